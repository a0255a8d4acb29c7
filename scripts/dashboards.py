#!/usr/bin/env python3
"""Writes baton's Grafana dashboards (grafana/dashboards/*.json).

The dashboards are data: this script is their source, so that every panel
gets the same shape (a unit, a description, the data-source variable, the
pod and workflow filters) and a layout without hand-counted grid positions.

    python3 scripts/dashboards.py          # rewrite the JSON files
    python3 scripts/dashboards.py --check  # exit 1 if a file is out of date

tests/prometheus.rs evaluates every query written here against a real
Prometheus scraping real pods; scripts/validate-dashboards.py checks the
JSON's structure.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "grafana" / "dashboards"
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
POD = 'pod=~"$pod"'
WF = 'workflow=~"$workflow"'
RATE = "[$__rate_interval]"


class Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self):
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def place(self, w, h):
        if self.x + w > 24:
            self.newline()
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_height = max(self.row_height, h)
        return pos

    def newline(self):
        self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def id(self):
        value = self.next_id
        self.next_id += 1
        return value


def target(expr, legend, ref):
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "range": True,
    }


def targets(queries):
    refs = "ABCDEFGH"
    return [target(expr, legend, refs[i]) for i, (expr, legend) in enumerate(queries)]


def thresholds(steps):
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


def stat(layout, title, description, unit, queries, steps=((None, "green"),), w=4):
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "id": layout.id(),
        "datasource": DS,
        "gridPos": layout.place(w, 4),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds"},
                "mappings": [],
                "thresholds": thresholds(steps),
                "decimals": 1,
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "textMode": "auto",
            "orientation": "auto",
            "wideLayout": True,
            "showPercentChange": False,
        },
        "targets": targets(queries),
    }


def timeseries(layout, title, description, unit, queries, stacked=False, w=12):
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "id": layout.id(),
        "datasource": DS,
        "gridPos": layout.place(w, 8),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "palette-classic"},
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 2,
                    "fillOpacity": 20,
                    "gradientMode": "opacity",
                    "showPoints": "never",
                    "lineInterpolation": "smooth",
                    "spanNulls": False,
                    "axisPlacement": "auto",
                    "scaleDistribution": {"type": "linear"},
                    "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
                    "thresholdsStyle": {"mode": "off"},
                },
                "mappings": [],
                "thresholds": thresholds([(None, "green")]),
                "min": 0,
            },
            "overrides": [],
        },
        "options": {
            "legend": {
                "showLegend": True,
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["mean", "max", "lastNotNull"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets(queries),
    }


def bargauge(layout, title, description, unit, queries, w=12):
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "id": layout.id(),
        "datasource": DS,
        "gridPos": layout.place(w, 8),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "palette-classic"},
                "mappings": [],
                "thresholds": thresholds([(None, "green")]),
                "min": 0,
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
            "sizing": "auto",
            "minVizWidth": 8,
            "minVizHeight": 16,
        },
        "targets": targets(queries),
    }


def row(layout, title):
    layout.newline()
    panel = {
        "type": "row",
        "title": title,
        "id": layout.id(),
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": layout.y},
        "panels": [],
    }
    layout.y += 1
    return panel


def variables(workflow=False):
    items = [
        {
            "name": "DS_PROMETHEUS",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
            "hide": 0,
            "includeAll": False,
            "multi": False,
            "options": [],
            "refresh": 1,
            "regex": "",
            "skipUrlSync": False,
        },
        query_variable("pod", "Pod", "label_values(baton_ready, pod)"),
    ]
    if workflow:
        items.append(
            query_variable("workflow", "Workflow", "label_values(baton_workflows, workflow)")
        )
    return {"list": items}


def query_variable(name, label, query):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "hide": 0,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "skipUrlSync": False,
    }


def dashboard(uid, title, description, tags, panels, workflow=False):
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [
            {
                "title": "baton dashboards",
                "type": "dashboards",
                "tags": ["baton"],
                "asDropdown": True,
                "icon": "external link",
                "includeVars": True,
                "keepTime": True,
                "targetBlank": False,
                "tooltip": "The other baton dashboards",
                "url": "",
            },
            {
                "title": "Runbook",
                "type": "link",
                "tags": [],
                "asDropdown": False,
                "icon": "doc",
                "includeVars": False,
                "keepTime": False,
                "targetBlank": True,
                "tooltip": "What each alert means and what to do (docs/runbook.md)",
                "url": "https://github.com/baton-rs/baton/blob/main/docs/runbook.md",
            },
        ],
        "liveNow": False,
        "panels": panels,
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": ["baton"] + tags,
        "templating": variables(workflow),
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m", "15m"]},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


def quantile(q, metric, by="", selector=POD):
    group = f"{by}, le" if by else "le"
    return (
        f"histogram_quantile({q}, sum by ({group}) "
        f"(rate({metric}_bucket{{{selector}}}{RATE})))"
    )


def overview():
    lay = Layout()
    p = [
        stat(lay, "Records consumed", "Input records taken from Kafka per second, all topics.", "reqps",
             [(f"sum(rate(baton_records_consumed_total{{{POD}}}{RATE}))", "consumed")]),
        stat(lay, "Consumer lag", "Records between the committed offsets and the fetch-side high watermarks, all partitions (baton_consumer_lag_records). KEDA scales on this.", "short",
             [(f"sum(baton_consumer_lag_records{{{POD}}})", "lag")],
             steps=((None, "green"), (1000, "orange"), (10000, "red"))),
        stat(lay, "End-to-end p99", "99th percentile from an input record's timestamp to the commit of its outputs.", "s",
             [(quantile(0.99, "baton_end_to_end_latency_seconds"), "p99")],
             steps=((None, "green"), (1, "orange"), (5, "red"))),
        stat(lay, "Dead letters", "Records sent to the DLQ per second, all classes.", "reqps",
             [(f"sum(rate(baton_dlq_records_total{{{POD}}}{RATE}))", "dlq")],
             steps=((None, "green"), (0.1, "orange"), (1, "red"))),
        stat(lay, "Ready pods", "Pods answering /readyz with 200 (joined, nothing restoring).", "short",
             [(f"sum(baton_ready{{{POD}}})", "ready")]),
        stat(lay, "Assigned partitions", "Input partitions assigned across the selected pods.", "short",
             [(f"sum(baton_assigned_partitions{{{POD}}})", "partitions")]),
    ]
    p.append(row(lay, "Throughput"))
    p += [
        timeseries(lay, "Records consumed /s by topic", "Input records taken from each topic.", "reqps",
                   [(f"sum by (topic) (rate(baton_records_consumed_total{{{POD}}}{RATE}))", "{{topic}}")], stacked=True),
        timeseries(lay, "Handovers /s by agent", "Handover records written to each agent's topic.", "reqps",
                   [(f"sum by (agent) (rate(baton_handovers_produced_total{{{POD}}}{RATE}))", "{{agent}}")], stacked=True),
        timeseries(lay, "Records per transaction", "Input records per committed transaction: mean and p99.", "short",
                   [(f"sum(rate(baton_transaction_records_sum{{{POD}}}{RATE})) / sum(rate(baton_transaction_records_count{{{POD}}}{RATE}))", "mean"),
                    (quantile(0.99, "baton_transaction_records"), "p99")]),
        timeseries(lay, "Unrouted, duplicate and stale events /s", "Events no workflow mentions, upstream duplicates, and answers for a step already left: counted and skipped.", "reqps",
                   [(f"sum(rate(baton_events_unrouted_total{{{POD}}}{RATE}))", "unrouted"),
                    (f"sum(rate(baton_events_duplicate_total{{{POD}}}{RATE}))", "duplicate"),
                    (f"sum(rate(baton_events_stale_total{{{POD}}}{RATE}))", "stale")]),
    ]
    p.append(row(lay, "Lag"))
    p += [
        timeseries(lay, "Consumer lag by partition", "Records behind the fetch-side high watermark, per input partition (the pod that owns it reports it).", "short",
                   [(f"sum by (topic, partition) (baton_consumer_lag_records{{{POD}}})", "{{topic}}/{{partition}}")]),
        timeseries(lay, "Committed offset age", "Seconds since a partition's committed offset last moved while records waited; 0 when caught up. A rising line is a stalled partition.", "s",
                   [(f"max by (topic, partition) (baton_committed_offset_age_seconds{{{POD}}})", "{{topic}}/{{partition}}")]),
    ]
    p.append(row(lay, "Latency"))
    p += [
        timeseries(lay, "End-to-end latency", "From an input record's own timestamp to the commit of the transaction holding its outputs: p50, p90, p99.", "s",
                   [(quantile(0.5, "baton_end_to_end_latency_seconds"), "p50"),
                    (quantile(0.9, "baton_end_to_end_latency_seconds"), "p90"),
                    (quantile(0.99, "baton_end_to_end_latency_seconds"), "p99")]),
        timeseries(lay, "Agent hop latency p90 by agent", "How long each agent held a context: from the input that handed it over to the agent's answer (record timestamps).", "s",
                   [(quantile(0.9, "baton_agent_hop_seconds", by="agent"), "{{agent}}")]),
        timeseries(lay, "Commit latency", "Time to flush, send offsets and commit one transaction: p50 and p99.", "s",
                   [(quantile(0.5, "baton_transaction_commit_seconds"), "p50"),
                    (quantile(0.99, "baton_transaction_commit_seconds"), "p99")]),
        timeseries(lay, "Stage latency p99", "Per-record time in each stage of the pipeline (decode, step, encode).", "s",
                   [(quantile(0.99, "baton_stage_seconds", by="stage"), "{{stage}}")]),
    ]
    p.append(row(lay, "Errors"))
    p += [
        timeseries(lay, "Dead letters /s by class", "Records sent to the DLQ, by error class.", "reqps",
                   [(f"sum by (class) (rate(baton_dlq_records_total{{{POD}}}{RATE}))", "{{class}}")], stacked=True),
        timeseries(lay, "Transactions /s by outcome", "Committed, aborted, fenced, fatal and unknown-outcome transactions.", "reqps",
                   [(f"sum by (outcome) (rate(baton_transactions_total{{{POD}}}{RATE}))", "{{outcome}}")]),
        timeseries(lay, "Schema Registry", "Registry failures by kind, lookups by outcome, and retries of an unreachable registry.", "reqps",
                   [(f"sum by (kind) (rate(baton_schema_registry_errors_total{{{POD}}}{RATE}))", "error {{kind}}"),
                    (f"sum by (outcome) (rate(baton_schema_lookups_total{{{POD}}}{RATE}))", "lookup {{outcome}}"),
                    (f"sum by (dependency) (rate(baton_transient_errors_total{{{POD}}}{RATE}))", "retry {{dependency}}")]),
        timeseries(lay, "Paused partitions", "Tasks waiting out a transient failure (registry down, state reads failing).", "short",
                   [(f"sum by (pod) (baton_partitions_paused{{{POD}}})", "{{pod}}")]),
    ]
    p.append(row(lay, "HTTP surface and live feed"))
    p += [
        timeseries(lay, "HTTP requests /s", "Requests by endpoint and status, refusals for a missing token.", "reqps",
                   [(f"sum by (endpoint, status) (rate(baton_http_requests_total{{{POD}}}{RATE}))", "{{endpoint}} {{status}}"),
                    (f"sum(rate(baton_http_unauthorized_total{{{POD}}}{RATE}))", "unauthorized")]),
        timeseries(lay, "Live feed", "Open live-feed (SSE) clients per pod, and open HTTP connections.", "short",
                   [(f"sum by (pod) (baton_sse_clients{{{POD}}})", "feeds {{pod}}"),
                    (f"sum by (pod) (baton_http_connections{{{POD}}})", "connections {{pod}}")]),
    ]
    return dashboard(
        "baton-overview", "baton overview",
        "Is baton keeping up? Throughput, consumer lag, end-to-end latency and errors. Expects a `pod` label on every series (Kubernetes pod discovery, or the static labels in docker/prometheus.yml).",
        ["overview"], p)


def workflows():
    lay = Layout()
    sel = f"{POD},{WF}"
    p = [
        stat(lay, "Live contexts", "Contexts in the selected workflows, every state (baton_workflows).", "short",
             [(f"sum(baton_workflows{{{sel}}})", "contexts")], w=6),
        stat(lay, "Tokens debited /s", "Tokens committed steps debited, per second.", "short",
             [(f"sum(rate(baton_tokens_debited_total{{{sel}}}{RATE}))", "tokens")], w=6),
        stat(lay, "Budgets exhausted in range", "Contexts stopped because their token budget ran out.", "short",
             [(f"sum(increase(baton_budgets_exhausted_total{{{sel}}}[$__range]))", "exhausted")],
             steps=((None, "green"), (1, "orange")), w=6),
        stat(lay, "Failed in range", "Contexts whose workflow ended failed.", "short",
             [(f"sum(increase(baton_workflows_failed_total{{{sel}}}[$__range]))", "failed")],
             steps=((None, "green"), (1, "red")), w=6),
    ]
    p.append(row(lay, "Workflows by state"))
    p += [
        timeseries(lay, "Contexts by state", "Committed contexts per workflow and state: counted on restore, moved on every commit.", "short",
                   [(f"sum by (workflow, state) (baton_workflows{{{sel}}})", "{{workflow}} {{state}}")], stacked=True, w=24),
        bargauge(lay, "Contexts now by state", "The latest count of contexts in each state.", "short",
                 [(f"sort_desc(sum by (state) (baton_workflows{{{sel}}}))", "{{state}}")]),
        timeseries(lay, "PlanB entries and failures /s", "Contexts moved to their PlanB route, and contexts that failed, per workflow.", "reqps",
                   [(f"sum by (workflow) (rate(baton_plan_b_entries_total{{{sel}}}{RATE}))", "plan B {{workflow}}"),
                    (f"sum by (workflow) (rate(baton_workflows_failed_total{{{sel}}}{RATE}))", "failed {{workflow}}")]),
    ]
    p.append(row(lay, "Budgets"))
    p += [
        timeseries(lay, "Tokens debited /s by workflow", "Tokens debited by committed steps.", "short",
                   [(f"sum by (workflow) (rate(baton_tokens_debited_total{{{sel}}}{RATE}))", "{{workflow}}")], stacked=True),
        timeseries(lay, "Budgets exhausted /s by workflow", "Contexts whose budget ran out; a spike means a misbehaving agent or a budget set too low.", "reqps",
                   [(f"sum by (workflow) (rate(baton_budgets_exhausted_total{{{sel}}}{RATE}))", "{{workflow}}")]),
    ]
    p.append(row(lay, "Agents"))
    p += [
        timeseries(lay, "Agent hop latency p50 by agent", "Median time an agent held a context before answering.", "s",
                   [(quantile(0.5, "baton_agent_hop_seconds", by="agent"), "{{agent}}")]),
        timeseries(lay, "Heartbeats and held events /s", "agent.heartbeat records by outcome; events held while a retry is pending, and released.", "reqps",
                   [(f"sum by (outcome) (rate(baton_heartbeats_total{{{POD}}}{RATE}))", "heartbeat {{outcome}}"),
                    (f"sum(rate(baton_events_held_total{{{POD}}}{RATE}))", "held"),
                    (f"sum(rate(baton_events_released_total{{{POD}}}{RATE}))", "released")]),
    ]
    p.append(row(lay, "Timers"))
    p += [
        timeseries(lay, "Timers pending and contexts overdue", "Timers in the pods' indexes, and timers due more than two timer rounds ago and not fired.", "short",
                   [(f"sum(baton_timers_pending{{{POD}}})", "pending"),
                    (f"sum(baton_contexts_overdue{{{POD}}})", "overdue")]),
        timeseries(lay, "Timers fired /s by kind and lateness p99", "Step, heartbeat, deadline and approval timers fired; how late the p99 fired.", "short",
                   [(f"sum by (kind) (rate(baton_timers_fired_total{{{POD}}}{RATE}))", "fired {{kind}}"),
                    (quantile(0.99, "baton_timer_lateness_seconds"), "lateness p99 (s)")]),
    ]
    p.append(row(lay, "Memory"))
    p += [
        timeseries(lay, "Memory and snapshots /s", "memory.upserted records applied, snapshots frozen at handovers, snapshots pruned by retention.", "reqps",
                   [(f"sum(rate(baton_memory_upserts_total{{{POD}}}{RATE}))", "upserts"),
                    (f"sum(rate(baton_snapshots_frozen_total{{{POD}}}{RATE}))", "frozen"),
                    (f"sum(rate(baton_snapshots_pruned_total{{{POD}}}{RATE}))", "pruned")], w=24),
    ]
    return dashboard(
        "baton-workflows", "baton workflows and budgets",
        "Is work lost or stalled? Contexts by workflow and state, tokens, budgets, PlanB, failures, agents and timers.",
        ["workflows"], p, workflow=True)


def reliability():
    lay = Layout()
    p = [
        stat(lay, "Parked in range", "Records the healer parked (gave up on): each needs a person.", "short",
             [("sum(increase(baton_parked_records_total[$__range]))", "parked")],
             steps=((None, "green"), (1, "red")), w=6),
        stat(lay, "Aborted or fenced transactions", "Transactions that did not commit, in range.", "short",
             [(f'sum(increase(baton_transactions_total{{{POD},outcome!="committed"}}[$__range]))', "not committed")],
             steps=((None, "green"), (1, "orange")), w=6),
        stat(lay, "Retries pending", "Retries the healer scheduled and that are not due yet.", "short",
             [("sum(baton_healer_retries_pending)", "pending")], w=6),
        stat(lay, "Rebalances in range", "Consumer-group rebalance callbacks, every kind.", "short",
             [(f"sum(increase(baton_rebalances_total{{{POD}}}[$__range]))", "rebalances")], w=6),
    ]
    p.append(row(lay, "Dead letters and the healer"))
    p += [
        timeseries(lay, "Dead letters /s by class", "Records the pods sent to the DLQ.", "reqps",
                   [(f"sum by (class) (rate(baton_dlq_records_total{{{POD}}}{RATE}))", "{{class}}")], stacked=True),
        bargauge(lay, "Dead letters in range by class", "Which classes dominate the DLQ over the range.", "short",
                 [(f"sort_desc(sum by (class) (increase(baton_dlq_records_total{{{POD}}}[$__range])))", "{{class}}")]),
        timeseries(lay, "Healer decisions /s", "What the healer decided per dead letter: retry, alternate, plan_b, park.", "reqps",
                   [("sum by (decision) (rate(baton_healer_decisions_total[$__rate_interval]))", "{{decision}}")], stacked=True),
        timeseries(lay, "Parked records by class", "Records parked in the range, by class.", "short",
                   [("sum by (class) (increase(baton_parked_records_total[$__range]))", "{{class}}")]),
        timeseries(lay, "Healer retries", "Retries pending, the age of the oldest, whether the retry topic is paused at its bound, retries capped.", "short",
                   [("sum(baton_healer_retries_pending)", "pending"),
                    ("max(baton_healer_oldest_retry_age_seconds)", "oldest age (s)"),
                    ("max(baton_healer_retries_paused)", "paused"),
                    ("sum(increase(baton_healer_retries_capped_total[$__rate_interval]))", "capped")]),
        timeseries(lay, "Healer commands applied /s", "Commands the tasks received from the healer, by action and outcome.", "reqps",
                   [(f"sum by (action, outcome) (rate(baton_control_commands_total{{{POD}}}{RATE}))", "{{action}} {{outcome}}")]),
    ]
    p.append(row(lay, "Transactions"))
    p += [
        timeseries(lay, "Transactions not committed", "Share of transactions that aborted, were fenced, failed fatally or ended unknown.", "percentunit",
                   [(f'(sum(rate(baton_transactions_total{{{POD},outcome!="committed"}}{RATE})) or vector(0)) / sum(rate(baton_transactions_total{{{POD}}}{RATE}))', "not committed")]),
        timeseries(lay, "Fencings and producer rebuilds", "Fenced transactions and producer rebuilds: another pod took this pod's transactional.id, or the producer failed fatally.", "short",
                   [(f'sum by (pod) (increase(baton_transactions_total{{{POD},outcome="fenced"}}{RATE}))', "fenced {{pod}}"),
                    (f"sum by (pod) (increase(baton_producer_rebuilds_total{{{POD}}}{RATE}))", "rebuilt {{pod}}")]),
        timeseries(lay, "Records isolated and reopens", "Records the broker kept refusing (retried alone), and partitions reopened from their changelog, by reason.", "short",
                   [(f"sum by (outcome) (increase(baton_records_isolated_total{{{POD}}}{RATE}))", "isolated {{outcome}}"),
                    (f"sum by (reason) (increase(baton_partition_reopens_total{{{POD}}}{RATE}))", "reopen {{reason}}")]),
        timeseries(lay, "Output records /s", "Records handed to the transactional producer, forwarded to the repartition topic, and dead letters truncated to fit.", "reqps",
                   [(f"sum(rate(baton_records_sent_total{{{POD}}}{RATE}))", "sent"),
                    (f"sum(rate(baton_records_repartitioned_total{{{POD}}}{RATE}))", "repartitioned"),
                    (f"sum(rate(baton_dlq_truncated_total{{{POD}}}{RATE}))", "dlq truncated")]),
    ]
    p.append(row(lay, "Group and pods"))
    p += [
        timeseries(lay, "Rebalances by kind", "Assign, revoke and lost callbacks.", "short",
                   [(f"sum by (kind) (increase(baton_rebalances_total{{{POD}}}{RATE}))", "{{kind}}")]),
        timeseries(lay, "Assigned partitions and readiness", "Partitions per pod, and whether each pod is ready.", "short",
                   [(f"sum by (pod) (baton_assigned_partitions{{{POD}}})", "partitions {{pod}}"),
                    (f"sum by (pod) (baton_ready{{{POD}}})", "ready {{pod}}")]),
        timeseries(lay, "HTTP guards", "Connections refused at the cap, cut by the server, failed accepts, busy renderings, ignored membership records, forwarded requests.", "short",
                   [(f"sum(increase(baton_http_connections_refused_total{{{POD}}}{RATE}))", "refused"),
                    (f"sum by (reason) (increase(baton_http_connections_cut_total{{{POD}}}{RATE}))", "cut {{reason}}"),
                    (f"sum(increase(baton_http_accept_errors_total{{{POD}}}{RATE}))", "accept errors"),
                    (f"sum(increase(baton_snapshot_render_busy_total{{{POD}}}{RATE}))", "render busy"),
                    (f"sum by (reason) (increase(baton_members_ignored_total{{{POD}}}{RATE}))", "member ignored {{reason}}"),
                    (f"sum by (outcome) (increase(baton_forwarded_requests_total{{{POD}}}{RATE}))", "forwarded {{outcome}}")]),
        timeseries(lay, "Live feed events", "Live-feed events sent, clients dropped for stalling, feeds ended at their lifetime.", "short",
                   [(f"sum(rate(baton_sse_events_total{{{POD}}}{RATE}))", "events /s"),
                    (f"sum(increase(baton_sse_dropped_total{{{POD}}}{RATE}))", "dropped"),
                    (f"sum by (reason) (increase(baton_sse_ended_total{{{POD}}}{RATE}))", "ended {{reason}}")]),
    ]
    return dashboard(
        "baton-reliability", "baton reliability",
        "What went wrong and what the system did about it: DLQ, the healer, transactions, aborts, fencings, rebalances and the HTTP guards.",
        ["reliability"], p)


def state_and_restore():
    lay = Layout()
    p = [
        stat(lay, "Context keys", "Keys in the context stores of the selected pods (RocksDB's estimate).", "short",
             [(f'sum(baton_state_keys{{{POD},store="contexts"}})', "keys")], w=6),
        stat(lay, "Store bytes", "Bytes in every store of the selected pods (RocksDB's live-data estimate plus memtables).", "bytes",
             [(f"sum(baton_state_bytes{{{POD}}})", "bytes")], w=6),
        stat(lay, "Records left to restore", "Changelog records restoring partitions still have to read.", "short",
             [(f"sum(baton_state_restore_records_remaining{{{POD}}})", "remaining")], w=6),
        stat(lay, "Partitions restoring", "Partitions whose stores are being restored.", "short",
             [(f"sum(baton_partitions_restoring{{{POD}}})", "restoring")], w=6),
    ]
    p.append(row(lay, "Stores"))
    p += [
        timeseries(lay, "Keys by store", "RocksDB's estimate of keys per store (contexts, timer index), per pod.", "short",
                   [(f"sum by (pod, store) (baton_state_keys{{{POD}}})", "{{pod}} {{store}}")]),
        timeseries(lay, "Bytes by store", "RocksDB's live-data estimate plus memtables, per store and pod.", "bytes",
                   [(f"sum by (pod, store) (baton_state_bytes{{{POD}}})", "{{pod}} {{store}}")]),
    ]
    p.append(row(lay, "Restore"))
    p += [
        timeseries(lay, "Restore progress", "Changelog records left to read, and partitions restoring, per pod.", "short",
                   [(f"sum by (pod) (baton_state_restore_records_remaining{{{POD}}})", "remaining {{pod}}"),
                    (f"sum by (pod) (baton_partitions_restoring{{{POD}}})", "restoring {{pod}}")]),
        timeseries(lay, "Restore rate", "Changelog records read per second while restoring, by outcome (applied, skipped as uncommitted or stale).", "reqps",
                   [(f"sum by (outcome) (rate(baton_state_restore_records_total{{{POD}}}{RATE}))", "{{outcome}}")], stacked=True),
        stat(lay, "Restores in range", "Store partitions restored in the range.", "short",
             [(f"sum(increase(baton_state_restore_seconds_count{{{POD}}}[$__range]))", "restores")], w=6),
        stat(lay, "Restore time p99 in range", "99th percentile of the time to restore one store partition.", "s",
             [(f"histogram_quantile(0.99, sum by (le) (increase(baton_state_restore_seconds_bucket{{{POD}}}[$__range])))", "p99")], w=6),
        timeseries(lay, "Transient state errors /s", "State reads that failed and were retried (the partition pauses meanwhile).", "reqps",
                   [(f'sum(rate(baton_transient_errors_total{{{POD},dependency="state"}}{RATE}))', "state")]),
    ]
    return dashboard(
        "baton-state", "baton state and restore",
        "The RocksDB stores and their restores: keys and bytes per store, records left to restore, restore rate and time.",
        ["state"], p)


DASHBOARDS = {
    "baton-overview.json": overview,
    "baton-workflows.json": workflows,
    "baton-reliability.json": reliability,
    "baton-state.json": state_and_restore,
}


def render(build):
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, build in DASHBOARDS.items():
        path = OUT / name
        text = render(build)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run scripts/dashboards.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
