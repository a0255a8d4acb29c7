//! The researcher: consumes `mcp.handover.researcher`, hydrates its prompt
//! from the handover's memory snapshot, writes what it learned to
//! `mcp.memory` (`memory.upserted`), and answers with
//! `tool.research_enrich.completed` and its token usage.
//!
//! No model is called: the reply is deterministic simulated text whose token
//! counts come from baton's tokenizer (`baton::agent::simulate`). The one
//! line to replace with a real model call is marked below.
//!
//! ```text
//! cargo run --example agents -- researcher --bootstrap-servers 127.0.0.1:9092
//! ```

use baton::agent::emit::MemoryWrite;
use baton::agent::simulate::{prompt_of, simulated_reply};
use baton::agent::{AgentArgs, Job, Outcome, Worker};
use baton::handover::Handover;
use baton::memory::MemoryKind;
use serde_json::json;

/// The intent baton's PlanB route sends the researcher: a person should
/// look at the context; the researcher notes it in memory and answers
/// nothing to the workflow.
const PLAN_B_INTENT: &str = "plan_b_manual_review";

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// Words in each simulated reply (its output tokens follow).
    #[arg(long, env = "BATON_AGENT_WORDS", default_value_t = 60)]
    words: usize,
}

struct Researcher {
    words: usize,
}

impl Worker for Researcher {
    fn agent(&self) -> &str {
        "researcher"
    }

    fn tool(&self, _handover: &Handover) -> String {
        "research_enrich".into()
    }

    fn work(&self, job: &Job) -> Outcome {
        let context = &job.handover.context_id;
        if job.handover.intent == PLAN_B_INTENT {
            return Outcome::Noted {
                memories: vec![MemoryWrite {
                    kind: MemoryKind::Instruction,
                    content: format!("PlanB for {context}: queued for manual review"),
                    importance: 0.9,
                    key: Some("plan_b".into()),
                }],
            };
        }
        // The prompt: the intent, the vision result and the snapshot's memory.
        let prompt = prompt_of(job);
        // The model call goes here: send `prompt` to the model and take its
        // text and the usage its API reports. Simulated instead:
        let reply = simulated_reply(&job.handover.handover_id, &prompt, self.words);
        let memories_seen = job
            .snapshot
            .as_ref()
            .and_then(|s| s.get("memories"))
            .and_then(|m| m.as_array())
            .map_or(0, Vec::len);
        Outcome::Completed {
            result: json!({
                "summary": reply.text,
                "memories_seen": memories_seen,
                "simulated": true,
            }),
            usage: reply.usage,
            memories: vec![MemoryWrite {
                kind: MemoryKind::Fact,
                content: format!("research: {}", first_words(&reply.text, 12)),
                importance: 0.7,
                key: Some("research_summary".into()),
            }],
        }
    }
}

fn first_words(text: &str, n: usize) -> String {
    text.split(' ').take(n).collect::<Vec<_>>().join(" ")
}

pub fn main(cli: Args) -> std::process::ExitCode {
    baton::agent::main(cli.agent, Researcher { words: cli.words })
}
