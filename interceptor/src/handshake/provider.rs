//! The one place that chooses cryptography for mesh TLS and for TLS the agent originates.
//!
//! Everything is pinned explicitly rather than taken from rustls defaults, so a rustls upgrade
//! or a Cargo feature elsewhere in the dependency graph cannot widen what the mesh accepts:
//! TLS 1.3 only, AEAD suites the kernel can take over, the key-exchange groups of the node's
//! compliance policy, and ECDSA handshake signatures only (every mesh leaf is P-256); RSA is
//! accepted only as a CA's signature inside a chain, for Istio's RSA plug-in CAs (see [`SIGNATURE_ALGORITHMS`]).
//!
//! The compliance policy uses Istio's `COMPLIANCE_POLICY` names, as one node setting:
//!
//! | policy | groups offered (client order) | suites |
//! | --- | --- | --- |
//! | `default` | X25519MLKEM768, x25519, secp256r1 | AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305 when the kernel offloads it |
//! | `pqc` | X25519MLKEM768 | AES-128-GCM, AES-256-GCM |
//! | `fips-140-2` | secp256r1, secp384r1 | AES-128-GCM, AES-256-GCM |
//!
//! `requireAes256Gcm` narrows any of them to AES-256-GCM. Hybrid first protects recorded
//! traffic against a future quantum computer ("harvest now, decrypt later"); x25519 stays in
//! `default` so that an agent that only knows classical groups still connects. rustls sends
//! the x25519 half of the hybrid share as a second key share, so such a peer answers at once;
//! a peer that picks a group without a share (secp256r1) gets a HelloRetryRequest.

use std::{fmt, sync::Arc};

use rustls::{
    CipherSuite, NamedGroup, SignatureScheme, SupportedCipherSuite, SupportedProtocolVersion,
    crypto::{
        CryptoProvider, SupportedKxGroup, WebPkiSupportedAlgorithms,
        aws_lc_rs::{self, kx_group},
    },
    version::{TLS12, TLS13},
};
use serde::{Deserialize, Serialize};
use webpki::aws_lc_rs::{
    ECDSA_P256_SHA256, ECDSA_P384_SHA384, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_2048_8192_SHA384,
    RSA_PKCS1_2048_8192_SHA512,
};

use super::TlsConfigError;

/// A TLS 1.3 cipher suite the mesh may negotiate.
///
/// Each one maps to a kernel TLS cipher, so every session the mesh negotiates can be offloaded
/// when the kernel supports that cipher. Not every kernel that offloads AES-GCM offloads
/// ChaCha20-Poly1305, which is why the caller, knowing what the kernel probe found, passes the
/// list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MeshSuite {
    /// `TLS_AES_128_GCM_SHA256`
    Aes128Gcm,
    /// `TLS_AES_256_GCM_SHA384`
    Aes256Gcm,
    /// `TLS_CHACHA20_POLY1305_SHA256`
    Chacha20Poly1305,
}

impl MeshSuite {
    /// The suites to use when the kernel offloads AES-GCM only, in preference order.
    pub const AES_GCM: &'static [MeshSuite] = &[MeshSuite::Aes128Gcm, MeshSuite::Aes256Gcm];

    /// The mesh suite a negotiated rustls suite corresponds to, if any.
    pub fn from_rustls(suite: CipherSuite) -> Option<MeshSuite> {
        match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(MeshSuite::Aes128Gcm),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(MeshSuite::Aes256Gcm),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(MeshSuite::Chacha20Poly1305),
            _ => None,
        }
    }

    fn rustls(self) -> SupportedCipherSuite {
        match self {
            // rustls' aws-lc suites with a key schedule that sets each HMAC key up once (see
            // `hkdf`); the same suites on the wire.
            MeshSuite::Aes128Gcm => super::hkdf::tls13_aes_128_gcm_sha256(),
            MeshSuite::Aes256Gcm => super::hkdf::tls13_aes_256_gcm_sha384(),
            MeshSuite::Chacha20Poly1305 => super::hkdf::tls13_chacha20_poly1305_sha256(),
        }
    }

    fn is_aes_gcm(self) -> bool {
        matches!(self, MeshSuite::Aes128Gcm | MeshSuite::Aes256Gcm)
    }
}

/// A key-exchange group the agent may offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MeshGroup {
    /// The ML-KEM-768 + X25519 hybrid (draft-ietf-tls-ecdhe-mlkem, code point 0x11ec).
    X25519Mlkem768,
    X25519,
    Secp256r1,
    Secp384r1,
}

