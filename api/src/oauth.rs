//! OAuth 2.0 helpers shared by the vault (client side) and the reference entity (server side).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// How long a started linking (and an entity's authorization code) stays usable.
pub const LINK_TTL_MS: i64 = 10 * 60 * 1000;
/// OAuth linkings one customer may have waiting for their callback; starting another drops
/// the oldest.
pub const MAX_PENDING_LINKS: usize = 8;

/// The PKCE S256 challenge of a verifier (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    B64URL.encode(Sha256::digest(verifier.as_bytes()))
}

/// A random URL-safe token of `bytes` random bytes (a 48-byte one is a 64-character PKCE
/// verifier; 24 bytes make a `state` or a code).
pub fn random_token(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    B64URL.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert_eq!(random_token(48).len(), 64);
    }
}
