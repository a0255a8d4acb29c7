#!/usr/bin/env bash
# The main job: baton on a local broker, fed with sample vision-research traffic.
#
#   scripts/demo.sh            run, feed traffic, show the results, keep running until Ctrl-C
#   scripts/demo.sh --once     the same, then stop (for a quick check)
#
# Installs what it needs (apt packages, the pinned broker), builds baton into
# CARGO_TARGET_DIR (default ~/.cache/baton/target), starts the broker on a
# loopback port, creates the topics, starts one baton pod and the DLQ healer,
# and feeds them (some screenshots fail once: the healer retries them).
# Everything it started is stopped on exit.
set -euo pipefail

REPO_ROOT="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/prereqs.sh
source "$REPO_ROOT/scripts/prereqs.sh"

ONCE=0
[[ "${1:-}" == "--once" ]] && ONCE=1
BROKER_PORT="${BATON_DEMO_BROKER_PORT:-19092}"
HTTP_ADDR="${BATON_DEMO_HTTP_ADDR:-127.0.0.1:8080}"
CONTEXTS="${BATON_DEMO_CONTEXTS:-25}"
BOOTSTRAP="127.0.0.1:${BROKER_PORT}"
STATE_DIR="$(mktemp -d -t baton-demo-state.XXXXXX)"
LOG="$(mktemp -t baton-demo-log.XXXXXX)"
HEALER_LOG="$(mktemp -t baton-demo-healer-log.XXXXXX)"
HEALER_ADDR="${BATON_DEMO_HEALER_ADDR:-127.0.0.1:8081}"

install_prerequisites
echo "==> building baton (the first build compiles RocksDB and librdkafka: ~15 min on 2 cores)"
cargo build --all-targets --locked
BATON="$CARGO_TARGET_DIR/debug/baton"

BATON_PID=""
HEALER_PID=""
cleanup() {
    for pid in "$HEALER_PID" "$BATON_PID"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    bash "$REPO_ROOT/scripts/broker.sh" stop "$BROKER_PORT" >/dev/null 2>&1 || true
    rm -rf "$STATE_DIR"
}
trap cleanup EXIT INT TERM

echo "==> starting the broker on $BOOTSTRAP"
bash "$REPO_ROOT/scripts/broker.sh" start "$BROKER_PORT"

echo "==> creating topics"
"$BATON" topics create --bootstrap-servers "$BOOTSTRAP" --partitions 6 --topology topology

echo "==> starting baton (log: $LOG)"
# A fresh signing key per demo run: snapshot URLs in handovers are signed.
export BATON_SNAPSHOT_SECRET="${BATON_SNAPSHOT_SECRET:-$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')}"
# The bearer token of the HTTP surface (the dashboard asks for it once).
export BATON_HTTP_AUTH_TOKENS="${BATON_HTTP_AUTH_TOKENS:-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')}"
export BATON_HTTP_AUTH_TOKEN="${BATON_HTTP_AUTH_TOKENS%%,*}"
"$BATON" run --bootstrap-servers "$BOOTSTRAP" --instance-id demo-0 --topology topology \
    --state-dir "$STATE_DIR" --http-addr "$HTTP_ADDR" \
    --kafka-prop consumer.session.timeout.ms=6000 >"$LOG" 2>&1 &
BATON_PID=$!

wait_ready() {
    local deadline=$((SECONDS + 60))
    until curl -fsS "http://$HTTP_ADDR/readyz" >/dev/null 2>&1; do
        kill -0 "$BATON_PID" 2>/dev/null || { cat "$LOG"; echo "baton exited" >&2; exit 1; }
        (( SECONDS < deadline )) || { tail -20 "$LOG"; echo "baton not ready after 60 s" >&2; exit 1; }
        sleep 0.2
    done
}
wait_ready
echo "baton is ready: http://$HTTP_ADDR/readyz"

echo "==> starting the DLQ healer (log: $HEALER_LOG)"
"$BATON" heal --bootstrap-servers "$BOOTSTRAP" --instance-id demo-healer --topology topology \
    --http-addr "$HEALER_ADDR" --kafka-prop consumer.session.timeout.ms=6000 >"$HEALER_LOG" 2>&1 &
HEALER_PID=$!

echo "==> feeding $CONTEXTS vision-research workflows (4 events each), 4% poison, 10% failing a screenshot once"
SEED=$RANDOM
"$BATON" simulate --bootstrap-servers "$BOOTSTRAP" --contexts "$CONTEXTS" --poison-percent 4 \
    --failure-percent 10 --seed "$SEED"

metric() {
    curl -fsS "http://$HTTP_ADDR/metrics" | awk -v name="$1" '$1 ~ "^"name {sum += $2} END {print sum + 0}'
}
expected=$((CONTEXTS * 4))
deadline=$((SECONDS + 60))
until (( $(metric baton_handovers_produced_total) >= expected )); do
    (( SECONDS < deadline )) || { echo "not all handovers after 60 s" >&2; break; }
    sleep 0.5
done

echo
echo "==> results"
curl -fsS "http://$HTTP_ADDR/metrics" | grep -E '^baton_(handovers_produced|dlq_records|transactions|records_consumed|control_commands)_total' || true
echo
echo "The healer's decisions:"
curl -fsS "http://$HEALER_ADDR/metrics" | grep -E '^baton_(healer_decisions_total|parked_records_total|healer_retries_pending)' | grep -v ' 0$' || true
echo
echo "The dead-letter queue and what was parked:"
"$BATON" dlq inspect --bootstrap-servers "$BOOTSTRAP" --limit 10 || true
echo
echo "The state of context ctx-$SEED-0, asked from the running pod:"
"$BATON" state get --url "http://$HTTP_ADDR" "ctx-$SEED-0" || true
echo
echo "dashboard: http://$HTTP_ADDR/#token=$BATON_HTTP_AUTH_TOKEN"
echo "live feed: curl -N -H \"Authorization: Bearer $BATON_HTTP_AUTH_TOKEN\" http://$HTTP_ADDR/events?replay=20"
echo "metrics:   http://$HTTP_ADDR/metrics"
echo "readiness: http://$HTTP_ADDR/readyz"
echo "state:     $BATON state get --url http://$HTTP_ADDR <context_id>"
echo "DLQ:       $BATON dlq inspect --bootstrap-servers $BOOTSTRAP [--class tool_failed] [--format json]"
echo "healer:    http://$HEALER_ADDR/metrics"

if (( ONCE )); then
    exit 0
fi
echo
echo "baton keeps running; feed more with:"
echo "  $BATON simulate --bootstrap-servers $BOOTSTRAP --contexts 10 --failure-percent 20"
echo "Ctrl-C stops baton and the broker."
wait "$BATON_PID"