impl MeshGroup {
    /// The group rustls negotiated, if it is one of ours.
    pub fn from_rustls(group: NamedGroup) -> Option<MeshGroup> {
        match group {
            NamedGroup::X25519MLKEM768 => Some(MeshGroup::X25519Mlkem768),
            NamedGroup::X25519 => Some(MeshGroup::X25519),
            NamedGroup::secp256r1 => Some(MeshGroup::Secp256r1),
            NamedGroup::secp384r1 => Some(MeshGroup::Secp384r1),
            _ => None,
        }
    }

    /// The IANA TLS Supported Groups name.
    pub fn name(self) -> &'static str {
        match self {
            MeshGroup::X25519Mlkem768 => "X25519MLKEM768",
            MeshGroup::X25519 => "x25519",
            MeshGroup::Secp256r1 => "secp256r1",
            MeshGroup::Secp384r1 => "secp384r1",
        }
    }

    /// Whether the group resists a quantum adversary recording the handshake today.
    pub fn post_quantum(self) -> bool {
        self == MeshGroup::X25519Mlkem768
    }

    fn rustls(self) -> &'static dyn SupportedKxGroup {
        match self {
            MeshGroup::X25519Mlkem768 => kx_group::X25519MLKEM768,
            MeshGroup::X25519 => kx_group::X25519,
            MeshGroup::Secp256r1 => kx_group::SECP256R1,
            MeshGroup::Secp384r1 => kx_group::SECP384R1,
        }
    }
}

impl fmt::Display for MeshGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The node's compliance policy, with Istio's `COMPLIANCE_POLICY` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CompliancePolicy {
    /// Hybrid post-quantum key exchange first, classical groups kept for older peers.
    #[default]
    #[serde(rename = "default")]
    Default,
    /// TLS 1.3 with `X25519MLKEM768` only and AES-GCM: a peer that cannot do it is refused.
    #[serde(rename = "pqc")]
    Pqc,
    /// FIPS 140-2 approved algorithms only: ECDHE on P-256/P-384 and AES-GCM.
    #[serde(rename = "fips-140-2")]
    Fips1402,
}

impl CompliancePolicy {
    /// The name operators write.
    pub fn name(self) -> &'static str {
        match self {
            CompliancePolicy::Default => "default",
            CompliancePolicy::Pqc => "pqc",
            CompliancePolicy::Fips1402 => "fips-140-2",
        }
    }

    /// The groups offered, in preference order (the client's order decides).
    pub fn groups(self) -> &'static [MeshGroup] {
        match self {
            CompliancePolicy::Default => &[
                MeshGroup::X25519Mlkem768,
                MeshGroup::X25519,
                MeshGroup::Secp256r1,
            ],
            CompliancePolicy::Pqc => &[MeshGroup::X25519Mlkem768],
            CompliancePolicy::Fips1402 => &[MeshGroup::Secp256r1, MeshGroup::Secp384r1],
        }
    }
}

impl fmt::Display for CompliancePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `crypto` section of the node configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CryptoPolicy {
    pub compliance_policy: CompliancePolicy,
    /// Negotiate `TLS_AES_256_GCM_SHA384` only (mesh and originated TLS).
    pub require_aes256_gcm: bool,
}

impl fmt::Display for CryptoPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "compliancePolicy {}", self.compliance_policy)?;
        if self.require_aes256_gcm {
            f.write_str(" with requireAes256Gcm")?;
        }
        Ok(())
    }
}

/// What mesh handshakes on this node offer and accept: the policy resolved against the
/// suites the data path can carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshCrypto {
    policy: CryptoPolicy,
    suites: Vec<MeshSuite>,
    groups: &'static [MeshGroup],
}

/// What agents offered before the compliance policy existed (classical groups only).
const LEGACY_GROUPS: &[MeshGroup] = &[MeshGroup::X25519, MeshGroup::Secp256r1];

impl MeshCrypto {
    /// Resolves `policy` against `carried`, the suites the data path can take over (the kernel
    /// probe's list, or AES-GCM for the userspace relay), keeping `carried`'s order.
    pub fn new(policy: CryptoPolicy, carried: &[MeshSuite]) -> Result<Self, TlsConfigError> {
        let mut suites: Vec<MeshSuite> = Vec::with_capacity(carried.len());
        for &suite in carried {
            let allowed = match policy.compliance_policy {
                CompliancePolicy::Default => true,
                CompliancePolicy::Pqc | CompliancePolicy::Fips1402 => suite.is_aes_gcm(),
            } && (!policy.require_aes256_gcm || suite == MeshSuite::Aes256Gcm);
            if allowed && !suites.contains(&suite) {
                suites.push(suite);
            }
        }
        if carried.is_empty() {
            return Err(TlsConfigError::NoCipherSuites);
        }
        if suites.is_empty() {
            return Err(TlsConfigError::PolicyExcludesSuites {
                policy,
                carried: carried.to_vec(),
            });
        }
        Ok(Self {
            policy,
            suites,
            groups: policy.compliance_policy.groups(),
        })
    }

