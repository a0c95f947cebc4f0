//! Memory of certificates already checked, so a peer that connects again does not pay for the
//! same chain signature check and certificate parses on every connection.
//!
//! Mesh peers reconnect constantly with the same leaf (24 h certificates, thousands of
//! connections each), and a same-node agent checks both ends of every connection. The chain
//! check (an ECDSA verification of the leaf's signature by the root) and the x509 parses for
//! the SPIFFE ID were a fifth of the agent's CPU per connection. What is remembered is exactly
//! what a repeat of the check would conclude:
//!
//! * [`VerifiedChains`] (one per verifier, so per trust store and per client/server usage):
//!   "this leaf with these intermediates chains to the roots", valid while the current time is
//!   inside every certificate's validity window, the only input of webpki's path check that
//!   changes for the same bytes (there are no revocation lists). Bytes are compared in full,
//!   not by hash.
//! * [`leaf_identity`]: the SPIFFE ID of a certificate, a pure function of its bytes.
//!
//! The handshake signature (CertificateVerify), which proves the peer holds the leaf's key on
//! this connection, is never cached. Both maps are bounded; when one is full, entries that
//! expired are dropped, and failing that the whole map (a cache miss only costs the full check).

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
};

use rustls::{
    CertificateError, Error,
    pki_types::{CertificateDer, UnixTime},
};
use x509_parser::{certificate::X509Certificate, prelude::FromDer as _};

use crate::identity::{CertIdentityError, SpiffeId};

/// Chains one verifier accepted, by leaf.
#[derive(Debug)]
pub(super) struct VerifiedChains {
    entries: Mutex<HashMap<Vec<u8>, Verified>>,
    capacity: usize,
}

#[derive(Debug)]
struct Verified {
    intermediates: Vec<Vec<u8>>,
    /// Unix seconds; webpki accepts `not_before <= now <= not_after` for every certificate.
    not_before: u64,
    not_after: u64,
}

impl VerifiedChains {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Whether exactly this chain was accepted before and `now` is still inside all of its
    /// validity windows.
    pub(super) fn contains(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        let now = now.as_secs();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(leaf.as_ref()).is_some_and(|v| {
            v.not_before <= now
                && now <= v.not_after
                && v.intermediates.len() == intermediates.len()
                && v.intermediates
                    .iter()
                    .zip(intermediates)
                    .all(|(a, b)| a.as_slice() == b.as_ref())
        })
    }

    /// Records a chain the full check just accepted at `now`. A chain whose dates cannot be
    /// read is not remembered (it is then checked in full every time).
    pub(super) fn insert(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) {
        let mut not_before = 0u64;
        let mut not_after = u64::MAX;
        for der in std::iter::once(leaf).chain(intermediates) {
            let Some((nb, na)) = validity(der) else {
                return;
            };
            not_before = not_before.max(nb);
            not_after = not_after.min(na);
        }
        let now = now.as_secs();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity && !entries.contains_key(leaf.as_ref()) {
            entries.retain(|_, v| now <= v.not_after);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(
            leaf.to_vec(),
            Verified {
                intermediates: intermediates.iter().map(|c| c.to_vec()).collect(),
                not_before,
                not_after,
            },
        );
    }
}

/// The validity window in Unix seconds, clamped at zero (webpki compares against a `UnixTime`,
/// which cannot be before 1970 either).
pub(super) fn validity(der: &[u8]) -> Option<(u64, u64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let v = cert.validity();
    let secs = |t: i64| u64::try_from(t).unwrap_or(0);
    Some((
        secs(v.not_before.timestamp()),
        secs(v.not_after.timestamp()),
    ))
}

/// The SPIFFE ID of a certificate, as [`SpiffeId::from_certificate`], remembered by the
/// certificate's bytes. Like that function it does not verify anything: call it only on a
/// certificate whose chain has been checked.
pub(super) fn leaf_identity(der: &[u8]) -> Result<SpiffeId, CertIdentityError> {
    /// Distinct peer leaves a node sees within a certificate lifetime; far more only costs
    /// re-parsing.
    const CAPACITY: usize = 4096;
    static IDS: LazyLock<Mutex<HashMap<Vec<u8>, SpiffeId>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));

    if let Some(id) = IDS.lock().unwrap_or_else(|p| p.into_inner()).get(der) {
        return Ok(id.clone());
    }
    let id = SpiffeId::from_certificate(der)?;
    let mut ids = IDS.lock().unwrap_or_else(|p| p.into_inner());
    if ids.len() >= CAPACITY {
        ids.clear();
    }
    ids.insert(der.to_vec(), id.clone());
    Ok(id)
}

