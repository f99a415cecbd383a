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

# $ZANDD_AMQP_URL fit to print: the password cut out (split at the last @, as zandd does).
shown_amqp_url() {
  local url="$ZANDD_AMQP_URL" rest userinfo
  case "$url" in
    *://*@*) ;;
    *) printf '%s\n' "$url"; return 0 ;;
  esac
  rest="${url#*://}"
  userinfo="${rest%@*}"
  printf '%s://%s@%s\n' "${url%%://*}" "${userinfo%%:*}" "${rest##*@}"
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

amqp_reachable() {
  "$ZANDD_VENV/bin/python" - <<'PY'
import os, socket, sys
from urllib.parse import urlsplit
url = urlsplit(os.environ["ZANDD_AMQP_URL"])
try:
    socket.create_connection((url.hostname or "localhost", url.port or 5672), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

ensure_rabbitmq() {
  amqp_reachable && return 0
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
      [ "$waited" -lt 90 ] || die "rabbitmq-server did not start within 90 s (see /var/log/rabbitmq)"
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

ensure_all() {
  ensure_system_packages
  ensure_venv
  ensure_rabbitmq
  ensure_node_example
}
