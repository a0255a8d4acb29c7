//! Confluent wire-format Avro (magic byte, schema id, datum) through the
//! decoder a partition task uses, with a registry stub that already holds
//! baton's v1 and v2 ToolCompleted, a recursive schema and a deep one (ids
//! 1..=4; others are unknown). The writer schema is judged before decoding,
//! so no datum can recurse past the limits.
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use apache_avro::Schema;
use baton::codec::{DecodeError, DecodeLimits, InputDecoder, InputFormat};
use baton::event::SourceCoordinates;
use baton::registry::{Registry, RegistryConfig, WriterSchema};
use libfuzzer_sys::fuzz_target;

const V1: &str = include_str!("../../schemas/ToolCompleted.v1.avsc");
const V2: &str = include_str!("../../schemas/ToolCompleted.v2.avsc");
const RECURSIVE: &str = r#"{"type":"record","name":"Node","fields":[
    {"name":"value","type":"string"},{"name":"next","type":["null","Node"]}]}"#;

static DECODER: LazyLock<InputDecoder> = LazyLock::new(|| {
    apache_avro::util::max_allocation_bytes(DecodeLimits::default().max_record_bytes);
    // Never contacted: every schema the stub knows is already cached.
    let registry = Registry::connect(RegistryConfig {
        urls: vec!["http://127.0.0.1:9".into()],
        username: None,
        password: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
        timeout: Duration::from_millis(100),
        subject_strategy: Default::default(),
        auto_register: false,
    })
    .expect("a registry client builds offline");
    let mut deep = r#""string""#.to_string();
    for _ in 0..40 {
        deep = format!(r#"{{"type":"array","items":{deep}}}"#);
    }
    for (id, text) in [(1, V1), (2, V2), (3, RECURSIVE), (4, deep.as_str())] {
        let schema = Schema::parse_str(text).expect("the stub's schemas parse");
        registry.insert_cached(id, WriterSchema::Found(Arc::new(schema)));
    }
    registry.insert_cached(5, WriterSchema::Unknown("not registered".into()));
    let formats = HashMap::from([("mcp.events.all".to_string(), InputFormat::Avro)]);
    InputDecoder::new(DecodeLimits::default(), formats, Some(Arc::new(registry)))
});

fuzz_target!(|data: &[u8]| {
    let source = SourceCoordinates {
        topic: "mcp.events.all".into(),
        partition: 0,
        offset: 1,
    };
    match DECODER.decode(Some(data), &source) {
        Ok(event) => {
            assert!(!event.context_id.is_empty());
            let id = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
            assert!(id == 1 || id == 2, "only ToolCompleted decodes: {id}");
        }
        Err(DecodeError::Poison { reason, .. }) => assert!(!reason.is_empty()),
        Err(DecodeError::MissingSchema { id }) => assert!(!(1..=5).contains(&id)),
    }
});
