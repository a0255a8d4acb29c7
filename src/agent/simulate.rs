//! Stand-ins for a model: **no model is called anywhere in baton's example
//! agents.** Their "reasoning" is deterministic text made from a seed (the
//! handover id), so a rerun of a handover writes the same output, and its
//! token counts come from the same cl100k tokenizer baton debits budgets
//! with ([`crate::workflow::estimate_tokens`]).
//!
//! A real agent replaces [`simulated_reply`] with its model call (see
//! `examples/researcher.rs`, "the model call goes here") and reports the
//! usage the model's API returns.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::emit::MemoryWrite;
use super::{Job, Outcome, Worker};
use crate::event::Usage;
use crate::handover::Handover;
use crate::workflow::estimate_tokens;

const WORDS: &[&str] = &[
    "the",
    "image",
    "shows",
    "a",
    "red",
    "bicycle",
    "leaning",
    "against",
    "brick",
    "wall",
    "vintage",
    "frame",
    "steel",
    "market",
    "listing",
    "price",
    "condition",
    "evidence",
    "seller",
    "photo",
    "brand",
    "model",
    "year",
    "comparable",
    "sales",
    "suggest",
    "range",
    "between",
    "and",
    "with",
    "minor",
    "rust",
    "on",
    "chain",
    "original",
    "paint",
    "likely",
    "from",
    "1970s",
    "source",
    "page",
    "confirms",
    "serial",
    "number",
    "matches",
    "catalogue",
    "entry",
    "notes",
];

/// A number in `0..100` fixed by `seed` and `salt`: the same handover
/// always gets the same answer, so a simulated failure is reproducible.
pub fn percentile(seed: &str, salt: &str) -> u8 {
    let digest = Sha256::new()
        .chain_update(salt.as_bytes())
        .chain_update([0])
        .chain_update(seed.as_bytes())
        .finalize();
    (u16::from_be_bytes([digest[0], digest[1]]) % 100) as u8
}

/// `words` words of simulated text, fixed by `seed`.
pub fn simulated_text(seed: &str, words: usize) -> String {
    let mut out = String::with_capacity(words * 7);
    let mut block = Sha256::digest(seed.as_bytes());
    let mut index = 0;
    for n in 0..words {
        if index + 2 > block.len() {
            block = Sha256::digest(block);
            index = 0;
        }
        let pick = u16::from_be_bytes([block[index], block[index + 1]]) as usize % WORDS.len();
        index += 2;
        if n > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[pick]);
    }
    out
}

/// A simulated model reply: the text and the usage a model would report,
/// counted with baton's tokenizer (the prompt as input, the reply as output).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    pub usage: Usage,
}

/// What a model would answer to `prompt`: `words` words fixed by `seed`.
/// This is where a real agent calls its model instead.
pub fn simulated_reply(seed: &str, prompt: &Value, words: usize) -> Reply {
    let text = simulated_text(seed, words);
    let usage = Usage {
        input_tokens: estimate_tokens(prompt),
        output_tokens: estimate_tokens(&Value::String(text.clone())),
    };
    Reply { text, usage }
}

/// A simulated tool agent (valuation, playwright, fetcher, reporter): reads
/// its prompt from the handover and the snapshot, "answers" with
/// [`simulated_reply`], and fails a fixed share of its handovers, chosen by
/// handover id so a rerun fails the same ones.
pub struct SimulatedTool {
    pub agent: String,
    pub tool: String,
    /// Words in each simulated reply.
    pub words: usize,
    /// Handovers failing with `status=error`, in percent (0..=100).
    pub failure_percent: u8,
    /// Shapes the tool's `result` from the reply.
    pub result: fn(&Job, &Reply) -> Value,
    /// A memory entry to write with each answer, if any.
    pub memory: Option<fn(&Job, &Reply) -> MemoryWrite>,
}

/// The prompt a simulated agent "sends": its intent, the last tool output
/// and the snapshot's rendered memory, as a real agent would build it.
pub fn prompt_of(job: &Job) -> Value {
    serde_json::json!({
        "intent": job.handover.intent,
        "attempt": job.handover.attempt,
        "last_tool_output": job.handover.last_tool_output,
        "memory": job.snapshot,
    })
}

impl Worker for SimulatedTool {
    fn agent(&self) -> &str {
        &self.agent
    }

    fn tool(&self, _handover: &Handover) -> String {
        self.tool.clone()
    }

    fn work(&self, job: &Job) -> Outcome {
        let prompt = prompt_of(job);
        // The model call goes here in a real agent.
        let reply = simulated_reply(&job.handover.handover_id, &prompt, self.words);
        if percentile(&job.handover.handover_id, &self.tool) < self.failure_percent {
            return Outcome::Failed {
                error: format!(
                    "simulated failure of {} ({}% of calls fail)",
                    self.tool, self.failure_percent
                ),
                usage: Usage {
                    input_tokens: reply.usage.input_tokens,
                    output_tokens: 0,
                },
            };
        }
        Outcome::Completed {
            result: (self.result)(job, &reply),
            usage: reply.usage,
            memories: self
                .memory
                .map(|m| vec![m(job, &reply)])
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn text_and_usage_are_deterministic_and_counted_by_the_tokenizer() {
        let prompt = json!({"intent": "enrich_reasoning", "memory": ["a red bicycle"]});
        let first = simulated_reply("h-1", &prompt, 40);
        let again = simulated_reply("h-1", &prompt, 40);
        assert_eq!(first, again);
        assert_eq!(first.text.split(' ').count(), 40);
        assert_eq!(first.usage.input_tokens, estimate_tokens(&prompt));
        assert_eq!(
            first.usage.output_tokens,
            estimate_tokens(&Value::String(first.text.clone()))
        );
        assert!(first.usage.output_tokens >= 40);
        assert_ne!(simulated_text("h-2", 40), first.text);
    }

    #[test]
    fn percentiles_spread_over_the_range() {
        let hits = (0..1000)
            .filter(|n| percentile(&format!("h-{n}"), "fail") < 20)
            .count();
        assert!((120..280).contains(&hits), "about 20% of 1000: {hits}");
        assert_eq!(percentile("h-1", "fail"), percentile("h-1", "fail"));
    }
}
