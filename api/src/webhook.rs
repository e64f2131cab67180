//! Standard Webhooks 1.0: `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, secrets `whsec_<base64>`.
//!
//! Entities sign the events they send with their secret; the vault signs the commands it
//! delivers with the target entity's secret. Both sides use this module.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::digest::CtOutput;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::limits::SIGNATURE_TOLERANCE_SECS;

/// Header carrying the message id (the same on every retry).
pub const HEADER_ID: &str = "webhook-id";
/// Header carrying the signing time, in Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying one or more space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

const SECRET_PREFIX: &str = "whsec_";
/// Longest signature header we parse; more is an attack, not a key rotation.
/// Longest `webhook-signature` header read.
pub const MAX_SIGNATURE_HEADER: usize = 1024;
/// Longest `webhook-id` accepted.
pub const MAX_WEBHOOK_ID: usize = 256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// A `webhook-*` header is missing or not parseable.
    #[error("missing or malformed header {0}")]
    MissingHeader(&'static str),
    /// The timestamp is outside the tolerance window.
    #[error("webhook-timestamp {0} is more than 5 minutes from now{hint}", hint = stale_hint(*.0))]
    StaleTimestamp(i64),
    /// No signature matched.
    #[error("no signature matches")]
    BadSignature,
    /// The secret is not `whsec_<base64>`.
    #[error("secret is not whsec_<base64>")]
    BadSecret,
}

/// A decoded signing secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A fresh random 32-byte secret.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut bytes = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Secret(bytes)
    }

    /// Parses `whsec_<base64>` (the prefix is optional, as in the spec's libraries).
    pub fn parse(s: &str) -> Result<Self, WebhookError> {
        let b64 = s.strip_prefix(SECRET_PREFIX).unwrap_or(s);
        let bytes = B64.decode(b64).map_err(|_| WebhookError::BadSecret)?;
        if bytes.len() < 16 || bytes.len() > 64 {
            return Err(WebhookError::BadSecret);
        }
        Ok(Secret(bytes))
    }

    /// The `whsec_<base64>` text form.
    pub fn encode(&self) -> String {
        format!("{SECRET_PREFIX}{}", B64.encode(&self.0))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes any key length"),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `v1,<base64>` signature of a message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", B64.encode(tag))
    }
}

/// The three headers of a signed message, as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedHeaders<'a> {
    /// `webhook-id`.
    pub id: Option<&'a str>,
    /// `webhook-timestamp`.
    pub timestamp: Option<&'a str>,
    /// `webhook-signature`.
    pub signature: Option<&'a str>,
}

/// A hint for the most common stale timestamp: milliseconds where seconds are wanted.
fn stale_hint(timestamp: i64) -> &'static str {
    if timestamp > 100_000_000_000 {
        " (it looks like milliseconds: send Unix seconds)"
    } else {
        " (Unix seconds, from a synchronised clock)"
    }
}

/// Verifies a message against any of `secrets` (several during a rotation grace period).
/// `now` is Unix seconds. Returns the message id on success.
pub fn verify<'a>(
    secrets: &[&Secret],
    headers: SignedHeaders<'a>,
    body: &[u8],
    now: i64,
) -> Result<&'a str, WebhookError> {
    let id = headers
        .id
        .filter(|s| !s.is_empty() && s.len() <= MAX_WEBHOOK_ID)
        .ok_or(WebhookError::MissingHeader(HEADER_ID))?;
    let timestamp: i64 = headers
        .timestamp
        .and_then(|t| t.trim().parse().ok())
        .ok_or(WebhookError::MissingHeader(HEADER_TIMESTAMP))?;
    let signature = headers
        .signature
        .filter(|s| s.len() <= MAX_SIGNATURE_HEADER)
        .ok_or(WebhookError::MissingHeader(HEADER_SIGNATURE))?;
    // `abs_diff`: a timestamp near i64::MIN or MAX must not overflow the subtraction (which
    // panics in a debug build and, wrapped, passes the check in a release one).
    if now.abs_diff(timestamp) > SIGNATURE_TOLERANCE_SECS.unsigned_abs() {
        return Err(WebhookError::StaleTimestamp(timestamp));
    }
    // One HMAC over the body per secret, however many signatures the header lists; the
    // comparisons are constant-time.
    let expected: Vec<CtOutput<HmacSha256>> = secrets
        .iter()
        .map(|s| s.mac(id, timestamp, body).finalize())
        .collect();
    for candidate in signature.split_whitespace() {
        let Some(b64) = candidate.strip_prefix("v1,") else {
            continue;
        };
        let Ok(tag) = B64.decode(b64) else { continue };
        let Ok(tag) = <[u8; 32]>::try_from(tag.as_slice()) else {
            continue;
        };
        let given = CtOutput::<HmacSha256>::new(tag.into());
        if expected.contains(&given) {
            return Ok(id);
        }
    }
    Err(WebhookError::BadSignature)
}

