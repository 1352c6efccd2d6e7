#!/usr/bin/env bash
# Install edge-agent on a device as a hardened systemd service, or remove it. `install.sh --help`
# lists the options; docs/systemd.md explains the unit and what this script does, step by step.
#
# Idempotent: every step first looks at what is there and says "unchanged" when it matches, so a
# second run with the same flags changes no file and restarts nothing.
set -euo pipefail

prog=install.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
package=edge-ml

usage() {
  cat <<'EOF'
usage: install.sh [options]            install or update edge-agent as a systemd service
       install.sh --uninstall [--purge]

Where the agent comes from (pip installs it into /opt/edge-agent/venv):
  --source DIR        a checkout of the project (default: the one this script is in)
  --wheel FILE        a built wheel of the project instead
  --wheelhouse DIR    install offline: pip --no-index --find-links DIR, for the project's wheel
                      (unless --wheel or --source names it) and all its dependencies
  --pip-args "ARGS"   extra arguments for pip install, split on spaces (e.g. "--no-deps")
  --python PY         the Python (>= 3.11) that creates the venv (default: python3)

The configuration, /etc/edge-agent/agent.toml (written only when there is none):
  --device-id ID      the device's id (equal to its client certificate's CN)
  --broker HOST:PORT  the MQTT broker ([IPv6]:PORT works too)
  --ca FILE           CA of the broker (or of the IoT hub, optional there)   } copied to
  --cert FILE         this device's client certificate                       } /etc/edge-agent/certs,
  --key FILE          its private key                                        } mode 0640
  --trust-key FILE    a public key whose manifest signatures are accepted (repeatable; at least
                      one); copied to /etc/edge-agent/trust
  --iothub-connection-string-file FILE
                      Azure IoT Hub as the control channel, authenticated by a device connection
                      string (copied to /etc/edge-agent/certs/iothub-connection-string, mode 0640)
  --iothub-hostname HOST
                      Azure IoT Hub with X.509 instead: needs --cert and --key (--ca optional)
                      Either IoT Hub flag installs edge-ml[iothub] (the Azure IoT device SDK); the
                      base package, all that MQTT needs, goes without it
  --force-config      replace an existing agent.toml with one from the flags (the old one is kept
                      as agent.toml.bak)

The service:
  --accelerator       also install the accelerator drop-in (GPU/FPGA device access), as
                      /etc/systemd/system/edge-agent.service.d/accelerator.conf
  --user NAME         run as this existing user (and its primary group) instead of creating the
                      system user edge-agent
  --root DIR          install under DIR (/opt, /etc, /var/lib and /etc/systemd/system all move
                      there): for a disk image or a test. Never talks to a running systemd; the
                      unit is enabled offline (systemctl --root).

Removal:
  --uninstall         stop and disable the service, remove the unit, its drop-in and the venv;
                      keep /etc/edge-agent and /var/lib/edge-agent
  --purge             with --uninstall: also remove /etc/edge-agent, /var/lib/edge-agent,
                      /var/log/edge-agent and the edge-agent user

  -h, --help          this help

Exit status: 0 done, 1 a step failed, 2 bad or missing flags.
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$prog" "$*" >&2; }
fail() {
  printf '%s: error: %s\n' "$prog" "$*" >&2
  exit 1
}
usage_error() {
  printf '%s: %s\n' "$prog" "$*" >&2
  printf "run '%s --help' for the options\n" "$prog" >&2
  exit 2
}

# --- flags -----------------------------------------------------------------------------------------

root="" user_flag="" device_id="" broker="" ca="" cert="" key="" iothub_cs="" iothub_host=""
wheel="" source_dir="" wheelhouse="" pip_args="" python=python3
accelerator=0 force_config=0 uninstall=0 purge=0
trust_keys=()

