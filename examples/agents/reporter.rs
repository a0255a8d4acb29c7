//! The reporter: consumes `mcp.handover.reporter` once a context completed,
//! writes a summary to its memory and answers with
//! `tool.summarize_report.completed` (no workflow waits for it: baton counts
//! it as unrouted). Simulated: no model is called.
//!
//! ```text
//! cargo run --example agents -- reporter --bootstrap-servers 127.0.0.1:9092
//! ```

use baton::agent::emit::MemoryWrite;
use baton::agent::simulate::{Reply, SimulatedTool};
use baton::agent::{AgentArgs, Job};
use baton::memory::MemoryKind;
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// Words in each simulated report.
    #[arg(long, env = "BATON_AGENT_WORDS", default_value_t = 40)]
    words: usize,
}

fn report(_job: &Job, reply: &Reply) -> Value {
    json!({"report": reply.text, "simulated": true})
}

fn remember(job: &Job, reply: &Reply) -> MemoryWrite {
    MemoryWrite {
        kind: MemoryKind::Context,
        content: format!(
            "report for {}: {}",
            job.handover.context_id,
            reply.text.split(' ').take(10).collect::<Vec<_>>().join(" ")
        ),
        importance: 0.5,
        key: Some("report".into()),
    }
}

pub fn main(cli: Args) -> std::process::ExitCode {
    let worker = SimulatedTool {
        agent: "reporter".into(),
        tool: "summarize_report".into(),
        words: cli.words,
        failure_percent: 0,
        result: report,
        memory: Some(remember),
    };
    baton::agent::main(cli.agent, worker)
}
