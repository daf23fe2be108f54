//! Peer authentication: both sides prove they hold the cluster key by an HMAC-SHA256
//! over both sides' fresh nonces, before any other frame is accepted.
//!
//! ```text
//! dialer   -> Hello { nc }
//! listener -> Challenge { ns, proof = HMAC(key, "S" | nc | ns) }
//! dialer   -> Proof { HMAC(key, "C" | nc | ns) }        (after checking the listener's)
//! ```
//! Fresh nonces on both sides mean a recorded exchange cannot be replayed, and the
//! role byte keeps one side's proof from being reflected back as the other's.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::frame::NONCE_SIZE;

type HmacSha256 = Hmac<Sha256>;

/// The shortest key file accepted (bytes).
pub const KEY_BYTES_MIN: usize = 16;

/// The shared secret, as SHA-256 of the key file's bytes.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// `None` when the secret is shorter than `KEY_BYTES_MIN`.
    pub fn from_secret(secret: &[u8]) -> Option<ClusterKey> {
        (secret.len() >= KEY_BYTES_MIN).then(|| ClusterKey(Sha256::digest(secret).into()))
    }

    pub fn proof(&self, role: u8, nc: &[u8; NONCE_SIZE], ns: &[u8; NONCE_SIZE]) -> [u8; 32] {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"spool-auth-v1");
        m.update(&[role]);
        m.update(nc);
        m.update(ns);
        m.finalize().into_bytes().into()
    }

    /// Constant-time check of a peer's proof.
    pub fn verify(
        &self,
        role: u8,
        nc: &[u8; NONCE_SIZE],
        ns: &[u8; NONCE_SIZE],
        proof: &[u8],
    ) -> bool {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"spool-auth-v1");
        m.update(&[role]);
        m.update(nc);
        m.update(ns);
        m.verify_slice(proof).is_ok()
    }
}

pub const ROLE_LISTENER: u8 = b'S';
pub const ROLE_DIALER: u8 = b'C';

pub fn nonce() -> [u8; NONCE_SIZE] {
    let mut n = [0u8; NONCE_SIZE];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_key_role_and_both_nonces() {
        let k = ClusterKey::from_secret(b"0123456789abcdef").unwrap();
        let other = ClusterKey::from_secret(b"0123456789abcdeX").unwrap();
        let (a, b) = (nonce(), nonce());
        let p = k.proof(ROLE_LISTENER, &a, &b);
        assert!(k.verify(ROLE_LISTENER, &a, &b, &p));
        assert!(!k.verify(ROLE_DIALER, &a, &b, &p), "reflected proof");
        assert!(!k.verify(ROLE_LISTENER, &b, &a, &p), "swapped nonces");
        assert!(!other.verify(ROLE_LISTENER, &a, &b, &p), "other key");
        assert!(!k.verify(ROLE_LISTENER, &a, &b, &p[..31]), "short proof");
        assert!(ClusterKey::from_secret(b"short").is_none());
    }
}
