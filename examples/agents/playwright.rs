//! The playwright agent: consumes `mcp.handover.playwright` and answers with
//! `tool.browser_take_screenshot.completed`. It fails `--failure-percent` of
//! its handovers (chosen by handover id), so baton's DLQ, the healer's
//! retries, the fetcher fallback and PlanB are all seen. Simulated: no
//! browser and no model.
//!
//! ```text
//! cargo run --example agents -- playwright --bootstrap-servers 127.0.0.1:9092 --failure-percent 30
//! ```

use baton::agent::simulate::{Reply, SimulatedTool};
use baton::agent::{AgentArgs, Job};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// Words in each simulated page description.
    #[arg(long, env = "BATON_AGENT_WORDS", default_value_t = 30)]
    words: usize,
    /// Screenshots that fail (`status=error`), in percent.
    #[arg(long, env = "BATON_AGENT_FAILURE_PERCENT", default_value_t = 30, value_parser = clap::value_parser!(u8).range(0..=100))]
    failure_percent: u8,
}

fn screenshot(job: &Job, reply: &Reply) -> Value {
    json!({
        "screenshot": format!("s3://evidence/{}/{}.png", job.handover.context_id, job.handover.attempt),
        "page_text": reply.text,
        "simulated": true,
    })
}

pub fn main(cli: Args) -> std::process::ExitCode {
    let worker = SimulatedTool {
        agent: "playwright".into(),
        tool: "browser_take_screenshot".into(),
        words: cli.words,
        failure_percent: cli.failure_percent,
        result: screenshot,
        memory: None,
    };
    baton::agent::main(cli.agent, worker)
}
