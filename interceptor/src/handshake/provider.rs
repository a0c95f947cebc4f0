//! The one place that chooses cryptography for mesh TLS.
//!
//! Everything is pinned explicitly rather than taken from rustls defaults, so a rustls upgrade
//! or a Cargo feature elsewhere in the dependency graph cannot widen what the mesh accepts:
//! TLS 1.3 only, AEAD suites the kernel can take over, two key-exchange groups, and ECDSA
//! handshake signatures only (every mesh leaf is P-256); RSA is accepted only as a CA's
//! signature inside a chain, for Istio's RSA plug-in CAs (see [`SIGNATURE_ALGORITHMS`]).

use std::sync::Arc;

use rustls::{
    CipherSuite, SignatureScheme, SupportedCipherSuite,
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms,
        aws_lc_rs::{self, cipher_suite, kx_group},
    },
};
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
            MeshSuite::Aes128Gcm => cipher_suite::TLS13_AES_128_GCM_SHA256,
            MeshSuite::Aes256Gcm => cipher_suite::TLS13_AES_256_GCM_SHA384,
            MeshSuite::Chacha20Poly1305 => cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        }
    }
}

/// Builds the crypto provider for mesh connections, offering `suites` in the given order
/// (duplicates ignored).
///
/// Both ends of a mesh connection use this, so the client's order decides the suite.
pub fn provider(suites: &[MeshSuite]) -> Result<Arc<CryptoProvider>, TlsConfigError> {
    let mut cipher_suites: Vec<SupportedCipherSuite> = Vec::with_capacity(suites.len());
    for suite in suites.iter().map(|s| s.rustls()) {
        if !cipher_suites.contains(&suite) {
            cipher_suites.push(suite);
        }
    }
    if cipher_suites.is_empty() {
        return Err(TlsConfigError::NoCipherSuites);
    }
    let base = aws_lc_rs::default_provider();
    Ok(Arc::new(CryptoProvider {
        cipher_suites,
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1],
        signature_verification_algorithms: SIGNATURE_ALGORITHMS,
        ..base
    }))
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