    /// The default policy over AES-GCM (what the userspace relay carries).
    pub fn default_aes_gcm() -> Self {
        Self {
            policy: CryptoPolicy::default(),
            suites: MeshSuite::AES_GCM.to_vec(),
            groups: CompliancePolicy::Default.groups(),
        }
    }

    /// An agent of an earlier version, which offered only classical groups (x25519,
    /// secp256r1): what tests and the benchmark compare against. No node setting selects it.
    pub fn legacy_classical(carried: &[MeshSuite]) -> Result<Self, TlsConfigError> {
        Ok(Self {
            groups: LEGACY_GROUPS,
            ..Self::new(CryptoPolicy::default(), carried)?
        })
    }

    pub fn policy(&self) -> CryptoPolicy {
        self.policy
    }

    /// The suites offered, in preference order.
    pub fn suites(&self) -> &[MeshSuite] {
        &self.suites
    }

    /// The groups offered, in preference order.
    pub fn groups(&self) -> &'static [MeshGroup] {
        self.groups
    }

    /// Why a session with this suite and group would not be allowed now, if it would not (a
    /// flow negotiated under an earlier policy, or while the policy changed).
    pub fn refuses(&self, suite: CipherSuite, group: Option<NamedGroup>) -> Option<String> {
        let suite_ok = MeshSuite::from_rustls(suite).is_some_and(|s| self.suites.contains(&s));
        let group_ok = group
            .and_then(MeshGroup::from_rustls)
            .is_some_and(|g| self.groups().contains(&g));
        if suite_ok && group_ok {
            return None;
        }
        let group = group.map_or_else(|| "no group".to_owned(), group_name);
        Some(format!(
            "{suite:?} with {group} is not allowed by {} ({})",
            self.policy,
            self.offer()
        ))
    }

    /// `groups … suites …`, for refusal reasons.
    pub fn offer(&self) -> String {
        let groups: Vec<&str> = self.groups().iter().map(|g| g.name()).collect();
        let suites: Vec<String> = self
            .suites
            .iter()
            .map(|s| format!("{:?}", s.rustls().suite()))
            .collect();
        format!("groups {}; suites {}", groups.join(", "), suites.join(", "))
    }

    /// Runs one key exchange in every offered group, so that the first mesh connection does
    /// not pay for the first use of that code (page faults, lazy set-up; under the emulated
    /// CPU of the VM tests about 50 ms for ML-KEM, time the peer's inbound agent counts
    /// against the wait after which it treats a silent client as plaintext).
    pub fn warm_up(&self) {
        for group in self.groups.iter().map(|g| g.rustls()) {
            let Ok(client) = group.start() else { continue };
            if let Ok(server) = group.start_and_complete(client.pub_key()) {
                let _ = client.complete(&server.pub_key);
            }
        }
    }

    /// The rustls provider for mesh connections. Both ends of a mesh connection use it, so
    /// the client's order decides suite and group.
    pub fn provider(&self) -> Arc<CryptoProvider> {
        let base = aws_lc_rs::default_provider();
        Arc::new(CryptoProvider {
            cipher_suites: self.suites.iter().map(|s| s.rustls()).collect(),
            kx_groups: self.groups().iter().map(|g| g.rustls()).collect(),
            signature_verification_algorithms: SIGNATURE_ALGORITHMS,
            ..base
        })
    }
}

impl MeshCrypto {
    /// The provider of a resumed offer (see `super::MeshClient`): the same groups with x25519
    /// moved first, so that its share is the only one sent and a server that allows x25519
    /// takes it at once; a server that does not (`pqc`, `fips-140-2`) asks for a group of its
    /// own that is still listed, as it would of a full offer. `None` where full handshakes do
    /// not start with the hybrid (their hello fits a SYN already) or x25519 is not allowed.
    pub(super) fn resumed_provider(&self) -> Option<Arc<CryptoProvider>> {
        let hybrid_first = self.groups().first().is_some_and(|g| g.post_quantum());
        if !hybrid_first || !self.groups().contains(&MeshGroup::X25519) {
            return None;
        }
        let groups = std::iter::once(MeshGroup::X25519).chain(
            self.groups()
                .iter()
                .copied()
                .filter(|&g| g != MeshGroup::X25519),
        );
        Some(Arc::new(CryptoProvider {
            kx_groups: groups.map(MeshGroup::rustls).collect(),
            ..CryptoProvider::clone(&self.provider())
        }))
    }
}

