//! Dead-letter headers as the healer reads them (`DeadLetterView::of`) and
//! decides on them (`decide`): anyone who can write the DLQ controls these
//! bytes. Input: header pairs separated by 0x00, name and value by 0x01.
#![no_main]

use std::sync::LazyLock;

use baton::healer::{DeadLetterView, Decision, decide};
use baton::topology::{Topology, WorkflowDefinition};
use libfuzzer_sys::fuzz_target;
use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

static TOPOLOGY: LazyLock<Topology> = LazyLock::new(|| {
    let text = include_str!("../../topology/vision-research.toml");
    let definition: WorkflowDefinition = toml::from_str(text).expect("the shipped topology parses");
    Topology::from_definitions(vec![definition]).expect("and is valid")
});

fuzz_target!(|data: &[u8]| {
    let mut headers = OwnedHeaders::new();
    for pair in data.split(|byte| *byte == 0) {
        let (name, value) = match pair.iter().position(|byte| *byte == 1) {
            Some(at) => (&pair[..at], Some(&pair[at + 1..])),
            None => (pair, None),
        };
        let name = String::from_utf8_lossy(name);
        headers = headers.insert(Header {
            key: name.as_ref(),
            value,
        });
    }
    let message = OwnedMessage::new(
        Some(data.to_vec()),
        Some(b"ctx-1".to_vec()),
        "mcp.events.dlq".into(),
        Timestamp::CreateTime(1_700_000_000_000),
        0,
        1,
        Some(headers),
    );
    let letter = DeadLetterView::of(&message);
    match decide(&TOPOLOGY, &letter) {
        Decision::Command { attempt, .. } => assert!(attempt >= 1),
        Decision::Park { reason, .. } => assert!(!reason.is_empty()),
    }
});
