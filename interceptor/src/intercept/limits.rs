//! What one pod may cost the agent, and what an attacker may cost its logs.
//!
//! * [`PodLimits`]: caps on the flows the agent holds for one pod (as a client: everything its
//!   outbound listener accepted; as a server: everything one source address sent to its
//!   inbound listener) and on how many of them may be in set-up (classification, handshake,
//!   dial) at once. Every pod shares the agent's descriptors and workers; without a cap one
//!   pod opening connections until the descriptor limit denies service to all the others.
//! * [`AcceptBackoff`]: what an accept loop does after a failed accept. Running out of
//!   descriptors or memory is not fixed by retrying at once.
//! * [`LogLimiter`]: refusals are logged per reason as a sample (the first few per interval)
//!   plus one line with the count of those left out. The counters are never sampled.
//!
//! Pure except for the atomics: the clock is an argument, so tests drive time.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::refusal::RefusalCode;

/// Why a connection was turned away before any policy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapExceeded {
    /// The pod (or, inbound, one source toward the pod) already holds the maximum number of
    /// flows.
    Connections,
    /// The pod (or source) already has the maximum number of flows in set-up.
    Handshakes,
}

impl CapExceeded {
    /// The refusal code (`refused.<code>` counter).
    pub fn code(self) -> RefusalCode {
        match self {
            CapExceeded::Connections => RefusalCode::PodConnectionLimit,
            CapExceeded::Handshakes => RefusalCode::PodHandshakeLimit,
        }
    }
}

/// Caps of one pod and direction; inbound ones are kept per source address.
#[derive(Debug)]
pub struct PodLimits {
    max_connections: usize,
    max_pending: usize,
    /// Outbound: one bucket (the pod itself). Inbound: one bucket per source address.
    buckets: Mutex<HashMap<Option<IpAddr>, Arc<Bucket>>>,
}

#[derive(Debug, Default)]
struct Bucket {
    connections: AtomicUsize,
    pending: AtomicUsize,
}

/// A flow's share of its bucket: released when the flow ends (both sockets closed).
#[derive(Debug)]
pub struct FlowPermit {
    bucket: Arc<Bucket>,
    pending: Option<PendingPermit>,
    limits: Arc<PodLimits>,
    key: Option<IpAddr>,
}

/// The set-up share: released when the flow is relaying, refused, or failed.
#[derive(Debug)]
struct PendingPermit(Arc<Bucket>);

impl Drop for PendingPermit {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl FlowPermit {
    /// The flow finished its set-up: it no longer counts against the handshake cap.
    pub fn set_up(&mut self) {
        self.pending = None;
    }
}

impl Drop for FlowPermit {
    fn drop(&mut self) {
        self.pending = None;
        if self.bucket.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.limits.forget_if_idle(self.key, &self.bucket);
        }
    }
}

