# Shared by ops/up and ops/test: make this machine ready to run ZANDD HSM. Idempotent.
# Sourced, not run. Every step says what it does; a step that cannot be done says what to run.

ZANDD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ZANDD_VENV="${ZANDD_VENV:-$ZANDD_ROOT/.venv}"
# The broker URL (with its password) travels in the environment only, never on a command line
# (every local user can read those with ps): zandd up and the reachability check read it there.
export ZANDD_AMQP_URL="${ZANDD_AMQP_URL:-amqp://guest:guest@localhost:5672/}"
# docker-compose validates compose/compose.yaml and prometheus brings promtool for the alert
# rules: the tests use only these command-line tools, no Docker engine or Prometheus server.
APT_PACKAGES=(swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config python3-venv docker-compose prometheus)

say() { printf 'zandd ops: %s\n' "$*" >&2; }

# The virtualenv's Python on this checkout's code (whichever checkout the venv was installed from).
zandd_python() {
  PYTHONPATH="$ZANDD_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$ZANDD_VENV/bin/python" "$@"
}

# $ZANDD_AMQP_URL fit to print, redacted as zandd shows it (contracts/urls.py: amqp://u:***@h/).
# Only after ensure_venv: it runs the project's own redaction.
shown_amqp_url() {
  zandd_python -c 'import os; from contracts.urls import redact_url; print(redact_url(os.environ["ZANDD_AMQP_URL"]))'
}
die() { say "$*"; exit 1; }

ensure_system_packages() {
  local missing=()
  local pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
  else
    die "missing system packages; run: sudo apt-get install -y ${missing[*]}"
  fi
}

find_python() {
  local candidate
  for candidate in "${ZANDD_PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  die "Python 3.11 or newer is needed (set ZANDD_PYTHON to its path)"
}

ensure_venv() {
  if [ ! -x "$ZANDD_VENV/bin/python" ]; then
    say "creating $ZANDD_VENV"
    "$(find_python)" -m venv "$ZANDD_VENV" || die "could not create the virtualenv $ZANDD_VENV"
  fi
  # Reinstall only when the dependency list changed since the last successful install.
  local stamp="$ZANDD_VENV/.zandd-installed"
  local want
  want="$(sha256sum "$ZANDD_ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing ZANDD HSM and its dependencies into $ZANDD_VENV (tpm2-pytss compiles: a few minutes the first time)"
    "$ZANDD_VENV/bin/python" -m pip install -q --upgrade pip >/dev/null || die "pip upgrade failed"
    "$ZANDD_VENV/bin/python" -m pip install -q -e "$ZANDD_ROOT[dev]" || die "pip install -e '.[dev]' failed"
    echo "$want" >"$stamp"
  fi
}

# Whether a broker of $ZANDD_AMQP_URL accepts TCP: 0 yes; 1 no, and every host is this machine;
# 3 no, and a host is elsewhere; 2 the URL is malformed (said, redacted). The hosts are read by
# contracts/brokers.py, as zandd reads them (a cluster's several hosts, a password with "#").
amqp_reachable() {
  zandd_python - <<'PY'
import os, socket, sys
from contracts.brokers import brokers
from contracts.errors import ConfigurationError
try:
    candidates = brokers(os.environ["ZANDD_AMQP_URL"])
except ConfigurationError as exc:
    print(f"zandd ops: ZANDD_AMQP_URL: {exc.message}", file=sys.stderr)
    sys.exit(2)
for broker in candidates:
    try:
        socket.create_connection((broker.host.strip("[]"), broker.port), timeout=2).close()
    except OSError:
        continue
    sys.exit(0)
local = {"localhost", "127.0.0.1", "[::1]"}
sys.exit(1 if all(broker.host in local for broker in candidates) else 3)
PY
}

ensure_rabbitmq() {
  local status=0
  amqp_reachable || status=$?
  case "$status" in
    0) return 0 ;;
    2) exit 1 ;;
    3) die "no broker answers at $(shown_amqp_url): start it, or set ZANDD_AMQP_URL to a broker that runs" ;;
  esac
  if command -v rabbitmq-server >/dev/null; then
    say "RabbitMQ is not answering; starting the local rabbitmq-server"
    # A node whose app was stopped (rabbitmqctl stop_app) only needs start_app.
    if ! timeout 60 rabbitmqctl -q start_app >/dev/null 2>&1; then
      rabbitmq-server -detached >/dev/null 2>&1 || true
    fi
    local waited=0
    until amqp_reachable; do
      sleep 1
      waited=$((waited + 1))
      [ "$waited" -lt 90 ] || die "rabbitmq-server did not start within 90 s (see /var/log/rabbitmq), or no broker listens at $(shown_amqp_url)"
    done
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    say "RabbitMQ is up"
  else
    die "no broker at $(shown_amqp_url) and no local rabbitmq-server; install one (apt-get install rabbitmq-server) or set ZANDD_AMQP_URL"
  fi
}

ensure_node_example() {
  local dir="$ZANDD_ROOT/examples/node-producer"
  [ -f "$dir/package-lock.json" ] || return 0
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    say "node/npm not found: skipping the Node.js example (the interop test will be skipped; install Node.js 20 to run it)"
    return 0
  fi
  local installed="$dir/node_modules/.package-lock.json"
  [ -e "$installed" ] || installed="$dir/node_modules"
  if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$installed" ]; then
    say "installing the Node.js example's dependencies (npm ci in $dir)"
    (cd "$dir" && npm ci --silent --no-audit --no-fund) || die "npm ci failed in $dir"
  fi
}

# How to run zandd from another shell (keys, health, dead letters) while ops/up runs: it is in
# the virtualenv, not on PATH, unless that virtualenv is active.
say_where_zandd_is() {
  [ "$(command -v zandd 2>/dev/null)" = "$ZANDD_VENV/bin/zandd" ] && return 0
  say "zandd is $ZANDD_VENV/bin/zandd; to have it on your PATH in another shell: source $ZANDD_VENV/bin/activate"
}

ensure_all() {
  ensure_system_packages
  ensure_venv
  ensure_rabbitmq
  ensure_node_example
}
