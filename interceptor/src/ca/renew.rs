//! When workload certificates are replaced, and the store that replaces them.
//!
//! A leaf is renewed once a configured fraction of its lifetime has passed (Istio's
//! half-life default), pulled earlier by a random share of up to [`JITTER`] so the leaves of
//! one node, minted together at start-up, do not all renew in the same second afterwards.
//! Renewal is driven by the wall clock, read at two moments: whenever a handshake is about to
//! present a leaf, and on a periodic sweep. The handshake check is what makes a clock jump
//! (suspend/resume, an NTP step) harmless: whatever the monotonic timers believe, a leaf that
//! is not valid at the current wall-clock time is never presented.
//!
//! Replacing a leaf only changes what new handshakes present; open flows keep their session
//! keys, which do not depend on the certificate after the handshake.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use super::LeafCert;
use crate::identity::SpiffeId;

/// The wall clock, injectable so tests can move it.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system's real-time clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Largest share of the renewal point that jitter moves renewal earlier by: with the default
/// fraction of 0.5, a leaf renews between 45 % and 50 % of its lifetime.
pub const JITTER: f64 = 0.1;

/// Renewal settings (`identity.leafTtl`, `identity.renewFraction`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RenewPolicy {
    /// Requested leaf lifetime; the CA may clip it to its signer's remaining validity.
    pub ttl: Duration,
    /// Share of the lifetime after which the leaf is replaced, in (0, 1).
    pub fraction: f64,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        Self {
            ttl: super::DEFAULT_LEAF_TTL,
            fraction: DEFAULT_RENEW_FRACTION,
        }
    }
}

/// Istio's default: renew at half-life, which leaves the other half to ride out a CA outage.
pub const DEFAULT_RENEW_FRACTION: f64 = 0.5;

/// When a leaf issued at `issued` and expiring at `not_after` is due for renewal. `jitter` in
/// [0, 1) picks the point inside the jitter window; values outside are clamped.
pub fn renew_at(
    issued: SystemTime,
    not_after: SystemTime,
    fraction: f64,
    jitter: f64,
) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    let share = fraction.clamp(0.0, 1.0) * (1.0 - JITTER * jitter.clamp(0.0, 1.0));
    issued + life.mul_f64(share)
}

/// Whether a leaf may be presented at `now` (webpki's rule: `not_before <= now <= not_after`;
/// the last second is left out so the peer, checking a moment later, still accepts it).
pub fn presentable(leaf: &LeafCert, now: SystemTime) -> bool {
    leaf.not_before() <= now && now < leaf.not_after()
}

/// Delay before retrying a failed renewal: 1 s, doubling, at most a minute, so a CA that comes
/// back is noticed quickly while a broken one is not hammered.
pub fn retry_after(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << exp).min(MAX_RETRY)
}

const MAX_RETRY: Duration = Duration::from_secs(60);

