//! Sealing of secrets at rest (entities' access tokens and signing secrets): AES-256-GCM
//! under the cluster's token key ring.
//!
//! A sealed token is `version (1) | key id (4) | nonce (12) | ciphertext+tag`, bound to its
//! (customer, entity) as associated data so a sealed token cannot be moved to another link.
//! The first key seals; every key in the ring opens, so a key is rotated by putting the new
//! one first and dropping the old one once nothing sealed under it remains.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 4 + 12;

/// Why a key ring could not be built or a token opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A configured key is not base64 of 32 bytes.
    #[error("token key {0} is not base64 of 32 bytes")]
    BadKey(usize),
    /// No key configured.
    #[error("no token key configured")]
    NoKey,
    /// The sealed bytes are malformed, under an unknown key, or tampered with.
    #[error("sealed token cannot be opened: {0}")]
    Open(&'static str),
}

/// Stands in for the customer in the associated data of an entity's signing secret (customer
/// ids start with `cus_`, so the two kinds never open as each other).
const SIGNING_SECRET: &str = "signing-secret";
/// Stands in for the customer in the associated data of the vault's client secret at an
/// entity's OAuth provider.
const CLIENT_SECRET: &str = "client-secret";
/// Appended to the entity in the associated data of a refresh token (entity ids never hold
/// `/`), so an access token and a refresh token cannot be swapped.
const REFRESH: &str = "/refresh";

/// The node's token keys; the first one seals.
pub struct KeyRing {
    keys: Vec<([u8; 4], Aes256Gcm)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyRing({} keys)", self.keys.len())
    }
}

/// A new random key, base64 (for a config file or the data directory).
pub fn generate_key() -> String {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    B64.encode(k)
}

fn aad(customer: &str, entity: &str) -> Vec<u8> {
    [customer.as_bytes(), &[0], entity.as_bytes()].concat()
}

impl KeyRing {
    /// A ring from base64 keys, newest first.
    pub fn new(keys: &[String]) -> Result<Self, SealError> {
        if keys.is_empty() {
            return Err(SealError::NoKey);
        }
        let keys = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let bytes = B64.decode(k.trim()).map_err(|_| SealError::BadKey(i))?;
                if bytes.len() != 32 {
                    return Err(SealError::BadKey(i));
                }
                let id: [u8; 4] = Sha256::digest(&bytes)[..4]
                    .try_into()
                    .map_err(|_| SealError::BadKey(i))?;
                Ok((id, Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes))))
            })
            .collect::<Result<_, _>>()?;
        Ok(KeyRing { keys })
    }

    /// Seals `token` for the link (customer, entity) under the first key.
    pub fn seal(&self, customer: &str, entity: &str, token: &str) -> Result<Vec<u8>, SealError> {
        let (id, cipher) = self.keys.first().ok_or(SealError::NoKey)?;
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = aad(customer, entity);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: token.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Open("encryption failed"))?;
        let mut out = Vec::with_capacity(HEADER + ct.len());
        out.push(VERSION);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Seals an entity's signing secret (bound to the entity).
    pub fn seal_signing_secret(&self, entity: &str, secret: &str) -> Result<Vec<u8>, SealError> {
        self.seal(SIGNING_SECRET, entity, secret)
    }

    /// Opens an entity's signing secret sealed by [`KeyRing::seal_signing_secret`].
    pub fn open_signing_secret(&self, entity: &str, sealed: &[u8]) -> Result<String, SealError> {
        self.open(SIGNING_SECRET, entity, sealed)
    }

    /// Seals the vault's client secret at `entity`'s OAuth provider.
    pub fn seal_client_secret(&self, entity: &str, secret: &str) -> Result<Vec<u8>, SealError> {
        self.seal(CLIENT_SECRET, entity, secret)
    }

    /// Opens a client secret sealed by [`KeyRing::seal_client_secret`].
    pub fn open_client_secret(&self, entity: &str, sealed: &[u8]) -> Result<String, SealError> {
        self.open(CLIENT_SECRET, entity, sealed)
    }

    /// Seals a refresh token for the link (customer, entity).
    pub fn seal_refresh_token(
        &self,
        customer: &str,
        entity: &str,
        token: &str,
    ) -> Result<Vec<u8>, SealError> {
        self.seal(customer, &format!("{entity}{REFRESH}"), token)
    }

    /// Opens a refresh token sealed by [`KeyRing::seal_refresh_token`].
    pub fn open_refresh_token(
        &self,
        customer: &str,
        entity: &str,
        sealed: &[u8],
    ) -> Result<String, SealError> {
        self.open(customer, &format!("{entity}{REFRESH}"), sealed)
    }

    /// Opens a token sealed for the link (customer, entity) by any key of the ring.
    pub fn open(&self, customer: &str, entity: &str, sealed: &[u8]) -> Result<String, SealError> {
        if sealed.len() < HEADER || sealed[0] != VERSION {
            return Err(SealError::Open("unknown format"));
        }
        let cipher = self
            .keys
            .iter()
            .find(|(id, _)| id[..] == sealed[1..5])
            .map(|(_, c)| c)
            .ok_or(SealError::Open("sealed under a key no longer configured"))?;
        let aad = aad(customer, entity);
        let plain = cipher
            .decrypt(
                Nonce::from_slice(&sealed[5..HEADER]),
                Payload {
                    msg: &sealed[HEADER..],
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Open("authentication failed"))?;
        String::from_utf8(plain).map_err(|_| SealError::Open("not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_rotates_and_refuses_tampering() {
        let old = generate_key();
        let new = generate_key();
        let ring = KeyRing::new(std::slice::from_ref(&old)).expect("ring");
        let sealed = ring.seal("c1", "hotel", "tok_abc").expect("seal");
        assert!(
            !sealed.windows(7).any(|w| w == b"tok_abc"),
            "plaintext visible"
        );
        assert_eq!(ring.open("c1", "hotel", &sealed).expect("open"), "tok_abc");
        // Bound to its link.
        assert!(ring.open("c2", "hotel", &sealed).is_err());
        // Rotation: a new first key seals, the old one still opens.
        let rotated = KeyRing::new(&[new.clone(), old]).expect("ring");
        assert_eq!(
            rotated.open("c1", "hotel", &sealed).expect("open"),
            "tok_abc"
        );
        let resealed = rotated.seal("c1", "hotel", "tok_abc").expect("seal");
        let only_new = KeyRing::new(&[new]).expect("ring");
        assert!(only_new.open("c1", "hotel", &sealed).is_err());
        assert_eq!(
            only_new.open("c1", "hotel", &resealed).expect("open"),
            "tok_abc"
        );
        let mut tampered = resealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(only_new.open("c1", "hotel", &tampered).is_err());
        assert!(matches!(
            KeyRing::new(&["short".into()]),
            Err(SealError::BadKey(0))
        ));
        // Signing secrets are bound to their entity and never open as a link's token.
        let s = only_new
            .seal_signing_secret("hotel", "whsec_x")
            .expect("seal");
        assert_eq!(
            only_new.open_signing_secret("hotel", &s).expect("open"),
            "whsec_x"
        );
        assert!(only_new.open_signing_secret("airline", &s).is_err());
        assert!(only_new.open("c1", "hotel", &s).is_err());
    }
}
