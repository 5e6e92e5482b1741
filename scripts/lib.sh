#!/usr/bin/env bash
# Shared by scripts/test and scripts/up: install what a fresh Debian machine lacks, idempotently.
# Source it after `cd` to the repository root with REPO set.
START=$(date +%s)

say()  { printf '\033[1m==> %s\033[0m\n' "$*"; }
warn() { printf '\033[33mwarning:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 2; }
elapsed() { echo "$(( $(date +%s) - START ))s"; }

# --- privileges for apt-get: root, or passwordless sudo, or nothing ---------------------------
if [ "$(id -u)" -eq 0 ]; then
  AS_ROOT=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  AS_ROOT=(sudo -n)
else
  AS_ROOT=(false)
fi
APT_UPDATED=0
apt_install() {
  if [ "${AS_ROOT[0]:-}" = false ] || ! command -v apt-get >/dev/null 2>&1; then
    return 1
  fi
  if [ "$APT_UPDATED" = 0 ]; then
    "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends -o Dpkg::Options::=--force-confold "$@" >/dev/null
}

# --- PostgreSQL server binaries (the `postgres` test fixture runs its own throwaway cluster) ---
have_postgres() {
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && return 0
  command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && return 0
  command -v initdb >/dev/null 2>&1
}
docker_answers() {
  command -v docker >/dev/null 2>&1 && timeout 5 docker info >/dev/null 2>&1
}
ensure_postgres() {
  if [ -n "${BULKHEAD_TEST_POSTGRES_URL:-}" ] || have_postgres; then return 0; fi
  if docker_answers; then
    say "no local PostgreSQL; tests will start postgres:15 with testcontainers"
    return 0
  fi
  say "installing PostgreSQL server binaries (apt-get install postgresql)"
  # Don't let the package create and start a 'main' cluster: the tests bring their own.
  if [ ! -e /etc/postgresql-common/createcluster.conf ] && [ "${AS_ROOT[0]:-}" != false ]; then
    "${AS_ROOT[@]}" mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | "${AS_ROOT[@]}" tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  apt_install postgresql || die "PostgreSQL server binaries are missing and I can't install them.
  Run as root: apt-get install -y postgresql   (or start a Docker engine, or set
  BULKHEAD_TEST_POSTGRES_URL=postgresql://superuser:password@host:port/postgres)"
  have_postgres || die "apt-get installed postgresql but no initdb was found"
}

# --- PgBouncer (the `pgbouncer` test fixture runs its own, in transaction pooling mode) ---------
have_pgbouncer() {
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}
ensure_pgbouncer() {
  if have_pgbouncer; then return 0; fi
  say "installing PgBouncer (apt-get install pgbouncer)"
  # Debian would start (and enable at boot) a system pgbouncer on port 6432: the tests bring
  # their own. A policy-rc.d that answers 101 stops invoke-rc.d and deb-systemd-invoke from
  # starting it; ours is removed afterwards, an existing one is left alone.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ] && [ "${AS_ROOT[0]:-}" != false ]; then
    printf '#!/bin/sh\nexit 101\n' | "${AS_ROOT[@]}" tee "$policy" >/dev/null && "${AS_ROOT[@]}" chmod 755 "$policy" \
      && made_policy=1
  fi
  local ok=0
  apt_install pgbouncer && ok=1
  if [ "$made_policy" = 1 ]; then "${AS_ROOT[@]}" rm -f "$policy"; fi
  [ "$ok" = 1 ] || die "PgBouncer is missing and I can't install it.
  Run as root: apt-get install -y --no-install-recommends pgbouncer"
  if command -v systemctl >/dev/null 2>&1; then
    "${AS_ROOT[@]}" systemctl disable pgbouncer.service >/dev/null 2>&1 || true
  fi
  have_pgbouncer || die "apt-get installed pgbouncer but no pgbouncer binary was found"
}

# --- Python 3.11+ and the virtualenv ----------------------------------------------------------
pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.11 python3 python; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}
ensure_venv() {
  if [ -n "${BULKHEAD_VENV:-}" ]; then VENV=$BULKHEAD_VENV
  elif [ -n "${VIRTUAL_ENV:-}" ]; then VENV=$VIRTUAL_ENV
  else VENV=$REPO/.venv
  fi
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' 2>/dev/null; then return 0; fi
  local py
  py=$(pick_python) || die "Python 3.11 or newer is required (apt-get install -y python3)"
  say "creating virtualenv $VENV with $($py --version 2>&1)"
  rm -rf "$VENV"
  if ! "$py" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    local ver
    ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    say "installing python3-venv (Debian ships venv separately)"
    apt_install python3-venv "python$ver-venv" || apt_install python3-venv \
      || die "the venv module is missing: run as root: apt-get install -y python3-venv"
    "$py" -m venv "$VENV" || die "could not create $VENV"
  fi
}

# _install_quietly LOG PATTERN COMMAND...: run an installer with its whole output in LOG and, on screen,
# only the lines matching PATTERN (one per package), so a slow download is visibly progressing.
_install_quietly() {
  local log=$1 pattern=$2 rc
  shift 2
  set +o pipefail
  "$@" 2>&1 | tee -a "$log" | { grep --line-buffered -E "$pattern" || true; } | sed -u -E 's/^ *(.{0,100}).*/    \1/'
  rc=${PIPESTATUS[0]}
  set -o pipefail
  return "$rc"
}

# --- project + test extras, skipped when pyproject.toml hasn't changed since the last install --
ensure_python_deps() {  # ensure_python_deps [EXTRAS], e.g. "[test]"
  local extras=${1:-} stamp="$VENV/.bulkhead-install" want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$VENV/bin/python" -V 2>&1) ${extras:-[]}"
  # An install with the test extras also serves a plain run.
  if [ -f "$stamp" ] && { [ "$(cat "$stamp")" = "$want" ] || { [ -z "$extras" ] && \
      [ "$(cat "$stamp")" = "${want% *} [test]" ]; }; }; then return 0; fi
  say "installing bulkhead-mesh${extras:+ with $extras} into $VENV (first run takes a few minutes)"
  local log="$VENV/pip-install.log"
  # uv resolves and installs the same packages as pip about ten times faster (a fresh clone's install
  # drops from ~45 s to ~7 s); pip stays the fallback when uv cannot be had or fails. --compile-bytecode
  # as pip does: scripts/test sets PYTHONDONTWRITEBYTECODE, so without .pyc files every service process a
  # test starts would compile its libraries from source again (the kill tests took twice as long).
  if [ "${BULKHEAD_USE_UV:-1}" = 1 ] && { [ -x "$VENV/bin/uv" ] || \
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check uv >"$log" 2>&1; }; then
    if _install_quietly "$log" '^ *(\+|Resolved|Installed)' \
        "$VENV/bin/uv" pip install --compile-bytecode --python "$VENV/bin/python" -e "$REPO$extras"; then
      echo "$want" > "$stamp"
      return 0
    fi
    say "uv could not install (see $log); trying pip"
  fi
  if ! _install_quietly "$log" '^(Collecting|Successfully installed)' \
      "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -e "$REPO$extras"; then
    tail -n 40 "$log" >&2
    die "pip install failed (full log: $log)"
  fi
  echo "$want" > "$stamp"
}

# --- TypeScript clients: optional hook, only when clients/ has a package.json ---------------
ensure_npm_deps() {
  local pkg dir stamp want
  while IFS= read -r pkg; do
    dir=$(dirname "$pkg")
    if ! command -v npm >/dev/null 2>&1; then
      say "installing Node.js and npm for $dir"
      apt_install nodejs npm || { warn "npm is missing: skipping $dir (apt-get install -y nodejs npm)"; continue; }
    fi
    stamp="$dir/node_modules/.bulkhead-install"
    want=$(cat "$dir/package.json" "$dir/package-lock.json" 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then continue; fi
    say "installing npm dependencies in $dir"
    if [ -f "$dir/package-lock.json" ]; then
      (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    else
      (cd "$dir" && npm install --no-audit --no-fund --loglevel=error)
    fi
    echo "$want" > "$stamp"
  done < <(find clients -maxdepth 3 -name package.json -not -path '*/node_modules/*' 2>/dev/null | sort)
}


# --- Debian's chromium + chromedriver, for the console's browser tests (Playwright drives /usr/bin/chromium) ---
ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then return 0; fi
  say "installing chromium and chromium-driver (apt-get) for the console's browser tests"
  apt_install chromium chromium-driver || warn "chromium is missing: the console's browser tests will fail (apt-get install -y chromium chromium-driver)"
}
