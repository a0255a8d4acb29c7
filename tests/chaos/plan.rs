//! What a chaos run does, decided from its seed before it starts: how many
//! contexts, what each context's agents will answer, and the schedule of
//! faults. `--seed` (BATON_CHAOS_SEED) replays the same plan.

use std::time::Duration;

use serde_json::{Value, json};

/// How big and how long a run is.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub seed: u64,
    /// Workflows started by the vision and document sources.
    pub contexts: usize,
    /// At most this many contexts are between their first event and their
    /// agents' last answer, so the input backlog (and with it the time from
    /// an input to its handover) stays bounded while pods are killed.
    pub window: usize,
    /// How fast the sources start contexts, at most.
    pub starts_per_second: f64,
    /// The step, heartbeat and approval timeouts of the chaos topology.
    /// Long enough that no fault delays an answering agent past it; the
    /// stalled agent and the silent approvers are the only ones who miss it.
    pub step_timeout: Duration,
    /// Malformed records in the burst, and oversized ones.
    pub malformed: usize,
    pub oversized: usize,
    /// SIGKILLs of a random pod, one every 2 to 5 s; at least this many.
    pub min_kills: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// About two minutes: every fault once (kills ten times), a few hundred
    /// contexts. Runs in scripts/test.sh.
    Ci,
    /// At least 100,000 events, kills all the way through.
    Full,
}

impl Settings {
    /// From BATON_CHAOS_MODE (`ci`, the default, or `full`), BATON_CHAOS_SEED
    /// (default: from the clock) and BATON_CHAOS_CONTEXTS (override).
    pub fn from_env() -> Settings {
        let mode = match std::env::var("BATON_CHAOS_MODE").as_deref() {
            Ok("full") => Mode::Full,
            Ok("ci") | Err(_) => Mode::Ci,
            Ok(other) => panic!("BATON_CHAOS_MODE: `{other}` is not ci or full"),
        };
        let seed = match std::env::var("BATON_CHAOS_SEED") {
            Ok(text) => text
                .parse()
                .unwrap_or_else(|_| panic!("BATON_CHAOS_SEED: `{text}` is not a number")),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 % 1_000_000_007)
                .unwrap_or(1),
        };
        let mut settings = match mode {
            Mode::Ci => Settings {
                mode,
                seed,
                contexts: 360,
                window: 200,
                starts_per_second: 6.0,
                step_timeout: Duration::from_secs(75),
                malformed: 10_000,
                oversized: 20,
                min_kills: 10,
            },
            // 26,000 contexts at about 4.1 events each: over 100,000 events.
            Mode::Full => Settings {
                mode,
                seed,
                contexts: 26_000,
                window: 1_500,
                starts_per_second: 400.0,
                step_timeout: Duration::from_secs(120),
                malformed: 10_000,
                oversized: 50,
                min_kills: 10,
            },
        };
        if let Ok(text) = std::env::var("BATON_CHAOS_CONTEXTS") {
            settings.contexts = text
                .parse()
                .unwrap_or_else(|_| panic!("BATON_CHAOS_CONTEXTS: `{text}` is not a number"));
        }
        settings
    }
}

/// What a context's agents will do: decided by the seed, before the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// vision-research, every agent answers.
    Plain,
    /// The screenshot fails once, then the healer's retry succeeds.
    FlakyScreenshot,
    /// Playwright fails every attempt, then the fetcher (its alternate)
    /// does too: the healer moves the workflow to PlanB.
    DeadScreenshot,
    /// A budget the research alone exhausts.
    SmallBudget,
    /// A record that is no event at all, keyed by the context, after its
    /// first event: poison, parked; the workflow goes on.
    Poisoned,
    /// A research result for a context that never started: an invalid
    /// transition, unhealable, parked.
    Orphan,
    /// research-with-approval, approved after the research.
    Approved,
    /// research-with-approval, denied.
    Denied,
    /// research-with-approval, nobody answers: the approval timer denies.
    ApprovalTimesOut,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Plain,
        Kind::FlakyScreenshot,
        Kind::DeadScreenshot,
        Kind::SmallBudget,
        Kind::Poisoned,
        Kind::Orphan,
        Kind::Approved,
        Kind::Denied,
        Kind::ApprovalTimesOut,
    ];

    /// Out of 1000 contexts.
    fn weight(self) -> u32 {
        match self {
            Kind::Plain => 800,
            Kind::FlakyScreenshot => 40,
            Kind::DeadScreenshot => 15,
            Kind::SmallBudget => 15,
            Kind::Poisoned => 10,
            Kind::Orphan => 10,
            Kind::Approved => 50,
            Kind::Denied => 30,
            Kind::ApprovalTimesOut => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::FlakyScreenshot => "flaky_screenshot",
            Kind::DeadScreenshot => "dead_screenshot",
            Kind::SmallBudget => "small_budget",
            Kind::Poisoned => "poisoned",
            Kind::Orphan => "orphan",
            Kind::Approved => "approved",
            Kind::Denied => "denied",
            Kind::ApprovalTimesOut => "approval_times_out",
        }
    }

    pub fn approval_workflow(self) -> bool {
        matches!(self, Kind::Approved | Kind::Denied | Kind::ApprovalTimesOut)
    }
}

