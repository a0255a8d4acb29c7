#!/usr/bin/env bash
# The whole vision-research workflow on one machine, from one command.
#
#   scripts/demo.sh                       run until Ctrl-C; prints the dashboard URL
#   scripts/demo.sh --duration 60         run 60 s of traffic without a terminal, let it
#                                         settle, print one summary line, exit non-zero if
#                                         no context completed, reached PlanB or ran out of budget
#   scripts/demo.sh --researcher ts       the TypeScript researcher instead of the Rust one
#
# It installs what is missing (apt packages, the pinned broker, node for --researcher ts),
# builds baton and the example agents into CARGO_TARGET_DIR (default ~/.cache/baton/target),
# starts the broker on a loopback port, creates the topics, starts two baton pods, the DLQ
# healer and the agents (examples/README.md), and a vision source that starts
# --rate contexts per second. Some screenshots and fetches fail, so retries, the fallback
# and PlanB are seen; some contexts get small budgets, so budget exhaustion is seen.
# No model is called anywhere: the agents' text is simulated (examples/README.md).
#
# Every process runs in its own process group and is stopped on exit, Ctrl-C or SIGTERM
# (TERM, then KILL after 10 s): nothing is left behind.
#
# Environment: BATON_DEMO_RATE (contexts/s, default 2), BATON_DEMO_HTTP_PORT (first pod's
# dashboard, default 8080 in a terminal, a free port with --duration), BATON_DEMO_SETTLE
# (seconds to wait for contexts to finish after --duration, default 90).
set -euo pipefail

REPO_ROOT="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/prereqs.sh
source "$REPO_ROOT/scripts/prereqs.sh"

DURATION=""
RESEARCHER="rust"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration) DURATION="${2:?--duration needs SECONDS}"; shift 2 ;;
        --duration=*) DURATION="${1#*=}"; shift ;;
        --researcher) RESEARCHER="${2:?--researcher needs rust or ts}"; shift 2 ;;
        --researcher=*) RESEARCHER="${1#*=}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ -z "$DURATION" || "$DURATION" =~ ^[1-9][0-9]*$ ]] || die "--duration must be a positive number of seconds"
[[ "$RESEARCHER" == rust || "$RESEARCHER" == ts ]] || die "--researcher must be rust or ts"
RATE="${BATON_DEMO_RATE:-2}"
SETTLE="${BATON_DEMO_SETTLE:-90}"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# With --duration, stdout carries only the summary line; progress goes to stderr.
if [[ -n "$DURATION" ]]; then
    exec 3>&1 1>&2
else
    exec 3>&1
fi

install_prerequisites
command -v python3 >/dev/null 2>&1 || install_apt_packages python3

echo "==> building baton and the example agents (the first build compiles RocksDB and librdkafka)"
# The same targets and features as the test build, so the two share one build.
cargo build --locked --bin baton --example agents
BATON="$CARGO_TARGET_DIR/debug/baton"
AGENTS="$CARGO_TARGET_DIR/debug/examples/agents"
if [[ "$RESEARCHER" == ts ]]; then
    echo "==> building the TypeScript researcher"
    (cd examples/typescript/researcher && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
fi

if [[ -n "$DURATION" ]]; then
    BROKER_PORT="${BATON_DEMO_BROKER_PORT:-$(free_port)}"
    HTTP_PORT="${BATON_DEMO_HTTP_PORT:-$(free_port)}"
else
    BROKER_PORT="${BATON_DEMO_BROKER_PORT:-19092}"
    HTTP_PORT="${BATON_DEMO_HTTP_PORT:-8080}"
fi
HTTP_PORT_2="$(free_port)"
HEALER_PORT="$(free_port)"
BOOTSTRAP="127.0.0.1:${BROKER_PORT}"
WORK_DIR="$(mktemp -d -t baton-demo.XXXXXX)"
LOGS="$WORK_DIR/logs"
mkdir -p "$LOGS"

PIDS=()
STOPPING=0
cleanup() {
    local status=$?
    (( STOPPING )) && return
    STOPPING=1
    trap '' INT TERM
    local pid deadline
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + 10))
    for pid in "${PIDS[@]}"; do
        while kill -0 -- "-$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    bash "$REPO_ROOT/scripts/broker.sh" stop "$BROKER_PORT" >/dev/null 2>&1 || true
    if (( status != 0 )); then
        echo "logs kept in $LOGS" >&2
        rm -rf "$WORK_DIR/state-"*
    else
        rm -rf "$WORK_DIR"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in its own process group (so stopping it stops its children), logging to $1.log.
