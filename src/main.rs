use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use baton::cli::{self, Cli, LogFormat};

// The engine allocates and frees small buffers for every record, across
// threads (decode on the partition tasks, free after librdkafka's delivery):
// glibc's malloc spent about 16% of the CPU on that, and mimalloc takes about
// a fifth off the CPU per event (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[tokio::main]
async fn main() -> ExitCode {
    // Freed pages go back to the OS at once instead of after 10 ms: with a
    // million contexts that is ~35 MiB less resident memory, at no measurable
    // CPU cost (docs/benchmarks.md).
    // SAFETY: sets a plain integer option; mimalloc reads it atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli::execute(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
