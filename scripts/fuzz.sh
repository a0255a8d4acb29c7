#!/usr/bin/env bash
# Runs every libFuzzer target in fuzz/ for SECONDS each (default 30), from its
# committed corpus, and fails on a crash, a hang or an allocation past the
# limits. New inputs go to a scratch directory, so the committed corpora only
# change when someone minimizes them on purpose (fuzz/README.md).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail

REPO_ROOT="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
SECONDS_EACH="${1:-30}"
shift || true
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then
    mapfile -t TARGETS < <(cargo +nightly fuzz list)
fi
# The same limits the 10-minute runs used: no single allocation above
# 128 MiB (decoders allocate at most a record), no more than 2 GiB resident
# (ASan's shadow memory included), no input taking longer than 10 s.
LIMITS=(-rss_limit_mb=2048 -malloc_limit_mb=128 -timeout=10 -max_len=65536)
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/baton-fuzz.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

# cc-rs compiles C and C++ dependencies (zstd, RocksDB) with the sanitizer
# it finds in the Rust flags, so librdkafka's configure must link its test
# programs against the sanitizer's runtime too, or it finds no zstd.
export LDFLAGS="${LDFLAGS:-} -fsanitize=address"
# One build for every target, so its output comes before the runs.
cargo +nightly fuzz build
failed=()
for target in "${TARGETS[@]}"; do
    mkdir -p "$SCRATCH/$target" "fuzz/corpus/$target"
    printf -- '--- fuzz %s (%ss)\n' "$target" "$SECONDS_EACH"
    if ! cargo +nightly fuzz run "$target" "$SCRATCH/$target" "fuzz/corpus/$target" -- \
        "${LIMITS[@]}" -max_total_time="$SECONDS_EACH" -print_final_stats=1 \
        -artifact_prefix="$SCRATCH/$target-" >"$SCRATCH/$target.log" 2>&1; then
        tail -n 40 "$SCRATCH/$target.log"
        mkdir -p fuzz/artifacts
        cp "$SCRATCH/$target-"* fuzz/artifacts/ 2>/dev/null || true
        echo "fuzz $target FAILED; reproducer(s) copied to fuzz/artifacts/"
        failed+=("$target")
        continue
    fi
    # One line per target: executions and coverage from libFuzzer's own stats.
    grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$SCRATCH/$target.log" | tail -n 2 | tr '\n' ' '
    echo
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz failed: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#TARGETS[@]} target(s) ran ${SECONDS_EACH}s each without a crash"
