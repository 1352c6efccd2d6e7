// The fleet dashboard: REST for the first view, then the event stream (/api/events) for changes.
// No framework and no build step; everything it needs comes from the same server.
"use strict";

const S = { token: null, devices: new Map(), deployments: new Map(), models: [], images: [],
            device: null, deployment: null, progress: new Map(), stream: null };

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;  // CSSOM: allowed under the page's CSP, unlike style=""
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k ?? "–"));
  return e;
}
const fmtTags = (t) => Object.entries(t || {}).map(([k, v]) => `${k}=${v}`).join(", ");
const fmtTime = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "–");
const fmtNum = (x, d = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const DONE = ["active", "failed", "reverted", "revert_failed"];

// -- the API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, err) { super(`${err.code}: ${err.message}`); this.status = status; this.err = err; }
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${S.token}` } };
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const r = await fetch(path, init);
  const doc = await r.json();
  if (!r.ok) {
    if (r.status === 401) showLogin(doc.error.message);
    throw new ApiError(r.status, doc.error);
  }
  return doc;
}

// -- login -----------------------------------------------------------------------------------------

function showLogin(message) {
  sessionStorage.removeItem("edge-token");
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

async function start() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("edge-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname);  // the token leaves the address bar
  }
  S.token = sessionStorage.getItem("edge-token");
  if (!S.token) { showLogin(); return; }
  try { await loadAll(); } catch (e) { if (e.status !== 401) throw e; return; }
  $("#login").hidden = true;
  $("#app").hidden = false;
  stream();
  setInterval(() => loadMetrics().catch(() => {}), 10000);
}

async function loadAll() {
  const [devices, deployments, models, images] = await Promise.all([
    api("GET", "/api/devices"), api("GET", "/api/deployments"), api("GET", "/api/models"), api("GET", "/api/images"),
  ]);
  S.devices = new Map(devices.map((d) => [d.id, d]));
  S.deployments = new Map(deployments.map((d) => [d.id, d]));
  for (const d of deployments) sample(d);
  S.models = models; S.images = images;
  renderFleet(); renderDeployments(); renderRegistry();
  if (S.deployment) await selectDeployment(S.deployment);
  if (S.device) await selectDevice(S.device);
  await loadMetrics();
}

// -- the event stream (fetch, not EventSource: the token goes in a header, never in a URL) ---------

async function stream() {
  const live = $("#live");
  try {
    const r = await fetch("/api/events", { headers: { Authorization: `Bearer ${S.token}` } });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    live.textContent = "live"; live.className = "badge on";
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        onMessage(buf.slice(0, i));
        buf = buf.slice(i + 2);
      }
    }
  } catch (e) { /* reconnects below */ }
  live.textContent = "reconnecting"; live.className = "badge off";
  setTimeout(() => loadAll().then(stream, stream), 2000);  // what was missed is reloaded
}

function onMessage(block) {
  let kind = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (!data) return;
  const doc = JSON.parse(data);
  if (kind === "device") {
    S.devices.set(doc.id, doc);
    renderFleet();
    if (S.device === doc.id) selectDevice(doc.id);
  } else if (kind === "deployment") {
    S.deployments.set(doc.id, doc);
    sample(doc);
    renderDeployments();
    if (S.deployment === doc.id) renderDeployment(doc);
  }
}

// -- fleet -----------------------------------------------------------------------------------------

function renderFleet() {
  const q = $("#search").value.trim().toLowerCase();
  const want = $("#state-filter").value;
  const states = new Set([...S.devices.values()].map((d) => d.state).filter(Boolean));
  const sel = $("#state-filter");
  for (const s of states) if (![...sel.options].some((o) => o.value === s)) sel.append(el("option", { value: s }, s));
  const body = $("#fleet tbody");
  body.replaceChildren();
  for (const d of [...S.devices.values()].sort((a, b) => a.id.localeCompare(b.id))) {
    const text = [d.id, d.image, d.state, fmtTags(d.tags)].join(" ").toLowerCase();
    if ((q && !text.includes(q)) || (want && d.state !== want)) continue;
    const tr = el("tr", { "data-device": d.id, class: S.device === d.id ? "selected" : "" },
      el("th", { scope: "row" }, el("button", { class: "link", onclick: () => selectDevice(d.id),
        "aria-label": `show device ${d.id}` }, d.id)),
      el("td", { class: "image" }, d.image),
      el("td", { class: `state state-${d.state}` }, `${d.state ?? "–"}${d.online ? "" : " (offline)"}`),
      el("td", {}, fmtTime(d.last_seen)),
      el("td", {}, fmtNum(d.p99_ms)),
      el("td", {}, d.error_rate === null || d.error_rate === undefined ? "–" : `${(d.error_rate * 100).toFixed(2)}%`),
      el("td", {}, d.drift === null || d.drift === undefined ? "–" : String(typeof d.drift === "object" ? JSON.stringify(d.drift) : d.drift)),
      el("td", { class: "tags" }, fmtTags(d.tags)),
      el("td", {}, el("button", { "data-action": "tag", onclick: () => tagDevice(d.id), "aria-label": `tag ${d.id}` }, "Tag…")));
    body.append(tr);
  }
}

async function selectDevice(id) {
  S.device = id;
  const d = await api("GET", `/api/devices/${encodeURIComponent(id)}`);
  $("#device-panel").hidden = false;
  $("#device-h").textContent = `Device ${d.id}: ${d.image ?? "no image"}, ${d.state ?? "unknown"}`;
  const body = $("#device-history tbody");
  body.replaceChildren(...d.history.map((h) => el("tr", {},
    el("td", {}, el("button", { class: "link", onclick: () => selectDeployment(h.deployment_id) }, h.deployment_id)),
    el("td", {}, h.image), el("td", {}, String(h.wave ?? "–")),
    el("td", { class: `state-${h.state}` }, h.state), el("td", { class: `state-${h.deployment_state}` }, h.deployment_state),
    el("td", {}, h.error ? `${h.error.code ?? ""} ${h.error.message ?? ""}` : "–"))));
  $("#device-status").textContent = JSON.stringify(d.status, null, 2);
  renderFleet();
}

async function tagDevice(id) {
  const dev = S.devices.get(id);
  const ok = await confirmAction(`Change the tags of ${id} (now: ${fmtTags(dev.tags) || "none"})?`, true, async () => {
    const set = {};
    for (const pair of $("#tag-set").value.split(",").map((s) => s.trim()).filter(Boolean)) {
      const i = pair.indexOf("=");
      if (i < 1) throw new Error(`${pair}: write key=value`);
      set[pair.slice(0, i)] = pair.slice(i + 1);
    }
    const remove = $("#tag-remove").value.split(",").map((s) => s.trim()).filter(Boolean);
    const row = await api("POST", `/api/devices/${encodeURIComponent(id)}/tags`, { set, remove });
    S.devices.set(row.id, row);
  });
  if (ok) renderFleet();
}

// -- deployments -------------------------------------------------------------------------------------

function doneCount(d) { return DONE.reduce((n, k) => n + (d.counts[k] || 0), 0); }

function sample(d) {
  // rollout progress over time, for the plot: one point per change seen
  const pts = S.progress.get(d.id) || [];
  const frac = d.devices ? doneCount(d) / d.devices : 0;
  const t = Date.now() / 1000;
  if (!pts.length) pts.push([d.created_at, 0]);
  if (pts[pts.length - 1][1] !== frac || d.state !== pts.state) pts.push([t, frac]);
  pts.state = d.state;
  S.progress.set(d.id, pts);
}

function actionsFor(d) {
  const can = {
    pause: d.state === "running", resume: d.state === "paused", abort: ["running", "paused"].includes(d.state),
    rollback: ["running", "paused", "succeeded", "aborted"].includes(d.state),
  };
  const label = { pause: "Pause", resume: "Resume", abort: "Abort", rollback: "Roll back" };
  return Object.keys(label).filter((c) => can[c]).map((c) =>
    el("button", { "data-action": c, class: c === "rollback" || c === "abort" ? "danger" : "",
      onclick: () => command(d.id, c), "aria-label": `${label[c]} ${d.id}` }, label[c]));
}

function renderDeployments() {
  const body = $("#deployments tbody");
  const rows = [...S.deployments.values()].sort((a, b) => b.created_at - a.created_at);
  body.replaceChildren(...rows.map((d) => {
    const done = doneCount(d);
    return el("tr", { "data-deployment": d.id, class: S.deployment === d.id ? "selected" : "" },
      el("th", { scope: "row" }, el("button", { class: "link", onclick: () => selectDeployment(d.id) }, d.id)),
      el("td", {}, d.image), el("td", { class: `state state-${d.state}` }, d.state),
      el("td", { class: "wave-no" }, `${d.wave}/${d.waves}`),
      el("td", {}, el("span", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": String(d.devices),
        "aria-valuenow": String(done), "aria-label": `${d.id} progress` }, el("span", { style: `width:${d.devices ? 100 * done / d.devices : 0}%` })),
        ` ${done}/${d.devices}`),
      el("td", { class: "actions" }, ...actionsFor(d)));
  }));
}

async function selectDeployment(id) {
  S.deployment = id;
  const d = await api("GET", `/api/deployments/${encodeURIComponent(id)}`);
  S.deployments.set(id, { ...S.deployments.get(id), ...d });
  renderDeployments();
  renderDeployment(d);
}

function renderDeployment(d) {
  $("#dep-panel").hidden = false;
  $("#dep-h").textContent = `Deployment ${d.id}: ${d.image}`;
  $("#dep-summary").textContent =
    `state ${d.state} · wave ${d.wave}/${d.waves} · ${doneCount(d)}/${d.devices} devices done` +
    (d.phase ? ` · phase ${d.phase}` : "") + (d.reason ? ` · ${d.reason}` : "");
  const waves = new Map();
  for (const m of d.members) { if (!waves.has(m.wave)) waves.set(m.wave, []); waves.get(m.wave).push(m); }
  $("#waves").replaceChildren(...[...waves.entries()].sort((a, b) => a[0] - b[0]).map(([w, ms]) => {
    const counts = {};
    for (const m of ms) counts[m.state] = (counts[m.state] || 0) + 1;
    const done = ms.filter((m) => DONE.includes(m.state)).length;
    return el("div", { class: "wave", "data-wave": String(w) },
      el("strong", {}, `Wave ${w}${w === d.wave ? " (current)" : ""}: `),
      el("span", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": String(ms.length),
        "aria-valuenow": String(done), "aria-label": `wave ${w} progress` }, el("span", { style: `width:${100 * done / ms.length}%` })),
      el("span", { class: "wave-counts" }, ` ${Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ")}`),
      el("span", {}, ` — ${ms.map((m) => `${m.device_id}: ${m.state}`).join(", ")}`));
  }));
  const events = d.events || [];
  $("#gates").replaceChildren(...events.filter((e) => e.kind.startsWith("gate")).map((e) =>
    el("li", {}, `${fmtTime(e.ts)} ${e.kind} (wave ${e.detail.wave ?? "?"}): ` +
      (e.detail.violations?.length ? e.detail.violations.join("; ") :
        `p99 ${fmtNum(e.detail.current?.p99_ms)} ms vs ${fmtNum(e.detail.baseline?.p99_ms)} ms, error rate ${fmtNum(e.detail.current?.error_rate, 4)}`) +
      (e.detail.note ? ` — ${e.detail.note}` : ""))));
  if (!$("#gates").children.length) $("#gates").append(el("li", {}, "no health gate has judged a wave yet"));
  $("#dep-events tbody").replaceChildren(...events.slice().reverse().map((e) =>
    el("tr", {}, el("td", {}, fmtTime(e.ts)), el("td", {}, e.kind), el("td", {}, JSON.stringify(e.detail)))));
  const pts = S.progress.get(d.id) || [];
  plot($("#progress-plot"), [{ name: "devices done", points: pts }], (v) => `${Math.round(v * 100)}%`, 1);
}

