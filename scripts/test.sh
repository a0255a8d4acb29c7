#!/usr/bin/env bash
# THE test command: formatting, lints, unit + integration tests, doc tests.
#
#   scripts/test.sh [EXTRA ARGS FOR THE TEST RUNNER]
#
# e.g. `scripts/test.sh -E 'test(/exactly_once/)'` (nextest filterset) or
# `scripts/test.sh handover` (a name filter, under both nextest and cargo test).
#
# Works on a fresh Debian 12 machine with Rust installed, without stdin (CI=true),
# from any directory. It installs only what is missing:
#   - the apt packages the native dependencies build with (RocksDB, librdkafka);
#   - the pinned tansu broker (scripts/broker.sh install), exported as BATON_TANSU_BIN;
#   - the rustfmt and clippy components;
#   - Confluent's Python client (confluent-kafka[avro]) in a venv, exported as
#     BATON_INTEROP_PYTHON, for the Avro interop test;
#   - Debian's prometheus (promtool), for the alert-rule tests and
#     tests/prometheus.rs; scripts/validate-ops.sh adds the manifest and
#     dashboard validators.
#
# Environment:
#   CARGO_TARGET_DIR       default ~/.cache/baton/target, kept outside the clone:
#                          RocksDB alone takes ~13 min to compile on 2 cores.
#   BATON_TANSU_BIN        use this broker binary instead of the pinned one.
#
# fmt and clippy are gates: the first failure stops the run. The test phases (and the
# 60 s demo, scripts/demo.sh --duration 60) all run, and the script fails at the end if
# any of them failed. Dependencies get line tables only (Cargo.toml), so clippy and
# the test build share one build of RocksDB and librdkafka.
set -euo pipefail

REPO_ROOT="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

export CI="${CI:-true}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-auto}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# shellcheck source=scripts/prereqs.sh
source "$REPO_ROOT/scripts/prereqs.sh"

if [[ -t 1 ]]; then
    BOLD=$'\033[1m' RED=$'\033[1;31m' GREEN=$'\033[1;32m' RESET=$'\033[0m'
else
    BOLD="" RED="" GREEN="" RESET=""
fi

SCRIPT_START=$SECONDS
PHASE_START=$SECONDS
PHASE_NAME=""

section() {
    finish_phase
    PHASE_NAME="$1"
    PHASE_START=$SECONDS
    printf '\n%s==> %s%s\n' "$BOLD" "$1" "$RESET"
}

finish_phase() {
    if [[ -n "$PHASE_NAME" ]]; then
        printf -- '--- %s: %ss\n' "$PHASE_NAME" "$((SECONDS - PHASE_START))"
    fi
    PHASE_NAME=""
}


section "prerequisites"
install_prerequisites
rustc --version
cargo --version

LOCKED=()
if [[ -f Cargo.lock ]]; then
    LOCKED=(--locked)
else
    echo "warning: no Cargo.lock; building without --locked" >&2
fi

# Prints a section header naming the command, then runs it.
phase() {
    section "$*"
    "$@"
}

# ------------------------------------------------------------------------- gates
phase cargo fmt --all -- --check
phase cargo clippy --all-targets "${LOCKED[@]}" -- -D warnings

# ------------------------------------------------------------------------- tests
FAILED=()
PASSED_N=0 FAILED_N=0 SKIPPED_N=0
RUN_LOG="$(mktemp "${TMPDIR:-/tmp}/baton-test.XXXXXX")"
trap 'rm -f "$RUN_LOG"' EXIT

# Like phase, but keeps a copy of the output to count the tests it ran.
test_phase() {
    section "$*"
    "$@" 2>&1 | tee "$RUN_LOG"
}

strip_ansi() { sed -e 's/\x1b\[[0-9;]*[A-Za-z]//g'; }

# Prints the number just before WORD in LINE ("3 passed" -> 3), or 0.
number_before() {
    if [[ "$2" =~ ([0-9]+)\ $1 ]]; then
        printf '%s' "${BASH_REMATCH[1]}"
    else
        printf '0'
    fi
}

# Adds up `cargo test` result lines: "test result: ok. 3 passed; 0 failed; 1 ignored; ...".
count_cargo_test() {
    local line
    while IFS= read -r line; do
        PASSED_N=$((PASSED_N + $(number_before passed "$line")))
        FAILED_N=$((FAILED_N + $(number_before failed "$line")))
        SKIPPED_N=$((SKIPPED_N + $(number_before ignored "$line")))
    done < <(strip_ansi <"$RUN_LOG" | grep -E '^test result: ' || true)
    return 0
}

# Reads nextest's summary: "Summary [ 1.2s] 40 tests run: 38 passed, 1 failed, 1 timed out, 2 skipped".
count_nextest() {
    local line
    line="$(strip_ansi <"$RUN_LOG" | grep -E '^ *Summary \[' | tail -n1 || true)"
    PASSED_N=$((PASSED_N + $(number_before passed "$line")))
    FAILED_N=$((FAILED_N + $(number_before failed "$line") + $(number_before "timed out" "$line")))
    SKIPPED_N=$((SKIPPED_N + $(number_before skipped "$line")))
    return 0
}

