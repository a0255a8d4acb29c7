//! The valuation agent: consumes `mcp.handover.valuation` and answers with
//! `tool.valuation_estimate.completed` (a simulated estimate; no model is
//! called, token counts from baton's tokenizer).
//!
//! ```text
//! cargo run --example agents -- valuation --bootstrap-servers 127.0.0.1:9092
//! ```

use baton::agent::simulate::{Reply, SimulatedTool, percentile};
use baton::agent::{AgentArgs, Job};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// Words in each simulated reply.
    #[arg(long, env = "BATON_AGENT_WORDS", default_value_t = 40)]
    words: usize,
    /// Handovers answered with `status=error`, in percent.
    #[arg(long, env = "BATON_AGENT_FAILURE_PERCENT", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    failure_percent: u8,
}

fn estimate(job: &Job, reply: &Reply) -> Value {
    let low = 50 + u64::from(percentile(&job.handover.context_id, "valuation")) * 10;
    json!({"estimate_usd": {"low": low, "high": low * 2}, "rationale": reply.text, "simulated": true})
}

pub fn main(cli: Args) -> std::process::ExitCode {
    let worker = SimulatedTool {
        agent: "valuation".into(),
        tool: "valuation_estimate".into(),
        words: cli.words,
        failure_percent: cli.failure_percent,
        result: estimate,
        memory: None,
    };
    baton::agent::main(cli.agent, worker)
}