async function command(id, cmd) {
  const words = { pause: "Pause", resume: "Resume", abort: "Abort", rollback: "Roll back" };
  const what = { pause: "start no further wave", resume: "go on with the next wave",
    abort: "start no further wave, ever", rollback: "put every device it updated back on its previous image" };
  await confirmAction(`${words[cmd]} ${id}: ${what[cmd]}?`, false, async () => {
    const d = await api("POST", `/api/deployments/${encodeURIComponent(id)}/${cmd}`);
    S.deployments.set(id, { ...S.deployments.get(id), ...d });
    renderDeployments();
  });
}

// -- the confirmation dialog ------------------------------------------------------------------------

function confirmAction(text, withTags, action) {
  const dlg = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-error").textContent = "";
  $("#tag-fields").hidden = !withTags;
  $("#tag-set").value = ""; $("#tag-remove").value = "";
  return new Promise((resolve) => {
    const done = (v) => { ok.onclick = null; cancel.onclick = null; dlg.close(); resolve(v); };
    const ok = $("#confirm-ok"), cancel = $("#confirm-cancel");
    cancel.onclick = () => done(false);
    ok.onclick = async () => {
      try { await action(); done(true); } catch (e) { $("#confirm-error").textContent = e.message; }
    };
    dlg.showModal();
    (withTags ? $("#tag-set") : cancel).focus();  // the safe choice has the focus
  });
}