while [ $# -gt 0 ]; do
  flag=$1 value="" has_value=0
  case "$flag" in
    --*=*) value=${flag#*=} flag=${flag%%=*} has_value=1 ;;
  esac
  case "$flag" in
    --root | --user | --device-id | --broker | --ca | --cert | --key | --trust-key | \
      --iothub-connection-string-file | --iothub-hostname | --wheel | --source | --wheelhouse | \
      --pip-args | --python)
      if [ "$has_value" -eq 0 ]; then
        [ $# -ge 2 ] || usage_error "$flag needs a value"
        value=$2
        shift
      fi
      [ -n "$value" ] || usage_error "$flag needs a non-empty value"
      ;;
    *) [ "$has_value" -eq 0 ] || usage_error "$flag takes no value" ;;
  esac
  shift
  case "$flag" in
    --root) root=$value ;;
    --user) user_flag=$value ;;
    --device-id) device_id=$value ;;
    --broker) broker=$value ;;
    --ca) ca=$value ;;
    --cert) cert=$value ;;
    --key) key=$value ;;
    --trust-key) trust_keys+=("$value") ;;
    --iothub-connection-string-file) iothub_cs=$value ;;
    --iothub-hostname) iothub_host=$value ;;
    --wheel) wheel=$value ;;
    --source) source_dir=$value ;;
    --wheelhouse) wheelhouse=$value ;;
    --pip-args) pip_args=$value ;;
    --python) python=$value ;;
    --accelerator) accelerator=1 ;;
    --force-config) force_config=1 ;;
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) usage_error "unknown option: $flag" ;;
  esac
done

[ "$purge" -eq 0 ] || [ "$uninstall" -eq 1 ] || usage_error "--purge goes with --uninstall"
[ -z "$wheel" ] || [ -z "$source_dir" ] || usage_error "--wheel and --source exclude each other"
[ -z "$iothub_cs" ] || [ -z "$iothub_host" ] ||
  usage_error "--iothub-connection-string-file and --iothub-hostname exclude each other"
if [ -n "$iothub_cs$iothub_host" ] && [ -n "$broker" ]; then
  usage_error "--broker is for MQTT; IoT Hub (--iothub-*) needs none"
fi
if [ -n "$iothub_cs" ] && [ -n "$cert$key" ]; then
  usage_error "a connection string authenticates by itself: drop --cert/--key, or use --iothub-hostname"
fi
if [ -n "$iothub_host" ] && { [ -z "$cert" ] || [ -z "$key" ]; }; then
  usage_error "--iothub-hostname (X.509) needs --cert and --key"
fi
if [ -n "$broker" ] && [ -n "$ca$cert$key" ] && { [ -z "$ca" ] || [ -z "$cert" ] || [ -z "$key" ]; }; then
  usage_error "mutual TLS: --ca, --cert and --key go together"
fi
if [ -n "$device_id" ] && ! [[ "$device_id" =~ ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$ ]]; then
  usage_error "--device-id '$device_id' may only use letters, digits and . _ : -"
fi
broker_host="" broker_port=""
if [ -n "$broker" ]; then
  if [[ "$broker" =~ ^\[([0-9A-Fa-f:.]+)\]:([0-9]+)$ ]] || [[ "$broker" =~ ^([A-Za-z0-9._-]+):([0-9]+)$ ]]; then
    broker_host=${BASH_REMATCH[1]} broker_port=${BASH_REMATCH[2]}
  else
    usage_error "--broker '$broker' is not HOST:PORT"
  fi
  if [ "$broker_port" -lt 1 ] || [ "$broker_port" -gt 65535 ]; then
    usage_error "--broker: $broker_port is not a TCP port"
  fi
fi
if [ -n "$iothub_host" ] && ! [[ "$iothub_host" =~ ^[A-Za-z0-9._-]+$ ]]; then
  usage_error "--iothub-hostname '$iothub_host' is not a host name"
