//! rustls configuration for mesh mutual TLS.
//!
//! A mesh connection is TLS 1.3 with certificates on both sides, identified by SPIFFE URI SANs
//! and marked by the [`MESH_ALPN`] protocol. After the handshake the session keys move to
//! kernel TLS, which shapes several choices here:
//!
//! - secret extraction is enabled on both sides;
//! - TLS 1.3 resumption between agents is opt-in per config ([`server_config_with`],
//!   [`client_config_with`], rules in `resumption`): the server's one ticket per connection
//!   is written before the keys are extracted, so its sequence number is counted; a client
//!   receives it after the handshake, in rustls (userspace relay) or as a control record the
//!   kernel relay hands back. Configs built without it send and keep no tickets;
//! - only suites the kernel can offload are offered (see [`MeshSuite`]);
//! - no 0-RTT data, which would have no replay protection.
//!
//! Handshake timeouts belong to the network layer; this module only builds configurations and
//! interprets their outcome.

mod cache;
mod credentials;
pub mod derived;
pub mod driver;
mod hkdf;
mod provider;
mod resumption;
pub mod spare;
mod verifier;

use std::sync::Arc;

use rustls::{
    AlertDescription, CertificateError, ClientConfig, CommonState, Error, HandshakeKind,
    NamedGroup, PeerIncompatible, ProtocolVersion, RootCertStore, ServerConfig,
    SupportedCipherSuite,
    client::{
        ClientSessionStore, Resumption, Tls12Resumption, VerifierBuilderError,
        danger::ServerCertVerifier,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{NoServerSessionStorage, WebPkiClientVerifier},
    version::TLS13,
};

pub(crate) use self::verifier::ServerChain;
pub use self::{
    credentials::Credentials,
    provider::{
        CompliancePolicy, CryptoPolicy, MeshCrypto, MeshGroup, MeshSuite, group_name,
        origination_provider, origination_refuses, origination_versions,
    },
    resumption::SessionResumption,
    verifier::PeerIdentityError,
};
use self::{
    resumption::{ClientTickets, ResumedConfigs, SERVER_TICKETS, ServerTickets},
    verifier::{MeshClientVerifier, MeshServerVerifier},
};
use crate::{
    ca::LeafCert,
    identity::{SpiffeId, TrustDomain},
};

/// The ALPN protocol that marks mesh mTLS, so the inbound side can tell it apart from an
/// application's own TLS passing through.
pub const MESH_ALPN: &[u8] = b"interceptor-mtls/1";

/// The ALPN protocol of a spare mesh connection: a session the client's agent opens before
/// any app connection needs it. The server's agent then waits for [`spare::CLAIM`] before
/// it decides the flow or dials the app. Servers prefer it when offered; a spare's client
/// offers it first and [`MESH_ALPN`] second, so an agent that predates spares negotiates the
/// plain protocol and the client's agent drops the connection instead of keeping it.
pub const SPARE_ALPN: &[u8] = b"interceptor-mtls-spare/1";

/// What a finished mesh handshake established.
#[derive(Clone, Debug)]
pub struct Negotiated {
    /// The authenticated identity of the other end.
    pub peer: SpiffeId,
    /// The TLS 1.3 suite whose keys go to the kernel.
    pub suite: SupportedCipherSuite,
    /// The key-exchange group of the handshake (always known for a finished TLS 1.3 one).
    pub group: Option<NamedGroup>,
    /// The server asked for another key share (HelloRetryRequest): one more round trip.
    pub retried: bool,
    /// The session resumed an earlier one (a ticket): no certificate was sent in this
    /// handshake, `peer` is the identity of the certificate the ticket's session verified.
    pub resumed: bool,
    /// The session was opened as a spare ([`SPARE_ALPN`]): nothing is decided until the
    /// client's agent claims it.
    pub spare: bool,
    /// The connection runs on keys derived from an earlier session (`handshake::derived`):
    /// no handshake at all; `peer` is the identity that session verified.
    pub derived: bool,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// The suite list was empty.
    #[error(
        "no cipher suite selected; allow at least one of AES-128-GCM, AES-256-GCM and \
         ChaCha20-Poly1305"
    )]
    NoCipherSuites,
    /// The crypto policy allows none of the suites the data path can carry.
    #[error(
        "crypto {policy} allows none of the suites this node's data path carries ({carried:?})"
    )]
    PolicyExcludesSuites {
        policy: CryptoPolicy,
        carried: Vec<MeshSuite>,
    },
    /// No trust anchor, or one of them did not parse.
    #[error("mesh trust roots are unusable: {reason}")]
    Roots { reason: String },
    /// The local certificate belongs to another trust domain than the one configured.
    #[error("local certificate is for {id}, which is outside trust domain `{trust_domain}`")]
    LeafTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    /// The expected server identity is one the mesh root cannot vouch for.
    #[error(
        "expected peer {id} is outside trust domain `{trust_domain}`, the only one this node can \
         authenticate"
    )]
    ForeignPeer {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    /// rustls rejected the configuration (for example a key that does not match the certificate).
    #[error("rustls rejected the mesh tls configuration")]
    Rustls(#[source] Error),
    /// The client-certificate verifier could not be built.
    #[error("cannot build the client certificate verifier")]
    ClientVerifier(#[source] VerifierBuilderError),
}

/// Why a mesh handshake failed or its outcome is unusable.
///
/// Convert a `rustls::Error` from `process_new_packets` with `From` to learn why a peer was
/// refused.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer's chain is valid but its SPIFFE identity is not acceptable.
    #[error(transparent)]
    PeerIdentity(Box<PeerIdentityError>),
    /// The peer's certificate does not chain to our root: another mesh, or no mesh at all.
    #[error("certificate not signed by the mesh root")]
    UntrustedPeer(#[source] Error),
    /// The peer's certificate is unusable for another reason: expired, wrong key usage,
    /// malformed, or signed with an algorithm the mesh does not accept.
    #[error("peer certificate rejected")]
    PeerCertificate(#[source] Error),
    /// The peer sent no certificate.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The peer aborted; its own logs carry the reason.
    #[error("peer aborted the handshake with alert `{0:?}`; its logs say why")]
    RefusedByPeer(AlertDescription),
    /// The two ends have no key-exchange group or no cipher suite in common: their crypto
    /// policies do not meet (a `pqc` node and a peer without X25519MLKEM768, for example).
    #[error("no {0} in common with the peer")]
    NoCommonCrypto(&'static str),
    /// The peer did not agree on [`MESH_ALPN`], so it is not a mesh endpoint.
    #[error("peer did not negotiate alpn `interceptor-mtls/1`; it is not a mesh endpoint")]
    NotMesh,
    /// Anything but TLS 1.3 was negotiated (cannot happen with these configurations).
    #[error("negotiated {0:?}; the mesh requires TLS 1.3")]
    NotTls13(Option<ProtocolVersion>),
    /// The handshake has not finished.
    #[error("the handshake has not finished")]
    Incomplete,
    /// Any other TLS failure.
    #[error("tls handshake failed")]
    Tls(#[source] Error),
}

/// Builds a trust store from root certificates, failing on any that does not parse (rustls'
/// own loader skips those silently, which would hide a broken bundle until handshakes fail).
pub fn mesh_roots(
    roots: impl IntoIterator<Item = CertificateDer<'static>>,
) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root).map_err(|e| TlsConfigError::Roots {
            reason: e.to_string(),
        })?;
    }
    if store.is_empty() {
        return Err(TlsConfigError::Roots {
            reason: "no root certificate".into(),
        });
    }
    Ok(Arc::new(store))
}

/// The inbound (server) side: requires a client certificate chaining to `roots` with exactly
/// one SPIFFE ID in `trust_domain`.
pub fn server_config(
    leaf: &LeafCert,
    roots: Arc<RootCertStore>,
    trust_domain: &TrustDomain,
    crypto: &MeshCrypto,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    server_config_with(
        leaf,
        roots,
        trust_domain,
        crypto,
        &SessionResumption::disabled(),
    )
}

/// [`server_config`] that issues resumption tickets under `resumption` (one per connection)
/// and accepts them, when it is enabled.
pub fn server_config_with(
    leaf: &LeafCert,
    roots: Arc<RootCertStore>,
    trust_domain: &TrustDomain,
    crypto: &MeshCrypto,
    resumption: &SessionResumption,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    check_leaf(leaf, trust_domain)?;
    let provider = crypto.provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .build()
        .map_err(TlsConfigError::ClientVerifier)?;
    let verifier = MeshClientVerifier::new(webpki, trust_domain.clone());

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .map_err(TlsConfigError::Rustls)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(leaf.chain().to_vec(), leaf.key().clone_key())
        .map_err(TlsConfigError::Rustls)?;
    // Server preference decides: a spare's client offers both.
    config.alpn_protocols = vec![SPARE_ALPN.to_vec(), MESH_ALPN.to_vec()];
    config.enable_secret_extraction = true;
    if resumption.enabled() {
        config.session_storage = Arc::new(ServerTickets::new(resumption.clone(), SERVER_TICKETS));
        config.send_tls13_tickets = 1;
        // A client asking for more (RFC 9149) gets one too.
        config.max_tls13_tickets = 1;
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        // A client may ask for tickets (RFC 9149); it gets none either.
        config.max_tls13_tickets = 0;
    }
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// The outbound (client) side of a connection to `expected_server`.
///
/// Any `ServerName` may be passed to `ClientConnection::new` (the destination IP is natural):
/// it is not checked, and SNI is not sent, because the server is identified by its SPIFFE ID
/// alone.
pub fn client_config(
    leaf: &LeafCert,
    roots: Arc<RootCertStore>,
    trust_domain: &TrustDomain,
    expected_server: &SpiffeId,
    crypto: &MeshCrypto,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    client_config_with(
        leaf,
        roots,
        trust_domain,
        expected_server,
        crypto,
        &SessionResumption::disabled(),
    )
}

/// [`client_config`] that keeps the tickets servers send under `resumption` and offers them
/// to the same server address, when it is enabled.
pub fn client_config_with(
    leaf: &LeafCert,
    roots: Arc<RootCertStore>,
    trust_domain: &TrustDomain,
    expected_server: &SpiffeId,
    crypto: &MeshCrypto,
    resumption: &SessionResumption,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    mesh_client_with(
        leaf,
        roots,
        trust_domain,
        expected_server,
        crypto,
        resumption,
    )
    .map(|c| c.full)
}

/// [`client_config`] without the trust-domain checks, so tests can build peers the checks
/// would refuse.
#[cfg(test)]
fn build_client_config(
    leaf: &LeafCert,
    roots: Arc<RootCertStore>,
    expected_server: &SpiffeId,
    crypto: &MeshCrypto,
    resumption: &SessionResumption,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    Ok(build_mesh_client(leaf, roots, expected_server, crypto, resumption)?.full)
}

/// A mesh client's configs for one expected server identity: the full offer (every group of
/// the policy, hybrid first) and, where resumption is on and the policy starts with the
/// hybrid, the resumed offer.
///
/// The resumed offer exists so that a resumed ClientHello fits in a SYN (TCP Fast Open) and
/// the TLS exchange starts with it: an X25519MLKEM768 share alone is 1 216 bytes, larger than
/// what a SYN carries on a 1 500-byte link once the rest of the hello is added. It sends an
/// x25519 share alone and lists x25519 first in `supported_groups`: rustls' server takes the
/// first group of the client's `supported_groups` it supports, whatever the shares, and
/// answers a missing share for it with a HelloRetryRequest (`server/hs.rs`
/// `choose_suite_and_kx_group`, `server/tls13.rs`), so a list that still named the hybrid
/// first would cost the round trip this saves. The policy's other groups follow, so a `pqc`
/// or `fips-140-2` server asks for one of its own (a retry, as for a full offer) instead of
/// finding no group in common. Why a session resumed this way keeps the hybrid's protection:
/// ARCHITECTURE.md "Session resumption".
#[derive(Clone)]
pub struct MeshClient {
    full: Arc<ClientConfig>,
    resumed: Option<Arc<ResumedConfigs>>,
}

/// The config for one connection, and whether it is the resumed offer.
pub struct ClientOffer {
    pub config: Arc<ClientConfig>,
    /// The connection holds a ticket and offers an x25519 share alone: if the server declines
    /// the ticket, the handshake is a full one, on x25519 where the server allows it, which the
    /// caller must not use (see [`MeshClient::declined`]).
    pub resuming: bool,
}

impl MeshClient {
    /// The full offer: every group of the policy, a ticket if one is held.
    pub fn full(&self) -> &Arc<ClientConfig> {
        &self.full
    }

    /// The config for the next connection to `server`: the resumed offer with a ticket taken
    /// for this connection alone when one is held (so no other connection can take it between
    /// this choice and the ClientHello, which would leave this one a full handshake on x25519),
    /// else the full offer.
    pub fn offer(&self, server: &ServerName<'static>) -> ClientOffer {
        let full = ClientOffer {
            config: Arc::clone(&self.full),
            resuming: false,
        };
        match self.resumed.as_ref().and_then(|r| r.lend(server)) {
            Some(config) => ClientOffer {
                config,
                resuming: true,
            },
            None => full,
        }
    }

    /// `server` declined the ticket of a resumed offer and the full handshake that followed
    /// is not hybrid: it must not carry data (full handshakes stay hybrid). Drops the other
    /// tickets held for `server` and returns the full offer to dial again with.
    pub fn declined(&self, server: &ServerName<'static>) -> ClientOffer {
        if let Some(resumed) = &self.resumed {
            resumed.tickets().forget(server);
        }
        ClientOffer {
            config: Arc::clone(&self.full),
            resuming: false,
        }
    }
}

/// [`client_config_with`]'s checks, returning both offers.
pub fn mesh_client_with(
    leaf: &LeafCert,
    roots: Arc<RootCertStore>,
    trust_domain: &TrustDomain,
    expected_server: &SpiffeId,
    crypto: &MeshCrypto,
    resumption: &SessionResumption,
) -> Result<MeshClient, TlsConfigError> {
    check_leaf(leaf, trust_domain)?;
    if expected_server.trust_domain() != trust_domain {
        return Err(TlsConfigError::ForeignPeer {
            id: expected_server.clone(),
            trust_domain: trust_domain.clone(),
        });
    }
    build_mesh_client(leaf, roots, expected_server, crypto, resumption)
}

fn build_mesh_client(
    leaf: &LeafCert,
    roots: Arc<RootCertStore>,
    expected_server: &SpiffeId,
    crypto: &MeshCrypto,
    resumption: &SessionResumption,
) -> Result<MeshClient, TlsConfigError> {
    let provider = crypto.provider();
    let verifier: Arc<dyn ServerCertVerifier> = Arc::new(MeshServerVerifier::new(
        roots,
        provider.signature_verification_algorithms,
        expected_server.clone(),
    ));

    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .map_err(TlsConfigError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier))
        .with_client_auth_cert(leaf.chain().to_vec(), leaf.key().clone_key())
        .map_err(TlsConfigError::Rustls)?;
    mesh_client_settings(&mut config);
    let tickets = resumption
        .enabled()
        .then(|| Arc::new(ClientTickets::new(resumption.clone())));
    config.resumption = match &tickets {
        Some(tickets) => Resumption::store(Arc::clone(tickets) as Arc<dyn ClientSessionStore>)
            .tls12_resumption(Tls12Resumption::Disabled),
        None => Resumption::disabled(),
    };
    let resumed = match (tickets, crypto.resumed_provider()) {
        (Some(tickets), Some(provider)) => {
            let mut resumed = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&TLS13])
                .map_err(TlsConfigError::Rustls)?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_cert_resolver(Arc::clone(&config.client_auth_cert_resolver));
            mesh_client_settings(&mut resumed);
            resumed.resumption = Resumption::disabled();
            Some(Arc::new(ResumedConfigs::new(resumed, tickets)))
        }
        _ => None,
    };
    Ok(MeshClient {
        full: Arc::new(config),
        resumed,
    })
}