start() {
    local name="$1"
    shift
    setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    PIDS+=("$!")
}

echo "==> starting the broker on $BOOTSTRAP"
bash "$REPO_ROOT/scripts/broker.sh" start "$BROKER_PORT" >/dev/null
"$BATON" topics create --bootstrap-servers "$BOOTSTRAP" --partitions 6 --topology topology >/dev/null

# Fresh secrets per run: snapshot URLs and membership records are signed, and the HTTP
# surface asks for a bearer token (the dashboard takes it from the URL once).
random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
export BATON_SNAPSHOT_SECRET="${BATON_SNAPSHOT_SECRET:-$(random_hex 32)}"
export BATON_MEMBERSHIP_SECRET="${BATON_MEMBERSHIP_SECRET:-$(random_hex 32)}"
export BATON_HTTP_AUTH_TOKENS="${BATON_HTTP_AUTH_TOKENS:-$(random_hex 16)}"
export BATON_HTTP_AUTH_TOKEN="${BATON_HTTP_AUTH_TOKENS%%,*}"
export RUST_LOG="${RUST_LOG:-info,librdkafka=warn,rdkafka=warn}"
KAFKA=(--kafka-prop consumer.session.timeout.ms=6000 --kafka-prop consumer.heartbeat.interval.ms=500)

echo "==> starting two baton pods and the healer (logs: $LOGS)"
for n in 0 1; do
    port=$HTTP_PORT
    (( n == 1 )) && port=$HTTP_PORT_2
    start "baton-$n" "$BATON" run --bootstrap-servers "$BOOTSTRAP" --instance-id "demo-$n" \
        --topology topology --state-dir "$WORK_DIR/state-$n" --http-addr "127.0.0.1:$port" "${KAFKA[@]}"
done
start healer "$BATON" heal --bootstrap-servers "$BOOTSTRAP" --instance-id demo-healer \
    --topology topology --http-addr "127.0.0.1:$HEALER_PORT" "${KAFKA[@]}"

deadline=$((SECONDS + 90))
for port in "$HTTP_PORT" "$HTTP_PORT_2"; do
    until curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || { tail -20 "$LOGS"/baton-*.log >&2; die "baton on port $port not ready after 90 s"; }
        sleep 0.3
    done
done

echo "==> starting the agents (researcher: $RESEARCHER)"
AGENT_FLAGS=(--work-ms 300 --heartbeat-interval-ms 500 "${KAFKA[@]}")
if [[ "$RESEARCHER" == ts ]]; then
    start researcher node examples/typescript/researcher/dist/researcher.js --bootstrap-servers "$BOOTSTRAP" --work-ms 300
else
    start researcher "$AGENTS" researcher --bootstrap-servers "$BOOTSTRAP" "${AGENT_FLAGS[@]}"
fi
start valuation "$AGENTS" valuation --bootstrap-servers "$BOOTSTRAP" "${AGENT_FLAGS[@]}"
# PlanB needs three failed screenshots and then three failed fetches (the alternate
# gets max_attempts of its own): 0.5^3 * 0.8^3, about 6% of contexts.
start playwright "$AGENTS" playwright --bootstrap-servers "$BOOTSTRAP" --failure-percent 50 "${AGENT_FLAGS[@]}"
start fetcher "$AGENTS" fetcher --bootstrap-servers "$BOOTSTRAP" --failure-percent 80 "${AGENT_FLAGS[@]}"
start reporter "$AGENTS" reporter --bootstrap-servers "$BOOTSTRAP" "${AGENT_FLAGS[@]}"
PREFIX="demo-$(date +%s)"
SOURCE_ARGS=(--bootstrap-servers "$BOOTSTRAP" --rate "$RATE" --context-prefix "$PREFIX"
    --small-budget-percent 10 --small-budget-tokens 150)
start vision-source "$AGENTS" vision-source "${SOURCE_ARGS[@]}"
SOURCE_PID="${PIDS[-1]}"

