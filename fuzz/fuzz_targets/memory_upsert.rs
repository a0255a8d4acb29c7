//! `memory.upserted` records: decoded, applied to a context's memory, frozen
//! into a snapshot, stored and read back, and rendered as a prompt (which
//! tokenizes), as a partition task and the HTTP surface do.
#![no_main]

use baton::memory::{self, Memory, Snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(upsert) = memory::decode_upsert(data) else {
        return;
    };
    assert!(!upsert.context_id.is_empty());
    assert!((0.0..=1.0).contains(&upsert.importance));
    let mut memory = Memory::new(&upsert.context_id);
    memory.upsert(&upsert, 1);
    memory.upsert(&upsert, 2);
    let version = memory.freeze(3);
    let stored = Memory::decode(&memory.encode()).expect("a memory reads back");
    let snapshot = stored.snapshot(version).expect("the frozen snapshot");
    let snapshot = Snapshot::decode(&snapshot.encode()).expect("a snapshot reads back");
    let prompt = memory::render_prompt(&snapshot, 4096);
    serde_json::to_string(&prompt).expect("a prompt serializes");
});