/// Current Unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Fuzzing (PROPTEST_CASES=100000 for a longer run): header parsing and verification
        /// never panic, and what is signed verifies.
        #[test]
        fn arbitrary_headers_never_panic(
            id in ".{0,300}",
            ts in ".{0,30}",
            sig in ".{0,600}",
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
        ) {
            let secret = Secret::generate();
            let _ = verify(&[&secret], headers(&id, &ts, &sig), &body, unix_now());
        }

        #[test]
        fn signed_messages_verify(
            id in "[a-zA-Z0-9_-]{1,64}",
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            others in 0usize..5,
        ) {
            let (secret, other) = (Secret::generate(), Secret::generate());
            let now = unix_now();
            let mut sig = vec![other.sign(&id, now, &body); others];
            sig.push(secret.sign(&id, now, &body));
            let sig = sig.join(" ");
            let ts = now.to_string();
            proptest::prop_assert!(verify(&[&secret], headers(&id, &ts, &sig), &body, now).is_ok());
            proptest::prop_assert!(verify(&[&Secret::generate()], headers(&id, &ts, &sig), &body, now).is_err());
        }

        #[test]
        fn secrets_parse_or_refuse(s in ".{0,100}") {
            let _ = Secret::parse(&s);
        }
    }

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            id: Some(id),
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // Test vector from the Standard Webhooks specification's reference libraries.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let body = br#"{"test": 2432232314}"#;
        let sig = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn verifies_any_of_several_signatures_and_secrets() {
        let old = Secret::generate();
        let new = Secret::generate();
        let body = b"{}";
        let sig = format!("v1,bogus {}", new.sign("m1", 100, body));
        let ok = verify(&[&old, &new], headers("m1", "100", &sig), body, 110);
        assert_eq!(ok, Ok("m1"));
        let bad = verify(&[&old], headers("m1", "100", &sig), body, 110);
        assert_eq!(bad, Err(WebhookError::BadSignature));
    }

    #[test]
    fn refuses_stale_tampered_and_missing() {
        let s = Secret::generate();
        let sig = s.sign("m", 1000, b"a");
        assert_eq!(
            verify(&[&s], headers("m", "1000", &sig), b"a", 1000 + 301),
            Err(WebhookError::StaleTimestamp(1000))
        );
        // Timestamps at the ends of i64 are stale, not an overflow (a wrapped difference of
        // i64::MIN has a negative absolute value, which passed the check before).
        let now = 1_700_000_000;
        for far in [i64::MIN, now + i64::MIN, i64::MAX] {
            let sig = s.sign("m", far, b"a");
            assert_eq!(
                verify(&[&s], headers("m", &far.to_string(), &sig), b"a", now),
                Err(WebhookError::StaleTimestamp(far))
            );
        }
        assert_eq!(
            verify(&[&s], headers("m", "1000", &sig), b"b", 1000),
            Err(WebhookError::BadSignature)
        );
        let missing = SignedHeaders {
            id: Some("m"),
            timestamp: None,
            signature: Some(&sig),
        };
        assert_eq!(
            verify(&[&s], missing, b"a", 1000),
            Err(WebhookError::MissingHeader(HEADER_TIMESTAMP))
        );
        assert!(Secret::parse("whsec_!!").is_err());
        assert_eq!(Secret::parse(&s.encode()), Ok(s));
    }
}
