//! Bearer tokens for the HTTP surface.
//!
//! A pod accepts every token in its set, so a token rotates without downtime:
//! add the new one, move the clients, remove the old one. Tokens are kept as
//! SHA-256 digests and a presented token is hashed and compared with every
//! digest in constant time, so neither the comparison nor the token's length
//! tells a caller how close a guess was.

use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The shortest token accepted: a bearer token is a password that travels
/// on every request, so it must not be guessable.
pub const MIN_TOKEN_BYTES: usize = 16;
/// At most this many tokens may be configured at once (a rotation needs
/// two; a bound keeps each check cheap).
pub const MAX_TOKENS: usize = 64;

/// Who may call the protected endpoints.
#[derive(Clone)]
pub enum Auth {
    /// `--http-auth none`: an explicit choice for a private network.
    Open,
    /// Any of these tokens (their digests); empty refuses everyone.
    Tokens(Vec<[u8; 32]>),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Open => f.write_str("Open"),
            Auth::Tokens(tokens) => write!(f, "Tokens({} configured)", tokens.len()),
        }
    }
}

/// Which caller a request came from, for per-caller bounds (live feeds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Caller {
    Anonymous,
    /// The index of the token in the configured set.
    Token(usize),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Wrong,
}

impl Refused {
    pub fn message(self) -> &'static str {
        match self {
            Refused::Missing => "this endpoint needs `Authorization: Bearer <token>`",
            Refused::Wrong => "the bearer token is not accepted",
        }
    }
}

impl Auth {
    /// Refuses everyone: for a process (the healer) that serves only the
    /// open endpoints.
    pub fn deny_all() -> Auth {
        Auth::Tokens(Vec::new())
    }

    pub fn from_tokens<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Auth {
        Auth::Tokens(tokens.into_iter().map(digest).collect())
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<Caller, Refused> {
        let Auth::Tokens(digests) = self else {
            return Ok(Caller::Anonymous);
        };
        let Some(header) = authorization else {
            return Err(Refused::Missing);
        };
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let token = match header.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &header[7..],
            _ => return Err(Refused::Missing),
        };
        let presented = digest_bytes(token.trim_ascii());
        // Every digest is compared, so the time does not say which matched.
        let mut matched = None;
        for (index, known) in digests.iter().enumerate() {
            if bool::from(known.ct_eq(&presented)) && matched.is_none() {
                matched = Some(index);
            }
        }
        matched.map(Caller::Token).ok_or(Refused::Wrong)
    }
}

fn digest(token: &str) -> [u8; 32] {
    digest_bytes(token.as_bytes())
}

fn digest_bytes(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Tokens from `BATON_HTTP_AUTH_TOKENS` (comma or whitespace separated) and
/// the token file (one per line; blank lines and `#` comments skipped).
/// Problems name the source, never a token.
pub fn collect_tokens(
    inline: Option<&str>,
    file: Option<&Path>,
    problems: &mut Vec<String>,
) -> Vec<String> {
    let mut tokens: Vec<String> = inline
        .unwrap_or_default()
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|token| !token.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(path) = file {
        match std::fs::read_to_string(path) {
            Ok(text) => tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty() && !line.starts_with('#'))
                    .map(str::to_string),
            ),
            Err(err) => problems.push(format!(
                "http_auth_token_file: cannot read {}: {}",
                path.display(),
                err.kind()
            )),
        }
    }
    for (index, token) in tokens.iter().enumerate() {
        if token.len() < MIN_TOKEN_BYTES {
            problems.push(format!(
                "http_auth_tokens: token {} of {} is shorter than {MIN_TOKEN_BYTES} bytes",
                index + 1,
                tokens.len()
            ));
        }
        if token.chars().any(|c| c.is_control()) {
            problems.push(format!(
                "http_auth_tokens: token {} of {} holds a control character",
                index + 1,
                tokens.len()
            ));
        }
    }
    if tokens.len() > MAX_TOKENS {
        problems.push(format!(
            "http_auth_tokens: {} tokens given, at most {MAX_TOKENS} are accepted",
            tokens.len()
        ));
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "old-token-0123456789";
    const NEW: &str = "new-token-0123456789";

    #[test]
    fn any_configured_token_is_accepted_and_others_are_refused() {
        let auth = Auth::from_tokens([OLD, NEW]);
        let header = |token: &str| format!("Bearer {token}").into_bytes();
        assert_eq!(auth.check(Some(&header(OLD))), Ok(Caller::Token(0)));
        assert_eq!(auth.check(Some(&header(NEW))), Ok(Caller::Token(1)));
        assert_eq!(
            auth.check(Some(format!("bearer {NEW}").as_bytes())),
            Ok(Caller::Token(1))
        );
        assert_eq!(auth.check(None), Err(Refused::Missing));
        assert_eq!(
            auth.check(Some(format!("Basic {OLD}").as_bytes())),
            Err(Refused::Missing)
        );
        assert_eq!(auth.check(Some(&header("nope"))), Err(Refused::Wrong));
        assert_eq!(
            auth.check(Some(&header(&OLD[..OLD.len() - 1]))),
            Err(Refused::Wrong)
        );
        assert_eq!(
            Auth::deny_all().check(Some(&header(OLD))),
            Err(Refused::Wrong)
        );
        assert_eq!(Auth::Open.check(None), Ok(Caller::Anonymous));
        assert!(!format!("{auth:?}").contains(OLD));
    }

    #[test]
    fn tokens_come_from_the_variable_and_the_file_and_are_checked() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("# rotated 2026-01\n{NEW}\n\n")).expect("write");
        let mut problems = Vec::new();
        let tokens = collect_tokens(Some(OLD), Some(&path), &mut problems);
        assert_eq!(tokens, vec![OLD.to_string(), NEW.to_string()]);
        assert!(problems.is_empty(), "{problems:?}");
        let tokens = collect_tokens(Some("tiny1,x"), None, &mut problems);
        assert_eq!(tokens.len(), 2);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().all(|p| !p.contains("tiny1")),
            "{problems:?}"
        );
    }
}
