//! Every Prometheus metric baton exports, defined in one place.
//!
//! Labels stay low-cardinality: topics, agents, classes and outcomes, never a
//! context id. Hot paths take pre-built label handles from here.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The registry `/metrics` serves.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// All metrics, registered on first use.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics::register(&REGISTRY));

pub struct Metrics {
    /// Input records taken from Kafka, by topic.
    pub records_consumed: IntCounterVec,
    /// Events no topology definition mentions: counted and skipped.
    pub events_unrouted: IntCounter,
    /// Duplicate events (same `event_id`) that changed nothing.
    pub events_duplicate: IntCounter,
    /// Handover records written, by target agent.
    pub handovers_produced: IntCounterVec,
    /// Records sent to the DLQ, by error class.
    pub dlq_records: IntCounterVec,
    /// Kafka transactions, by outcome (committed, aborted, fenced, fatal,
    /// outcome_unknown).
    pub transactions: IntCounterVec,
    /// Partitions whose stores were closed, reopened and restored, by reason
    /// (commit_unknown, producer_rebuilt, state_write, missed_barrier,
    /// state_read).
    pub partition_reopens: IntCounterVec,
    /// Records the broker kept refusing, processed alone in their own
    /// transaction: `committed` alone, or `dead_lettered`.
    pub records_isolated: IntCounterVec,
    /// Time to flush, send offsets and commit one transaction.
    pub transaction_commit_seconds: Histogram,
    /// Input records per committed transaction.
    pub transaction_records: Histogram,
    /// Output records handed to the transactional producer: handovers,
    /// changelogs, status updates and dead letters (aborted ones included).
    pub records_sent: IntCounter,
    /// Input records forwarded to the repartition topic because their key
    /// was not their `context_id`.
    pub records_repartitioned: IntCounter,
    /// Dead letters whose value was cut to fit `message.max.bytes`.
    pub dlq_truncated: IntCounter,
    /// Partitions currently assigned to this pod.
    pub assigned_partitions: IntGauge,
    /// Rebalance callbacks, by kind (assign, revoke, lost).
    pub rebalances: IntCounterVec,
    /// Producer rebuilds after a fatal error or fencing.
    pub producer_rebuilds: IntCounter,
    /// Time spent in the per-record processing path, by stage.
    pub stage_seconds: HistogramVec,
    /// Changelog records read while restoring, by outcome.
    pub restore_records: IntCounterVec,
    /// Time to restore one store partition.
    pub restore_seconds: Histogram,
    /// Partitions currently restoring.
    pub partitions_restoring: IntGauge,
    /// Tasks paused because something outside the record failed (the
    /// Schema Registry is down): their partitions wait, nothing is skipped.
    pub partitions_paused: IntGauge,
    /// Failed attempts to reach a dependency, by dependency.
    pub transient_errors: IntCounterVec,
    /// Writer schemas fetched from the registry, by outcome (found, unknown).
    pub schema_lookups: IntCounterVec,
    /// `memory.upserted` records applied.
    pub memory_upserts: IntCounter,
    /// Memory snapshots frozen at handovers.
    pub snapshots_frozen: IntCounter,
    /// Snapshots dropped by retention.
    pub snapshots_pruned: IntCounter,
    /// Snapshot and state requests, by endpoint and HTTP status.
    pub http_requests: IntCounterVec,
    /// Requests answered by forwarding to the owning pod, by outcome.
    pub forwarded_requests: IntCounterVec,
    /// Open live-feed (SSE) connections.
    pub sse_clients: IntGauge,
    /// Live-feed events sent to clients.
    pub sse_events: IntCounter,
    /// Live-feed clients dropped after accepting nothing for the stall limit.
    pub sse_dropped: IntCounter,
    /// Events held in a context's state while a retry is pending.
    pub events_held: IntCounter,
    /// Held events released after the healer's command was applied.
    pub events_released: IntCounter,
    /// Healer commands a task received, by action and outcome
    /// (applied, duplicate, stale).
    pub control_commands: IntCounterVec,
    /// `baton heal`: decisions per DLQ record, by kind (retry, alternate,
    /// plan_b, park).
    pub healer_decisions: IntCounterVec,
    /// `baton heal`: records parked, by class.
    pub parked_records: IntCounterVec,
    /// `baton heal`: retries scheduled and not yet due.
    pub retries_pending: IntGauge,
    /// `baton heal`: how long the oldest pending retry has waited, in seconds.
    pub oldest_retry_seconds: Gauge,
    /// Completions for a step the context has left (late answers, a second
    /// attempt's, anything after a terminal state): counted and skipped.
    pub events_stale: IntCounter,
    /// `agent.heartbeat` records, by outcome (accepted, ignored).
    pub heartbeats: IntCounterVec,
    /// Timers in this pod's partitions' timer indexes (RocksDB's estimate).
    pub timers_pending: IntGauge,
    /// Timers fired, by kind (step, heartbeat, deadline, approval).
    pub timers_fired: IntCounterVec,
    /// How late a timer fired: the firing's wall clock minus its due time.
    pub timer_lateness_seconds: Histogram,
    /// Timers due more than a commit interval ago and not fired yet, by
    /// partition: contexts nobody is acting on.
    pub contexts_overdue: IntGaugeVec,
}

