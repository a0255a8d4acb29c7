//! The example agents of the vision-research workflow, in one binary so the
//! debug build links baton once (each agent is its own module here):
//!
//! ```text
//! cargo run --example agents -- vision-source --bootstrap-servers 127.0.0.1:9092 --rate 2
//! cargo run --example agents -- researcher    --bootstrap-servers 127.0.0.1:9092
//! cargo run --example agents -- valuation     --bootstrap-servers 127.0.0.1:9092
//! cargo run --example agents -- playwright    --bootstrap-servers 127.0.0.1:9092 --failure-percent 30
//! cargo run --example agents -- fetcher       --bootstrap-servers 127.0.0.1:9092 --failure-percent 50
//! cargo run --example agents -- reporter      --bootstrap-servers 127.0.0.1:9092
//! ```
//!
//! **No model is called.** Every agent's "reasoning" is deterministic
//! simulated text whose token counts come from the tokenizer baton budgets
//! with; `researcher.rs` marks the line where a real model call goes.
//! `examples/README.md` documents every flag.

mod fetcher;
mod playwright;
mod reporter;
mod researcher;
mod valuation;
mod vision_source;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agents",
    about = "baton's example agents (simulated: no model is called)"
)]
struct Cli {
    #[command(subcommand)]
    agent: Agent,
}

#[derive(Subcommand)]
enum Agent {
    /// Starts new contexts at a steady rate (tool.vision_analyze.completed).
    VisionSource(vision_source::Args),
    /// Answers mcp.handover.researcher: snapshot in, memory and research out.
    Researcher(researcher::Args),
    /// Answers mcp.handover.valuation with an estimate.
    Valuation(valuation::Args),
    /// Answers mcp.handover.playwright with a screenshot, failing a share.
    Playwright(playwright::Args),
    /// Answers mcp.handover.fetcher (the screenshot's fallback), failing a share.
    Fetcher(fetcher::Args),
    /// Answers mcp.handover.reporter with a summary.
    Reporter(reporter::Args),
}

fn main() -> ExitCode {
    match Cli::parse().agent {
        Agent::VisionSource(args) => vision_source::main(args),
        Agent::Researcher(args) => researcher::main(args),
        Agent::Valuation(args) => valuation::main(args),
        Agent::Playwright(args) => playwright::main(args),
        Agent::Fetcher(args) => fetcher::main(args),
        Agent::Reporter(args) => reporter::main(args),
    }
}
