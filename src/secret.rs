//! Secrets: a value that never prints, and the rules for which librdkafka
//! properties hold one. Whatever reaches `Debug`, a log line or an error
//! message goes through here first.

use std::fmt;
use std::str::FromStr;

/// A secret from a flag, a variable or a file. `Debug` and `Display` show
/// only that it is set, so a `{:?}` of a whole configuration is safe to log.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself; call only where it is used, never to print it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(value.to_string()))
    }
}

/// Whether a librdkafka property (with or without its `consumer.`,
/// `producer.` or `admin.` prefix) holds a secret: passwords, keys, JAAS
/// configurations, OAuth client secrets and tokens.
pub fn is_sensitive_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "token",
        "ssl.key.pem",
        "ssl_key",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// A property's value as it may be shown: secrets redacted.
pub fn shown_value<'v>(key: &str, value: &'v str) -> &'v str {
    if is_sensitive_property(key) {
        "<redacted>"
    } else {
        value
    }
}

/// Removes every occurrence of `value` from `text` (an error message from
/// librdkafka may quote the value it refused).
pub fn scrub(text: &str, key: &str, value: &str) -> String {
    if value.is_empty() || !is_sensitive_property(key) {
        return text.to_string();
    }
    text.replace(value, "<redacted>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let secret: Secret = "hunter2-hunter2".parse().expect("infallible");
        assert_eq!(format!("{secret:?} {secret}"), "<redacted> <redacted>");
        assert_eq!(secret.expose(), "hunter2-hunter2");
        assert!(is_sensitive_property("sasl.password"));
        assert!(is_sensitive_property("producer.ssl.key.password"));
        assert!(is_sensitive_property("sasl.oauthbearer.client.secret"));
        assert!(is_sensitive_property("sasl.jaas.config"));
        assert!(!is_sensitive_property("linger.ms"));
        assert_eq!(shown_value("sasl.password", "x"), "<redacted>");
        assert_eq!(
            scrub("bad value `a,b` for sasl.password", "sasl.password", "a,b"),
            "bad value `<redacted>` for sasl.password"
        );
    }
}