DASHBOARD="http://127.0.0.1:$HTTP_PORT/#token=$BATON_HTTP_AUTH_TOKEN"

# Counts from what Kafka and the pods hold, never from the agents' own counters:
# contexts by state from `baton context list`, records on the DLQ and its parked topic.
summary() {
    "$BATON" context list --pod-url "http://127.0.0.1:$HTTP_PORT" --max 100000 --format json >"$WORK_DIR/states.json"
    "$BATON" dlq inspect --bootstrap-servers "$BOOTSTRAP" --topic dlq --format json --timeout-ms 15000 >"$WORK_DIR/dlq.json"
    "$BATON" dlq inspect --bootstrap-servers "$BOOTSTRAP" --topic parked --format json --timeout-ms 15000 >"$WORK_DIR/parked.json"
    python3 - "$WORK_DIR" <<'EOF'
import json, os, sys
def records(path):
    with open(path) as f:
        text = f.read().strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]
work = sys.argv[1]
by_state = {}
for context in records(os.path.join(work, "states.json")):
    by_state[context["state"]] = by_state.get(context["state"], 0) + 1
print(
    "summary: completed={} plan_b={} budget_exhausted={} failed={} dlq={} parked={}".format(
        by_state.get("Completed", 0), by_state.get("PlanB", 0), by_state.get("BudgetExhausted", 0),
        by_state.get("Failed", 0), len(records(os.path.join(work, "dlq.json"))),
        len(records(os.path.join(work, "parked.json"))),
    )
)
EOF
}

# Contexts not yet at an end (Completed, PlanB, BudgetExhausted, Failed).
unsettled() {
    "$BATON" context list --pod-url "http://127.0.0.1:$HTTP_PORT" --max 100000 --format json |
        python3 -c 'import json,sys; print(sum(1 for c in json.load(sys.stdin) if c["state"] not in ("Completed","PlanB","BudgetExhausted","Failed")))'
}

if [[ -z "$DURATION" ]]; then
    echo
    echo "dashboard: $DASHBOARD"
    echo "           (the token is BATON_HTTP_AUTH_TOKEN=$BATON_HTTP_AUTH_TOKEN; the page keeps it after the first visit)"
    echo "contexts:  $BATON context list --pod-url http://127.0.0.1:$HTTP_PORT --token $BATON_HTTP_AUTH_TOKEN"
    echo "DLQ:       $BATON dlq inspect --bootstrap-servers $BOOTSTRAP"
    echo "live feed: curl -N -H \"Authorization: Bearer $BATON_HTTP_AUTH_TOKEN\" http://127.0.0.1:$HTTP_PORT/events"
    echo "logs:      $LOGS"
    echo
    echo "Vision source: $RATE new contexts per second. Ctrl-C stops everything."
    while true; do
        sleep 15
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || die "a demo process stopped (pid $pid); logs in $LOGS"
        done
        summary 2>/dev/null || true
    done
fi

echo "==> $DURATION s of traffic at $RATE contexts/s"
end=$((SECONDS + DURATION))
while (( SECONDS < end )); do
    kill -0 "$SOURCE_PID" 2>/dev/null || { tail -20 "$LOGS/vision-source.log" >&2; die "the vision source stopped"; }
    sleep 1
done
kill -TERM -- "-$SOURCE_PID" 2>/dev/null || true
echo "==> letting the contexts settle (at most $SETTLE s)"
deadline=$((SECONDS + SETTLE))
while left="$(unsettled)" && (( left > 0 )) && (( SECONDS < deadline )); do
    sleep 2
done
if [[ "${left:-1}" != 0 ]]; then
    echo "still working on ${left:-?} context(s) after $SETTLE s; they are counted as they stand" >&2
fi
line="$(summary)"
echo "$line" >&3
read -r completed plan_b budget_exhausted <<<"$(sed -E 's/.*completed=([0-9]+) plan_b=([0-9]+) budget_exhausted=([0-9]+).*/\1 \2 \3/' <<<"$line")"
if (( completed == 0 || plan_b == 0 || budget_exhausted == 0 )); then
    echo "demo: expected completed, plan_b and budget_exhausted contexts; logs in $LOGS" >&2
    exit 1
fi
