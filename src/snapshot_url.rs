//! Signed, expiring snapshot URLs:
//! `{public_url}/contexts/{id}/snapshots/{version}?exp={unix_seconds}&sig={hex}`.
//!
//! The signature is HMAC-SHA256 over `"{path}?exp={exp}"`, where the path
//! starts at `/contexts`: the public URL is left out, so every pod verifies
//! the same string whichever ingress or host name the request came through.

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// The shortest secret accepted: HMAC-SHA256 is only as strong as its key,
/// and 32 bytes match its output.
pub const MIN_SECRET_BYTES: usize = 32;

/// Signs snapshot URLs with the current secret and verifies them under the
/// current or the previous one, so a secret can rotate without breaking the
/// URLs already handed out.
#[derive(Clone)]
pub struct UrlSigner {
    /// Keyed once; every signature clones it.
    current: HmacSha256,
    previous: Option<HmacSha256>,
    /// Without a trailing slash.
    public_url: String,
    expiry: Duration,
}

/// Secrets stay out of logs: only the settings that are not secret are shown.
impl fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UrlSigner")
            .field("public_url", &self.public_url)
            .field("expiry", &self.expiry)
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a snapshot request's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SignatureError {
    #[error("the URL carries no `exp` or no `sig`")]
    Missing,
    #[error("`exp` is not a unix time in seconds or `sig` is not a 32-byte hex digest")]
    Malformed,
    #[error("the URL expired")]
    Expired,
    #[error("the signature does not match this URL under any accepted secret")]
    Invalid,
}

impl SignatureError {
    /// A request that never tried to authenticate is 401; one whose attempt
    /// failed is 403.
    pub fn http_status(&self) -> u16 {
        match self {
            SignatureError::Missing => 401,
            SignatureError::Malformed | SignatureError::Expired | SignatureError::Invalid => 403,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::Expired => "signature_expired",
            SignatureError::Invalid => "signature_invalid",
        }
    }
}

impl UrlSigner {
    /// `current` is `BATON_SNAPSHOT_SECRET`; `previous`,
    /// `BATON_SNAPSHOT_SECRET_PREVIOUS`, is accepted while secrets rotate but
    /// never signs. `public_url` is where clients reach baton's HTTP server.
    pub fn new(
        current: &[u8],
        previous: Option<&[u8]>,
        public_url: &str,
        expiry: Duration,
    ) -> Result<UrlSigner, String> {
        let current = keyed("BATON_SNAPSHOT_SECRET", current)?;
        let previous = previous
            .map(|secret| keyed("BATON_SNAPSHOT_SECRET_PREVIOUS", secret))
            .transpose()?;
        let public_url = public_url.trim_end_matches('/');
        if public_url.is_empty() {
            return Err("the snapshot public URL is empty".into());
        }
        let host = public_url
            .strip_prefix("https://")
            .or_else(|| public_url.strip_prefix("http://"));
        match host {
            None => {
                return Err(format!(
                    "the snapshot public URL `{public_url}` must start with http:// or https://"
                ));
            }
            Some("") => {
                return Err(format!(
                    "the snapshot public URL `{public_url}` names no host"
                ));
            }
            Some(_) => {}
        }
        if expiry.as_secs() == 0 {
            return Err("the snapshot URL expiry must be at least one second".into());
        }
        Ok(UrlSigner {
            current,
            previous,
            public_url: public_url.to_owned(),
            expiry,
        })
    }

    /// `/contexts/{id}/snapshots/{version}`, the id percent-encoded as one
    /// path segment exactly as the HTTP server matches it.
    pub fn path(context_id: &str, version: u64) -> String {
        format!(
            "/contexts/{}/snapshots/{version}",
            utf8_percent_encode(context_id, NON_ALPHANUMERIC)
        )
    }

    /// The full URL of a snapshot, valid until `now_unix` plus the expiry.
    pub fn sign(&self, context_id: &str, version: u64, now_unix: i64) -> String {
        let path = UrlSigner::path(context_id, version);
        let expiry = i64::try_from(self.expiry.as_secs()).unwrap_or(i64::MAX);
        let exp = now_unix.saturating_add(expiry).to_string();
        let mut mac = self.current.clone();
        mac.update(signed_text(&path, &exp).as_bytes());
        let sig = hex::encode(mac.finalize().into_bytes());
        format!("{}{path}?exp={exp}&sig={sig}", self.public_url)
    }

