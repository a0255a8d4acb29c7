//! Token estimates for steps whose tool reported no usage.

use std::sync::LazyLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// The cl100k_base vocabulary, built once: building it parses ~100k ranks,
/// far too slow to repeat per event.
static CL100K: LazyLock<CoreBPE> = LazyLock::new(|| {
    // The vocabulary is compiled into the binary, so this fails only for a
    // broken build, never because of an input.
    tiktoken_rs::cl100k_base().expect("the embedded cl100k_base vocabulary loads")
});

/// How many cl100k tokens a tool output costs a model that reads it. A JSON
/// string counts as its text (a model reads the text, not the quotes); any
/// other value as its compact JSON; `null` as nothing.
pub fn estimate_tokens(value: &Value) -> u64 {
    let tokens = match value {
        Value::Null => 0,
        Value::String(text) => CL100K.encode_ordinary(text).len(),
        other => CL100K.encode_ordinary(&other.to_string()).len(),
    };
    u64::try_from(tokens).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn counts_real_cl100k_tokens() {
        // "hello world" is two cl100k tokens; a byte ratio would say 2.75 or 3.
        assert_eq!(estimate_tokens(&json!("hello world")), 2);
        assert_eq!(estimate_tokens(&Value::Null), 0);
        assert_eq!(estimate_tokens(&json!("")), 0);
    }

    #[test]
    fn objects_count_as_their_json() {
        let value = json!({"caption": "a red bicycle leaning on a wall"});
        let expected = CL100K.encode_ordinary(&value.to_string()).len() as u64;
        assert_eq!(estimate_tokens(&value), expected);
        assert!(expected > 5);
    }
}