// -- registry and metrics -----------------------------------------------------------------------------

function renderRegistry() {
  $("#models tbody").replaceChildren(...S.models.map((m) => el("tr", {},
    el("th", { scope: "row" }, m.ref), el("td", {}, fmtTags(m.tags)), el("td", {}, fmtTags(m.properties)),
    el("td", {}, m.images.join(", ") || "–"))));
  $("#images tbody").replaceChildren(...S.images.map((i) => el("tr", { "data-image": i.ref },
    el("th", { scope: "row" }, i.ref), el("td", {}, i.models.join(", ")),
    el("td", {}, i.deployments.join(", ") || "–"), el("td", { class: "running" }, i.devices.join(", ") || "–"))));
}

async function loadMetrics() {
  const m = await api("GET", "/api/metrics?window=900&step=15");
  const series = (key) => m.series.map((s) => ({ name: s.image,
    points: s.points.filter((p) => p[key] !== null).map((p) => [p.t, p[key]]) }));
  plot($("#plot-p99"), series("p99_ms"), (v) => `${v.toFixed(1)}`);
  plot($("#plot-err"), series("error_rate"), (v) => `${(v * 100).toFixed(1)}%`);
}

const COLORS = ["#1a73e8", "#d93025", "#188038", "#e37400", "#9334e6", "#007b83"];

