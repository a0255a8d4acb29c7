#!/usr/bin/env bash
# The chaos suite (tests/chaos/): 3 baton pods, the healer and the agents
# while pods are killed, frozen, cut off, black-holed, scaled, flooded, left
# without their Schema Registry and their state disk, then an exact verdict
# printed as counts. See docs/benchmarks.md, "Reliability".
#
# Usage:
#   scripts/chaos.sh [--ci] [--seed N] [--contexts N] [--release]
#
#   --ci          about two minutes: every fault, pods SIGKILLed 10 times,
#                 360 contexts (scripts/test.sh runs this)
#   (default)     the full run: 26,000 contexts, over 100,000 events, pods
#                 SIGKILLed every 2-5 s for as long as the sources feed
#   --seed N      replay the schedule of faults (and the contexts) of seed N;
#                 every run prints its seed
#   --contexts N  override the number of contexts
#   --release     build optimised (needs a few GiB of disk for the target dir)
#
# Environment: CARGO_TARGET_DIR, BATON_TANSU_BIN as for scripts/test.sh. The
# run is niced: it shares the machine's cores with whoever else runs.
# The state disk of one pod is a tmpfs mounted for the run when `mount` is
# allowed (root); otherwise the full disk is simulated with baton's test
# fault switch, and the output says so.
set -euo pipefail

REPO_ROOT="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/prereqs.sh
source "$REPO_ROOT/scripts/prereqs.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; }

MODE=full
PROFILE=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --ci) MODE=ci ;;
    --seed)
        [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--seed needs a number"
        export BATON_CHAOS_SEED="$2"
        shift
        ;;
    --contexts)
        [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--contexts needs a number"
        export BATON_CHAOS_CONTEXTS="$2"
        shift
        ;;
    --release) PROFILE=(--release) ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument: '$1'"
        ;;
    esac
    shift
done
export BATON_CHAOS_MODE="$MODE"

install_apt_packages
install_rust_components
install_broker

LOCKED=()
[[ -f Cargo.lock ]] && LOCKED=(--locked)
exec nice -n 10 cargo test "${LOCKED[@]}" "${PROFILE[@]}" --test chaos -- \
    --ignored --exact chaos --nocapture --test-threads 1
