#!/usr/bin/env bash
# Runs every libFuzzer target in fuzz/ for SECONDS each (default 30), from its
# committed corpus, and fails on a crash, a hang or an allocation past the
# limits. New inputs go to a scratch directory, so the committed corpora only
# change when someone minimizes them on purpose (fuzz/README.md).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# BATON_FUZZ_BUILD=dev builds the targets without optimisation (cargo fuzz
# --dev): about half the cold build time, for a short smoke run from the
# corpora (scripts/test.sh). The default, release, is for long runs.
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
# BATON_FUZZ_KEEP=DIR keeps the inputs a run finds there, to minimize them
# into the committed corpora afterwards (fuzz/README.md).
if [[ -n "${BATON_FUZZ_KEEP:-}" ]]; then
    SCRATCH="$BATON_FUZZ_KEEP"
    mkdir -p "$SCRATCH"
else
    SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/baton-fuzz.XXXXXX")"
    trap 'rm -rf "$SCRATCH"' EXIT
fi

# cc-rs compiles C and C++ dependencies (zstd, lz4) with the sanitizer it
# finds in the Rust flags, so librdkafka's configure must link its test
# programs against the sanitizer's runtime too, or it finds no zstd.
export LDFLAGS="${LDFLAGS:-} -fsanitize=address"

# The fuzz build keeps its own target directory beside the main one, so a CI
# machine compiles the sanitizer build once, not on every fresh clone.
MAIN_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/baton/target}"
export CARGO_TARGET_DIR="${BATON_FUZZ_TARGET_DIR:-$MAIN_TARGET_DIR/fuzz}"

# RocksDB is linked, never exercised: no target reaches the stores. Compiling
# it again under the sanitizer's flags would cost 15-45 minutes on two cores,
# so link the static library the main build already compiled from the same
# librocksdb-sys sources (librocksdb-sys's ROCKSDB_LIB_DIR). Its code is then
# uninstrumented, which AddressSanitizer allows.
rocksdb_version="$(sed -n '/^name = "librocksdb-sys"$/{n;s/^version = "\(.*\)"$/\1/p;}' Cargo.lock)"
prebuilt=""
for lib in $(ls -t "$MAIN_TARGET_DIR"/{release,debug}/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null); do
    # The build directory's `output` file names the crate's sources, version included.
    if grep -q "librocksdb-sys-$rocksdb_version" "$(dirname "$(dirname "$lib")")/output" 2>/dev/null; then
        prebuilt="$(dirname "$lib")"
        break
    fi
done
if [[ -n "$prebuilt" && -z "${ROCKSDB_LIB_DIR:-}" ]]; then
    echo "fuzz: linking the main build's RocksDB $rocksdb_version from $prebuilt"
    export ROCKSDB_LIB_DIR="$prebuilt" ROCKSDB_STATIC=1
elif [[ -z "${ROCKSDB_LIB_DIR:-}" ]]; then
    echo "fuzz: no prebuilt RocksDB $rocksdb_version under $MAIN_TARGET_DIR; compiling it (slow)"
fi
case "${BATON_FUZZ_BUILD:-release}" in
release) PROFILE=() ;;
dev) PROFILE=(--dev) ;;
*)
    echo "BATON_FUZZ_BUILD must be dev or release, not '${BATON_FUZZ_BUILD}'" >&2
    exit 2
    ;;
esac
# One build for every target, so its output comes before the runs.
cargo +nightly fuzz build "${PROFILE[@]}"
failed=()
for target in "${TARGETS[@]}"; do
    mkdir -p "$SCRATCH/$target" "fuzz/corpus/$target"
    printf -- '--- fuzz %s (%ss)\n' "$target" "$SECONDS_EACH"
    if ! cargo +nightly fuzz run "${PROFILE[@]}" "$target" "$SCRATCH/$target" "fuzz/corpus/$target" -- \
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
echo "fuzz: ${#TARGETS[@]} target(s) ran ${SECONDS_EACH}s each without a crash (${BATON_FUZZ_BUILD:-release} build)"
