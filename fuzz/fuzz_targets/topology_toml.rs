//! Workflow definitions as `baton run` and `baton topology check` load
//! them: TOML into a definition, validated; a valid one is described.
#![no_main]

use baton::topology::{Topology, WorkflowDefinition, describe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(definition) = toml::from_str::<WorkflowDefinition>(text) else {
        return;
    };
    if let Ok(topology) = Topology::from_definitions(vec![definition]) {
        let _ = describe::text(&topology);
        let _ = describe::mermaid(&topology);
    }
});
