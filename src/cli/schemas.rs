//! `baton schemas check|register`: baton's Avro contracts against a live
//! Schema Registry, for producers' CI and for deployments without
//! auto-registration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use clap::{Args, Subcommand};

use super::RegistryArgs;
use crate::config::{FileConfig, registry_config};
use crate::registry::{Avsc, Registry, RegistryError, SubjectStrategy};
use crate::topology::Topology;

#[derive(Debug, Subcommand)]
pub enum SchemasCommand {
    /// Ask the registry whether every `*.avsc` may be registered under its
    /// subject (the compatibility endpoint, under the subject's level). Exits
    /// 1 when one is incompatible, printing why; 2 when the registry or a file
    /// cannot be read.
    Check(SchemasArgs),
    /// Register every `*.avsc` under its subject, oldest file first.
    Register(SchemasArgs),
}

#[derive(Debug, Args)]
pub struct SchemasArgs {
    /// The directory of `.avsc` files.
    #[arg(long, default_value = "schemas")]
    pub dir: PathBuf,
    /// Workflow definitions: their handover topics name the `HandoverEvent` subjects.
    #[arg(long, env = "BATON_TOPOLOGY", default_value = "topology")]
    pub topology: PathBuf,
    /// Input topics: they name the `ToolCompleted` subjects.
    #[arg(long, env = "BATON_INPUT_TOPICS", value_delimiter = ',', default_value = crate::config::DEFAULT_INPUT_TOPIC)]
    pub input_topics: Vec<String>,
    /// The live-feed topic: it names the `StatusUpdate` subject.
    #[arg(long, default_value = STATUS_TOPIC)]
    pub status_topic: String,
    /// The control topic: it names the `ControlCommand` subject.
    #[arg(long, default_value = CONTROL_TOPIC)]
    pub control_topic: String,
    /// Register only: set each subject's compatibility level first
    /// (BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL,
    /// FULL_TRANSITIVE, NONE).
    #[arg(long)]
    pub compatibility: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

const STATUS_TOPIC: &str = "mcp.orchestration.status";
const CONTROL_TOPIC: &str = "mcp.control";
const LEVELS: [&str; 7] = [
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
];

/// One schema file and the subjects it is registered under.
struct Contract {
    file: String,
    schema: Avsc,
    subjects: Vec<String>,
}

pub async fn execute(command: SchemasCommand) -> anyhow::Result<ExitCode> {
    let (args, registering) = match command {
        SchemasCommand::Check(args) => (args, false),
        SchemasCommand::Register(args) => (args, true),
    };
    let mut problems = Vec::new();
    let config = registry_config(&args.registry, &FileConfig::default(), &mut problems);
    if let Some(level) = &args.compatibility
        && !LEVELS.contains(&level.as_str())
    {
        problems.push(format!(
            "compatibility: `{level}` is not one of {}",
            LEVELS.join(", ")
        ));
    }
    let config = match config {
        Some(config) if problems.is_empty() => config,
        None if problems.is_empty() => {
            eprintln!(
                "invalid configuration: schema_registry_url: required (--schema-registry-url or BATON_SCHEMA_REGISTRY_URL)"
            );
            return Ok(ExitCode::from(2));
        }
        _ => {
            for problem in problems {
                eprintln!("invalid configuration: {problem}");
            }
            return Ok(ExitCode::from(2));
        }
    };
    let strategy = config.subject_strategy;
    let contracts = match load_contracts(&args, strategy) {
        Ok(contracts) => contracts,
        Err(message) => {
            eprintln!("{message}");
            return Ok(ExitCode::from(2));
        }
    };
    let registry = match Registry::connect(config) {
        Ok(registry) => registry,
        Err(err) => {
            eprintln!("schema registry: {err}");
            return Ok(ExitCode::from(2));
        }
    };
    let result = if registering {
        register(&registry, &contracts, args.compatibility.as_deref()).await
    } else {
        check(&registry, &contracts).await
    };
    match result {
        Ok(code) => Ok(code),
        Err(err) => {
            eprintln!("schema registry: {err}");
            Ok(ExitCode::from(2))
        }
    }
}

async fn check(registry: &Registry, contracts: &[Contract]) -> Result<ExitCode, RegistryError> {
    let mut incompatible = 0;
    for contract in contracts {
        for subject in &contract.subjects {
            let Some((version, latest)) = registry.latest(subject).await? else {
                println!(
                    "NEW   {} -> {subject}: no version registered yet",
                    contract.file
                );
                continue;
            };
            let level = registry.compatibility_level(subject).await?;
            if registry.is_compatible(subject, &contract.schema).await? {
                println!(
                    "OK    {} -> {subject}: compatible with version {version} ({level})",
                    contract.file
                );
            } else {
                incompatible += 1;
                println!(
                    "FAIL  {} -> {subject}: incompatible with version {version} ({level}): {}",
                    contract.file,
                    explain(&level, &latest, &contract.schema.parsed)
                );
            }
        }
    }
    if incompatible > 0 {
        println!("{incompatible} incompatible schema(s)");
        Ok(ExitCode::FAILURE)
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// Why the registry refused, in words: its answer is a bare boolean, so the
/// same rule is re-checked locally to name the fields involved.
fn explain(level: &str, latest: &Schema, candidate: &Schema) -> String {
    // (writer, reader, what a failure means)
    let backward = (
        latest,
        candidate,
        "the new schema cannot read data written with the registered one",
    );
    let forward = (
        candidate,
        latest,
        "the registered schema cannot read data written with the new one",
    );
    let directions = if level.starts_with("BACKWARD") {
        vec![backward]
    } else if level.starts_with("FORWARD") {
        vec![forward]
    } else {
        vec![backward, forward]
    };
    for (writer, reader, meaning) in directions {
        let mut reasons = field_differences(writer, reader);
        match SchemaCompatibility::can_read(writer, reader) {
            Err(err) => reasons.insert(0, err.to_string()),
            Ok(Compatibility::Full) if reasons.is_empty() => continue,
            Ok(_) => {}
        }
        if reasons.is_empty() {
            reasons.push("some values cannot be resolved".into());
        }
        return format!("{meaning}: {}", reasons.join("; "));
    }
    "incompatible with an earlier version (a transitive level checks every version)".into()
}

/// Field by field, what stops `reader` reading every record `writer` wrote.
fn field_differences(writer: &Schema, reader: &Schema) -> Vec<String> {
    let (Schema::Record(writer), Schema::Record(reader)) = (writer, reader) else {
        return Vec::new();
    };
    let mut differences = Vec::new();
    for field in &reader.fields {
        match writer.fields.iter().find(|w| w.name == field.name) {
            None if field.default.is_none() => {
                differences.push(format!("field `{}` is new and has no default", field.name))
            }
            None => {}
            Some(written) => {
                let (from, to) = (
                    written.schema.canonical_form(),
                    field.schema.canonical_form(),
                );
                if from != to
                    && !matches!(
                        SchemaCompatibility::can_read(&written.schema, &field.schema),
                        Ok(Compatibility::Full)
                    )
                {
                    differences.push(format!(
                        "field `{}` changes type from {from} to {to}",
                        field.name
                    ));
                }
            }
        }
    }
    differences
}

async fn register(
    registry: &Registry,
    contracts: &[Contract],
    level: Option<&str>,
) -> Result<ExitCode, RegistryError> {
    for contract in contracts {
        for subject in &contract.subjects {
            if let Some(level) = level {
                registry.set_compatibility_level(subject, level).await?;
            }
            match registry.register(subject, &contract.schema).await {
                Ok(id) => println!("registered {} -> {subject} as id {id}", contract.file),
                Err(RegistryError::Rejected(reason)) => {
                    println!("REFUSED {} -> {subject}: {reason}", contract.file);
                    return Ok(ExitCode::FAILURE);
                }
                Err(err) => return Err(err),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads `*.avsc` in name order (so `v1` precedes `v2`) and names each one's subjects.
fn load_contracts(args: &SchemasArgs, strategy: SubjectStrategy) -> Result<Vec<Contract>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.dir)
        .map_err(|err| format!("{}: {err}", args.dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "avsc"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no .avsc files", args.dir.display()));
    }
    let handover_topics = match Topology::load(&args.topology) {
        Ok(topology) => topology.output_topics().into_iter().collect(),
        Err(err) if strategy == SubjectStrategy::Topic => return Err(err.to_string()),
        Err(_) => Vec::new(),
    };
    let mut contracts = Vec::new();
    for path in files {
        let text =
            std::fs::read_to_string(&path).map_err(|err| format!("{}: {err}", path.display()))?;
        let schema = Avsc::parse(&text).map_err(|err| format!("{}: {err}", path.display()))?;
        let name = schema.full_name();
        let topics: Vec<String> = match name.rsplit('.').next().unwrap_or_default() {
            "ToolCompleted" => args.input_topics.clone(),
            "HandoverEvent" => handover_topics.clone(),
            "StatusUpdate" => vec![args.status_topic.clone()],
            "ControlCommand" => vec![args.control_topic.clone()],
            _ => Vec::new(),
        };
        // Heartbeats share the input topics with ToolCompleted: under the
        // topic strategy a topic's subject holds one record type, so they
        // are registered by record name only (their producers use that
        // strategy; baton decodes whatever id a record carries).
        if name.ends_with(".AgentHeartbeat") && strategy == SubjectStrategy::Topic {
            eprintln!(
                "{}: skipped under the topic strategy (heartbeats share the input topics; register it with --subject-name-strategy record)",
                display_name(&path)
            );
            continue;
        }
        let subjects: Vec<String> = match strategy {
            SubjectStrategy::Record => vec![name.clone()],
            SubjectStrategy::Topic if topics.is_empty() => {
                return Err(format!(
                    "{}: no topic carries {name}; use --subject-name-strategy record",
                    display_name(&path)
                ));
            }
            SubjectStrategy::Topic => topics
                .iter()
                .map(|topic| strategy.subject(topic, &name))
                .collect(),
        };
        contracts.push(Contract {
            file: display_name(&path),
            schema,
            subjects,
        });
    }
    Ok(contracts)
}

fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