/// A negotiated group as logs and `interceptor flows` show it: the IANA name.
pub fn group_name(group: NamedGroup) -> String {
    match MeshGroup::from_rustls(group) {
        Some(g) => g.name().to_owned(),
        None => format!("{group:?}"),
    }
}

/// The provider for TLS the agent originates to servers outside the mesh (DestinationRule
/// SIMPLE/MUTUAL), under the node's policy. Those servers are not ours, so this keeps what
/// they commonly need (TLS 1.2, RSA certificates) where the policy allows it.
pub fn origination_provider(policy: CryptoPolicy) -> Arc<CryptoProvider> {
    let base = aws_lc_rs::default_provider();
    let mut kx_groups: Vec<&'static dyn SupportedKxGroup> = policy
        .compliance_policy
        .groups()
        .iter()
        .map(|g| g.rustls())
        .collect();
    if policy.compliance_policy == CompliancePolicy::Default {
        // Servers outside the mesh may know only the larger NIST curve.
        kx_groups.push(kx_group::SECP384R1);
    }
    let cipher_suites = base
        .cipher_suites
        .iter()
        .copied()
        .filter(|s| origination_allows(policy, *s))
        .collect();
    Arc::new(CryptoProvider {
        cipher_suites,
        kx_groups,
        ..base
    })
}

/// The TLS versions originated connections may use: TLS 1.3 only under `pqc` (a hybrid group
/// exists only there), TLS 1.2 and 1.3 otherwise.
pub fn origination_versions(policy: CryptoPolicy) -> &'static [&'static SupportedProtocolVersion] {
    static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&TLS13];
    static TLS12_AND_13: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];
    match policy.compliance_policy {
        CompliancePolicy::Pqc => TLS13_ONLY,
        CompliancePolicy::Default | CompliancePolicy::Fips1402 => TLS12_AND_13,
    }
}

/// Why an originated session with this suite and group would not be allowed by `policy`.
pub fn origination_refuses(
    policy: CryptoPolicy,
    suite: CipherSuite,
    group: Option<NamedGroup>,
) -> Option<String> {
    let provider = origination_provider(policy);
    let suite_ok = provider.cipher_suites.iter().any(|s| s.suite() == suite);
    let group_ok = group.is_some_and(|g| provider.kx_groups.iter().any(|k| k.name() == g));
    if suite_ok && group_ok {
        return None;
    }
    let group = group.map_or_else(|| "no group".to_owned(), group_name);
    Some(format!(
        "originated TLS with {suite:?} and {group} is not allowed by {policy}"
    ))
}

fn origination_allows(policy: CryptoPolicy, suite: SupportedCipherSuite) -> bool {
    use CipherSuite as C;
    let name = suite.suite();
    let aes_gcm = matches!(
        name,
        C::TLS13_AES_128_GCM_SHA256
            | C::TLS13_AES_256_GCM_SHA384
            | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
    );
    let aes256 = matches!(
        name,
        C::TLS13_AES_256_GCM_SHA384
            | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
    );
    let by_policy = match policy.compliance_policy {
        CompliancePolicy::Default => true,
        CompliancePolicy::Pqc => aes_gcm && suite.version() == &TLS13,
        CompliancePolicy::Fips1402 => aes_gcm,
    };
    by_policy && (!policy.require_aes256_gcm || aes256)
}

/// Handshake signatures: ECDSA only, with each TLS 1.3 scheme bound to its own curve (every
/// mesh leaf is P-256). Certificate signatures in a chain (`all`) also accept RSA PKCS#1, 2048
/// bits or more: the signing CA of an Istio `cacerts` secret is RSA more often than not, and
/// the leaves it signs carry an RSA signature.
static SIGNATURE_ALGORITHMS: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[
        ECDSA_P256_SHA256,
        ECDSA_P384_SHA384,
        RSA_PKCS1_2048_8192_SHA256,
        RSA_PKCS1_2048_8192_SHA384,
        RSA_PKCS1_2048_8192_SHA512,
    ],
    mapping: &[
        (SignatureScheme::ECDSA_NISTP256_SHA256, &[ECDSA_P256_SHA256]),
        (SignatureScheme::ECDSA_NISTP384_SHA384, &[ECDSA_P384_SHA384]),
    ],
};
