//! JSON input events, both dialects (legacy `conversationId`/`payload` and
//! canonical), through the decoder a partition task uses: never a panic, and
//! what is accepted is within every limit.
#![no_main]

use baton::codec::{DecodeError, DecodeLimits, InputDecoder};
use baton::event::SourceCoordinates;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits::default();
    let decoder = InputDecoder::json(limits);
    let source = SourceCoordinates {
        topic: "mcp.events.all".into(),
        partition: 0,
        offset: 1,
    };
    match decoder.decode(Some(data), &source) {
        Ok(event) => {
            assert!(!event.context_id.is_empty());
            assert!(!event.event.is_empty());
            assert!(
                event
                    .token_budget
                    .is_none_or(|b| b <= limits.max_token_budget)
            );
            // What was accepted is stored and read back: it must survive that.
            let stored = serde_json::to_vec(&event.result).expect("a Value serializes");
            serde_json::from_slice::<serde_json::Value>(&stored).expect("and reads back");
        }
        Err(DecodeError::Poison { reason, .. }) => assert!(!reason.is_empty()),
        Err(DecodeError::MissingSchema { .. }) => panic!("JSON never needs a schema"),
    }
});
