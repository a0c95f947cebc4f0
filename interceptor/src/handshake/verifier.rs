//! Certificate verifiers: webpki chain validation, then the SPIFFE identity check.
//!
//! rustls checks DNS names and IP addresses but knows nothing of URI SANs, and mesh
//! certificates carry only a SPIFFE URI. Both verifiers therefore delegate the chain, validity,
//! key-usage and signature checks to webpki unchanged and add exactly one thing: the peer's
//! SPIFFE ID must be acceptable. Nothing here skips or weakens a webpki check; the verifier of
//! server certificates only leaves out the DNS/IP name match, which cannot succeed for a
//! certificate without DNS or IP SANs.
//!
//! Identity failures (and a handshake signature made with the wrong key) travel through rustls
//! as `CertificateError::Other` holding a [`PeerIdentityError`], which
//! [`super::HandshakeError`] recovers so the agent can log the precise reason. Chain failures
//! keep rustls' own error so the alert sent to the peer stays specific (`unknown_ca`,
//! `certificate_expired`, ...).
//!
//! A chain accepted once is remembered (`super::cache`), so a peer's repeat connections skip
//! the chain check until a certificate of it expires; the identity check and the handshake
//! signature check run on every connection.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{self, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::cache::{VerifiedChains, leaf_identity};
use crate::identity::{CertIdentityError, SpiffeId, TrustDomain};

/// The server-certificate checks rustls' `WebPkiServerVerifier` makes (trust anchor,
/// signatures, validity, `serverAuth` usage, handshake signatures) without its DNS/IP name
/// match, which each verifier replaces with its own: the rule's names here, the SPIFFE ID in
/// the mesh's own verifier (`MeshServerVerifier`).
#[derive(Debug)]
pub(crate) struct ServerChain {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) algorithms: WebPkiSupportedAlgorithms,
}

impl ServerChain {
    /// Validates `end_entity`'s chain to the roots and returns it parsed for the name check.
    pub(crate) fn verify<'a>(
        &self,
        end_entity: &'a CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ParsedCertificate<'a>, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(cert)
    }

    pub(crate) fn tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    pub(crate) fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    pub(crate) fn supported_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Why a peer whose certificate chains to the mesh root was still refused.
///
/// Messages name both sides where there are two, so a log line alone explains the refusal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerIdentityError {
    /// The certificate has no single, well-formed SPIFFE ID.
    #[error(transparent)]
    Certificate(#[from] CertIdentityError),
    /// A client from another trust domain.
    #[error("peer trust domain `{presented}` is not `{expected}`")]
    ForeignTrustDomain {
        presented: TrustDomain,
        expected: TrustDomain,
    },
    /// A server other than the one the connection was meant for.
    #[error("peer presented {presented}, expected {expected}")]
    UnexpectedIdentity {
        presented: SpiffeId,
        expected: SpiffeId,
    },
    /// The handshake signature does not verify with the certificate's key: the peer presented
    /// a certificate it does not hold the key for.
    #[error("peer's handshake signature does not match its certificate; it does not hold the key")]
    KeyNotHeld,
}

/// Server side: accepts any client of our trust domain whose chain webpki accepts.
///
/// Which service accounts may call which is policy, decided after the handshake from the
/// identity [`super::negotiated`] returns.
#[derive(Debug)]
pub(super) struct MeshClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
    verified: VerifiedChains,
}

/// Client leaves a server verifier remembers: every workload that calls this one, with room
/// for rotation.
const CLIENT_CHAINS: usize = 4096;

/// Server leaves a client verifier remembers: it accepts one identity, so a few leaves
/// (rotation overlap, several replicas' agents) at most.
const SERVER_CHAINS: usize = 64;

/// Client side: accepts only the server identity the connection was meant for.
#[derive(Debug)]
pub(super) struct MeshServerVerifier {
    chain: ServerChain,
    expected: SpiffeId,
    verified: VerifiedChains,
}

// === impl MeshClientVerifier ===

impl MeshClientVerifier {
    /// `webpki` must be a verifier that requires a client certificate.
    pub(super) fn new(webpki: Arc<dyn ClientCertVerifier>, trust_domain: TrustDomain) -> Self {
        Self {
            webpki,
            trust_domain,
            verified: VerifiedChains::new(CLIENT_CHAINS),
        }
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_peer(
            &self.verified,
            (end_entity, intermediates, now),
            || {
                self.webpki
                    .verify_client_cert(end_entity, intermediates, now)
                    .map(drop)
            },
            |presented| {
                if presented.trust_domain() == &self.trust_domain {
                    Ok(())
                } else {
                    Err(reject(PeerIdentityError::ForeignTrustDomain {
                        presented: presented.trust_domain().clone(),
                        expected: self.trust_domain.clone(),
                    }))
                }
            },
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        possession(self.webpki.verify_tls12_signature(message, cert, dss))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        possession(self.webpki.verify_tls13_signature(message, cert, dss))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

// === impl MeshServerVerifier ===

impl MeshServerVerifier {
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        algorithms: WebPkiSupportedAlgorithms,
        expected: SpiffeId,
    ) -> Self {
        Self {
            chain: ServerChain { roots, algorithms },
            expected,
            verified: VerifiedChains::new(SERVER_CHAINS),
        }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    /// Runs the same chain validation as rustls' `WebPkiServerVerifier` (trust anchor,
    /// signatures, validity, `serverAuth` usage) and replaces its DNS/IP name match with the
    /// SPIFFE ID match. `server_name` is ignored: the client addresses the peer by IP, and the
    /// identity it expects is fixed in this verifier.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        verify_peer(
            &self.verified,
            (end_entity, intermediates, now),
            || self.chain.verify(end_entity, intermediates, now).map(drop),
            |presented| {
                if presented == self.expected {
                    Ok(())
                } else {
                    Err(reject(PeerIdentityError::UnexpectedIdentity {
                        presented,
                        expected: self.expected.clone(),
                    }))
                }
            },
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        possession(self.chain.tls12_signature(message, cert, dss))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        possession(self.chain.tls13_signature(message, cert, dss))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_schemes()
    }
}

/// The peer's certificate checks, shared by both verifiers: `chain` (trust anchor, signatures,
/// validity, usage) runs unless this verifier accepted exactly this chain before and it is
/// still valid; `identity` runs on the SPIFFE ID every time. A chain is remembered only once
/// both passed, so a chain with the wrong identity is checked in full again next time.
fn verify_peer(
    verified: &VerifiedChains,
    (leaf, intermediates, now): (&CertificateDer<'_>, &[CertificateDer<'_>], UnixTime),
    chain: impl FnOnce() -> Result<(), Error>,
    identity: impl FnOnce(SpiffeId) -> Result<(), Error>,
) -> Result<(), Error> {
    let known = verified.contains(leaf, intermediates, now);
    if !known {
        chain()?;
    }
    identity(leaf_identity(leaf).map_err(reject)?)?;
    if !known {
        verified.insert(leaf, intermediates, now);
    }
    Ok(())
}

/// Tells a bad handshake signature apart from a bad chain signature: rustls reports both as
/// `BadSignature`, but only the chain case means "not signed by the mesh root".
fn possession(
    result: Result<HandshakeSignatureValid, Error>,
) -> Result<HandshakeSignatureValid, Error> {
    result.map_err(|e| match e {
        Error::InvalidCertificate(CertificateError::BadSignature) => {
            reject(PeerIdentityError::KeyNotHeld)
        }
        e => e,
    })
}

fn reject(error: impl Into<PeerIdentityError>) -> Error {
    let error: PeerIdentityError = error.into();
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}