impl PodLimits {
    pub fn new(max_connections: usize, max_pending: usize) -> Arc<PodLimits> {
        Arc::new(PodLimits {
            max_connections,
            max_pending,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Admits one new flow from `source` (`None`: the pod's own outbound bucket), or says
    /// which cap it would exceed. Nothing is taken when it is refused.
    pub fn admit(self: &Arc<Self>, source: Option<IpAddr>) -> Result<FlowPermit, CapExceeded> {
        // Taken under the map lock, so a bucket is never forgotten while a flow joins it.
        let buckets = &mut self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = Arc::clone(buckets.entry(source).or_default());
        if !take(&bucket.connections, self.max_connections) {
            return Err(CapExceeded::Connections);
        }
        if !take(&bucket.pending, self.max_pending) {
            bucket.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(CapExceeded::Handshakes);
        }
        Ok(FlowPermit {
            bucket: Arc::clone(&bucket),
            pending: Some(PendingPermit(bucket)),
            limits: Arc::clone(self),
            key: source,
        })
    }

    /// Flows held and in set-up for `source`.
    pub fn usage(&self, source: Option<IpAddr>) -> (usize, usize) {
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.get(&source).map_or((0, 0), |b| {
            (
                b.connections.load(Ordering::Acquire),
                b.pending.load(Ordering::Acquire),
            )
        })
    }

    /// Drops a source's bucket once it holds nothing, so sources that come and go do not
    /// accumulate.
    fn forget_if_idle(&self, key: Option<IpAddr>, bucket: &Arc<Bucket>) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = buckets.get(&key)
            && Arc::ptr_eq(b, bucket)
            && b.connections.load(Ordering::Acquire) == 0
        {
            buckets.remove(&key);
        }
    }
}

/// Increments `counter` unless it is at `max`.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// The pause after a failed accept: none for errors that concern one connection (it was
/// aborted before we took it), growing from [`AcceptBackoff::FIRST`] to [`AcceptBackoff::MAX`]
/// while the agent is out of a resource (descriptors, memory) that retrying cannot give back.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);

    /// How long to wait before the next accept after `error`.
    pub fn failed(&mut self, error: &io::Error) -> Duration {
        if !exhausts_resources(error) {
            return Duration::ZERO;
        }
        let wait = self.next.unwrap_or(Self::FIRST);
        self.next = Some((wait * 2).min(Self::MAX));
        wait
    }

    /// An accept succeeded: the next failure starts over.
    pub fn succeeded(&mut self) {
        self.next = None;
    }
}

/// Errors from accept(2) that mean the agent (or the node) is out of something.
fn exhausts_resources(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Every name [`accept_error_name`] returns; `other` last.
pub const ACCEPT_ERRORS: [&str; 7] = [
    "emfile",
    "enfile",
    "enobufs",
    "enomem",
    "econnaborted",
    "eperm",
    "other",
];

/// A short name for an accept error, for its counter (`accept_failed.<name>`).
pub fn accept_error_name(error: &io::Error) -> &'static str {
    let i = match error.raw_os_error() {
        Some(libc::EMFILE) => 0,
        Some(libc::ENFILE) => 1,
        Some(libc::ENOBUFS) => 2,
        Some(libc::ENOMEM) => 3,
        Some(libc::ECONNABORTED) => 4,
        Some(libc::EPERM) => 5,
        _ => 6,
    };
    ACCEPT_ERRORS[i]
}

/// Per-key log sampling: within each `interval`, the first `burst` events of a key are
/// logged; the rest are counted and reported in one summary line once the interval is over.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    burst: u32,
    windows: HashMap<LogKey, Window>,
}

/// What a log line is about: a kind (`refused`, `failed accepts`, ...) and a code. Both are
/// static, so the limiter's memory is bounded by the codes the agent has.
pub type LogKey = (&'static str, &'static str);

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// Events of `key` left out of the log during one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub key: LogKey,
    pub count: u64,
    pub interval: Duration,
}

impl LogLimiter {
    pub fn new(interval: Duration, burst: u32) -> LogLimiter {
        LogLimiter {
            interval,
            burst,
            windows: HashMap::new(),
        }
    }