/// What every mesh client config sets, whichever offer it makes.
fn mesh_client_settings(config: &mut ClientConfig) {
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    config.enable_secret_extraction = true;
    config.enable_sni = false;
    config.enable_early_data = false;
}

/// The peer identity and suite of a finished mesh handshake, on either side.
///
/// Re-checks what the configurations already enforce (TLS 1.3, a verified certificate) and
/// adds the one thing rustls cannot enforce: a server whose client offered no ALPN at all still
/// completes the handshake, so the ALPN is checked here. A resumed session is refused when the
/// peer certificate its ticket carries is outside its validity window now: no chain check ran
/// on this connection.
pub fn negotiated(conn: &CommonState) -> Result<Negotiated, HandshakeError> {
    negotiated_at(conn, UnixTime::now(), false)
}

/// [`negotiated`] for a handshake its driver saw go through a HelloRetryRequest
/// (`retried`), which rustls no longer reports once such a handshake resumed a session.
pub fn negotiated_after(conn: &CommonState, retried: bool) -> Result<Negotiated, HandshakeError> {
    negotiated_at(conn, UnixTime::now(), retried)
}

fn negotiated_at(
    conn: &CommonState,
    now: UnixTime,
    retried: bool,
) -> Result<Negotiated, HandshakeError> {
    if conn.is_handshaking() {
        return Err(HandshakeError::Incomplete);
    }
    match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => {}
        other => return Err(HandshakeError::NotTls13(other)),
    }
    let spare = match conn.alpn_protocol() {
        Some(MESH_ALPN) => false,
        Some(SPARE_ALPN) => true,
        _ => return Err(HandshakeError::NotMesh),
    };
    let suite = conn
        .negotiated_cipher_suite()
        .ok_or(HandshakeError::Incomplete)?;
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(HandshakeError::NoPeerCertificate)?;
    let peer = cache::leaf_identity(leaf)
        .map_err(|e| HandshakeError::PeerIdentity(Box::new(PeerIdentityError::Certificate(e))))?;
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    if resumed {
        cache::check_validity(leaf, now).map_err(HandshakeError::PeerCertificate)?;
    }
    Ok(Negotiated {
        peer,
        suite,
        group: conn.negotiated_key_exchange_group().map(|g| g.name()),
        retried: retried || conn.handshake_kind() == Some(HandshakeKind::FullWithHelloRetryRequest),
        resumed,
        spare,
        derived: false,
    })
}

