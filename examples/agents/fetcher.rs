//! The fetcher: the screenshot's alternate. Consumes `mcp.handover.fetcher`
//! (the healer's fallback when screenshots keep failing) and answers with
//! `tool.fetch_page.completed`, which the workflow's join counts as the
//! screenshot's. It fails `--failure-percent` of its handovers, so PlanB is
//! seen too. Simulated: no network and no model.
//!
//! ```text
//! cargo run --example agents -- fetcher --bootstrap-servers 127.0.0.1:9092 --failure-percent 50
//! ```

use baton::agent::simulate::{Reply, SimulatedTool};
use baton::agent::{AgentArgs, Job};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// Words in each simulated page text.
    #[arg(long, env = "BATON_AGENT_WORDS", default_value_t = 50)]
    words: usize,
    /// Fetches that fail (`status=error`), in percent.
    #[arg(long, env = "BATON_AGENT_FAILURE_PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    failure_percent: u8,
}

fn page(job: &Job, reply: &Reply) -> Value {
    json!({"url": format!("https://example.test/{}", job.handover.context_id), "text": reply.text, "simulated": true})
}

pub fn main(cli: Args) -> std::process::ExitCode {
    let worker = SimulatedTool {
        agent: "fetcher".into(),
        tool: "fetch_page".into(),
        words: cli.words,
        failure_percent: cli.failure_percent,
        result: page,
        memory: None,
    };
    baton::agent::main(cli.agent, worker)
}