/// One context of the run.
#[derive(Debug, Clone)]
pub struct ContextPlan {
    pub id: String,
    pub kind: Kind,
    /// Token usage of each answer, by agent.
    pub usage: [(u64, u64); 4],
}

pub fn contexts(settings: &Settings) -> Vec<ContextPlan> {
    let mut rng = fastrand::Rng::with_seed(settings.seed);
    let total: u32 = Kind::ALL.iter().map(|k| k.weight()).sum();
    (0..settings.contexts)
        .map(|i| {
            let mut pick = rng.u32(0..total);
            let kind = Kind::ALL
                .into_iter()
                .find(|k| {
                    if pick < k.weight() {
                        true
                    } else {
                        pick -= k.weight();
                        false
                    }
                })
                .unwrap_or(Kind::Plain);
            let mut usage = [(0, 0); 4];
            for slot in &mut usage {
                *slot = (rng.u64(50..400), rng.u64(20..200));
            }
            ContextPlan {
                id: format!("chaos-{}-{i}", settings.seed),
                kind,
                usage,
            }
        })
        .collect()
}

/// The agents of the workflows, by the index of their usage slot.
pub fn usage_slot(agent: &str) -> usize {
    match agent {
        "researcher" => 0,
        "valuation" => 1,
        "playwright" | "fetcher" => 2,
        _ => 3,
    }
}

/// The first event of a context, as its source writes it: vision events in
/// the platform's legacy JSON form, document events and small budgets in
/// the canonical form.
pub fn first_event(context: &ContextPlan) -> Value {
    let id = &context.id;
    match context.kind {
        Kind::SmallBudget => json!({
            "event_id": format!("{id}-vision"), "context_id": id,
            "event": "tool.vision_analyze.completed", "server_id": "srv-vision", "tool": "vision_analyze",
            "arguments": {"image": format!("s3://uploads/{id}.png")},
            "result": {"labels": ["lamp"], "confidence": 0.71},
            "token_budget": 120,
        }),
        kind if kind.approval_workflow() => json!({
            "event_id": format!("{id}-document"), "context_id": id,
            "event": "tool.document_ingest.completed", "server_id": "srv-docs", "tool": "document_ingest",
            "arguments": {"uri": format!("s3://docs/{id}.pdf")}, "result": {"pages": 12},
        }),
        _ => json!({
            "event": "tool.vision_analyze.completed", "serverId": "srv-vision",
            "payload": {"tool": "vision_analyze", "arguments": {"image": format!("s3://uploads/{id}.png")},
                        "result": {"labels": ["sofa", "mid-century"], "confidence": 0.93}},
            "conversationId": id, "correlationId": format!("{id}-r1"),
            "eventId": format!("{id}-vision"),
        }),
    }
}

/// A tool's answer to one call: (tool, event name, result or error).
pub fn answer(
    context: &ContextPlan,
    agent: &str,
    attempt: u32,
) -> Option<(&'static str, bool, Value)> {
    let fails = match (context.kind, agent) {
        (Kind::FlakyScreenshot, "playwright") => attempt == 1,
        (Kind::DeadScreenshot, "playwright" | "fetcher") => true,
        _ => false,
    };
    let (tool, result) = match agent {
        "researcher" => (
            "research_enrich",
            json!({"sources": 4, "summary": format!("notes for {}", context.id)}),
        ),
        "valuation" => (
            "valuation_estimate",
            json!({"low": 800, "high": 1400, "currency": "EUR"}),
        ),
        "playwright" => (
            "browser_take_screenshot",
            json!({"path": format!("/shots/{}-{attempt}.png", context.id)}),
        ),
        "fetcher" => ("fetch_page", json!({"bytes": 18_432, "status": 200})),
        _ => return None,
    };
    Some((tool, fails, result))
}

/// A garbage record, keyed by the context, that no decoder accepts.
pub fn poison_for(context: &ContextPlan) -> Vec<u8> {
    format!("\u{1}not an event for {}", context.id).into_bytes()
}