function plot(box, series, fmt, yMax) {
  // an inline SVG line chart: time on x, the value on y, one line per series, and a legend
  const NS = "http://www.w3.org/2000/svg";
  const W = 600, H = 160, L = 50, B = 20;
  const all = series.flatMap((s) => s.points);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  const title = document.createElementNS(NS, "title");
  title.textContent = series.map((s) => s.name).join(", ") || "no data";
  svg.append(title);
  if (all.length) {
    const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]), t0 + 1);
    const top = yMax ?? Math.max(...all.map((p) => p[1]), 1e-9) * 1.1;
    const x = (t) => L + (W - L - 5) * (t - t0) / (t1 - t0), y = (v) => H - B - (H - B - 5) * v / top;
    for (const [v, label] of [[0, fmt(0)], [top, fmt(top)]]) {
      const tx = document.createElementNS(NS, "text");
      tx.setAttribute("x", "2"); tx.setAttribute("y", String(y(v) + 4)); tx.setAttribute("font-size", "10");
      tx.textContent = label; svg.append(tx);
    }
    series.forEach((s, i) => {
      if (!s.points.length) return;
      const pl = document.createElementNS(NS, "polyline");
      pl.setAttribute("points", s.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "));
      pl.setAttribute("fill", "none"); pl.setAttribute("stroke", COLORS[i % COLORS.length]); pl.setAttribute("stroke-width", "2");
      svg.append(pl);
    });
  }
  const legend = el("div", { class: "legend" }, ...series.map((s, i) =>
    el("span", { style: `color:${COLORS[i % COLORS.length]}` }, `■ ${s.name}`)));
  box.replaceChildren(svg, legend);
}

// -- wiring ------------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#search").addEventListener("input", renderFleet);
  $("#state-filter").addEventListener("change", renderFleet);
  $("#login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("edge-token", $("#token").value.trim());
    start();
  });
  start();
});
