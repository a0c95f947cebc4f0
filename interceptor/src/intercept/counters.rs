//! What the connection path counts: refusals and policy closes by [`RefusalCode`], flows that
//! failed, accepts that failed (by errno), node-config reloads that were rejected. Every
//! counter is an atomic, so counting never waits for a lock; `interceptor flows --stats`
//! reads them through [`Counters::stats`], an exporter through the typed getters.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

use super::limits::ACCEPT_ERRORS;
use crate::{
    handshake::derived::Refused,
    refusal::{RefusalCode, RefusalCounts},
};

#[derive(Debug, Default)]
pub struct Counters {
    /// Connections refused, by code (`refused.<code>`).
    pub refused: RefusalCounts,
    /// Open flows closed by a policy change, by code (`closed.<code>`).
    pub closed: RefusalCounts,
    flows_failed: AtomicU64,
    accept_failed: [AtomicU64; ACCEPT_ERRORS.len()],
    config_reload_failures: AtomicU64,
    spares: [AtomicU64; SPARE_OUTCOMES.len()],
    derived: [AtomicU64; DERIVED_OUTCOMES.len()],
    tickets_declined: AtomicU64,
}

/// Declares an outcome enum whose discriminant indexes its counter array and whose
/// [`name`](DerivedOutcome::name) is the counter's stats/metrics label, so counting one is an
/// array index, not a search by string.
macro_rules! outcomes {
    ($(#[$doc:meta])* $ty:ident, $all:ident { $($variant:ident => $name:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $ty {
            $($variant,)+
        }

        impl $ty {
            /// Every outcome, in counter order.
            pub const ALL: [$ty; [$($name),+].len()] = [$($ty::$variant),+];

            /// Its name in `flows --stats` and the metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }

            /// Its counter's place in [`Counters`] (and in the metrics' per-index series).
            pub const fn index(self) -> usize {
                self as usize
            }
        }

        #[doc = concat!("The names of [`", stringify!($ty), "`], in counter order.")]
        pub const $all: [&str; $ty::ALL.len()] = [$($name),+];
    };
}

outcomes! {
    /// What became of derived-key connections (`derived.<name>`; `tuning.connectionKeys:
    /// derived`, `handshake::derived`). Client side: `kept` (a handshake left a root),
    /// `offered`, `used` (the server accepted), `fallback` (it did not: dialed again with a
    /// handshake), `early` (the app's first bytes rode behind the header), `resent` (they
    /// went again behind a handshake after a refusal), `early_unknown` (no answer in time
    /// with early bytes out: the app connection was reset, nothing resent); server side:
    /// `kept`, `accepted`, `awaited` (accepted after waiting for the handshake under way that
    /// kept its root: the client's agent keeps a root before this one can), and why a header
    /// was refused; both: `retired` (a root past its lifetime or connection cap erased by the
    /// periodic sweep).
    DerivedOutcome, DERIVED_OUTCOMES {
        Kept => "kept",
        Offered => "offered",
        Used => "used",
        Fallback => "fallback",
        Accepted => "accepted",
        Malformed => "malformed",
        Unknown => "unknown",
        Expired => "expired",
        Generation => "generation",
        PeerExpired => "peer_expired",
        BadMac => "bad_mac",
        Replayed => "replayed",
        Early => "early",
        Resent => "resent",
        EarlyUnknown => "early_unknown",
        Retired => "retired",
        Awaited => "awaited",
    }
}

impl From<Refused> for DerivedOutcome {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Malformed => DerivedOutcome::Malformed,
            Refused::Unknown => DerivedOutcome::Unknown,
            Refused::Expired => DerivedOutcome::Expired,
            Refused::Generation => DerivedOutcome::Generation,
            Refused::PeerExpired => DerivedOutcome::PeerExpired,
            Refused::BadMac => DerivedOutcome::BadMac,
            Refused::Replayed => DerivedOutcome::Replayed,
        }
    }
}

outcomes! {
    /// What became of spare mesh sessions (`spares.<name>`; see `intercept::spare`). Client
    /// side: `opened`, `used`, `fill_failed`, and the reasons one was closed unused; server
    /// side: `claimed` and `unclaimed`.
    SpareOutcome, SPARE_OUTCOMES {
        Opened => "opened",
        Used => "used",
        FillFailed => "fill_failed",
        StaleCert => "stale_cert",
        StalePolicy => "stale_policy",
        Expired => "expired",
        Dead => "dead",
        NotSupported => "not_supported",
        Claimed => "claimed",
        Unclaimed => "unclaimed",
    }
}

