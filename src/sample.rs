//! Sample vision-research traffic, for the demo, load tests and benchmarks.
//!
//! Deterministic for a seed: each context walks the whole workflow (vision,
//! research, then valuation and screenshot in either order), mixing the
//! legacy and canonical JSON forms the platform produces.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;

use crate::kafka::KafkaSettings;

/// One record to produce: key and value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleRecord {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

/// The events of one context, in workflow order.
pub fn context_events(context_id: &str, rng: &mut fastrand::Rng) -> Vec<SampleRecord> {
    let key = Some(context_id.as_bytes().to_vec());
    let usage = |rng: &mut fastrand::Rng| json!({"input_tokens": rng.u64(50..400), "output_tokens": rng.u64(20..200)});
    let mut events = vec![
        // Today's legacy form, exactly as the platform produces it.
        json!({
            "event": "tool.vision_analyze.completed", "serverId": "srv-vision",
            "payload": {"tool": "vision_analyze", "arguments": {"image": format!("s3://uploads/{context_id}.png")},
                        "result": {"labels": ["sofa", "mid-century"], "confidence": 0.93}},
            "conversationId": context_id, "correlationId": format!("{context_id}-r1"),
            "eventId": format!("{context_id}-vision"),
        }),
        json!({
            "event_id": format!("{context_id}-research"), "context_id": context_id,
            "event": "tool.research_enrich.completed", "server_id": "srv-research", "tool": "research_enrich",
            "arguments": {"query": "mid-century sofa value"}, "result": {"sources": 4, "summary": "teak frame, 1960s"},
            "usage": usage(rng),
        }),
    ];
    let valuation = json!({
        "event_id": format!("{context_id}-valuation"), "context_id": context_id,
        "event": "tool.valuation_estimate.completed", "server_id": "srv-valuation", "tool": "valuation_estimate",
        "arguments": {}, "result": {"low": 800, "high": 1400, "currency": "EUR"}, "usage": usage(rng),
    });
    let screenshot = json!({
        "event_id": format!("{context_id}-screenshot"), "context_id": context_id,
        "event": "tool.browser_take_screenshot.completed", "server_id": "srv-playwright", "tool": "browser_take_screenshot",
        "arguments": {"url": "https://example.test/listing"}, "result": {"path": format!("/shots/{context_id}.png")},
        "usage": usage(rng),
    });
    if rng.bool() {
        events.extend([valuation, screenshot]);
    } else {
        events.extend([screenshot, valuation]);
    }
    events
        .into_iter()
        .map(|event| SampleRecord {
            key: key.clone(),
            value: event.to_string().into_bytes(),
        })
        .collect()
}

/// Puts a failed screenshot call before the successful one.
fn fail_screenshot_once(events: &mut Vec<SampleRecord>) {
    let Some(at) = events.iter().position(|record| {
        String::from_utf8_lossy(&record.value).contains("\"browser_take_screenshot\"")
    }) else {
        return;
    };
    let Ok(mut failed) = serde_json::from_slice::<serde_json::Value>(&events[at].value) else {
        return;
    };
    let event_id = format!(
        "{}-failed",
        failed["event_id"].as_str().unwrap_or("screenshot")
    );
    failed["event_id"] = json!(event_id);
    failed["status"] = json!("error");
    failed["error"] = json!("navigation timeout after 30 s");
    failed["result"] =
        json!({"isError": true, "content": [{"type": "text", "text": "navigation timeout"}]});
    let record = SampleRecord {
        key: events[at].key.clone(),
        value: failed.to_string().into_bytes(),
    };
    events.insert(at, record);
}

/// Poison records of every JSON-era class.
pub fn poison_record(n: u64) -> SampleRecord {
    let value: &[u8] = match n % 4 {
        0 => b"\x00\x01not json at all",
        1 => br#"{"hello":"neither form"}"#,
        2 => br#"{"event":"tool.vision_analyze.completed","payload":{}}"#,
        _ => b"[1,2,3]",
    };
    SampleRecord {
        key: Some(format!("poison-{n}").into_bytes()),
        value: value.to_vec(),
    }
}

/// `contexts` whole workflows, interleaved across contexts (each context's
/// own events stay in order), with `poison_percent` poison mixed in.
pub fn vision_research_traffic(
    contexts: usize,
    poison_percent: f64,
    seed: u64,
) -> Vec<SampleRecord> {
    vision_research_traffic_with_failures(contexts, poison_percent, 0.0, seed)
}

/// [`vision_research_traffic`] where `failure_percent` of the contexts see
/// their screenshot fail once before it succeeds: the healer retries it.
pub fn vision_research_traffic_with_failures(
    contexts: usize,
    poison_percent: f64,
    failure_percent: f64,
    seed: u64,
) -> Vec<SampleRecord> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut per_context: Vec<std::collections::VecDeque<SampleRecord>> = (0..contexts)
        .map(|i| {
            let mut events = context_events(&format!("ctx-{seed}-{i}"), &mut rng);
            if rng.f64() * 100.0 < failure_percent {
                fail_screenshot_once(&mut events);
            }
            events.into()
        })
        .collect();
    let mut out = Vec::new();
    let mut poison = 0;
    while !per_context.is_empty() {
        let i = rng.usize(..per_context.len());
        if let Some(record) = per_context[i].pop_front() {
            out.push(record);
            if rng.f64() * 100.0 < poison_percent {
                out.push(poison_record(poison));
                poison += 1;
            }
        }
        if per_context[i].is_empty() {
            per_context.swap_remove(i);
        }
    }
    out
}

/// Produces records with an idempotent producer and waits for every ack.
pub async fn produce(
    settings: &KafkaSettings,
    topic: &str,
    records: Vec<SampleRecord>,
) -> Result<(), rdkafka::error::KafkaError> {
    let producer: FutureProducer = settings.producer_config().create()?;
    let mut deliveries = Vec::with_capacity(records.len());
    for record in &records {
        loop {
            let mut future_record = FutureRecord::to(topic).payload(&record.value);
            if let Some(key) = &record.key {
                future_record = future_record.key(key);
            }
            match producer.send_result(future_record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err((err, _)) => return Err(err),
            }
        }
    }
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((err, _))) => return Err(err),
            Err(_) => return Err(rdkafka::error::KafkaError::Canceled),
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_is_deterministic_and_keeps_context_order() {
        let a = vision_research_traffic(20, 5.0, 7);
        assert_eq!(a, vision_research_traffic(20, 5.0, 7));
        let ctx: Vec<String> = a
            .iter()
            .filter(|r| r.key.as_deref() == Some(b"ctx-7-3".as_slice()))
            .map(|r| String::from_utf8_lossy(&r.value).into_owned())
            .collect();
        assert_eq!(ctx.len(), 4);
        assert!(ctx[0].contains("vision_analyze"));
        assert!(ctx[1].contains("research_enrich"));
    }
}
