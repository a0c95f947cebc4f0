//! Why the agent turns a connection away, as a closed set of stable names.
//!
//! The snake_case name of a [`RefusalCode`] is an interface: operators grep logs for it
//! (`[code]`), counters are named after it (`refused.<code>`, `closed.<code>`), and
//! `interceptor flows --stats` shows those counters. Renaming a variant's name breaks
//! dashboards and alerts, so the names are spelled once, here, and the README table
//! ("Refusal codes") lists every one of them (a unit test keeps the two in step).

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

/// One reason a connection was refused, or an open flow closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    // Inbound policy (PeerAuthentication, AuthorizationPolicy).
    PlaintextRefusedStrict,
    MtlsRefusedDisable,
    ForeignTrustDomain,
    CustomRule,
    DenyRule,
    NoAllowMatch,
    UnknownWorkload,
    // Outbound policy (services, DestinationRules, automatic mTLS).
    NoEndpoints,
    CredentialsUnavailable,
    UnknownClient,
    MeshIdentityUnknown,
    /// An open flow lacks the protection a new policy generation requires.
    TransportChanged,
    // Per-pod caps.
    PodConnectionLimit,
    PodHandshakeLimit,
    // Connection set-up.
    ConnectFailed,
    HandshakeFailed,
    CryptoMismatch,
    /// A session the current crypto policy does not allow.
    CryptoPolicy,
    OriginationFailed,
}

impl RefusalCode {
    /// Every code, in declaration order.
    pub const ALL: [RefusalCode; 19] = [
        Self::PlaintextRefusedStrict,
        Self::MtlsRefusedDisable,
        Self::ForeignTrustDomain,
        Self::CustomRule,
        Self::DenyRule,
        Self::NoAllowMatch,
        Self::UnknownWorkload,
        Self::NoEndpoints,
        Self::CredentialsUnavailable,
        Self::UnknownClient,
        Self::MeshIdentityUnknown,
        Self::TransportChanged,
        Self::PodConnectionLimit,
        Self::PodHandshakeLimit,
        Self::ConnectFailed,
        Self::HandshakeFailed,
        Self::CryptoMismatch,
        Self::CryptoPolicy,
        Self::OriginationFailed,
    ];

    /// The stable name (the serde name too).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PlaintextRefusedStrict => "plaintext_refused_strict",
            Self::MtlsRefusedDisable => "mtls_refused_disable",
            Self::ForeignTrustDomain => "foreign_trust_domain",
            Self::CustomRule => "custom_rule",
            Self::DenyRule => "deny_rule",
            Self::NoAllowMatch => "no_allow_match",
            Self::UnknownWorkload => "unknown_workload",
            Self::NoEndpoints => "no_endpoints",
            Self::CredentialsUnavailable => "credentials_unavailable",
            Self::UnknownClient => "unknown_client",
            Self::MeshIdentityUnknown => "mesh_identity_unknown",
            Self::TransportChanged => "transport_changed",
            Self::PodConnectionLimit => "pod_connection_limit",
            Self::PodHandshakeLimit => "pod_handshake_limit",
            Self::ConnectFailed => "connect_failed",
            Self::HandshakeFailed => "handshake_failed",
            Self::CryptoMismatch => "crypto_mismatch",
            Self::CryptoPolicy => "crypto_policy",
            Self::OriginationFailed => "origination_failed",
        }
    }

    /// The code named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Position in [`RefusalCode::ALL`], for tables indexed by code.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for RefusalCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One counter per [`RefusalCode`], lock-free (connections count from every task at once).
pub struct RefusalCounts([AtomicU64; RefusalCode::ALL.len()]);

impl Default for RefusalCounts {
    fn default() -> Self {
        RefusalCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl RefusalCounts {
    /// Counts one event of `code`.
    pub fn add(&self, code: RefusalCode) {
        self.0[code.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The count of `code` so far.
    pub fn get(&self, code: RefusalCode) -> u64 {
        self.0[code.index()].load(Ordering::Relaxed)
    }

    /// Every code with its count (zeros included), in [`RefusalCode::ALL`] order.
    pub fn snapshot(&self) -> Vec<(RefusalCode, u64)> {
        RefusalCode::ALL.iter().map(|&c| (c, self.get(c))).collect()
    }
}

impl fmt::Debug for RefusalCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.snapshot().into_iter().filter(|(_, n)| *n > 0))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::RefusalCode;

    #[test]
    fn all_is_complete_and_indexed_in_order() {
        for (i, code) in RefusalCode::ALL.into_iter().enumerate() {
            assert_eq!(code.index(), i, "{code}");
            assert_eq!(RefusalCode::from_name(code.as_str()), Some(code));
        }
        // A variant missing from ALL would not compile in `as_str`'s match, but could still
        // be left out of ALL: the serde names and ALL must agree one to one.
        let names: BTreeSet<&str> = RefusalCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), RefusalCode::ALL.len());
    }

    #[test]
    fn counts_are_per_code() {
        let counts = super::RefusalCounts::default();
        counts.add(RefusalCode::DenyRule);
        counts.add(RefusalCode::DenyRule);
        counts.add(RefusalCode::OriginationFailed);
        let nonzero: Vec<_> = counts
            .snapshot()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(
            nonzero,
            [
                (RefusalCode::DenyRule, 2),
                (RefusalCode::OriginationFailed, 1)
            ]
        );
        assert_eq!(counts.snapshot().len(), RefusalCode::ALL.len());
    }

    #[test]
    fn serde_name_is_the_stable_name() {
        for code in RefusalCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{code}\""));
            let back: RefusalCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
    }

    /// The README's "Refusal codes" table lists every code once, and nothing else.
    #[test]
    fn readme_table_matches_the_enum() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n### Refusal codes\n")
            .nth(1)
            .expect("README has a \"### Refusal codes\" section");
        let mut listed = Vec::new();
        for line in section.lines().skip_while(|l| !l.starts_with('|')) {
            if !line.starts_with('|') {
                break;
            }
            let first = line.trim_start_matches('|').split('|').next().unwrap_or("");
            let first = first.trim();
            if first == "code" || first.starts_with("---") {
                continue;
            }
            listed.push(first.trim_matches('`').to_owned());
        }
        let want: Vec<String> = RefusalCode::ALL.iter().map(|c| c.to_string()).collect();
        let extra: Vec<&String> = listed.iter().filter(|l| !want.contains(l)).collect();
        let missing: Vec<&String> = want.iter().filter(|w| !listed.contains(w)).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "README refusal table: rows without a code {extra:?}, codes without a row {missing:?}"
        );
        assert_eq!(
            listed.len(),
            want.len(),
            "a code is listed twice: {listed:?}"
        );
    }
}