fi
for pair in "--ca:$ca" "--cert:$cert" "--key:$key" "--iothub-connection-string-file:$iothub_cs" "--wheel:$wheel"; do
  name=${pair%%:*} path=${pair#*:}
  [ -z "$path" ] || [ -f "$path" ] || usage_error "$name: no such file: $path"
  [ -z "$path" ] || [ -r "$path" ] || usage_error "$name: cannot read $path"
done
for path in "${trust_keys[@]}"; do
  if ! [ -f "$path" ] || ! [ -r "$path" ]; then usage_error "--trust-key: no such readable file: $path"; fi
done
for pair in "--source:$source_dir" "--wheelhouse:$wheelhouse"; do
  name=${pair%%:*} path=${pair#*:}
  [ -z "$path" ] || [ -d "$path" ] || usage_error "$name: no such directory: $path"
done
read -r -a pip_extra <<<"$pip_args" || true

if [ -n "$root" ]; then
  mkdir -p "$root" || fail "cannot create --root $root"
  root=$(cd "$root" && pwd)
  [ "$root" != / ] || root=""
fi
if [ "$(id -u)" -ne 0 ] && [ -z "$root" ]; then
  fail "run as root (or with --root DIR to stage an install)"
fi
as_root=0
[ "$(id -u)" -ne 0 ] || as_root=1

prefix=$root/opt/edge-agent
venv=$prefix/venv
etc=$root/etc/edge-agent
config=$etc/agent.toml
state=$root/var/lib/edge-agent
logs=$root/var/log/edge-agent
unit_dir=$root/etc/systemd/system
unit=$unit_dir/edge-agent.service
dropin=$unit_dir/edge-agent.service.d/accelerator.conf
stamp=$prefix/install.stamp

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# systemd is asked to start, stop and reload only on a booted system, never for a --root install.
systemd_running() { [ -z "$root" ] && [ -d /run/systemd/system ]; }
have_systemctl() { command -v systemctl >/dev/null 2>&1; }
# systemctl for unit-file operations: offline (--root) for a staged install.
unitctl() {
  if [ -n "$root" ]; then systemctl --root="$root" "$@"; else systemctl "$@"; fi
}

# --- uninstall -------------------------------------------------------------------------------------

remove_path() { # PATH LABEL
  if [ -e "$1" ] || [ -L "$1" ]; then
    rm -rf -- "$1"
    say "$2: removed ($1)"
  else
    say "$2: absent (unchanged)"
  fi
}

if [ "$uninstall" -eq 1 ]; then
  if [ -e "$unit" ] && systemd_running; then
    systemctl disable --now edge-agent.service || warn "systemctl disable --now edge-agent failed"
    say "service: stopped and disabled"
  elif [ -e "$unit" ] && have_systemctl; then
    unitctl disable edge-agent.service >/dev/null 2>&1 || true
    say "service: disabled (offline${root:+, in $root})"
  else
    say "service: not installed (unchanged)"
  fi
  remove_path "$unit" "unit"
  remove_path "$dropin" "accelerator drop-in"
  rmdir "$(dirname "$dropin")" 2>/dev/null || true
  if systemd_running; then
    systemctl daemon-reload
    systemctl reset-failed edge-agent.service 2>/dev/null || true
  fi
  remove_path "$prefix" "venv"
  if [ "$purge" -eq 1 ]; then
    remove_path "$etc" "config"
    remove_path "$state" "state"
    remove_path "$logs" "logs"
    if [ -n "$user_flag" ]; then
      say "user $user_flag: given with --user, not ours to remove (unchanged)"
    elif [ -n "$root" ] && [ -f "$root/etc/passwd" ] && grep -q '^edge-agent:' "$root/etc/passwd"; then
      userdel --root "$root" edge-agent
      say "user edge-agent: removed"
    elif [ -z "$root" ] && getent passwd edge-agent >/dev/null; then
      userdel edge-agent
      say "user edge-agent: removed"
    else
      say "user edge-agent: absent (unchanged)"
    fi
  else
    say "kept $etc and $state (--purge removes them)"
  fi
  exit 0
fi

# --- install: what it needs, checked before any step -----------------------------------------------

write_config_file=0
if [ ! -f "$config" ] || [ "$force_config" -eq 1 ]; then
  write_config_file=1
  [ -n "$device_id" ] || usage_error "--device-id is needed to write $config"
  [ -n "$broker$iothub_cs$iothub_host" ] ||
    usage_error "--broker (or --iothub-connection-string-file / --iothub-hostname) is needed to write $config"
  [ ${#trust_keys[@]} -gt 0 ] ||
    usage_error "--trust-key is needed to write $config (the agent accepts no manifest without one)"
fi

# --- install: the user -----------------------------------------------------------------------------

passwd_db=/etc/passwd group_db=/etc/group
if [ -n "$user_flag" ]; then
  user=$user_flag
  getent passwd "$user" >/dev/null || usage_error "--user: no such user: $user"
  uid=$(id -u "$user")
  gid=$(id -g "$user")
  group=$(id -gn "$user")
  say "user $user: given with --user (unchanged)"
else
  user=edge-agent group=edge-agent
  if [ -n "$root" ]; then
    passwd_db=$root/etc/passwd group_db=$root/etc/group
    [ -f "$passwd_db" ] || fail "--root $root has no etc/passwd to add the user to; pass --user NAME"
  fi
  if awk -F: -v u="$user" '$1 == u { found = 1 } END { exit !found }' "$passwd_db" ||
    { [ -z "$root" ] && getent passwd "$user" >/dev/null; }; then
    say "user $user: exists (unchanged)"
  else
    # A system user with no login and its state directory as home: what pip or score.py write to
    # $HOME lands in the one writable place.
    in_root=()
    [ -z "$root" ] || in_root=(--root "$root")
    useradd "${in_root[@]}" --system --user-group --home-dir /var/lib/edge-agent \
      --no-create-home --shell /usr/sbin/nologin --comment "edge-agent ML deployment agent" "$user"
    say "user $user: created (system user, no login)"
  fi
  if [ -n "$root" ]; then
    uid=$(awk -F: -v u="$user" '$1 == u { print $3 }' "$passwd_db")
    gid=$(awk -F: -v u="$user" '$1 == u { print $4 }' "$passwd_db")
  else
    uid=$(id -u "$user")
    gid=$(id -g "$user")
  fi
fi
# Ownership is set only when we can: a staged install by a plain user keeps the caller's.
own_root="" own_user=""
if [ "$as_root" -eq 1 ]; then
  own_root=0:$gid own_user=$uid:$gid
fi

# --- install: files and directories ----------------------------------------------------------------

ensure_dir() { # PATH MODE OWNER(uid:gid or empty)
  local path=$1 mode=$2 own=$3
  if [ -d "$path" ] && [ "$(stat -c %a "$path")" = "${mode#0}" ] &&
    { [ -z "$own" ] || [ "$(stat -c %u:%g "$path")" = "$own" ]; }; then
    say "directory $path: unchanged"
    return
  fi
  mkdir -p "$path"
  chmod "$mode" "$path"
  [ -z "$own" ] || chown "$own" "$path"
  say "directory $path: ready (mode $mode)"
}

ensure_file() { # SRC DEST MODE OWNER LABEL; sets $changed
  local src=$1 dest=$2 mode=$3 own=$4 label=$5
  changed=0
  if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ] &&
    { [ -z "$own" ] || [ "$(stat -c %u:%g "$dest")" = "$own" ]; }; then
    say "$label $dest: unchanged"
    return
  fi
  mkdir -p "$(dirname "$dest")"
  # Into a temporary name and renamed: the service never reads half a file.
  cp "$src" "$dest.tmp.$$"
  chmod "$mode" "$dest.tmp.$$"
  [ -z "$own" ] || chown "$own" "$dest.tmp.$$"
  mv -f "$dest.tmp.$$" "$dest"
  changed=1
  say "$label $dest: installed (mode $mode)"
}

# The code is root's: the agent runs it but can never rewrite it.
ensure_dir "$root/opt" 0755 "${own_root:+0:0}"
ensure_dir "$prefix" 0755 "${own_root:+0:0}"
# Readable by the agent's group only: keys and connection strings live here.
ensure_dir "$etc" 0750 "$own_root"
ensure_dir "$etc/certs" 0750 "$own_root"
ensure_dir "$etc/trust" 0750 "$own_root"
ensure_dir "$state" 0750 "$own_user"

# --- install: the package --------------------------------------------------------------------------

if [ -x "$venv/bin/python" ]; then
  say "venv $venv: exists (unchanged)"
else
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    fail "$python is not Python >= 3.11 (choose one with --python)"
  "$python" -m venv "$venv" || fail "cannot create the venv (Debian: apt-get install python3-venv)"
  say "venv $venv: created"
fi
"$venv/bin/python" -m pip --version >/dev/null 2>&1 || fail "the venv $venv has no pip"

if [ -z "$wheel" ] && [ -z "$source_dir" ] && [ -z "$wheelhouse" ]; then
  source_dir=$(dirname "$here")
  [ -f "$source_dir/pyproject.toml" ] ||
    usage_error "this script is not in a checkout: name the agent with --wheel, --source or --wheelhouse"
fi

# The files pip takes from a checkout: pyproject plus every top-level package.
source_files() { # DIR
  local dir=$1 d
  {
    for f in pyproject.toml setup.py setup.cfg README.md; do
      [ ! -f "$dir/$f" ] || printf '%s\n' "$f"
    done
    for d in "$dir"/*/; do
      [ -f "$d/__init__.py" ] || continue
      (cd "$dir" && find "$(basename "$d")" -type f ! -path '*/__pycache__/*' ! -name '*.pyc')
    done
  } | LC_ALL=C sort
}
# What goes into pip, as one digest: the same digest as last time means the same install.
source_digest() { # DIR
  source_files "$1" | (cd "$1" && tr '\n' '\0' | xargs -0 -r sha256sum) | sha256sum | cut -c1-64
}
if [ -n "$wheel" ]; then
  target=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
  digest="wheel $(sha256sum "$wheel" | cut -c1-64)"
elif [ -n "$source_dir" ]; then
  target=$(cd "$source_dir" && pwd)
  digest="source $(source_digest "$target")"
else
  target=$package
  digest="package $package"
fi
pip_index=()
if [ -n "$wheelhouse" ]; then
  wheelhouse=$(cd "$wheelhouse" && pwd)
  pip_index=(--no-index --find-links "$wheelhouse")
  digest="$digest; wheelhouse $(cd "$wheelhouse" && find . -type f -printf '%P %s\n' | LC_ALL=C sort | sha256sum | cut -c1-64)"
fi
# The base package is what the agent needs over MQTT; the IoT Hub SDK is the [iothub] extra, added
# when the flags configure IoT Hub or the kept agent.toml names it (a rerun without flags).
extras=""
if [ -n "$iothub_cs$iothub_host" ] ||
  { [ "$write_config_file" -eq 0 ] && grep -Eq '^[[:space:]]*transport[[:space:]]*=[[:space:]]*"iothub"' "$config"; }; then
  extras="[iothub]"
fi
digest="$digest; pip-args $pip_args; extras $extras"
package_changed=0
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && [ -x "$venv/bin/edge-agent" ]; then
  say "package $package: unchanged"
else
  pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
  if [ -n "$source_dir" ]; then
    # Built once into a wheel, so that both passes below install the very same build, and from a
    # copy: the build writes build/ and *.egg-info, and the checkout may be read-only or someone's.
    mkdir "$tmp/src"
    source_files "$target" | tar -C "$target" -cf - -T - | tar -C "$tmp/src" -xf - ||
      fail "cannot copy the sources of $target"
    "${pip[@]}" wheel --quiet --no-deps --wheel-dir "$tmp/wheel" "${pip_index[@]}" "${pip_extra[@]}" "$tmp/src" ||
      fail "building the agent from $target failed"
    target=$(find "$tmp/wheel" -name 'edge_ml-*.whl' | head -n 1)
    [ -n "$target" ] || fail "pip built no edge_ml wheel from $source_dir"
  fi
  # First the package with its dependencies, then the package alone, reinstalled: pip skips a
  # wheel whose version is already installed, and a rebuild of the same version is new code.
  "${pip[@]}" install --quiet "${pip_index[@]}" "${pip_extra[@]}" "$target$extras" || fail "pip install failed"
  "${pip[@]}" install --quiet --force-reinstall --no-deps "${pip_index[@]}" "${pip_extra[@]}" "$target" ||
    fail "pip install failed"
  [ -x "$venv/bin/edge-agent" ] || fail "pip installed no $venv/bin/edge-agent"
  printf '%s\n' "$digest" >"$stamp"
  package_changed=1
  say "package $package${extras}: installed into $venv"
fi

# --- install: the configuration --------------------------------------------------------------------

secret_changed=0
install_secret() { # SRC NAME-IN-ETC LABEL
  ensure_file "$1" "$etc/$2" 0640 "$own_root" "$3"
  [ "$changed" -eq 0 ] || secret_changed=1
}
[ -z "$ca" ] || install_secret "$ca" certs/ca.pem "CA"
[ -z "$cert" ] || install_secret "$cert" certs/device.pem "certificate"
[ -z "$key" ] || install_secret "$key" certs/device.key "private key"
[ -z "$iothub_cs" ] || install_secret "$iothub_cs" certs/iothub-connection-string "connection string"
trust_rel=()
for path in "${trust_keys[@]}"; do
  name=$(basename "$path")
  for seen in "${trust_rel[@]}"; do
    [ "$seen" != "trust/$name" ] || usage_error "--trust-key: two keys named $name"
  done
  install_secret "$path" "trust/$name" "trust key"
  trust_rel+=("trust/$name")
done

# Paths in the file are relative to /etc/edge-agent (the agent resolves them against the file's
# directory), so the same file is right in a --root staging tree and on the device.
write_config() {
  printf '# edge-agent configuration, written by systemd/install.sh (docs/systemd.md).\n'
  printf '# Relative paths are relative to this directory. Every setting can be overridden by\n'
  printf '# EDGE_AGENT_<SECTION>__<NAME>, e.g. in a drop-in made with "systemctl edit edge-agent".\n'
  printf 'device_id = "%s"\n' "$device_id"
  printf 'state_dir = "/var/lib/edge-agent"\n'
  if [ -n "$iothub_cs$iothub_host" ]; then
    printf 'transport = "iothub"\n\n[iothub]\n'
    if [ -n "$iothub_cs" ]; then
      printf 'connection_string_file = "certs/iothub-connection-string"\n'
    else
      printf 'hostname = "%s"\ncert = "certs/device.pem"\nkey = "certs/device.key"\n' "$iothub_host"
    fi
    [ -z "$ca" ] || printf 'ca = "certs/ca.pem"\n'
  else
    printf 'transport = "mqtt"\n\n[mqtt]\nhost = "%s"\nport = %s\n' "$broker_host" "$broker_port"
    if [ -n "$ca" ]; then
      printf 'ca = "certs/ca.pem"\ncert = "certs/device.pem"\nkey = "certs/device.key"\n'
    fi
  fi
  printf '\n[trust]\nkeys = ['
  local sep=""
  for rel in "${trust_rel[@]}"; do
    printf '%s"%s"' "$sep" "$rel"
    sep=", "
  done
  printf ']\n'
}

config_changed=0
if [ "$write_config_file" -eq 0 ]; then
  if [ -n "$device_id" ] && [ -n "$broker$iothub_cs$iothub_host" ] && [ ${#trust_keys[@]} -gt 0 ] &&
    write_config >"$tmp/agent.toml" && cmp -s "$tmp/agent.toml" "$config"; then
    say "config $config: unchanged"
  else
    say "config $config: kept the existing file (--force-config replaces it from the flags)"
  fi
else
  write_config >"$tmp/agent.toml"
  if [ -f "$config" ] && ! cmp -s "$tmp/agent.toml" "$config"; then
    cp -p "$config" "$config.bak"
    say "config $config: previous version kept as $config.bak"
  fi
  ensure_file "$tmp/agent.toml" "$config" 0640 "$own_root" "config"
  config_changed=$changed
fi

# The environment the service gets: none of the caller's EDGE_AGENT_* overrides.
check=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$venv/bin/edge-agent" check-config --config "$config")
if [ "$as_root" -eq 1 ] && [ -z "$root" ] && [ "$user" != root ] && command -v runuser >/dev/null 2>&1; then
  check=(runuser -u "$user" -- "${check[@]}") # the agent's user must be able to read it all
fi
if ! out=$("${check[@]}" 2>&1); then
  fail "$config does not validate: $out"
fi
say "config $config: valid ($out)"

# --- install: the unit -----------------------------------------------------------------------------

sed -e "s/^User=edge-agent\$/User=$user/" -e "s/^Group=edge-agent\$/Group=$group/" \
  "$here/edge-agent.service" >"$tmp/edge-agent.service"
ensure_file "$tmp/edge-agent.service" "$unit" 0644 "${own_root:+0:0}" "unit"
unit_changed=$changed
if [ "$accelerator" -eq 1 ]; then
  ensure_file "$here/accelerator.conf" "$dropin" 0644 "${own_root:+0:0}" "accelerator drop-in"
  [ "$changed" -eq 0 ] || unit_changed=1
  for g in render video; do
    if ! awk -F: -v g="$g" '$1 == g { found = 1 } END { exit !found }' "$group_db" &&
      ! { [ -z "$root" ] && getent group "$g" >/dev/null; }; then
      warn "group $g does not exist: the service will not start with the accelerator drop-in (SupplementaryGroups=)"
    fi
  done
elif [ -f "$dropin" ]; then
  say "accelerator drop-in $dropin: present, kept (--uninstall removes it)"
fi

# --- install: enable and start ---------------------------------------------------------------------

anything_changed=$((package_changed | config_changed | secret_changed | unit_changed))
if systemd_running; then
  [ "$unit_changed" -eq 0 ] || systemctl daemon-reload
  if ! systemctl is-enabled --quiet edge-agent.service; then
    systemctl enable --quiet edge-agent.service
    say "service: enabled"
  else
    say "service: enabled (unchanged)"
  fi
  if ! systemctl is-active --quiet edge-agent.service; then
    systemctl start edge-agent.service
    say "service: started (journalctl -u edge-agent -f shows its log)"
  elif [ "$anything_changed" -ne 0 ]; then
    systemctl restart edge-agent.service
    say "service: restarted (its package, configuration or unit changed)"
  else
    say "service: running (unchanged)"
  fi
elif ! have_systemctl; then
  say "service: systemctl not found; once systemd runs: systemctl enable --now edge-agent"
else
  [ -n "$root" ] || say "systemd is not running here (a container or an image build?): enabling offline"
  if [ "$(unitctl is-enabled edge-agent.service 2>/dev/null || true)" = enabled ]; then
    say "service: enabled (unchanged)"
  else
    unitctl enable edge-agent.service >/dev/null 2>&1 || fail "systemctl${root:+ --root=$root} enable edge-agent failed"
    say "service: enabled (offline${root:+, in $root}); it starts at the next boot"
  fi
fi
