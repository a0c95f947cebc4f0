use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::*;
use crate::{
    ca::{Ca, CaError, CertificateAuthority as _},
    identity::TrustDomain,
};

/// A wall clock the test moves (whole seconds since the epoch).
struct TestClock(AtomicU64);

impl TestClock {
    fn at(secs: u64) -> Arc<Self> {
        Arc::new(Self(AtomicU64::new(secs)))
    }

    fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_secs(), Ordering::SeqCst);
    }

    fn back(&self, d: Duration) {
        self.0.fetch_sub(d.as_secs(), Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::SeqCst))
    }
}

fn td() -> TrustDomain {
    "cluster.local".parse().unwrap()
}

fn web() -> SpiffeId {
    "spiffe://cluster.local/ns/default/sa/web".parse().unwrap()
}

const HOUR: Duration = Duration::from_secs(3600);

/// Now, in whole seconds (the CA signs whole seconds, so the test clock uses them too).
fn real_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn renewal_point_is_the_fraction_pulled_earlier_by_at_most_the_jitter() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let end = t0 + 24 * HOUR;
    assert_eq!(renew_at(t0, end, 0.5, 0.0), t0 + 12 * HOUR);
    // The largest jitter pulls renewal 10 % earlier: 45 % of the lifetime.
    let earliest = renew_at(t0, end, 0.5, 0.999_999);
    assert!(earliest >= t0 + HOUR.mul_f64(24.0 * 0.45), "{earliest:?}");
    assert!(earliest < t0 + HOUR.mul_f64(24.0 * 0.4501));
    // Out-of-range inputs are clamped, never past expiry or before issuance.
    assert_eq!(renew_at(t0, end, 7.0, -3.0), end);
    assert_eq!(renew_at(t0, end, 0.5, 5.0), renew_at(t0, end, 0.5, 1.0));
    assert_eq!(renew_at(end, t0, 0.5, 0.0), end);

    // Real jitter spreads leaves minted together over the window, inside its bounds.
    let points: Vec<SystemTime> = (0..200)
        .map(|_| renew_at(t0, end, 0.5, random_unit()))
        .collect();
    for p in &points {
        assert!(*p >= t0 + HOUR.mul_f64(24.0 * 0.45) && *p <= t0 + 12 * HOUR);
    }
    let distinct_secs: std::collections::BTreeSet<u64> = points
        .iter()
        .map(|p| p.duration_since(t0).unwrap().as_secs())
        .collect();
    assert!(
        distinct_secs.len() > 150,
        "{} distinct",
        distinct_secs.len()
    );
}

#[test]
fn backoff_doubles_and_is_capped() {
    let secs: Vec<u64> = (1..=9).map(|n| retry_after(n).as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(retry_after(u32::MAX), MAX_RETRY);
}

/// A CA whose failures the test switches on, counting issuances.
struct Flaky {
    ca: Ca,
    failing: std::sync::atomic::AtomicBool,
    issued: AtomicUsize,
}

impl Flaky {
    fn new() -> Self {
        Self {
            ca: Ca::generate(&td()).unwrap(),
            failing: false.into(),
            issued: AtomicUsize::new(0),
        }
    }

    fn make(&self, id: &SpiffeId, now: SystemTime, ttl: Duration) -> Result<LeafCert, CaError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(CaError::Random);
        }
        self.issued.fetch_add(1, Ordering::SeqCst);
        self.ca.issue_at(id, ttl, now)
    }
}

fn store(clock: &Arc<TestClock>, jitter: f64) -> LeafStore<LeafCert> {
    LeafStore::with_jitter(
        Arc::clone(clock) as Arc<dyn Clock>,
        RenewPolicy {
            ttl: 24 * HOUR,
            fraction: 0.5,
        },
        Box::new(move || jitter),
    )
}

#[test]
fn leaf_is_kept_until_due_then_replaced_for_new_handshakes() {
    let clock = TestClock::at(real_now());
    let ca = Flaky::new();
    let store = store(&clock, 0.0);
    let make = |id: &SpiffeId, now, ttl| ca.make(id, now, ttl);

    let first = store.get(&web(), 0, make).unwrap();
    let (issued, due) = store.schedule(&web()).unwrap();
    assert_eq!(due, issued + 12 * HOUR);
    clock.advance(12 * HOUR - Duration::from_secs(1));
    let same = store.get(&web(), 0, make).unwrap();
    assert!(Arc::ptr_eq(&first, &same));

    clock.advance(Duration::from_secs(1));
    let renewed = store.get(&web(), 0, make).unwrap();
    assert!(!Arc::ptr_eq(&first, &renewed));
    assert_ne!(renewed.serial_hex(), first.serial_hex());
    assert!(renewed.not_after() > first.not_after());
    assert_eq!(ca.issued.load(Ordering::SeqCst), 2);
    // The old one is not touched: whoever holds it (an open flow's config) keeps it.
    assert!(presentable(&first, clock.now()));
}

