//! Readiness as the DaemonSet probes and `interceptor status` see it: each start-up step sets
//! its flag once it holds, and the agent is ready only when all do.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Readiness {
    pub programs_attached: AtomicBool,
    pub ca_loaded: AtomicBool,
    pub policy_loaded: AtomicBool,
    /// Set at start when the agent has no cluster to sync with.
    pub cluster_synced: AtomicBool,
    /// A successor took the listeners: this agent only finishes its open flows, reports not
    /// ready, and gives the metrics port up so the successor can bind it.
    pub retired: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.missing().is_empty()
    }

    /// The steps that do not hold yet, by name, for the `/readyz` body.
    pub fn missing(&self) -> Vec<&'static str> {
        if self.retired.load(Ordering::Acquire) {
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
