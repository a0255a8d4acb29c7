//! Snapshot URL verification, which every pod runs on requests from anyone:
//! input is `path?query`. Never a panic; only a URL this signer made (or one
//! byte-for-byte equal to it) verifies.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use baton::snapshot_url::UrlSigner;
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_700_000_000;

static SIGNER: LazyLock<UrlSigner> = LazyLock::new(|| {
    UrlSigner::new(
        b"fuzz-current-secret-0123456789abcdef",
        Some(b"fuzz-previous-secret-0123456789abcd"),
        "https://baton.example.com",
        Duration::from_secs(3600),
    )
    .expect("signer")
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match text.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (text, None),
    };
    let verdict = SIGNER.verify(path, query, NOW);
    if verdict.is_ok() {
        // Accepted: then it is what the signer would have produced for some
        // id and version, or a reordering of its own parameters.
        assert!(path.starts_with("/contexts/"), "{path}");
    }
    // A URL signed now always verifies, whatever the context id.
    let id = String::from_utf8_lossy(&data[..data.len().min(64)]);
    let url = SIGNER.sign(&id, data.len() as u64, NOW);
    let rest = url
        .strip_prefix("https://baton.example.com")
        .expect("prefix");
    let (path, query) = rest.split_once('?').expect("query");
    assert_eq!(SIGNER.verify(path, Some(query), NOW), Ok(()));
});