    /// Checks a request: `path` is the raw request path as received, `query`
    /// the raw query string, which may carry other parameters in any order.
    /// Expiry is judged only once the signature holds, so a tampered `exp`
    /// is `Invalid`, never `Expired`.
    pub fn verify(
        &self,
        path: &str,
        query: Option<&str>,
        now_unix: i64,
    ) -> Result<(), SignatureError> {
        let (exp_text, sig_text) = signature_params(query)?;
        // Digits only: `i64::from_str` would also take a sign, and the text
        // signed must be the text sent.
        if !exp_text.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(SignatureError::Malformed);
        }
        let exp: i64 = exp_text.parse().map_err(|_| SignatureError::Malformed)?;
        let sig = hex::decode(sig_text).map_err(|_| SignatureError::Malformed)?;
        if sig.len() != 32 {
            return Err(SignatureError::Malformed);
        }
        let text = signed_text(path, exp_text);
        let valid = std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .any(|key| {
                let mut mac = key.clone();
                mac.update(text.as_bytes());
                // Constant time: a byte-by-byte comparison would leak how much
                // of a forged signature was right.
                mac.verify_slice(&sig).is_ok()
            });
        if !valid {
            return Err(SignatureError::Invalid);
        }
        if exp < now_unix {
            return Err(SignatureError::Expired);
        }
        Ok(())
    }
}

fn keyed(name: &str, secret: &[u8]) -> Result<HmacSha256, String> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{name} is too short: use at least {MIN_SECRET_BYTES} random bytes"
        ));
    }
    HmacSha256::new_from_slice(secret).map_err(|err| format!("{name} cannot key HMAC: {err}"))
}

fn signed_text(path: &str, exp: &str) -> String {
    format!("{path}?exp={exp}")
}