impl From<Error> for HandshakeError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidCertificate(CertificateError::Other(ref other)) => {
                match other.0.downcast_ref::<PeerIdentityError>() {
                    Some(identity) => HandshakeError::PeerIdentity(Box::new(identity.clone())),
                    None => HandshakeError::PeerCertificate(error),
                }
            }
            // A root with the same name but another key (two clusters that both ran
            // `ca init` for `cluster.local`) shows up as a bad chain signature.
            Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => HandshakeError::UntrustedPeer(error),
            Error::InvalidCertificate(_) => HandshakeError::PeerCertificate(error),
            Error::NoCertificatesPresented => HandshakeError::NoPeerCertificate,
            Error::AlertReceived(alert) => HandshakeError::RefusedByPeer(alert),
            Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon) => {
                HandshakeError::NoCommonCrypto("key-exchange group")
            }
            Error::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon) => {
                HandshakeError::NoCommonCrypto("cipher suite")
            }
            Error::NoApplicationProtocol => HandshakeError::NotMesh,
            Error::HandshakeNotComplete => HandshakeError::Incomplete,
            error => HandshakeError::Tls(error),
        }
    }
}

fn check_leaf(leaf: &LeafCert, trust_domain: &TrustDomain) -> Result<(), TlsConfigError> {
    if leaf.id().trust_domain() == trust_domain {
        return Ok(());
    }
    Err(TlsConfigError::LeafTrustDomain {
        id: leaf.id().clone(),
        trust_domain: trust_domain.clone(),
    })
}

#[cfg(test)]
mod tests;