    /// Whether to log this event of `key` at `now`, and the summary of the interval that
    /// just ended for it, if events were left out of that one.
    pub fn check(&mut self, key: LogKey, now: Instant) -> (bool, Option<Suppressed>) {
        let mut summary = None;
        let w = self.windows.entry(key).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(w.start) >= self.interval {
            if w.suppressed > 0 {
                summary = Some(Suppressed {
                    key,
                    count: w.suppressed,
                    interval: self.interval,
                });
            }
            *w = Window {
                start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged < self.burst {
            w.logged += 1;
            (true, summary)
        } else {
            w.suppressed += 1;
            (false, summary)
        }
    }

    /// Summaries of every interval over at `now` that left events out; forgets quiet keys.
    /// Called periodically, so a flood that stops is still reported.
    pub fn flush(&mut self, now: Instant) -> Vec<Suppressed> {
        let mut out = Vec::new();
        self.windows.retain(|&key, w| {
            if now.saturating_duration_since(w.start) < self.interval {
                return true;
            }
            if w.suppressed > 0 {
                out.push(Suppressed {
                    key,
                    count: w.suppressed,
                    interval: self.interval,
                });
            }
            false
        });
        out.sort_by_key(|s| s.key);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_logs_a_burst_then_counts_and_reports_the_rest() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(Duration::from_secs(10), 3);
        let mut logged = 0;
        for i in 0..1000u64 {
            let (log, summary) = l.check(("refused", "deny_rule"), t0 + Duration::from_millis(i));
            logged += u32::from(log);
            assert_eq!(summary, None);
        }
        assert_eq!(logged, 3);
        // Another reason has its own budget.
        assert_eq!(
            l.check(("refused", "handshake_failed"), t0 + Duration::from_secs(1)),
            (true, None)
        );
        // The next event after the interval is logged and carries the summary.
        let (log, summary) = l.check(("refused", "deny_rule"), t0 + Duration::from_secs(10));
        assert!(log);
        assert_eq!(
            summary,
            Some(Suppressed {
                key: ("refused", "deny_rule"),
                count: 997,
                interval: Duration::from_secs(10),
            })
        );
        // A fresh interval starts with a fresh budget.
        assert_eq!(
            l.check(("refused", "deny_rule"), t0 + Duration::from_secs(11)),
            (true, None)
        );
    }

    #[test]
    fn flush_reports_a_flood_that_stopped_and_forgets_quiet_keys() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(Duration::from_secs(5), 1);
        for _ in 0..50 {
            l.check(("refused", "pod_connection_limit"), t0);
        }
        l.check(("failed flows", "flow"), t0);
        assert!(l.flush(t0 + Duration::from_secs(4)).is_empty(), "too early");
        assert_eq!(
            l.flush(t0 + Duration::from_secs(5)),
            vec![Suppressed {
                key: ("refused", "pod_connection_limit"),
                count: 49,
                interval: Duration::from_secs(5),
            }]
        );
        assert!(l.windows.is_empty(), "flushed windows are forgotten");
        // Nothing is reported twice.
        assert!(l.flush(t0 + Duration::from_secs(60)).is_empty());
        assert_eq!(
            l.check(
                ("refused", "pod_connection_limit"),
                t0 + Duration::from_secs(61)
            ),
            (true, None)
        );
    }

    #[test]
    fn caps_hold_per_bucket_and_come_back_when_flows_end() {
        let limits = PodLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut p1 = limits.admit(Some(a)).unwrap();
        let _p2 = limits.admit(Some(a)).unwrap();
        // Two in set-up: the third is refused for handshakes, and takes nothing.
        assert_eq!(limits.admit(Some(a)).unwrap_err(), CapExceeded::Handshakes);
        assert_eq!(limits.usage(Some(a)), (2, 2));
        p1.set_up();
        let _p3 = limits.admit(Some(a)).unwrap();
        assert_eq!(limits.admit(Some(a)).unwrap_err(), CapExceeded::Connections);
        // Another source, and the outbound bucket, are not affected.
        let _q = limits.admit(Some(b)).unwrap();
        let _o = limits.admit(None).unwrap();
        drop(p1);
        assert_eq!(limits.usage(Some(a)), (2, 2));
        let _p4 = limits.admit(Some(a)).unwrap_err();
        assert_eq!(_p4, CapExceeded::Handshakes);
    }

    #[test]
    fn idle_buckets_are_forgotten() {
        let limits = PodLimits::new(4, 4);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let p = limits.admit(Some(a)).unwrap();
        assert_eq!(limits.buckets.lock().unwrap().len(), 1);
        drop(p);
        assert!(limits.buckets.lock().unwrap().is_empty());
    }

    #[test]
    fn accept_backs_off_only_when_out_of_resources() {
        let mut b = AcceptBackoff::default();
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(b.failed(&aborted), Duration::ZERO);
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<_> = (0..10).map(|_| b.failed(&emfile)).collect();
        assert_eq!(waits[0], AcceptBackoff::FIRST);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), AcceptBackoff::MAX);
        b.succeeded();
        assert_eq!(b.failed(&emfile), AcceptBackoff::FIRST);
        assert_eq!(accept_error_name(&emfile), "emfile");
    }
}