/// The raw `exp` and `sig` values of a query. A second `exp` or `sig` is
/// malformed: which one was meant would be up to whoever reads the query.
fn signature_params(query: Option<&str>) -> Result<(&str, &str), SignatureError> {
    let mut exp = None;
    let mut sig = None;
    for pair in query.unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "exp" => &mut exp,
            "sig" => &mut sig,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(SignatureError::Malformed);
        }
    }
    match (exp, sig) {
        (Some(exp), Some(sig)) if !exp.is_empty() && !sig.is_empty() => Ok((exp, sig)),
        _ => Err(SignatureError::Missing),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OLD_KEY: &[u8] = b"old-old-old-old-old-old-old-old-";
    const OTHER_KEY: &[u8] = b"someone-else-entirely-0123456789";
    const PUBLIC: &str = "https://baton.example.com";
    const NOW: i64 = 1_700_000_000;
    const HOUR: Duration = Duration::from_secs(3_600);

    fn signer(current: &[u8], previous: Option<&[u8]>) -> UrlSigner {
        UrlSigner::new(current, previous, PUBLIC, HOUR).unwrap()
    }

    /// Splits a signed URL into what the HTTP server receives.
    fn request(url: &str) -> (String, String) {
        let rest = url.strip_prefix(PUBLIC).unwrap();
        let (path, query) = rest.split_once('?').unwrap();
        (path.to_owned(), query.to_owned())
    }

    fn params(query: &str) -> (String, String) {
        let mut exp = String::new();
        let mut sig = String::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("exp", value)) => exp = value.to_owned(),
                Some(("sig", value)) => sig = value.to_owned(),
                _ => {}
            }
        }
        (exp, sig)
    }

    #[test]
    fn a_signed_url_verifies() {
        let signer = signer(KEY, None);
        let url = signer.sign("c-42", 3, NOW);
        let (path, query) = request(&url);
        assert_eq!(path, "/contexts/c%2D42/snapshots/3");
        let (exp, sig) = params(&query);
        assert_eq!(exp, (NOW + 3_600).to_string());
        assert_eq!(sig.len(), 64);
        assert!(
            sig.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        );
        assert_eq!(signer.verify(&path, Some(&query), NOW), Ok(()));
        // Valid up to and including the second it expires.
        assert_eq!(signer.verify(&path, Some(&query), NOW + 3_600), Ok(()));
    }

    #[test]
    fn the_signature_is_a_known_hmac_of_path_and_exp() {
        let url = signer(KEY, None).sign("c", 1, 0);
        let mut mac = HmacSha256::new_from_slice(KEY).unwrap();
        mac.update(b"/contexts/c/snapshots/1?exp=3600");
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(
            url,
            format!("{PUBLIC}/contexts/c/snapshots/1?exp=3600&sig={expected}")
        );
    }

    #[test]
    fn an_expired_url_is_expired() {
        let signer = signer(KEY, None);
        let (path, query) = request(&signer.sign("c-42", 3, NOW));
        assert_eq!(
            signer.verify(&path, Some(&query), NOW + 3_601),
            Err(SignatureError::Expired)
        );
    }

    #[test]
    fn a_tampered_path_is_invalid() {
        let signer = signer(KEY, None);
        let (_, query) = request(&signer.sign("c-42", 3, NOW));
        for path in [
            "/contexts/c%2D42/snapshots/4",
            "/contexts/c%2D43/snapshots/3",
            "/contexts/c-42/snapshots/3",
            "/contexts/c%2d42/snapshots/3",
            "/contexts/c%2D42/snapshots/3/",
        ] {
            assert_eq!(
                signer.verify(path, Some(&query), NOW),
                Err(SignatureError::Invalid),
                "{path}"
            );
        }
    }

    #[test]
    fn a_tampered_exp_is_invalid_not_expired() {
        let signer = signer(KEY, None);
        let (path, query) = request(&signer.sign("c-42", 3, NOW));
        let (exp, sig) = params(&query);
        let later = format!("exp={}&sig={sig}", NOW + 86_400);
        assert_eq!(
            signer.verify(&path, Some(&later), NOW),
            Err(SignatureError::Invalid)
        );
        let earlier = format!("exp={}&sig={sig}", NOW - 10);
        assert_eq!(
            signer.verify(&path, Some(&earlier), NOW),
            Err(SignatureError::Invalid)
        );
        // The same number spelled differently is not the text that was signed.
        let padded = format!("exp=0{exp}&sig={sig}");
        assert_eq!(
            signer.verify(&path, Some(&padded), NOW),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn a_tampered_sig_is_invalid() {
        let signer = signer(KEY, None);
        let (path, query) = request(&signer.sign("c-42", 3, NOW));
        let (exp, sig) = params(&query);
        let flipped = if sig.starts_with('0') { "1" } else { "0" };
        let tampered = format!("exp={exp}&sig={flipped}{}", &sig[1..]);
        assert_eq!(
            signer.verify(&path, Some(&tampered), NOW),
            Err(SignatureError::Invalid)
        );
        // Case does not change the bytes, so an upper-case digest still holds.
        let upper = format!("exp={exp}&sig={}", sig.to_uppercase());
        assert_eq!(signer.verify(&path, Some(&upper), NOW), Ok(()));
    }

    #[test]
    fn malformed_parameters_are_malformed() {
        let signer = signer(KEY, None);
        let (path, query) = request(&signer.sign("c-42", 3, NOW));
        let (exp, sig) = params(&query);
        let cases = [
            format!("exp={exp}&sig={}", "zz".repeat(32)),
            format!("exp={exp}&sig={}", &sig[..62]),
            format!("exp={exp}&sig={sig}00"),
            format!("exp={exp}&sig={}", &sig[..63]),
            format!("exp=soon&sig={sig}"),
            format!("exp=-{exp}&sig={sig}"),
            format!("exp=+{exp}&sig={sig}"),
            format!("exp={}&sig={sig}", "9".repeat(30)),
            format!("exp={exp}&sig={sig}&sig={sig}"),
            format!("exp={exp}&exp={exp}&sig={sig}"),
        ];
        for query in cases {
            assert_eq!(
                signer.verify(&path, Some(&query), NOW),
                Err(SignatureError::Malformed),
                "{query}"
            );
        }
    }

    #[test]
    fn missing_parameters_are_missing() {
        let signer = signer(KEY, None);
        let (path, query) = request(&signer.sign("c-42", 3, NOW));
        let (exp, sig) = params(&query);
        let cases = [
            None,
            Some(String::new()),
            Some(format!("exp={exp}")),
            Some(format!("sig={sig}")),
            Some(format!("exp={exp}&sig=")),
            Some(format!("exp=&sig={sig}")),
            Some(format!("exp={exp}&sig")),
            Some("max_tokens=100".to_owned()),
        ];
        for query in cases {
            let err = signer.verify(&path, query.as_deref(), NOW).unwrap_err();
            assert_eq!(err, SignatureError::Missing, "{query:?}");
        }
    }

    #[test]
    fn a_rotated_secret_still_verifies_urls_signed_with_the_previous_one() {
        let old = signer(OLD_KEY, None);
        let (path, query) = request(&old.sign("c-42", 3, NOW));

        let rotated = signer(KEY, Some(OLD_KEY));
        assert_eq!(rotated.verify(&path, Some(&query), NOW), Ok(()));
        let unrelated = signer(KEY, Some(OTHER_KEY));
        assert_eq!(
            unrelated.verify(&path, Some(&query), NOW),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            signer(OTHER_KEY, None).verify(&path, Some(&query), NOW),
            Err(SignatureError::Invalid)
        );
        // Expiry still applies to URLs signed with the previous secret.
        assert_eq!(
            rotated.verify(&path, Some(&query), NOW + 7_200),
            Err(SignatureError::Expired)
        );

        // The previous secret never signs.
        let (path, query) = request(&rotated.sign("c-42", 3, NOW));
        assert_eq!(
            old.verify(&path, Some(&query), NOW),
            Err(SignatureError::Invalid)
        );
        assert_eq!(signer(KEY, None).verify(&path, Some(&query), NOW), Ok(()));
    }

    #[test]
    fn other_query_parameters_in_any_order_do_not_matter() {
        let signer = signer(KEY, None);
        let (path, query) = request(&signer.sign("c-42", 3, NOW));
        let (exp, sig) = params(&query);
        for query in [
            format!("max_tokens=500&exp={exp}&sig={sig}"),
            format!("sig={sig}&max_tokens=500&exp={exp}"),
            format!("sig={sig}&exp={exp}&max_tokens=500&format=json"),
            format!("&exp={exp}&&sig={sig}&"),
        ] {
            assert_eq!(signer.verify(&path, Some(&query), NOW), Ok(()), "{query}");
        }
    }

    #[test]
    fn the_public_url_is_not_signed() {
        let a = UrlSigner::new(KEY, None, "http://10.0.0.7:8080/", HOUR).unwrap();
        let b = UrlSigner::new(KEY, None, PUBLIC, HOUR).unwrap();
        let url = a.sign("c", 1, NOW);
        assert!(url.starts_with("http://10.0.0.7:8080/contexts/c/snapshots/1?exp="));
        let (_, query) = url.split_once('?').unwrap();
        assert_eq!(
            b.verify("/contexts/c/snapshots/1", Some(query), NOW),
            Ok(())
        );
        assert_eq!(
            b.sign("c", 1, NOW).split_once('?').unwrap().1,
            query,
            "same key, path and time give the same signature behind any ingress"
        );
    }

    #[test]
    fn ids_are_percent_encoded_as_one_path_segment() {
        assert_eq!(
            UrlSigner::path("c 1/é?x", 7),
            "/contexts/c%201%2F%C3%A9%3Fx/snapshots/7"
        );
        assert_eq!(
            UrlSigner::path("abcXYZ019", 0),
            "/contexts/abcXYZ019/snapshots/0"
        );
    }

    #[test]
    fn bad_settings_are_rejected() {
        let short = UrlSigner::new(&KEY[..31], None, PUBLIC, HOUR).unwrap_err();
        assert!(short.contains("BATON_SNAPSHOT_SECRET is too short: use at least 32 random bytes"));
        let short = UrlSigner::new(KEY, Some(b"short"), PUBLIC, HOUR).unwrap_err();
        assert!(short.contains("BATON_SNAPSHOT_SECRET_PREVIOUS is too short"));
        for url in [
            "",
            "/",
            "baton.example.com",
            "ftp://baton",
            "https://",
            "http:///",
        ] {
            assert!(UrlSigner::new(KEY, None, url, HOUR).is_err(), "{url:?}");
        }
        assert!(UrlSigner::new(KEY, None, PUBLIC, Duration::ZERO).is_err());
        assert!(UrlSigner::new(KEY, None, "http://localhost:8080", HOUR).is_ok());
    }

    #[test]
    fn debug_output_hides_the_secrets() {
        let shown = format!("{:?}", signer(KEY, Some(OLD_KEY)));
        assert!(shown.contains(PUBLIC));
        assert!(!shown.contains("0123456789abcdef"));
        assert!(!shown.contains("old-old"));
    }

    #[test]
    fn errors_map_to_statuses_and_codes() {
        let all = [
            (SignatureError::Missing, 401, "signature_missing"),
            (SignatureError::Malformed, 403, "signature_malformed"),
            (SignatureError::Expired, 403, "signature_expired"),
            (SignatureError::Invalid, 403, "signature_invalid"),
        ];
        for (error, status, code) in all {
            assert_eq!(error.http_status(), status);
            assert_eq!(error.code(), code);
        }
    }

    proptest! {
        #[test]
        fn any_context_id_and_version_round_trip(id in "\\PC{1,24}", version in any::<u64>(), now in 0i64..4_000_000_000) {
            let signer = signer(KEY, None);
            let (path, query) = request(&signer.sign(&id, version, now));
            prop_assert_eq!(signer.verify(&path, Some(&query), now), Ok(()));
            prop_assert_eq!(signer.verify(&path, Some(&query), now + 3_601), Err(SignatureError::Expired));
        }

        #[test]
        fn verify_never_panics(path in "\\PC{0,40}", query in proptest::option::of("[a-z0-9=&%]{0,120}"), now in any::<i64>()) {
            let _ = signer(KEY, None).verify(&path, query.as_deref(), now);
        }
    }
}
