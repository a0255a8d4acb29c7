#!/usr/bin/env bash
# baton against its peers, in one run on one broker (a benchmark, not a test).
#
# Usage:
#   scripts/bench.sh [--quick|--full]
#
#   --quick   50,000 events per peer, three offered loads of 5 s, restore of
#             200,000 records; a few minutes on 2 cores
#   --full    (default) 100,000 events per peer, four offered loads of 15 s,
#             restore of 1,000,000 records, and baton's peak RSS after
#             1,000,000 more single-event contexts
#
# Peers (benches/compare.rs): L1, the raw rdkafka transactional passthrough;
# Lk, the same writing as many records per input as baton; Quix Streams 3.28
# running the first workflow step (benches/peers/quix_first_step.py); baton on
# the same first step; loop, baton on the whole vision-research workflow with a
# closed-loop driver answering every handover as its agent would; timers, the
# first step with and without timers, and how late they fire when they come due.
# Then the restore rate (benches/restore.rs). Prints the table, ratios and
# targets (benches/peers/report.py) and draws docs/benchmarks-throughput.png.
#
# Environment:
#   CARGO_TARGET_DIR     build directory (default: scripts/prereqs.sh's)
#   BATON_BENCH_VENV     venv for Quix Streams and matplotlib
#                        (default ~/.cache/baton/bench-venv)
#   BATON_BENCH_OUT      where results go (default $CARGO_TARGET_DIR/bench-results)
#   BATON_BENCH_PEERS    which peers (default l1,baton,lk,quix,loop,timers)
#   BATON_BENCH_RECORDS, BATON_BENCH_LOADS, BATON_BENCH_LOAD_SECS,
#   BATON_BENCH_RSS_CONTEXTS, BATON_BENCH_RESTORE_RECORDS override the mode
set -euo pipefail

REPO_ROOT="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/prereqs.sh
source "$REPO_ROOT/scripts/prereqs.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; }

MODE=full
for arg in "$@"; do
    case "$arg" in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument: '$arg'"
        ;;
    esac
done

if [[ $MODE == quick ]]; then
    : "${BATON_BENCH_RECORDS:=50000}" "${BATON_BENCH_LOADS:=0.05,0.25,0.5}" "${BATON_BENCH_LOAD_SECS:=5}"
    : "${BATON_BENCH_RSS_CONTEXTS:=0}" "${BATON_BENCH_RESTORE_RECORDS:=200000}"
else
    : "${BATON_BENCH_RECORDS:=100000}" "${BATON_BENCH_LOADS:=0.05,0.25,0.5,0.75}" "${BATON_BENCH_LOAD_SECS:=15}"
    : "${BATON_BENCH_RSS_CONTEXTS:=1000000}" "${BATON_BENCH_RESTORE_RECORDS:=1000000}"
fi
export BATON_BENCH_RECORDS BATON_BENCH_LOADS BATON_BENCH_LOAD_SECS BATON_BENCH_RSS_CONTEXTS
: "${BATON_BENCH_PEERS:=l1,baton,lk,quix,loop,timers}"
export BATON_BENCH_PEERS

# Processes this script starts; each child of the benchmarks dies with it
# (PR_SET_PDEATHSIG), so killing these is enough.
PIDS=()
cleanup() {
    local status=$? pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command in the background and waits for it, so the traps can end it.
run_tracked() {
    "$@" &
    PIDS+=("$!")
    wait "$!"
}

# --- prerequisites (scripts/prereqs.sh) -------------------------------------
install_apt_packages
install_rust_components
install_broker
# The peers' Python: Quix Streams and matplotlib, in their own venv, through
# prereqs.sh's venv installer.
INTEROP_VENV="${BATON_BENCH_VENV:-${HOME:-/root}/.cache/baton/bench-venv}"
INTEROP_PACKAGES=("quixstreams==3.28.1" "matplotlib")
PYTHON="$INTEROP_VENV/bin/python"
if ! "$PYTHON" -c 'import quixstreams, matplotlib' 2>/dev/null; then
    install_python_tools
fi
"$PYTHON" -c 'import quixstreams, matplotlib' ||
    die "quixstreams and matplotlib are not importable from $PYTHON"
export BATON_BENCH_QUIX_PYTHON="$PYTHON"
mkdir -p "$CARGO_TARGET_DIR"
OUT_DIR="${BATON_BENCH_OUT:-$CARGO_TARGET_DIR/bench-results}"
mkdir -p "$OUT_DIR"

# --- build (release; the bench profile) -------------------------------------
cd "$REPO_ROOT"
echo "building the benchmarks (release) in $CARGO_TARGET_DIR"
# The executables, from cargo's own report, so they run without cargo between.
bench_exe() {
    cargo bench --locked --no-run --bench "$1" --message-format=json 2>/dev/null |
        "$PYTHON" -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == name and m.get("executable"):
        print(m["executable"])
' "$1"
}
run_tracked cargo bench --locked --no-run --bench compare --bench restore
COMPARE="$(bench_exe compare)"
RESTORE="$(bench_exe restore)"
[[ -x "$COMPARE" && -x "$RESTORE" ]] || die "could not find the built benchmark executables"

# --- run ---------------------------------------------------------------------
echo "== peers ($MODE): $BATON_BENCH_RECORDS events each, peers $BATON_BENCH_PEERS, loads $BATON_BENCH_LOADS x ${BATON_BENCH_LOAD_SECS}s"
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
export BATON_BENCH_JSON="$OUT_DIR/results-$MODE.json"
rm -f "$BATON_BENCH_JSON"
run_tracked "$COMPARE" > >(tee "$OUT_DIR/compare-$MODE.log") 2>&1
[[ -s "$BATON_BENCH_JSON" ]] || die "benches/compare.rs wrote no results"

echo "== restore: $BATON_BENCH_RESTORE_RECORDS changelog records"
BATON_BENCH_RECORDS="$BATON_BENCH_RESTORE_RECORDS" run_tracked "$RESTORE" > >(tee "$OUT_DIR/restore-$MODE.log") 2>&1

# --- report ------------------------------------------------------------------
echo
echo "== results ($MODE)"
"$PYTHON" "$REPO_ROOT/benches/peers/report.py" "$BATON_BENCH_JSON" "$OUT_DIR/restore-$MODE.log" \
    "$MODE" "$REPO_ROOT/docs/benchmarks-throughput.png" "$OUT_DIR/results-$MODE.md"
# Other work on the machine shares the cores: say how busy it was.
MACHINE="$(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); load average (1, 5, 15 min) before the peers: $LOAD_BEFORE, after the restore: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '\nMachine: %s.\n' "$MACHINE" | tee -a "$OUT_DIR/results-$MODE.md"
echo "results: $OUT_DIR/results-$MODE.{json,md}"
