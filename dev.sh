#!/usr/bin/env bash
# Set everything up on a fresh Debian machine (Python >= 3.11), then run the demo or the tests.
#
#   bash dev.sh demo     # local broker + bundle server + 3 real agents: deploy, refuse, update, roll back
#   bash dev.sh test     # the whole test suite, on real mosquitto brokers, HTTP servers, SQLite files
#                        # and a local PostgreSQL (started here if it is installed and down)
#   bash dev.sh setup    # only set up
#
# Idempotent: a second run reuses .venv and skips what is installed.
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
# the registry's tests run on PostgreSQL too (deploy/registry/backend.py): a local server, trust auth
command -v pg_ctlcluster >/dev/null 2>&1 || command -v pg_isready >/dev/null 2>&1 || need_apt+=(postgresql)
# the dashboard's browser tests (tests/test_dashboard.py): headless chromium driven by selenium
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
# systemd-analyze verifies the unit in the tests (no running systemd needed)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
PY=""
for c in python3.13 python3.12 python3.11 python3; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>/dev/null; then
    PY=$(command -v "$c"); break
  fi
done
[ -n "$PY" ] || need_apt+=(python3 python3-venv)
# Azurite (Azure Blob emulator, for the tests) comes from npm, pinned in package.json
if [ -f package.json ] && ! command -v npm >/dev/null 2>&1; then need_apt+=(nodejs npm); fi
if [ -n "$PY" ] && ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then need_apt+=(python3-venv); fi

if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  [ -n "$PY" ] || PY=$(command -v python3)
fi

# PostgreSQL for the tests: up and reachable as postgres on 127.0.0.1:5432, or started here. A server
# that already answers (CI's service, a developer's own) is left alone.
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! pg_up && command -v pg_ctlcluster >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  cluster=$(pg_lsclusters -h 2>/dev/null | awk 'NR==1 {print $1" "$2}')
  if [ -z "$cluster" ]; then
    ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
    $SUDO pg_createcluster "$ver" main >/dev/null
    cluster="$ver main"
  fi
  # trust for local TCP connections: a test server, never one that holds real data
  hba=$(ls /etc/postgresql/${cluster% *}/main/pg_hba.conf)
  grep -q '^host all all 127.0.0.1/32 trust' "$hba" || \
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  $SUDO pg_ctlcluster $cluster start || $SUDO pg_ctlcluster $cluster reload
  for _ in $(seq 30); do pg_up && break; sleep 1; done
fi
pg_up || echo "warning: no PostgreSQL on 127.0.0.1:5432; the registry's PostgreSQL tests will be skipped" >&2

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
fi

# Microsoft's Azure ML inference server, pinned, in a venv of its own: tests/test_azureml_compat.py
# runs the same score.py files under it and under the agent and compares the answers. Its Flask,
# gunicorn and pydantic stay out of .venv, so the agent cannot come to depend on them by accident.
# image-wheels/ holds inference-schema and its dependencies as wheels for the agent's interpreter:
# the images of that test ship them (a device installs an image's wheels offline, --no-deps).
AML_PINS="azureml-inference-server-http==1.5.1 inference-schema==1.8 onnxruntime numpy"
aml_stamp=.venv-azureml/.installed-$(echo "$AML_PINS" | sha256sum | cut -c1-16)
if [ ! -f "$aml_stamp" ]; then
  [ -x .venv-azureml/bin/python ] || "$PY" -m venv .venv-azureml
  # shellcheck disable=SC2086
  .venv-azureml/bin/python -m pip install -q $AML_PINS
  rm -rf .venv-azureml/image-wheels
  .venv/bin/python -m pip download -q --only-binary :all: -d .venv-azureml/image-wheels inference-schema==1.8
  rm -f .venv-azureml/.installed-*; touch "$aml_stamp"
fi

if [ -f package-lock.json ]; then
  node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  [ "$node_major" -ge 20 ] || echo "warning: Node.js $node_major is older than 20; Azurite (blob-storage tests) may not run" >&2
  npm_stamp=node_modules/.installed-$(sha256sum package-lock.json | cut -c1-16)
  if [ ! -f "$npm_stamp" ]; then
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    touch "$npm_stamp"
  fi
fi

case "${1:-setup}" in
  setup) echo "ready: .venv/bin/edge-agent, .venv/bin/edge-deploy, .venv/bin/edge-sim" ;;
  demo) shift; exec .venv/bin/edge-sim demo "$@" ;;
  test) shift; exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@" ;;
  *) echo "usage: bash dev.sh [setup|demo|test]" >&2; exit 2 ;;
esac