/// A uniformly distributed value in [0, 1) from the system RNG (0 if it fails: jitter is a
/// nicety, not a security property).
pub fn random_unit() -> f64 {
    let mut bytes = [0u8; 4];
    if rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .is_err()
    {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

/// Something built around one leaf (the leaf itself, or the TLS configs that present it).
pub trait HoldsLeaf: Send + Sync {
    fn leaf(&self) -> &LeafCert;
}

impl HoldsLeaf for LeafCert {
    fn leaf(&self) -> &LeafCert {
        self
    }
}

/// Why a leaf is being replaced (for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// None held yet.
    First,
    /// The renewal point passed.
    Due,
    /// The CA material changed (new signer or trust bundle).
    NewMaterial,
    /// The wall clock is outside the leaf's validity (it jumped, or renewal kept failing).
    NotValidNow,
}

struct Slot<T> {
    current: Arc<T>,
    issued: SystemTime,
    renew_at: SystemTime,
    material: u64,
    failures: u32,
    retry_at: Option<SystemTime>,
}

/// One current leaf-bearing value per identity, replaced on the schedule above.
///
/// `make` (passed to each call) issues a leaf and builds the value; it runs under the store's
/// lock, which is fine for the built-in CA (a key generation and a signature). `material` is
/// the generation of the CA material in effect; a leaf minted under an older one is replaced.
pub struct LeafStore<T> {
    clock: Arc<dyn Clock>,
    policy: RenewPolicy,
    jitter: Box<dyn Fn() -> f64 + Send + Sync>,
    slots: Mutex<HashMap<SpiffeId, Slot<T>>>,
}

impl<T: HoldsLeaf> LeafStore<T> {
    pub fn new(clock: Arc<dyn Clock>, policy: RenewPolicy) -> Self {
        Self::with_jitter(clock, policy, Box::new(random_unit))
    }

    /// With a chosen jitter source, for tests.
    pub fn with_jitter(
        clock: Arc<dyn Clock>,
        policy: RenewPolicy,
        jitter: Box<dyn Fn() -> f64 + Send + Sync>,
    ) -> Self {
        Self {
            clock,
            policy,
            jitter,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> RenewPolicy {
        self.policy
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// The value to present for `id` now, renewed first if due. A failed renewal keeps the
    /// current value while it is still valid (retrying with backoff); with no valid value left
    /// the error is returned, so the caller fails closed instead of presenting an invalid leaf.
    pub fn get<E: std::fmt::Display>(
        &self,
        id: &SpiffeId,
        material: u64,
        make: impl FnOnce(&SpiffeId, SystemTime, Duration) -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        self.get_ahead(id, material, Duration::ZERO, make)
    }

    /// [`LeafStore::get`], treating a leaf as due `ahead` before its renewal point.
    fn get_ahead<E: std::fmt::Display>(
        &self,
        id: &SpiffeId,
        material: u64,
        ahead: Duration,
        make: impl FnOnce(&SpiffeId, SystemTime, Duration) -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        let now = self.clock.now();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let reason = match slots.get(id) {
            None => Reason::First,
            Some(slot) => {
                let valid = presentable(slot.current.leaf(), now);
                let reason = if !valid {
                    Reason::NotValidNow
                } else if slot.material < material {
                    Reason::NewMaterial
                } else if now + ahead >= slot.renew_at {
                    Reason::Due
                } else {
                    return Ok(Arc::clone(&slot.current));
                };
                if valid && slot.retry_at.is_some_and(|at| now < at) {
                    return Ok(Arc::clone(&slot.current));
                }
                reason
            }
        };
        match make(id, now, self.policy.ttl) {
            Ok(value) => {
                let value = Arc::new(value);
                let leaf = value.leaf();
                let renew_at =
                    renew_at(now, leaf.not_after(), self.policy.fraction, (self.jitter)());
                if reason != Reason::First {
                    info!(
                        %id,
                        ?reason,
                        serial = %leaf.serial_hex(),
                        valid_for_secs = leaf.not_after().duration_since(now).unwrap_or_default().as_secs(),
                        "workload certificate renewed"
                    );
                }
                slots.insert(
                    id.clone(),
                    Slot {
                        current: Arc::clone(&value),
                        issued: now,
                        renew_at,
                        material,
                        failures: 0,
                        retry_at: None,
                    },
                );
                Ok(value)
            }
            Err(e) => {
                let Some(slot) = slots.get_mut(id) else {
                    return Err(e);
                };
                slot.failures += 1;
                let retry = retry_after(slot.failures);
                slot.retry_at = Some(now + retry);
                if presentable(slot.current.leaf(), now) {
                    warn!(
                        %id,
                        ?reason,
                        failures = slot.failures,
                        retry_in_secs = retry.as_secs(),
                        expires_in_secs = slot.current.leaf().not_after().duration_since(now).unwrap_or_default().as_secs(),
                        "workload certificate renewal failed, still presenting the current one: {e}"
                    );
                    Ok(Arc::clone(&slot.current))
                } else {
                    warn!(
                        %id,
                        failures = slot.failures,
                        "workload certificate is not valid at the current time and renewal failed: {e}"
                    );
                    Err(e)
                }
            }
        }
    }

    /// Renews every held leaf that is due within `ahead` or was minted under older material
    /// than `material` (the periodic sweep, and the step before new CA material is published),
    /// so handshakes rarely wait for a key generation. Returns how many were replaced.
    pub fn sweep<E: std::fmt::Display>(
        &self,
        material: u64,
        ahead: Duration,
        mut make: impl FnMut(&SpiffeId, SystemTime, Duration) -> Result<T, E>,
    ) -> usize {
        let held: Vec<(SpiffeId, Arc<T>)> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .iter()
                .map(|(id, s)| (id.clone(), Arc::clone(&s.current)))
                .collect()
        };
        let mut renewed = 0;
        for (id, before) in held {
            if let Ok(now) = self.get_ahead(&id, material, ahead, &mut make)
                && !Arc::ptr_eq(&now, &before)
            {
                renewed += 1;
            }
        }
        renewed
    }

    /// Every held identity and when its current leaf expires (the expiry metrics).
    pub fn expiries(&self) -> Vec<(SpiffeId, SystemTime)> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .map(|(id, s)| (id.clone(), s.current.leaf().not_after()))
            .collect()
    }

    /// When the value for `id` was minted and when it is due, for tests and status output.
    pub fn schedule(&self, id: &SpiffeId) -> Option<(SystemTime, SystemTime)> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(id).map(|s| (s.issued, s.renew_at))
    }
}

#[cfg(test)]
mod tests;
