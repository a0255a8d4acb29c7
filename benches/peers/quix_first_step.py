"""Quix Streams running baton's first workflow step, for benches/compare.rs.

A vision event moves its context from VisionAnalyzing to ResearcherQueued:
the state per context (state, locked_by, attempts, budget) lives in RocksDB
with its changelog, and a handover goes to the researcher topic. A failed
vision call (status "error") counts an attempt (three fail the context); a
record that is not JSON is dropped. Exactly-once, committing every 100 ms.

Usage: quix_first_step.py BOOTSTRAP INPUT OUTPUT EXPECTED STATS_PATH STATE_DIR

When EXPECTED inputs have been processed it writes STATS_PATH: the wall time
and process CPU time (all threads) at the first and at the EXPECTED-th input.
Each output carries `made_at` (time.time() when it was made).
"""

import json
import os
import sys
import time

from quixstreams import Application
from quixstreams.models import TopicConfig

BUDGET = 20000
MAX_ATTEMPTS = 3


def main():
    bootstrap, input_name, output_name, expected, stats_path, state_dir = sys.argv[1:7]
    expected = int(expected)
    app = Application(
        broker_address=bootstrap,
        consumer_group="quix-first-step",
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        commit_interval=0.1,
        state_dir=state_dir,
        loglevel="WARNING",
        # As for every peer (benches/support/mod.rs FETCH_WAIT_MS): the test
        # broker holds a fetch for its whole wait.
        consumer_extra_config={"session.timeout.ms": 6000, "fetch.wait.max.ms": 10},
    )
    # Explicit retention: this broker's DescribeConfigs returns only the keys
    # that were set (BROKER.md, gap 6).
    config = TopicConfig(
        num_partitions=6,
        replication_factor=1,
        extra_config={"retention.ms": "604800000", "retention.bytes": "-1"},
    )
    source = app.topic(input_name, value_deserializer="bytes", config=config)
    sink = app.topic(output_name, value_serializer="json", config=config)

    progress = {"count": 0}

    def step(raw, state):
        count = progress["count"] = progress["count"] + 1
        if count == 1:
            progress["first_wall"] = time.time()
            progress["first_cpu"] = time.process_time()
        if count == expected:
            done = {
                "first_wall": progress["first_wall"],
                "first_cpu": progress["first_cpu"],
                "last_wall": time.time(),
                "last_cpu": time.process_time(),
                "count": count,
            }
            tmp = stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(done, f)
            os.rename(tmp, stats_path)
        try:
            event = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("event") != "tool.vision_analyze.completed":
            return None
        wf = state.get("wf") or {
            "state": "VisionAnalyzing",
            "locked_by": None,
            "attempts": 0,
            "budget": BUDGET,
        }
        if wf["state"] != "VisionAnalyzing":
            return None
        usage = event.get("usage") or {}
        tokens = int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))
        wf["budget"] -= tokens
        if event.get("status") == "error":
            wf["attempts"] += 1
            if wf["attempts"] >= MAX_ATTEMPTS:
                wf["state"] = "Failed"
            state.set("wf", wf)
            return None
        wf["state"] = "ResearcherQueued"
        wf["locked_by"] = "researcher"
        wf["attempts"] = 0
        state.set("wf", wf)
        context = event.get("context_id")
        return {
            "handover_id": f"{context}-vision-researcher-enrich_reasoning",
            "context_id": context,
            "agent": "researcher",
            "intent": "enrich_reasoning",
            "from_event": event.get("event_id"),
            "budget_remaining": wf["budget"],
            "input": event.get("result"),
            "made_at": time.time(),
        }

    sdf = app.dataframe(source)
    sdf = sdf.apply(step, stateful=True)
    sdf = sdf.filter(lambda value: value is not None)
    sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()
