#!/usr/bin/env bash
# Installs what baton's builds, tests and demo need, only where it is missing.
# Sourced by scripts/test.sh and scripts/demo.sh; `install_prerequisites`
# does it all and exports CARGO_TARGET_DIR, BATON_TANSU_BIN,
# BATON_INTEROP_PYTHON and BATON_CHROMIUM.
#
#   - apt packages the native dependencies build with (RocksDB, librdkafka);
#   - the rustfmt and clippy components;
#   - the pinned tansu broker (scripts/broker.sh install);
#   - Confluent's Python client in a venv, for the Avro interop tests;
#   - Debian's chromium, for the dashboard's headless-browser test;
#   - Debian's prometheus and promtool, for the alert-rule tests and the
#     dashboards' proof against a real Prometheus.
#   - node and npm, for the TypeScript example agent.

REPO_ROOT="${REPO_ROOT:-$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
export DEBIAN_FRONTEND=noninteractive
# Outside the clone: RocksDB alone takes ~13 min to compile on 2 cores.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/baton/target}"

# Native builds: RocksDB (libclang for bindgen, cmake), librdkafka (SASL/GSSAPI, OpenSSL, zstd).
APT_PACKAGES=(libclang-dev cmake libsasl2-dev libzstd-dev libssl-dev pkg-config curl)

die() {
    printf '%s: error: %s\n' "$(basename -- "$0")" "$*" >&2
    exit 1
}

# Installs the given packages (default: APT_PACKAGES) where missing.
install_apt_packages() {
    local wanted=("$@")
    [[ ${#wanted[@]} -gt 0 ]] || wanted=("${APT_PACKAGES[@]}")
    if ! command -v dpkg >/dev/null 2>&1; then
        echo "no dpkg: not a Debian system; make sure these are installed: ${wanted[*]}"
        return 0
    fi
    local missing=() pkg
    for pkg in "${wanted[@]}"; do
        if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "apt packages already installed: ${wanted[*]}"
        return 0
    fi
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "missing packages (${missing[*]}) and not root; install them and retry"
        sudo=(sudo -n)
    fi
    echo "installing: ${missing[*]}"
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_rust_components() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [[ ${#missing[@]} -gt 0 ]]; then
        command -v rustup >/dev/null 2>&1 || die "missing ${missing[*]} and no rustup to install them"
        echo "installing rust components: ${missing[*]}"
        rustup component add "${missing[@]}"
    fi
}

install_broker() {
    if [[ -n "${BATON_TANSU_BIN:-}" && -x "${BATON_TANSU_BIN}" ]]; then
        echo "using BATON_TANSU_BIN=${BATON_TANSU_BIN} from the environment"
        return 0
    fi
    BATON_TANSU_BIN="$(bash "$REPO_ROOT/scripts/broker.sh" install)"
    export BATON_TANSU_BIN
    echo "BATON_TANSU_BIN=${BATON_TANSU_BIN}"
}

# Confluent's own Python client, for the Avro interop tests and the peer
# benchmarks: a venv outside the clone, reused across runs.
INTEROP_VENV="${BATON_INTEROP_VENV:-${HOME:-/root}/.cache/baton/venv}"
INTEROP_PACKAGES=("confluent-kafka[avro]==2.16.1")

install_python_tools() {
    local python="$INTEROP_VENV/bin/python"
    if [[ -x "$python" ]] && "$python" -c 'import confluent_kafka.schema_registry.avro' 2>/dev/null; then
        echo "python tools already installed in $INTEROP_VENV"
    else
        # Debian's python3 lacks ensurepip (and so venv) without python3-venv.
        if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
            install_apt_packages python3 python3-venv
        fi
        echo "installing ${INTEROP_PACKAGES[*]} into $INTEROP_VENV"
        python3 -m venv "$INTEROP_VENV"
        "$INTEROP_VENV/bin/pip" install -q "${INTEROP_PACKAGES[@]}"
    fi
    export BATON_INTEROP_PYTHON="$python"
}

# Debian's chromium, which the dashboard test drives headless. Installed only
# when no chromium is on PATH: with its libraries it takes some 400 MB.
install_browser() {
    if [[ -n "${BATON_CHROMIUM:-}" && -x "${BATON_CHROMIUM}" ]]; then
        echo "using BATON_CHROMIUM=${BATON_CHROMIUM} from the environment"
        return 0
    fi
    local binary
    binary="$(command -v chromium || command -v chromium-browser || true)"
    if [[ -z "$binary" ]]; then
        install_apt_packages chromium
        binary="$(command -v chromium || true)"
    fi
    if [[ -z "$binary" ]]; then
        echo "no chromium: install it (or set BATON_CHROMIUM) for the dashboard's browser test"
        return 0
    fi
    export BATON_CHROMIUM="$binary"
    echo "BATON_CHROMIUM=${BATON_CHROMIUM}"
}

# Debian's prometheus (with promtool): the alert rules' unit tests
# (promtool test rules) and tests/prometheus.rs, which evaluates every
# dashboard query and alert expression against a real Prometheus.
install_prometheus() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        echo "prometheus already installed: $(prometheus --version 2>&1 | head -n1)"
        return 0
    fi
    install_apt_packages prometheus
}

# Node and npm, for the TypeScript example agent (examples/typescript/researcher)
# and its broker test; any node >= 18 on PATH will do.
install_node() {
    if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
        echo "node already installed: $(node --version)"
        return 0
    fi
    install_apt_packages nodejs npm
}

install_prerequisites() {
    install_apt_packages
    install_node
    install_rust_components
    install_broker
    install_python_tools
    install_browser
    install_prometheus
    mkdir -p "$CARGO_TARGET_DIR"
    echo "CARGO_TARGET_DIR=${CARGO_TARGET_DIR}"
}