/// One fault, at its time from the start of the run.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// SIGKILL a pod picked at the time (from the seed), restart it under its id.
    KillPod { pick: u64 },
    /// Start a fourth pod.
    AddPod,
    /// SIGTERM one pod for good (it leaves the group).
    RemovePod { pick: u64 },
    /// SIGSTOP a pod for this long (past its session timeout), then SIGCONT.
    FreezePod { pick: u64, for_: Duration },
    /// Refuse and close a pod's connections through the proxy, then heal.
    CutPod { pick: u64, for_: Duration },
    /// Drop every frame of a pod's connections (never answer, never close).
    BlackHolePod { pick: u64, for_: Duration },
    /// Malformed and oversized records, all at once.
    MalformedBurst,
    /// The Schema Registry stops answering (connections refused) for this long.
    RegistryOutage { for_: Duration },
    /// SIGKILL the healer and start it again under its id.
    KillHealer,
    /// The researcher ignores the first call of every vision-research
    /// context handed to it for this long: their step timers fire.
    StallResearcher { for_: Duration },
    /// Fill the state disk of the pod that has a small one, then free it.
    FillDisk { for_: Duration },
}

impl Fault {
    pub fn name(&self) -> &'static str {
        match self {
            Fault::KillPod { .. } => "sigkill_pod",
            Fault::AddPod => "add_pod",
            Fault::RemovePod { .. } => "remove_pod",
            Fault::FreezePod { .. } => "sigstop_pod",
            Fault::CutPod { .. } => "cut_pod",
            Fault::BlackHolePod { .. } => "black_hole_pod",
            Fault::MalformedBurst => "malformed_burst",
            Fault::RegistryOutage { .. } => "registry_outage",
            Fault::KillHealer => "sigkill_healer",
            Fault::StallResearcher { .. } => "stall_researcher",
            Fault::FillDisk { .. } => "fill_state_disk",
        }
    }
}

/// The schedule: (time from the start, fault), in time order. Every fault
/// the issue names is in it. The kills run every 2 to 5 s, at least
/// `min_kills` times; in full mode the schedule holds kills for half an
/// hour and the run carries them out for as long as its sources feed.
pub fn schedule(settings: &Settings) -> Vec<(Duration, Fault)> {
    let mut rng = fastrand::Rng::with_seed(settings.seed ^ 0x00c4_a05e);
    let s = Duration::from_secs;
    let jitter =
        |rng: &mut fastrand::Rng, at: u64| Duration::from_millis(at * 1000 + rng.u64(0..2000));
    let mut faults = vec![
        (jitter(&mut rng, 1), Fault::StallResearcher { for_: s(5) }),
        (jitter(&mut rng, 12), Fault::KillHealer),
        (jitter(&mut rng, 15), Fault::MalformedBurst),
        (s(18), Fault::FillDisk { for_: s(12) }),
        // A full disk bites when RocksDB must write files (its WAL is off,
        // the changelog is the log): a rebalance makes the disk pod flush
        // what it gives up and restore what it is given.
        (s(20), Fault::KillPod { pick: rng.u64(..) }),
        (jitter(&mut rng, 21), Fault::AddPod),
        (
            jitter(&mut rng, 25),
            Fault::FreezePod {
                pick: rng.u64(..),
                for_: s(8),
            },
        ),
        (jitter(&mut rng, 31), Fault::RegistryOutage { for_: s(20) }),
        // A pod restarted while the registry is away has no writer schemas
        // cached: it must wait for the registry, not dead-letter.
        (s(36), Fault::KillPod { pick: rng.u64(..) }),
        (jitter(&mut rng, 40), Fault::KillHealer),
        (
            jitter(&mut rng, 45),
            Fault::CutPod {
                pick: rng.u64(..),
                for_: s(8),
            },
        ),
        (
            jitter(&mut rng, 56),
            Fault::BlackHolePod {
                pick: rng.u64(..),
                for_: s(8),
            },
        ),
        (jitter(&mut rng, 67), Fault::RemovePod { pick: rng.u64(..) }),
    ];
    // The kills, from 6 s on, every 2 to 5 s.
    let mut at = s(6);
    let mut kills = 0;
    let until = if settings.mode == Mode::Full {
        s(1800)
    } else {
        Duration::ZERO
    };
    while kills < settings.min_kills.saturating_sub(1) || at < until {
        faults.push((at, Fault::KillPod { pick: rng.u64(..) }));
        kills += 1;
        at += Duration::from_millis(rng.u64(2000..=5000));
    }
    faults.sort_by_key(|(at, _)| *at);
    faults
}