impl Counters {
    /// A flow that failed after it was accepted, other than by a refusal (`flows_failed`).
    pub fn flow_failed(&self) {
        self.flows_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A failed accept, by [`limits::accept_error_name`](super::limits::accept_error_name)
    /// (`accept_failed.<name>`).
    pub fn accept_failed(&self, name: &str) {
        let i = ACCEPT_ERRORS
            .iter()
            .position(|n| *n == name)
            .unwrap_or(ACCEPT_ERRORS.len() - 1);
        self.accept_failed[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A node config (or crypto policy) that was not applied (`config.reload_failures`).
    pub fn config_reload_failed(&self) {
        self.config_reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// One spare's outcome.
    pub fn spare(&self, outcome: SpareOutcome) {
        self.spares[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// One derived-key connection's outcome.
    pub fn derived(&self, outcome: DerivedOutcome) {
        self.derived[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// A peer agent declined the resumption ticket a connection offered, so the flow dialed
    /// again with a full handshake (`tickets.declined`): each one costs a set-up round trip,
    /// and a run of them means peers restart or reload policy often.
    pub fn ticket_declined(&self) {
        self.tickets_declined.fetch_add(1, Ordering::Relaxed);
    }

    pub fn tickets_declined(&self) -> u64 {
        self.tickets_declined.load(Ordering::Relaxed)
    }

    pub fn flows_failed(&self) -> u64 {
        self.flows_failed.load(Ordering::Relaxed)
    }

    /// Every accept error name with its count, zeros included.
    pub fn accept_failures(&self) -> Vec<(&'static str, u64)> {
        ACCEPT_ERRORS
            .iter()
            .zip(&self.accept_failed)
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn config_reload_failures(&self) -> u64 {
        self.config_reload_failures.load(Ordering::Relaxed)
    }

    /// The counters that counted something, by their `flows --stats` names.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        let codes = |prefix: &str, counts: &RefusalCounts| -> Vec<(String, u64)> {
            counts
                .snapshot()
                .into_iter()
                .map(|(code, n): (RefusalCode, u64)| (format!("{prefix}.{code}"), n))
                .collect()
        };
        codes("refused", &self.refused)
            .into_iter()
            .chain(codes("closed", &self.closed))
            .chain(
                self.accept_failures()
                    .into_iter()
                    .map(|(name, n)| (format!("accept_failed.{name}"), n)),
            )
            .chain(
                SPARE_OUTCOMES
                    .iter()
                    .zip(&self.spares)
                    .map(|(name, n)| (format!("spares.{name}"), n.load(Ordering::Relaxed))),
            )
            .chain(
                DERIVED_OUTCOMES
                    .iter()
                    .zip(&self.derived)
                    .map(|(name, n)| (format!("derived.{name}"), n.load(Ordering::Relaxed))),
            )
            .chain([
                ("flows_failed".to_owned(), self.flows_failed()),
                (
                    "config.reload_failures".to_owned(),
                    self.config_reload_failures(),
                ),
                ("tickets.declined".to_owned(), self.tickets_declined()),
            ])
            .chain(busy_polls(&crate::relay::BUSY_POLLS))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// `tuning.relayBusyPollUs`'s counts (process-wide: see [`crate::relay::BusyPolls`]).
fn busy_polls(b: &crate::relay::BusyPolls) -> [(String, u64); 3] {
    [
        ("relay.busy_poll_found".to_owned(), b.found()),
        ("relay.busy_poll_timed_out".to_owned(), b.timed_out()),
        ("relay.busy_poll_spun_us".to_owned(), b.spun_us()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_name_what_counted() {
        let c = Counters::default();
        assert!(c.stats().is_empty());
        c.refused.add(RefusalCode::DenyRule);
        c.closed.add(RefusalCode::TransportChanged);
        c.accept_failed("emfile");
        c.accept_failed("no such name");
        c.flow_failed();
        c.config_reload_failed();
        c.spare(SpareOutcome::Used);
        c.derived(DerivedOutcome::Used);
        c.derived(Refused::Replayed.into());
        c.ticket_declined();
        c.ticket_declined();
        let want: BTreeMap<String, u64> = [
            ("refused.deny_rule", 1),
            ("closed.transport_changed", 1),
            ("accept_failed.emfile", 1),
            ("accept_failed.other", 1),
            ("flows_failed", 1),
            ("config.reload_failures", 1),
            ("spares.used", 1),
            ("derived.used", 1),
            ("derived.replayed", 1),
            ("tickets.declined", 2),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(c.stats(), want);
    }

    /// Each outcome counts under its own name: the enum's order and the name list agree, and
    /// every refusal reason has the outcome of the same name.
    #[test]
    fn outcomes_count_under_their_names() {
        assert!(DerivedOutcome::ALL.len() <= crate::telemetry::DERIVED_SLOTS);
        for (i, o) in DerivedOutcome::ALL.into_iter().enumerate() {
            let c = Counters::default();
            c.derived(o);
            assert_eq!(o.index(), i);
            assert_eq!(DERIVED_OUTCOMES[i], o.name());
            let stats = c.stats();
            assert_eq!(
                stats.get(&format!("derived.{}", o.name())),
                Some(&1),
                "{o:?}"
            );
            assert_eq!(stats.len(), 1);
        }
        for (i, o) in SpareOutcome::ALL.into_iter().enumerate() {
            let c = Counters::default();
            c.spare(o);
            assert_eq!(SPARE_OUTCOMES[i], o.name());
            assert_eq!(c.stats().get(&format!("spares.{}", o.name())), Some(&1));
        }
        for r in [
            Refused::Malformed,
            Refused::Unknown,
            Refused::Expired,
            Refused::Generation,
            Refused::PeerExpired,
            Refused::BadMac,
            Refused::Replayed,
        ] {
            assert_eq!(DerivedOutcome::from(r).name(), r.reason());
        }
    }
}