/// Whether `der` is inside its validity window at `now`, for a resumed session (whose peer
/// chain no verifier looked at on this connection). The window is remembered by the
/// certificate's bytes; a certificate whose dates cannot be read is refused.
pub(super) fn check_validity(der: &[u8], now: UnixTime) -> Result<(), Error> {
    const CAPACITY: usize = 4096;
    /// `(not_before, not_after)` in Unix seconds.
    type Window = (u64, u64);
    static WINDOWS: LazyLock<Mutex<HashMap<Vec<u8>, Window>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));

    let known = WINDOWS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(der)
        .copied();
    let (not_before, not_after) = match known {
        Some(window) => window,
        None => {
            let window =
                validity(der).ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
            let mut windows = WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
            if windows.len() >= CAPACITY {
                windows.clear();
            }
            windows.insert(der.to_vec(), window);
            window
        }
    };
    let now = now.as_secs();
    if now < not_before {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
    }
    if now > not_after {
        return Err(Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        ca::{Ca, CertificateAuthority as _},
        identity::TrustDomain,
    };

    fn leaf(sa: &str) -> CertificateDer<'static> {
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let ca = Ca::generate(&td).unwrap();
        let id = SpiffeId::new(td, "ns", sa).unwrap();
        ca.issue(&id, Duration::from_secs(3600)).unwrap().chain()[0].clone()
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    fn now() -> u64 {
        UnixTime::now().as_secs()
    }

    #[test]
    fn remembers_exactly_the_accepted_chain_within_its_validity() {
        let cache = VerifiedChains::new(8);
        let a = leaf("a");
        let other = leaf("b");
        let t = now();
        assert!(!cache.contains(&a, &[], at(t)));
        cache.insert(&a, &[], at(t));
        assert!(cache.contains(&a, &[], at(t)));
        // Other leaf bytes, or the same leaf with other intermediates: a full check again.
        assert!(!cache.contains(&other, &[], at(t)));
        assert!(!cache.contains(&a, std::slice::from_ref(&other), at(t)));
        // Outside the certificate's window (1 h TTL; issued a little before now).
        assert!(!cache.contains(&a, &[], at(t + 2 * 3600)));
        assert!(!cache.contains(&a, &[], at(t - 24 * 3600)));
    }

    #[test]
    fn stays_bounded() {
        let cache = VerifiedChains::new(2);
        let t = now();
        let leaves: Vec<_> = ["a", "b", "c"].into_iter().map(leaf).collect();
        for l in &leaves {
            cache.insert(l, &[], at(t));
        }
        let held = leaves
            .iter()
            .filter(|l| cache.contains(l, &[], at(t)))
            .count();
        assert!(held <= 2, "capacity 2, {held} held");
        assert!(cache.contains(&leaves[2], &[], at(t)), "the newest is kept");
    }

    #[test]
    fn identity_is_read_from_the_bytes_and_garbage_is_refused() {
        let a = leaf("a");
        let first = leaf_identity(a.as_ref()).unwrap();
        assert_eq!(first.to_string(), "spiffe://cluster.local/ns/ns/sa/a");
        assert_eq!(leaf_identity(a.as_ref()).unwrap(), first);
        assert!(leaf_identity(b"not a certificate").is_err());
    }

    #[test]
    fn validity_is_judged_at_the_given_time() {
        let a = leaf("a");
        let t = now();
        assert_eq!(check_validity(a.as_ref(), at(t)), Ok(()));
        assert_eq!(
            check_validity(a.as_ref(), at(t + 2 * 3600)),
            Err(Error::InvalidCertificate(CertificateError::Expired))
        );
        assert_eq!(
            check_validity(a.as_ref(), at(t - 24 * 3600)),
            Err(Error::InvalidCertificate(CertificateError::NotValidYet))
        );
        assert!(check_validity(b"garbage", at(t)).is_err());
    }
}