if cargo nextest --version >/dev/null 2>&1; then
    test_phase cargo nextest run --profile ci --no-fail-fast "${LOCKED[@]}" "$@" ||
        FAILED+=("tests (nextest)")
    count_nextest
else
    finish_phase
    echo "cargo-nextest is not installed: falling back to cargo test"
    # --tests: lib, bin and tests/ targets; the doc tests get their own phase below.
    test_phase cargo test --tests --no-fail-fast "${LOCKED[@]}" "$@" ||
        FAILED+=("tests (cargo test)")
    count_cargo_test
fi

if [[ -f src/lib.rs ]]; then
    test_phase cargo test --doc "${LOCKED[@]}" || FAILED+=("doc tests")
    count_cargo_test
fi

# ------------------------------------------------------------------- operations
# Alert rules (promtool check + unit tests), Kubernetes and KEDA manifests,
# YAML lint, the compose file and the dashboards' schema: scripts/validate-ops.sh
# installs what it needs (PyPI, npm, Debian) under ~/.cache/baton.
phase bash scripts/validate-ops.sh || FAILED+=("operations checks")

# -------------------------------------------------------------------------- demo
# The whole workflow for 60 s (scripts/demo.sh --duration 60): two pods, the healer,
# the example agents. It must print exactly one summary line, counted from the topics
# and the pods' state, with completed, PlanB and budget-exhausted contexts all seen.
# BATON_DEMO_SECONDS=0 skips it.
if [[ "${BATON_DEMO_SECONDS:-60}" != 0 ]]; then
    section "demo (scripts/demo.sh --duration ${BATON_DEMO_SECONDS:-60})"
    if bash scripts/demo.sh --duration "${BATON_DEMO_SECONDS:-60}" >"$RUN_LOG"; then
        cat "$RUN_LOG"
        if [[ "$(grep -c '^summary: completed=[0-9]* plan_b=[0-9]* budget_exhausted=[0-9]* failed=[0-9]* dlq=[0-9]* parked=[0-9]*$' "$RUN_LOG")" != 1 ||
            "$(wc -l <"$RUN_LOG")" != 1 ]]; then
            echo "demo: stdout is not exactly one summary line" >&2
            FAILED+=("demo")
        fi
    else
        cat "$RUN_LOG"
        FAILED+=("demo")
    fi
fi

# ------------------------------------------------------------------------- chaos
# The chaos suite's two-minute version (tests/chaos; docs/benchmarks.md,
# "Reliability"): every fault once, pods SIGKILLed ten times, an exact verdict.
# Its seed is printed; `scripts/chaos.sh --ci --seed N` replays a failure.
test_phase bash scripts/chaos.sh --ci || FAILED+=("chaos suite (--ci)")
count_cargo_test

# -------------------------------------------------------------------------- fuzz
# Every cargo-fuzz target for BATON_FUZZ_SECONDS (10) from its committed corpus
# (fuzz/README.md): a smoke run that replays the corpora and mutates them a
# little; the long runs are `scripts/fuzz.sh 600`. The sanitizer build is
# unoptimised (BATON_FUZZ_BUILD=dev: a smoke run needs no speed, and a cold
# build takes about half as long), links the RocksDB this run already
# compiled and keeps its own target directory under CARGO_TARGET_DIR, so only
# the first run on a machine pays for it.
# BATON_FUZZ=0 skips the phase; without a nightly toolchain it is skipped,
# saying so, since no registry here serves one.
if [[ -d fuzz && "${BATON_FUZZ:-1}" != 0 ]]; then
    if cargo +nightly --version >/dev/null 2>&1; then
        if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
            section "install cargo-fuzz"
            cargo install --locked cargo-fuzz || FAILED+=("install cargo-fuzz")
        fi
        BATON_FUZZ_BUILD="${BATON_FUZZ_BUILD:-dev}" \
            phase bash scripts/fuzz.sh "${BATON_FUZZ_SECONDS:-10}" || FAILED+=("fuzz")
    else
        finish_phase
        printf '\n%s==> fuzz: SKIPPED%s (needs a nightly toolchain: `rustup toolchain install nightly`)\n' "$BOLD" "$RESET"
    fi
elif [[ -d fuzz ]]; then
    finish_phase
    printf '\n%s==> fuzz: SKIPPED%s (BATON_FUZZ=0)\n' "$BOLD" "$RESET"
fi

finish_phase
printf '\n'
if [[ ${#FAILED[@]} -gt 0 ]]; then
    printf '%sFAILED%s: %s (total %ss)\n' "$RED" "$RESET" "${FAILED[*]}" "$((SECONDS - SCRIPT_START))"
else
    printf '%sOK%s: fmt, clippy, tests, doc tests and the demo passed (total %ss)\n' "$GREEN" "$RESET" "$((SECONDS - SCRIPT_START))"
fi
# One closing line over every test phase (unit, integration, doc tests).
printf 'total: %d passed, %d failed, %d skipped\n' "$PASSED_N" "$FAILED_N" "$SKIPPED_N"
[[ ${#FAILED[@]} -eq 0 ]]