#[test]
fn jitter_moves_renewal_earlier_within_bounds() {
    let clock = TestClock::at(real_now());
    let ca = Flaky::new();
    let store = store(&clock, 0.5);
    store
        .get(&web(), 0, |id: &SpiffeId, now, ttl| ca.make(id, now, ttl))
        .unwrap();
    let (issued, due) = store.schedule(&web()).unwrap();
    // 24 h * 0.5 * (1 - 0.1 * 0.5) = 11.4 h
    assert_eq!(due.duration_since(issued).unwrap(), HOUR.mul_f64(11.4));
}

#[test]
fn sweep_renews_only_what_is_due() {
    let clock = TestClock::at(real_now());
    let ca = Flaky::new();
    let store = store(&clock, 0.0);
    let other: SpiffeId = "spiffe://cluster.local/ns/default/sa/db".parse().unwrap();
    store
        .get(&web(), 0, |id: &SpiffeId, now, ttl| ca.make(id, now, ttl))
        .unwrap();
    clock.advance(HOUR);
    store
        .get(&other, 0, |id: &SpiffeId, now, ttl| ca.make(id, now, ttl))
        .unwrap();
    clock.advance(11 * HOUR);
    let make = |id: &SpiffeId, now, ttl| ca.make(id, now, ttl);
    assert_eq!(store.sweep(0, Duration::ZERO, make), 1);
    assert_eq!(store.sweep(0, Duration::ZERO, make), 0);
    // Renewing a little ahead: the other leaf is due in an hour.
    assert_eq!(store.sweep(0, Duration::from_secs(60), make), 0);
    assert_eq!(store.sweep(0, HOUR, make), 1);
    // New CA material renews everything at once...
    assert_eq!(store.sweep(1, Duration::ZERO, make), 2);
    // ...and a handshake still holding the previous material does not undo it.
    let issued = ca.issued.load(Ordering::SeqCst);
    store.get(&web(), 0, make).unwrap();
    assert_eq!(ca.issued.load(Ordering::SeqCst), issued);
}

#[test]
fn clock_jumps_never_present_an_invalid_leaf() {
    let clock = TestClock::at(real_now());
    let ca = Flaky::new();
    let store = store(&clock, 0.0);
    let make = |id: &SpiffeId, now, ttl| ca.make(id, now, ttl);
    let first = store.get(&web(), 0, make).unwrap();

    // Forward past expiry (suspend for a day and more): replaced before it is presented.
    clock.advance(25 * HOUR);
    assert!(!presentable(&first, clock.now()));
    let after_jump = store.get(&web(), 0, make).unwrap();
    assert!(presentable(&after_jump, clock.now()));

    // Backward before its notBefore (an NTP step back): replaced too.
    clock.back(2 * HOUR);
    assert!(!presentable(&after_jump, clock.now()));
    let after_step_back = store.get(&web(), 0, make).unwrap();
    assert!(presentable(&after_step_back, clock.now()));
    assert_eq!(ca.issued.load(Ordering::SeqCst), 3);
}

#[test]
fn failed_renewal_keeps_the_valid_leaf_backs_off_and_fails_closed_at_expiry() {
    let clock = TestClock::at(real_now());
    let ca = Flaky::new();
    let store = store(&clock, 0.0);
    let make = |id: &SpiffeId, now, ttl| ca.make(id, now, ttl);
    let first = store.get(&web(), 0, make).unwrap();

    ca.failing.store(true, Ordering::SeqCst);
    clock.advance(13 * HOUR);
    // Due, the CA fails: the current (still valid) leaf is presented.
    let kept = store.get(&web(), 0, make).unwrap();
    assert!(Arc::ptr_eq(&first, &kept));
    // Within the 1 s backoff the CA is not asked again.
    ca.failing.store(false, Ordering::SeqCst);
    let kept = store.get(&web(), 0, make).unwrap();
    assert!(Arc::ptr_eq(&first, &kept));
    assert_eq!(ca.issued.load(Ordering::SeqCst), 1);
    // After it, the retry succeeds.
    clock.advance(Duration::from_secs(1));
    let renewed = store.get(&web(), 0, make).unwrap();
    assert!(!Arc::ptr_eq(&first, &renewed));

    // A CA down until the leaf expires: the store refuses rather than present it.
    ca.failing.store(true, Ordering::SeqCst);
    clock.advance(24 * HOUR + Duration::from_secs(400));
    assert!(store.get(&web(), 0, make).is_err());
    ca.failing.store(false, Ordering::SeqCst);
    assert!(presentable(
        &store.get(&web(), 0, make).unwrap(),
        clock.now()
    ));
}

#[test]
fn leaf_ttl_is_clipped_to_the_signer_and_renewal_follows_the_clipped_life() {
    let ca = Ca::generate(&td()).unwrap();
    let signer_end = ca.not_after();
    // Ten hours before the signer expires, a 24 h leaf is cut to the signer's end...
    let now = signer_end - 10 * HOUR;
    let leaf = ca.issue_at(&web(), 24 * HOUR, now).unwrap();
    assert_eq!(leaf.not_after(), signer_end);
    // ...and renewal is planned at half of what it really got.
    assert_eq!(renew_at(now, leaf.not_after(), 0.5, 0.0), now + 5 * HOUR);
    // Past the signer's end nothing is issued.
    let err = ca
        .issue_at(&web(), 24 * HOUR, signer_end + Duration::from_secs(1))
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}
