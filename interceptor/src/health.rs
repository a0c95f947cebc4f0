//! Readiness as the DaemonSet probes and `interceptor status` see it: each start-up step sets
//! its flag once it holds, and the agent is ready only when all do.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

#[derive(Debug, Default)]
pub struct Readiness {
    pub programs_attached: AtomicBool,
    pub ca_loaded: AtomicBool,
    pub policy_loaded: AtomicBool,
    /// Set at start when the agent has no cluster to sync with.
    pub cluster_synced: AtomicBool,
    /// A successor took the listeners: this agent only finishes its open flows, reports not
    /// ready, and gives the metrics port up so the successor can bind it. A channel rather
    /// than a flag so the metrics listener wakes the moment it is set instead of polling.
    retired: watch::Sender<bool>,
}

impl Readiness {
    /// Marks the agent retired and wakes everyone waiting in [`Readiness::retired`].
    pub fn retire(&self) {
        self.retired.send_replace(true);
    }

    pub fn is_retired(&self) -> bool {
        *self.retired.borrow()
    }

    /// Returns once the agent is retired (at once if it already is).
    pub async fn retired(&self) {
        let mut rx = self.retired.subscribe();
        // The sender lives in `self`, so the channel cannot close while this borrows it.
        let _ = rx.wait_for(|retired| *retired).await;
    }

    pub fn ready(&self) -> bool {
        self.missing().is_empty()
    }

    /// The steps that do not hold yet, by name, for the `/readyz` body.
    pub fn missing(&self) -> Vec<&'static str> {
        if self.is_retired() {
            return vec!["retired (a successor serves the pods)"];
        }
        [
            ("programs_attached", &self.programs_attached),
            ("ca_loaded", &self.ca_loaded),
            ("policy_loaded", &self.policy_loaded),
            ("cluster_synced", &self.cluster_synced),
        ]
        .into_iter()
        .filter(|(_, flag)| !flag.load(Ordering::Acquire))
        .map(|(name, _)| name)
        .collect()
    }
}