impl Metrics {
    fn register(registry: &Registry) -> Metrics {
        let metrics = Metrics {
            records_consumed: IntCounterVec::new(
                Opts::new("baton_records_consumed_total", "Input records consumed"),
                &["topic"],
            )
            .expect("valid metric"),
            events_unrouted: IntCounter::new(
                "baton_events_unrouted_total",
                "Events that no topology definition mentions (skipped)",
            )
            .expect("valid metric"),
            events_duplicate: IntCounter::new(
                "baton_events_duplicate_total",
                "Events whose event_id was already applied (no effect)",
            )
            .expect("valid metric"),
            handovers_produced: IntCounterVec::new(
                Opts::new(
                    "baton_handovers_produced_total",
                    "Handover records produced",
                ),
                &["agent"],
            )
            .expect("valid metric"),
            dlq_records: IntCounterVec::new(
                Opts::new("baton_dlq_records_total", "Records sent to the DLQ"),
                &["class"],
            )
            .expect("valid metric"),
            transactions: IntCounterVec::new(
                Opts::new("baton_transactions_total", "Kafka transactions by outcome"),
                &["outcome"],
            )
            .expect("valid metric"),
            partition_reopens: IntCounterVec::new(
                Opts::new(
                    "baton_partition_reopens_total",
                    "Partitions reopened and restored from their changelogs, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            records_isolated: IntCounterVec::new(
                Opts::new(
                    "baton_records_isolated_total",
                    "Records the broker kept refusing, retried alone, by outcome",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            transaction_commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "baton_transaction_commit_seconds",
                    "Time to send offsets and commit a transaction",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )
            .expect("valid metric"),
            transaction_records: Histogram::with_opts(
                HistogramOpts::new(
                    "baton_transaction_records",
                    "Input records per committed transaction",
                )
                .buckets(prometheus::exponential_buckets(1.0, 4.0, 10).expect("valid buckets")),
            )
            .expect("valid metric"),
            records_sent: IntCounter::new(
                "baton_records_sent_total",
                "Output records handed to the transactional producer (aborted transactions included)",
            )
            .expect("valid metric"),
            records_repartitioned: IntCounter::new(
                "baton_records_repartitioned_total",
                "Input records forwarded to the repartition topic, keyed by their context_id",
            )
            .expect("valid metric"),
            dlq_truncated: IntCounter::new(
                "baton_dlq_truncated_total",
                "Dead letters whose value was cut to fit message.max.bytes",
            )
            .expect("valid metric"),
            assigned_partitions: IntGauge::new(
                "baton_assigned_partitions",
                "Input partitions assigned to this pod",
            )
            .expect("valid metric"),
            rebalances: IntCounterVec::new(
                Opts::new("baton_rebalances_total", "Rebalance callbacks by kind"),
                &["kind"],
            )
            .expect("valid metric"),
            producer_rebuilds: IntCounter::new(
                "baton_producer_rebuilds_total",
                "Transactional producer rebuilds after fencing or a fatal error",
            )
            .expect("valid metric"),
            stage_seconds: HistogramVec::new(
                HistogramOpts::new("baton_stage_seconds", "Time per pipeline stage").buckets(
                    prometheus::exponential_buckets(0.00001, 4.0, 10).expect("valid buckets"),
                ),
                &["stage"],
            )
            .expect("valid metric"),
            restore_records: IntCounterVec::new(
                Opts::new(
                    "baton_state_restore_records_total",
                    "Changelog records read while restoring, by outcome",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            restore_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "baton_state_restore_seconds",
                    "Time to restore one store partition from its changelog",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
            )
            .expect("valid metric"),
            partitions_restoring: IntGauge::new(
                "baton_partitions_restoring",
                "Partitions whose stores are being restored",
            )
            .expect("valid metric"),
            partitions_paused: IntGauge::new(
                "baton_partitions_paused",
                "Tasks waiting out a transient failure (e.g. the schema registry is down)",
            )
            .expect("valid metric"),
            transient_errors: IntCounterVec::new(
                Opts::new(
                    "baton_transient_errors_total",
                    "Failed attempts to reach a dependency; retried with backoff",
                ),
                &["dependency"],
            )
            .expect("valid metric"),
            schema_lookups: IntCounterVec::new(
                Opts::new(
                    "baton_schema_lookups_total",
                    "Writer schemas fetched from the schema registry by id",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            memory_upserts: IntCounter::new(
                "baton_memory_upserts_total",
                "memory.upserted records applied to context memory",
            )
            .expect("valid metric"),
            snapshots_frozen: IntCounter::new(
                "baton_snapshots_frozen_total",
                "Memory snapshots frozen at handovers",
            )
            .expect("valid metric"),
            snapshots_pruned: IntCounter::new(
                "baton_snapshots_pruned_total",
                "Memory snapshots dropped by retention",
            )
            .expect("valid metric"),
            http_requests: IntCounterVec::new(
                Opts::new(
                    "baton_http_requests_total",
                    "HTTP requests, by endpoint and status",
                ),
                &["endpoint", "status"],
            )
            .expect("valid metric"),
            forwarded_requests: IntCounterVec::new(
                Opts::new(
                    "baton_forwarded_requests_total",
                    "Requests forwarded to the pod that owns the context, by outcome",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            sse_clients: IntGauge::new("baton_sse_clients", "Open live-feed (SSE) connections")
                .expect("valid metric"),
            sse_events: IntCounter::new("baton_sse_events_total", "Live-feed events sent")
                .expect("valid metric"),
            sse_dropped: IntCounter::new(
                "baton_sse_dropped_total",
                "Live-feed clients dropped after accepting nothing for the stall limit (10 s)",
            )
            .expect("valid metric"),
            events_held: IntCounter::new(
                "baton_events_held_total",
                "Events held in state while their context's retry is pending",
            )
            .expect("valid metric"),
            events_released: IntCounter::new(
                "baton_events_released_total",
                "Held events released once the healer's command was applied",
            )
            .expect("valid metric"),
            control_commands: IntCounterVec::new(
                Opts::new(
                    "baton_control_commands_total",
                    "Healer commands received, by action and outcome",
                ),
                &["action", "outcome"],
            )
            .expect("valid metric"),
            healer_decisions: IntCounterVec::new(
                Opts::new(
                    "baton_healer_decisions_total",
                    "Healer decisions per dead letter, by kind",
                ),
                &["decision"],
            )
            .expect("valid metric"),
            parked_records: IntCounterVec::new(
                Opts::new(
                    "baton_parked_records_total",
                    "Records parked by the healer, by class",
                ),
                &["class"],
            )
            .expect("valid metric"),
            retries_pending: IntGauge::new(
                "baton_healer_retries_pending",
                "Retries scheduled by the healer and not yet due",
            )
            .expect("valid metric"),
            oldest_retry_seconds: Gauge::new(
                "baton_healer_oldest_retry_age_seconds",
                "How long the oldest pending retry has waited",
            )
            .expect("valid metric"),
            events_stale: IntCounter::new(
                "baton_events_stale_total",
                "Completions for a step the context has left (counted and skipped, never dead-lettered)",
            )
            .expect("valid metric"),
            heartbeats: IntCounterVec::new(
                Opts::new(
                    "baton_heartbeats_total",
                    "agent.heartbeat records, by outcome (accepted, ignored)",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            timers_pending: IntGauge::new(
                "baton_timers_pending",
                "Timers in this pod's timer indexes (RocksDB's estimate)",
            )
            .expect("valid metric"),
            timers_fired: IntCounterVec::new(
                Opts::new(
                    "baton_timers_fired_total",
                    "Timers fired, by kind (step, heartbeat, deadline, approval)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            timer_lateness_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "baton_timer_lateness_seconds",
                    "Wall clock of a timer's firing minus its due time",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            )
            .expect("valid metric"),
            contexts_overdue: IntGaugeVec::new(
                Opts::new(
                    "baton_contexts_overdue",
                    "Timers due more than a commit interval ago and not fired, by partition",
                ),
                &["partition"],
            )
            .expect("valid metric"),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 44] = [
            Box::new(metrics.events_stale.clone()),
            Box::new(metrics.heartbeats.clone()),
            Box::new(metrics.timers_pending.clone()),
            Box::new(metrics.timers_fired.clone()),
            Box::new(metrics.timer_lateness_seconds.clone()),
            Box::new(metrics.contexts_overdue.clone()),
            Box::new(metrics.records_consumed.clone()),
            Box::new(metrics.partition_reopens.clone()),
            Box::new(metrics.records_isolated.clone()),
            Box::new(metrics.events_unrouted.clone()),
            Box::new(metrics.events_duplicate.clone()),
            Box::new(metrics.handovers_produced.clone()),
            Box::new(metrics.dlq_records.clone()),
            Box::new(metrics.transactions.clone()),
            Box::new(metrics.transaction_commit_seconds.clone()),
            Box::new(metrics.transaction_records.clone()),
            Box::new(metrics.records_sent.clone()),
            Box::new(metrics.records_repartitioned.clone()),
            Box::new(metrics.dlq_truncated.clone()),
            Box::new(metrics.assigned_partitions.clone()),
            Box::new(metrics.rebalances.clone()),
            Box::new(metrics.producer_rebuilds.clone()),
            Box::new(metrics.stage_seconds.clone()),
            Box::new(metrics.restore_records.clone()),
            Box::new(metrics.restore_seconds.clone()),
            Box::new(metrics.partitions_restoring.clone()),
            Box::new(metrics.partitions_paused.clone()),
            Box::new(metrics.transient_errors.clone()),
            Box::new(metrics.schema_lookups.clone()),
            Box::new(metrics.memory_upserts.clone()),
            Box::new(metrics.snapshots_frozen.clone()),
            Box::new(metrics.snapshots_pruned.clone()),
            Box::new(metrics.http_requests.clone()),
            Box::new(metrics.forwarded_requests.clone()),
            Box::new(metrics.sse_clients.clone()),
            Box::new(metrics.sse_events.clone()),
            Box::new(metrics.sse_dropped.clone()),
            Box::new(metrics.events_held.clone()),
            Box::new(metrics.events_released.clone()),
            Box::new(metrics.control_commands.clone()),
            Box::new(metrics.healer_decisions.clone()),
            Box::new(metrics.parked_records.clone()),
            Box::new(metrics.retries_pending.clone()),
            Box::new(metrics.oldest_retry_seconds.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        // Known label values exist from the start, so the first increment
        // already shows up in rate() instead of creating the series.
        for outcome in ["committed", "aborted", "fenced", "fatal", "outcome_unknown"] {
            metrics.transactions.with_label_values(&[outcome]);
        }
        for reason in [
            "commit_unknown",
            "producer_rebuilt",
            "state_write",
            "missed_barrier",
            "state_read",
            "state_open",
            "seek_failed",
        ] {
            metrics.partition_reopens.with_label_values(&[reason]);
        }
        for outcome in ["committed", "dead_lettered"] {
            metrics.records_isolated.with_label_values(&[outcome]);
        }
        for kind in ["assign", "revoke", "lost"] {
            metrics.rebalances.with_label_values(&[kind]);
        }
        for class in crate::dlq::ErrorClass::ALL {
            metrics.dlq_records.with_label_values(&[class.as_str()]);
        }
        metrics
            .transient_errors
            .with_label_values(&["schema_registry"]);
        metrics.transient_errors.with_label_values(&["state"]);
        for decision in ["retry", "alternate", "plan_b", "park"] {
            metrics.healer_decisions.with_label_values(&[decision]);
        }
        for class in crate::dlq::ErrorClass::ALL {
            metrics.parked_records.with_label_values(&[class.as_str()]);
        }
        for outcome in ["found", "unknown"] {
            metrics.schema_lookups.with_label_values(&[outcome]);
        }
        for outcome in ["applied", "skipped_uncommitted", "skipped_stale"] {
            metrics.restore_records.with_label_values(&[outcome]);
        }
        for outcome in ["ok", "failed"] {
            metrics.forwarded_requests.with_label_values(&[outcome]);
        }
        for outcome in ["accepted", "ignored"] {
            metrics.heartbeats.with_label_values(&[outcome]);
        }
        for kind in ["step", "heartbeat", "deadline", "approval"] {
            metrics.timers_fired.with_label_values(&[kind]);
        }
        metrics
    }
}

/// The guards of the HTTP surface, membership and the healer's bounds (issue
/// 13). Kept apart from [`Metrics`] so each struct stays one screen of
/// definitions; both register on [`REGISTRY`].
pub static GUARDS: LazyLock<GuardMetrics> = LazyLock::new(|| GuardMetrics::register(&REGISTRY));

pub struct GuardMetrics {
    /// Requests refused for a missing or wrong bearer token.
    pub http_unauthorized: IntCounter,
    /// Open HTTP connections, on every listener of the pod.
    pub http_connections: IntGauge,
    /// Connections answered 503 and closed because the cap was reached.
    pub http_connections_refused: IntCounter,
    /// Connections closed by the server, by reason (header_timeout, idle).
    pub http_connections_cut: IntCounterVec,
    /// Failed `accept` calls (EMFILE and the like), each followed by a backoff.
    pub http_accept_errors: IntCounter,
    /// Live feeds ended by the server, by reason (lifetime).
    pub sse_ended: IntCounterVec,
    /// Snapshot renderings refused because the rendering pool stayed busy.
    pub render_busy: IntCounter,
    /// `{app}-members` records ignored, by reason (unsigned, bad_signature,
    /// bad_url, unreadable).
    pub members_ignored: IntCounterVec,
    /// `baton heal`: retry records whose `not_before` lay beyond the
    /// policy's maximum backoff and was capped.
    pub retries_capped: IntCounter,
    /// `baton heal`: 1 while the retry topic is paused because the pending
    /// retries reached their bound.
    pub retries_paused: IntGauge,
}

impl GuardMetrics {
    fn register(registry: &Registry) -> GuardMetrics {
        let metrics = GuardMetrics {
            http_unauthorized: IntCounter::new(
                "baton_http_unauthorized_total",
                "HTTP requests refused for a missing or wrong bearer token",
            )
            .expect("valid metric"),
            http_connections: IntGauge::new("baton_http_connections", "Open HTTP connections")
                .expect("valid metric"),
            http_connections_refused: IntCounter::new(
                "baton_http_connections_refused_total",
                "HTTP connections answered 503 because the connection cap was reached",
            )
            .expect("valid metric"),
            http_connections_cut: IntCounterVec::new(
                Opts::new(
                    "baton_http_connections_cut_total",
                    "HTTP connections closed by the server, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            http_accept_errors: IntCounter::new(
                "baton_http_accept_errors_total",
                "Failed accept calls on the HTTP listeners (each backs off)",
            )
            .expect("valid metric"),
            sse_ended: IntCounterVec::new(
                Opts::new(
                    "baton_sse_ended_total",
                    "Live feeds ended by the server, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            render_busy: IntCounter::new(
                "baton_snapshot_render_busy_total",
                "Snapshot requests answered 503 because the rendering pool stayed busy",
            )
            .expect("valid metric"),
            members_ignored: IntCounterVec::new(
                Opts::new(
                    "baton_members_ignored_total",
                    "Membership records ignored, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            retries_capped: IntCounter::new(
                "baton_healer_retries_capped_total",
                "Retry records whose not_before was capped at the maximum backoff",
            )
            .expect("valid metric"),
            retries_paused: IntGauge::new(
                "baton_healer_retries_paused",
                "1 while the retry topic is paused at the pending-retry bound",
            )
            .expect("valid metric"),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.http_unauthorized.clone()),
            Box::new(metrics.http_connections.clone()),
            Box::new(metrics.http_connections_refused.clone()),
            Box::new(metrics.http_connections_cut.clone()),
            Box::new(metrics.http_accept_errors.clone()),
            Box::new(metrics.sse_ended.clone()),
            Box::new(metrics.render_busy.clone()),
            Box::new(metrics.members_ignored.clone()),
            Box::new(metrics.retries_capped.clone()),
            Box::new(metrics.retries_paused.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        for reason in ["header_timeout", "idle"] {
            metrics.http_connections_cut.with_label_values(&[reason]);
        }
        metrics.sse_ended.with_label_values(&["lifetime"]);
        for reason in ["unsigned", "bad_signature", "bad_url", "unreadable"] {
            metrics.members_ignored.with_label_values(&[reason]);
        }
        metrics
    }
}

/// What an operator needs to tell whether baton keeps up, loses or stalls
/// work (issue 14): lag, end-to-end latency, workflows by state, budgets,
/// store sizes and restore progress. A third struct, like [`GuardMetrics`],
/// so each stays one screen of definitions; all register on [`REGISTRY`].
pub static OPS: LazyLock<OpsMetrics> = LazyLock::new(|| OpsMetrics::register(&REGISTRY));

/// Buckets for latencies measured from event timestamps: a commit interval
/// (100 ms) up to an agent thinking for minutes.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

pub struct OpsMetrics {
    /// Records between the partition's committed offset and its high
    /// watermark as the consumer's fetches last saw it (not ListOffsets:
    /// BROKER.md gap 3), by topic and partition.
    pub consumer_lag: IntGaugeVec,
    /// Seconds since the partition's committed offset last moved while it
    /// had records to process (0 when caught up).
    pub committed_offset_age: GaugeVec,
    /// From an input record's own timestamp to the commit of the
    /// transaction that holds its outputs.
    pub end_to_end_seconds: Histogram,
    /// How long each agent held a context: from the input that handed it
    /// over to the input that answered it (both record timestamps), by the
    /// agent that held it.
    pub agent_hop_seconds: HistogramVec,
    /// Contexts of this pod's partitions by workflow and state, as
    /// committed (counted on restore, moved on every commit, dropped on
    /// release).
    pub workflows: IntGaugeVec,
    /// Tokens debited by committed steps, by workflow.
    pub tokens_debited: IntCounterVec,
    /// Contexts whose budget ran out (committed), by workflow.
    pub budgets_exhausted: IntCounterVec,
    /// Contexts moved to their workflow's PlanB route (committed), by workflow.
    pub plan_b_entries: IntCounterVec,
    /// Contexts whose workflow failed (committed), by workflow.
    pub workflows_failed: IntCounterVec,
    /// Keys in this pod's open store partitions, by store (RocksDB's
    /// `estimate-num-keys`).
    pub state_keys: IntGaugeVec,
    /// Bytes of this pod's open store partitions, by store (RocksDB's
    /// live-data estimate plus memtables).
    pub state_bytes: IntGaugeVec,
    /// Changelog records this pod's restoring partitions still have to
    /// read (each one's fetch-side high watermark minus its position).
    pub restore_records_remaining: IntGauge,
    /// Schema Registry failures, by kind (unavailable, not_found,
    /// unparseable).
    pub registry_errors: IntCounterVec,
    /// 1 while the pod answers /readyz with 200 (joined, nothing restoring).
    pub ready: IntGauge,
}

impl OpsMetrics {
    fn register(registry: &Registry) -> OpsMetrics {
        let metrics = OpsMetrics {
            consumer_lag: IntGaugeVec::new(
                Opts::new(
                    "baton_consumer_lag_records",
                    "Records between the committed offset and the fetch-side high watermark",
                ),
                &["topic", "partition"],
            )
            .expect("valid metric"),
            committed_offset_age: GaugeVec::new(
                Opts::new(
                    "baton_committed_offset_age_seconds",
                    "Seconds since the committed offset last moved while records waited (0 when caught up)",
                ),
                &["topic", "partition"],
            )
            .expect("valid metric"),
            end_to_end_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "baton_end_to_end_latency_seconds",
                    "From an input record's timestamp to the commit of its outputs",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            agent_hop_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "baton_agent_hop_seconds",
                    "How long an agent held a context: handover input to answer, by record timestamps",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["agent"],
            )
            .expect("valid metric"),
            workflows: IntGaugeVec::new(
                Opts::new(
                    "baton_workflows",
                    "Contexts in this pod's partitions by workflow and state (committed)",
                ),
                &["workflow", "state"],
            )
            .expect("valid metric"),
            tokens_debited: IntCounterVec::new(
                Opts::new(
                    "baton_tokens_debited_total",
                    "Tokens debited by committed steps, by workflow",
                ),
                &["workflow"],
            )
            .expect("valid metric"),
            budgets_exhausted: IntCounterVec::new(
                Opts::new(
                    "baton_budgets_exhausted_total",
                    "Contexts whose token budget ran out, by workflow",
                ),
                &["workflow"],
            )
            .expect("valid metric"),
            plan_b_entries: IntCounterVec::new(
                Opts::new(
                    "baton_plan_b_entries_total",
                    "Contexts moved to their workflow's PlanB route, by workflow",
                ),
                &["workflow"],
            )
            .expect("valid metric"),
            workflows_failed: IntCounterVec::new(
                Opts::new(
                    "baton_workflows_failed_total",
                    "Contexts whose workflow failed, by workflow",
                ),
                &["workflow"],
            )
            .expect("valid metric"),
            state_keys: IntGaugeVec::new(
                Opts::new(
                    "baton_state_keys",
                    "Keys in this pod's open store partitions (RocksDB's estimate), by store",
                ),
                &["store"],
            )
            .expect("valid metric"),
            state_bytes: IntGaugeVec::new(
                Opts::new(
                    "baton_state_bytes",
                    "Bytes in this pod's open store partitions (RocksDB's live-data estimate plus memtables), by store",
                ),
                &["store"],
            )
            .expect("valid metric"),
            restore_records_remaining: IntGauge::new(
                "baton_state_restore_records_remaining",
                "Changelog records this pod's restoring partitions still have to read",
            )
            .expect("valid metric"),
            registry_errors: IntCounterVec::new(
                Opts::new(
                    "baton_schema_registry_errors_total",
                    "Schema Registry failures, by kind",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            ready: IntGauge::new(
                "baton_ready",
                "1 while the pod is ready (joined its group, nothing restoring)",
            )
            .expect("valid metric"),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.consumer_lag.clone()),
            Box::new(metrics.committed_offset_age.clone()),
            Box::new(metrics.end_to_end_seconds.clone()),
            Box::new(metrics.agent_hop_seconds.clone()),
            Box::new(metrics.workflows.clone()),
            Box::new(metrics.tokens_debited.clone()),
            Box::new(metrics.budgets_exhausted.clone()),
            Box::new(metrics.plan_b_entries.clone()),
            Box::new(metrics.workflows_failed.clone()),
            Box::new(metrics.state_keys.clone()),
            Box::new(metrics.state_bytes.clone()),
            Box::new(metrics.restore_records_remaining.clone()),
            Box::new(metrics.registry_errors.clone()),
            Box::new(metrics.ready.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        for kind in RegistryErrorKind::ALL {
            metrics.registry_errors.with_label_values(&[kind.as_str()]);
        }
        for store in StoreFamily::ALL {
            metrics.state_keys.with_label_values(&[store.as_str()]);
            metrics.state_bytes.with_label_values(&[store.as_str()]);
        }
        metrics
    }
}

/// The `kind` of `baton_schema_registry_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryErrorKind {
    /// The registry did not answer, or refused baton (the partition pauses).
    Unavailable,
    /// The registry does not know the schema id (the record is poison).
    NotFound,
    /// The registered schema does not parse as Avro (the record is poison).
    Unparseable,
}

impl RegistryErrorKind {
    pub const ALL: [RegistryErrorKind; 3] = [
        RegistryErrorKind::Unavailable,
        RegistryErrorKind::NotFound,
        RegistryErrorKind::Unparseable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RegistryErrorKind::Unavailable => "unavailable",
            RegistryErrorKind::NotFound => "not_found",
            RegistryErrorKind::Unparseable => "unparseable",
        }
    }
}

/// The `store` of `baton_state_keys` and `baton_state_bytes`: the column
/// families of a partition's RocksDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFamily {
    /// The context records (workflow state and memory).
    Contexts,
    /// The timer index.
    Timers,
}

impl StoreFamily {
    pub const ALL: [StoreFamily; 2] = [StoreFamily::Contexts, StoreFamily::Timers];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreFamily::Contexts => "contexts",
            StoreFamily::Timers => "timers",
        }
    }
}

/// The agent library's metrics ([`crate::agent`]), registered on first use:
/// every example agent reports its handovers, retries and heartbeats here.
pub static AGENTS: LazyLock<AgentMetrics> = LazyLock::new(|| AgentMetrics::register(&REGISTRY));

pub struct AgentMetrics {
    /// Handovers an agent took from its topic, by agent and outcome
    /// (completed, failed, noted, duplicate, skipped, unreadable).
    pub handovers: IntCounterVec,
    /// Calls to a dependency repeated after a retriable error, by agent and
    /// dependency (broker, snapshot, registry).
    pub retries: IntCounterVec,
    /// Dependencies that stayed down past the retry bound, by agent and
    /// dependency: the policy at the bound then applies (a failed tool call,
    /// or the agent exits without committing).
    pub retries_exhausted: IntCounterVec,
    /// `agent.heartbeat` records sent while working, by agent.
    pub heartbeats: IntCounterVec,
    /// Handover ids forgotten by the bounded duplicate filter, by agent.
    pub dedup_evicted: IntCounterVec,
}

impl AgentMetrics {
    fn register(registry: &Registry) -> AgentMetrics {
        let metrics = AgentMetrics {
            handovers: IntCounterVec::new(
                Opts::new(
                    "baton_agent_handovers_total",
                    "Handovers an agent consumed, by outcome",
                ),
                &["agent", "outcome"],
            )
            .expect("valid metric"),
            retries: IntCounterVec::new(
                Opts::new(
                    "baton_agent_retries_total",
                    "Dependency calls an agent repeated after a retriable error",
                ),
                &["agent", "dependency"],
            )
            .expect("valid metric"),
            retries_exhausted: IntCounterVec::new(
                Opts::new(
                    "baton_agent_retries_exhausted_total",
                    "Dependency calls an agent gave up on at the retry bound",
                ),
                &["agent", "dependency"],
            )
            .expect("valid metric"),
            heartbeats: IntCounterVec::new(
                Opts::new(
                    "baton_agent_heartbeats_total",
                    "agent.heartbeat records an agent sent while working",
                ),
                &["agent"],
            )
            .expect("valid metric"),
            dedup_evicted: IntCounterVec::new(
                Opts::new(
                    "baton_agent_dedup_evicted_total",
                    "Handover ids the bounded duplicate filter forgot (oldest first)",
                ),
                &["agent"],
            )
            .expect("valid metric"),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.handovers.clone()),
            Box::new(metrics.retries.clone()),
            Box::new(metrics.retries_exhausted.clone()),
            Box::new(metrics.heartbeats.clone()),
            Box::new(metrics.dedup_evicted.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }
}

/// Renders every registered metric in the Prometheus text format.
pub fn render() -> String {
    LazyLock::force(&METRICS);
    LazyLock::force(&GUARDS);
    LazyLock::force(&OPS);
    LazyLock::force(&AGENTS);
    let mut buffer = Vec::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    let _ = TextEncoder::new().encode(&REGISTRY.gather(), &mut buffer);
    String::from_utf8(buffer).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        METRICS
            .dlq_records
            .with_label_values(&["malformed_json"])
            .inc();
        let text = render();
        assert!(text.contains("baton_dlq_records_total{class=\"malformed_json\"}"));
        assert!(text.contains("# TYPE baton_events_unrouted_total counter"));
    }
}
