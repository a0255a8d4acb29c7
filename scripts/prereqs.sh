#!/usr/bin/env bash
# Installs what baton's builds, tests and demo need, only where it is missing.
# Sourced by scripts/test.sh and scripts/demo.sh; `install_prerequisites`
# does it all and exports CARGO_TARGET_DIR and BATON_TANSU_BIN.
#
#   - apt packages the native dependencies build with (RocksDB, librdkafka);
#   - the rustfmt and clippy components;
#   - the pinned tansu broker (scripts/broker.sh install).

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

install_apt_packages() {
    if ! command -v dpkg >/dev/null 2>&1; then
        echo "no dpkg: not a Debian system; make sure these are installed: ${APT_PACKAGES[*]}"
        return 0
    fi
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "apt packages already installed: ${APT_PACKAGES[*]}"
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


install_prerequisites() {
    install_apt_packages
    install_rust_components
    install_broker
    mkdir -p "$CARGO_TARGET_DIR"
    echo "CARGO_TARGET_DIR=${CARGO_TARGET_DIR}"
}
