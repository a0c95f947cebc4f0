//! In-memory handshakes: a rustls client and server exchange records through `Vec<u8>`s.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use rustls::{
    ClientConnection, Connection, ConnectionTrafficSecrets, ExtractedSecrets, ServerConnection,
    pki_types::ServerName, server::ServerSessionMemoryCache,
};

use super::*;
use crate::ca::{Ca, CertificateAuthority, DEFAULT_LEAF_TTL};

const TD: &str = "cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/frontend/sa/web";
const SERVER_ID: &str = "spiffe://cluster.local/ns/backend/sa/api";

fn td(s: &str) -> TrustDomain {
    s.parse().unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// One side of a test connection: its CA's root and its own leaf.
struct Node {
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
    leaf: LeafCert,
}

impl Node {
    fn new(ca: &Ca, spiffe: &str) -> Self {
        Node {
            trust_domain: ca.trust_domain().clone(),
            roots: mesh_roots(ca.roots()).unwrap(),
            leaf: ca.issue(&id(spiffe), DEFAULT_LEAF_TTL).unwrap(),
        }
    }

    fn server(&self) -> Arc<ServerConfig> {
        self.server_with(&MeshCrypto::default_aes_gcm())
    }

    fn server_with(&self, crypto: &MeshCrypto) -> Arc<ServerConfig> {
        server_config(
            &self.leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            crypto,
        )
        .unwrap()
    }

    fn client(&self, expected: &str) -> Arc<ClientConfig> {
        self.client_with(expected, &MeshCrypto::default_aes_gcm())
    }

    fn client_with(&self, expected: &str, crypto: &MeshCrypto) -> Arc<ClientConfig> {
        client_config(
            &self.leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            &id(expected),
            crypto,
        )
        .unwrap()
    }
}

fn pair(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> (Connection, Connection) {
    // What the outbound path will pass: the destination address, never checked.
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)).into());
    (
        ClientConnection::new(client, name).unwrap().into(),
        ServerConnection::new(server).unwrap().into(),
    )
}

/// The errors each side reported when a handshake failed.
#[derive(Debug)]
struct Failure {
    client: Option<Error>,
    server: Option<Error>,
}

/// Moves every pending record from `from` to `to`; returns the bytes moved.
fn transfer(from: &mut Connection, to: &mut Connection) -> Result<usize, Error> {
    let mut records = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut records).unwrap();
    }
    let mut unread = &records[..];
    while !unread.is_empty() {
        to.read_tls(&mut unread).unwrap();
        to.process_new_packets()?;
    }
    Ok(records.len())
}

/// Runs the handshake to completion. On failure, the failing side's alert is still delivered
/// so the test can see what the other side makes of it.
#[expect(clippy::result_large_err, reason = "test helper; size is irrelevant")]
fn handshake(client: &mut Connection, server: &mut Connection) -> Result<(), Failure> {
    for _ in 0..10 {
        if let Err(e) = transfer(client, server) {
            let client_err = transfer(server, client).err();
            return Err(Failure {
                client: client_err,
                server: Some(e),
            });
        }
        if let Err(e) = transfer(server, client) {
            let server_err = transfer(client, server).err();
            return Err(Failure {
                client: Some(e),
                server: server_err,
            });
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish in 10 round trips");
}

fn connect(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> (Connection, Connection) {
    let (mut c, mut s) = pair(client, server);
    handshake(&mut c, &mut s).unwrap();
    (c, s)
}

fn refused(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Failure {
    let (mut c, mut s) = pair(client, server);
    handshake(&mut c, &mut s).unwrap_err()
}

fn two_nodes() -> (Node, Node) {
    let ca = Ca::generate(&td(TD)).unwrap();
    (Node::new(&ca, CLIENT_ID), Node::new(&ca, SERVER_ID))
}

#[test]
fn mutual_handshake_authenticates_both_sides() {
    let (client, server) = two_nodes();
    let (c, s) = connect(client.client(SERVER_ID), server.server());

    let at_client = negotiated(&c).unwrap();
    let at_server = negotiated(&s).unwrap();
    assert_eq!(at_client.peer, id(SERVER_ID));
    assert_eq!(at_server.peer, id(CLIENT_ID));
    assert_eq!(c.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(
        at_client.suite.suite(),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    assert_eq!(at_client.suite, at_server.suite);
    assert_eq!(
        MeshSuite::from_rustls(at_server.suite.suite()),
        Some(MeshSuite::Aes128Gcm)
    );
    assert_eq!(c.alpn_protocol(), Some(MESH_ALPN));
    assert_eq!(s.alpn_protocol(), Some(MESH_ALPN));
}

fn assert_same(a: &ConnectionTrafficSecrets, b: &ConnectionTrafficSecrets) {
    match (a, b) {
        (
            ConnectionTrafficSecrets::Aes128Gcm { key: ka, iv: ia },
            ConnectionTrafficSecrets::Aes128Gcm { key: kb, iv: ib },
        )
        | (
            ConnectionTrafficSecrets::Aes256Gcm { key: ka, iv: ia },
            ConnectionTrafficSecrets::Aes256Gcm { key: kb, iv: ib },
        )
        | (
            ConnectionTrafficSecrets::Chacha20Poly1305 { key: ka, iv: ia },
            ConnectionTrafficSecrets::Chacha20Poly1305 { key: kb, iv: ib },
        ) => {
            assert_eq!(ka.as_ref(), kb.as_ref());
            assert_eq!(ia.as_ref(), ib.as_ref());
        }
        _ => panic!("the two directions use different ciphers"),
    }
}

fn extract_secrets(suites: &[MeshSuite]) -> (ExtractedSecrets, ExtractedSecrets) {
    let (client, server) = two_nodes();
    let crypto = MeshCrypto::new(CryptoPolicy::default(), suites).unwrap();
    let (c, s) = connect(
        client.client_with(SERVER_ID, &crypto),
        server.server_with(&crypto),
    );
    (
        c.dangerous_extract_secrets().unwrap(),
        s.dangerous_extract_secrets().unwrap(),
    )
}

#[test]
fn extracted_secrets_match_across_the_connection() {
    for suites in [
        &[MeshSuite::Aes128Gcm][..],
        &[MeshSuite::Aes256Gcm],
        &[MeshSuite::Chacha20Poly1305],
    ] {
        let (c, s) = extract_secrets(suites);
        assert_eq!(c.tx.0, s.rx.0, "client tx and server rx sequence numbers");
        assert_eq!(c.rx.0, s.tx.0, "client rx and server tx sequence numbers");
        assert_same(&c.tx.1, &s.rx.1);
        assert_same(&c.rx.1, &s.tx.1);
        let expected = match suites[0] {
            MeshSuite::Aes128Gcm => matches!(c.tx.1, ConnectionTrafficSecrets::Aes128Gcm { .. }),
            MeshSuite::Aes256Gcm => matches!(c.tx.1, ConnectionTrafficSecrets::Aes256Gcm { .. }),
            MeshSuite::Chacha20Poly1305 => {
                matches!(c.tx.1, ConnectionTrafficSecrets::Chacha20Poly1305 { .. })
            }
        };
        assert!(expected, "{suites:?}");
    }
}

#[test]
fn server_sends_no_session_tickets() {
    let (client, server) = two_nodes();
    let (c, s) = connect(client.client(SERVER_ID), server.server());
    assert!(!s.wants_write(), "server queued post-handshake records");
    let Connection::Client(c) = c else {
        unreachable!()
    };
    assert_eq!(c.tls13_tickets_received(), 0);

    // Control: the same check does see tickets when a server is allowed to send them.
    let mut leaky = ServerConfig::clone(&server.server());
    leaky.session_storage = ServerSessionMemoryCache::new(16);
    leaky.send_tls13_tickets = 2;
    let (c, _) = connect(client.client(SERVER_ID), Arc::new(leaky));
    let Connection::Client(c) = c else {
        unreachable!()
    };
    assert_eq!(c.tls13_tickets_received(), 2);
}

#[test]
fn client_refuses_a_server_with_the_wrong_identity() {
    let ca = Ca::generate(&td(TD)).unwrap();
    let client = Node::new(&ca, CLIENT_ID);
    let impostor = Node::new(&ca, "spiffe://cluster.local/ns/backend/sa/other");

    let failure = refused(client.client(SERVER_ID), impostor.server());
    let err = HandshakeError::from(failure.client.unwrap());
    assert_eq!(
        err.to_string(),
        "peer presented spiffe://cluster.local/ns/backend/sa/other, expected \
         spiffe://cluster.local/ns/backend/sa/api"
    );
    assert!(matches!(
        &err,
        HandshakeError::PeerIdentity(e) if matches!(**e, PeerIdentityError::UnexpectedIdentity { .. })
    ));
    let server_view = HandshakeError::from(failure.server.unwrap());
    assert!(
        matches!(
            server_view,
            HandshakeError::RefusedByPeer(AlertDescription::CertificateUnknown)
        ),
        "{server_view}"
    );
}

#[test]
fn server_refuses_a_client_from_another_trust_domain() {
    // The server trusts both roots, so only the trust-domain check can refuse the client.
    let ca = Ca::generate(&td(TD)).unwrap();
    let foreign = Ca::generate(&td("other.org")).unwrap();
    let roots = mesh_roots(ca.roots().into_iter().chain(foreign.roots())).unwrap();
    let server = Node {
        roots: Arc::clone(&roots),
        ..Node::new(&ca, SERVER_ID)
    };
    let foreign_leaf = foreign
        .issue(&id("spiffe://other.org/ns/x/sa/y"), DEFAULT_LEAF_TTL)
        .unwrap();
    // `client_config` would refuse this combination; build it as a foreign agent would.
    let client = build_client_config(
        &foreign_leaf,
        roots,
        &id(SERVER_ID),
        &MeshCrypto::default_aes_gcm(),
        &SessionResumption::disabled(),
    )
    .unwrap();

    let failure = refused(client, server.server());
    let err = HandshakeError::from(failure.server.unwrap());
    assert_eq!(
        err.to_string(),
        "peer trust domain `other.org` is not `cluster.local`"
    );
    assert!(matches!(
        HandshakeError::from(failure.client.unwrap()),
        HandshakeError::RefusedByPeer(AlertDescription::CertificateUnknown)
    ));
}

#[test]
fn both_sides_refuse_a_peer_from_another_ca_with_the_same_trust_domain() {
    let ours = Ca::generate(&td(TD)).unwrap();
    let theirs = Ca::generate(&td(TD)).unwrap();

    // Our client, their server.
    let client = Node::new(&ours, CLIENT_ID);
    let server = Node::new(&theirs, SERVER_ID);
    let failure = refused(client.client(SERVER_ID), server.server());
    let err = HandshakeError::from(failure.client.unwrap());
    assert_eq!(err.to_string(), "certificate not signed by the mesh root");

    // Their client, our server. The client trusts both roots so that it does not refuse the
    // server first (the client checks the server's certificate before sending its own).
    let client = Node {
        roots: mesh_roots(theirs.roots().into_iter().chain(ours.roots())).unwrap(),
        ..Node::new(&theirs, CLIENT_ID)
    };
    let server = Node::new(&ours, SERVER_ID);
    let failure = refused(client.client(SERVER_ID), server.server());
    let err = HandshakeError::from(failure.server.unwrap());
    assert!(matches!(err, HandshakeError::UntrustedPeer(_)), "{err:?}");
    assert!(matches!(
        HandshakeError::from(failure.client.unwrap()),
        HandshakeError::RefusedByPeer(AlertDescription::DecryptError)
    ));

    // A root that is not even named like ours.
    let stranger = Ca::generate(&td("other.org")).unwrap();
    let leaf = stranger
        .issue(
            &id("spiffe://other.org/ns/backend/sa/api"),
            DEFAULT_LEAF_TTL,
        )
        .unwrap();
    let server = Node {
        trust_domain: td("other.org"),
        roots: mesh_roots(stranger.roots()).unwrap(),
        leaf,
    };
    let client = Node::new(&ours, CLIENT_ID);
    let client = build_client_config(
        &client.leaf,
        client.roots,
        &id("spiffe://other.org/ns/backend/sa/api"),
        &MeshCrypto::default_aes_gcm(),
        &SessionResumption::disabled(),
    )
    .unwrap();
    let failure = refused(client, server.server());
    let err = HandshakeError::from(failure.client.unwrap());
    assert_eq!(err.to_string(), "certificate not signed by the mesh root");
    assert!(matches!(
        HandshakeError::from(failure.server.unwrap()),
        HandshakeError::RefusedByPeer(AlertDescription::UnknownCA)
    ));
}

#[test]
fn client_refuses_a_server_without_the_certificates_key() {
    // The server presents a genuine mesh certificate for the expected identity but signs the
    // handshake with another key, as someone replaying a captured certificate would.
    let (client, server) = two_nodes();
    let provider = MeshCrypto::default_aes_gcm().provider();
    let other_key = provider
        .key_provider
        .load_private_key(client.leaf.key().clone_key())
        .unwrap();
    let stolen = rustls::sign::CertifiedKey::new(server.leaf.chain().to_vec(), other_key);
    let webpki = WebPkiClientVerifier::builder_with_provider(
        Arc::clone(&server.roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let mut impostor = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(MeshClientVerifier::new(webpki, td(TD))))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(stolen)));
    impostor.alpn_protocols = vec![MESH_ALPN.to_vec()];

    let failure = refused(client.client(SERVER_ID), Arc::new(impostor));
    let err = HandshakeError::from(failure.client.unwrap());
    assert!(
        matches!(
            &err,
            HandshakeError::PeerIdentity(e) if matches!(**e, PeerIdentityError::KeyNotHeld)
        ),
        "{err:?}"
    );
}

#[test]
fn server_requires_a_client_certificate() {
    let (client, server) = two_nodes();
    let verifier = MeshServerVerifier::new(
        Arc::clone(&client.roots),
        MeshCrypto::default_aes_gcm()
            .provider()
            .signature_verification_algorithms,
        id(SERVER_ID),
    );
    let mut anonymous =
        ClientConfig::builder_with_provider(MeshCrypto::default_aes_gcm().provider())
            .with_protocol_versions(&[&TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
    anonymous.alpn_protocols = vec![MESH_ALPN.to_vec()];

    let failure = refused(Arc::new(anonymous), server.server());
    assert!(matches!(
        HandshakeError::from(failure.server.unwrap()),
        HandshakeError::NoPeerCertificate
    ));
}

#[test]
fn alpn_marks_mesh_connections() {
    let (client, server) = two_nodes();

    // A client that offers no ALPN completes the handshake, but is not mesh traffic.
    let mut plain = ClientConfig::clone(&client.client(SERVER_ID));
    plain.alpn_protocols.clear();
    let (_, s) = connect(Arc::new(plain), server.server());
    assert!(matches!(negotiated(&s), Err(HandshakeError::NotMesh)));

    // A client offering only another protocol is refused outright.
    let mut other = ClientConfig::clone(&client.client(SERVER_ID));
    other.alpn_protocols = vec![b"h2".to_vec()];
    let failure = refused(Arc::new(other), server.server());
    assert!(matches!(
        HandshakeError::from(failure.server.unwrap()),
        HandshakeError::NotMesh
    ));
}

#[test]
fn suites_are_limited_to_the_callers_list() {
    let aes = MeshCrypto::default_aes_gcm().provider();
    let names: Vec<_> = aes
        .cipher_suites
        .iter()
        .map(SupportedCipherSuite::suite)
        .collect();
    assert_eq!(
        names,
        [
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        ]
    );
    assert!(matches!(
        MeshCrypto::new(CryptoPolicy::default(), &[]),
        Err(TlsConfigError::NoCipherSuites)
    ));
    let deduped = MeshCrypto::new(
        CryptoPolicy::default(),
        &[MeshSuite::Aes256Gcm, MeshSuite::Aes256Gcm],
    )
    .unwrap();
    assert_eq!(deduped.provider().cipher_suites.len(), 1);

    // A client that can only do ChaCha20 finds no common suite with an AES-only server.
    let (client, server) = two_nodes();
    let chacha = MeshCrypto::new(CryptoPolicy::default(), &[MeshSuite::Chacha20Poly1305]).unwrap();
    let failure = refused(client.client_with(SERVER_ID, &chacha), server.server());
    assert!(matches!(
        HandshakeError::from(failure.server.unwrap()),
        HandshakeError::NoCommonCrypto("cipher suite")
    ));
}

#[test]
fn configs_refuse_identities_outside_the_trust_domain() {
    let (client, _) = two_nodes();
    let err = client_config(
        &client.leaf,
        Arc::clone(&client.roots),
        &client.trust_domain,
        &id("spiffe://other.org/ns/a/sa/b"),
        &MeshCrypto::default_aes_gcm(),
    )
    .unwrap_err();
    assert!(matches!(err, TlsConfigError::ForeignPeer { .. }), "{err}");

    let err = server_config(
        &client.leaf,
        Arc::clone(&client.roots),
        &td("other.org"),
        &MeshCrypto::default_aes_gcm(),
    )
    .unwrap_err();
    assert!(
        matches!(err, TlsConfigError::LeafTrustDomain { .. }),
        "{err}"
    );

    assert!(matches!(
        mesh_roots(Vec::new()),
        Err(TlsConfigError::Roots { .. })
    ));
    assert!(matches!(
        mesh_roots([CertificateDer::from(b"junk".to_vec())]),
        Err(TlsConfigError::Roots { .. })
    ));
}

#[test]
fn negotiated_needs_a_finished_handshake() {
    let (client, server) = two_nodes();
    let (c, _) = pair(client.client(SERVER_ID), server.server());
    assert!(matches!(negotiated(&c), Err(HandshakeError::Incomplete)));
}

/// Crypto for one policy over every suite the kernel may carry.
fn policy(compliance: CompliancePolicy, aes256: bool) -> MeshCrypto {
    MeshCrypto::new(
        CryptoPolicy {
            compliance_policy: compliance,
            require_aes256_gcm: aes256,
        },
        &[
            MeshSuite::Aes128Gcm,
            MeshSuite::Aes256Gcm,
            MeshSuite::Chacha20Poly1305,
        ],
    )
    .unwrap()
}

fn legacy() -> MeshCrypto {
    MeshCrypto::legacy_classical(MeshSuite::AES_GCM).unwrap()
}

/// What both ends agreed on: `(group, suite, HelloRetryRequest)`, identical on both sides.
fn agreed(client_crypto: &MeshCrypto, server_crypto: &MeshCrypto) -> (String, MeshSuite, bool) {
    let (client, server) = two_nodes();
    let (c, s) = connect(
        client.client_with(SERVER_ID, client_crypto),
        server.server_with(server_crypto),
    );
    let (at_c, at_s) = (negotiated(&c).unwrap(), negotiated(&s).unwrap());
    assert_eq!(at_c.group, at_s.group);
    assert_eq!(at_c.suite.suite(), at_s.suite.suite());
    assert_eq!(at_c.retried, at_s.retried);
    (
        group_name(at_c.group.unwrap()),
        MeshSuite::from_rustls(at_c.suite.suite()).unwrap(),
        at_c.retried,
    )
}

#[test]
fn policies_negotiate_what_they_promise() {
    use CompliancePolicy::*;
    use MeshSuite::*;
    let default = policy(Default, false);
    let hybrid = ("X25519MLKEM768".to_owned(), Aes128Gcm, false);
    assert_eq!(agreed(&default, &default), hybrid);
    assert_eq!(agreed(&policy(Pqc, false), &default), hybrid);
    assert_eq!(agreed(&default, &policy(Pqc, false)), hybrid);
    // An agent of an earlier version: x25519 either way, without a retry (the default client
    // sends the x25519 half of its hybrid share as a key share of its own).
    let classical = ("x25519".to_owned(), Aes128Gcm, false);
    assert_eq!(agreed(&legacy(), &default), classical);
    assert_eq!(agreed(&default, &legacy()), classical);
    // FIPS: NIST curves and AES-GCM; a default client meets a FIPS server on secp256r1 after
    // a HelloRetryRequest (it sent no secp256r1 share), a FIPS client a default server at once.
    let fips = policy(Fips1402, false);
    assert_eq!(
        agreed(&fips, &fips),
        ("secp256r1".to_owned(), Aes128Gcm, false)
    );
    assert_eq!(
        agreed(&default, &fips),
        ("secp256r1".to_owned(), Aes128Gcm, true)
    );
    assert_eq!(
        agreed(&fips, &default),
        ("secp256r1".to_owned(), Aes128Gcm, false)
    );
    assert_eq!(
        agreed(&legacy(), &fips),
        ("secp256r1".to_owned(), Aes128Gcm, true)
    );
    // AES-256-GCM required on either side is what the session uses.
    let aes256 = ("X25519MLKEM768".to_owned(), Aes256Gcm, false);
    assert_eq!(agreed(&policy(Default, true), &default), aes256);
    assert_eq!(agreed(&default, &policy(Default, true)), aes256);
    assert_eq!(agreed(&policy(Pqc, true), &policy(Pqc, true)), aes256);
    assert_eq!(
        agreed(&policy(Fips1402, true), &fips),
        ("secp256r1".to_owned(), Aes256Gcm, false)
    );
}

#[test]
fn pqc_refuses_classical_peers_with_a_reason_on_both_sides() {
    let pqc = policy(CompliancePolicy::Pqc, false);
    // The server finds no group in common and says so; the client sees its alert.
    for (client, server) in [
        (legacy(), pqc.clone()),
        (pqc.clone(), legacy()),
        (pqc.clone(), policy(CompliancePolicy::Fips1402, false)),
        (policy(CompliancePolicy::Fips1402, false), pqc.clone()),
    ] {
        let (c, s) = two_nodes();
        let failure = refused(c.client_with(SERVER_ID, &client), s.server_with(&server));
        let at_server = HandshakeError::from(failure.server.unwrap());
        assert!(
            matches!(
                at_server,
                HandshakeError::NoCommonCrypto("key-exchange group")
            ),
            "{at_server:?}"
        );
        assert_eq!(
            at_server.to_string(),
            "no key-exchange group in common with the peer"
        );
        let at_client = HandshakeError::from(failure.client.unwrap());
        assert!(
            matches!(
                at_client,
                HandshakeError::RefusedByPeer(AlertDescription::HandshakeFailure)
            ),
            "{at_client:?}"
        );
    }
}

#[test]
fn providers_offer_exactly_the_policy() {
    use CompliancePolicy::*;
    let groups = |c: &MeshCrypto| -> Vec<rustls::NamedGroup> {
        c.provider().kx_groups.iter().map(|g| g.name()).collect()
    };
    let suites = |c: &MeshCrypto| -> Vec<rustls::CipherSuite> {
        c.provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect()
    };
    use rustls::{CipherSuite as C, NamedGroup as G};
    assert_eq!(
        groups(&policy(Default, false)),
        [G::X25519MLKEM768, G::X25519, G::secp256r1]
    );
    assert_eq!(
        suites(&policy(Default, false)),
        [
            C::TLS13_AES_128_GCM_SHA256,
            C::TLS13_AES_256_GCM_SHA384,
            C::TLS13_CHACHA20_POLY1305_SHA256
        ]
    );
    assert_eq!(groups(&policy(Pqc, false)), [G::X25519MLKEM768]);
    assert_eq!(
        suites(&policy(Pqc, false)),
        [C::TLS13_AES_128_GCM_SHA256, C::TLS13_AES_256_GCM_SHA384]
    );
    assert_eq!(
        groups(&policy(Fips1402, false)),
        [G::secp256r1, G::secp384r1]
    );
    assert_eq!(
        suites(&policy(Fips1402, false)),
        [C::TLS13_AES_128_GCM_SHA256, C::TLS13_AES_256_GCM_SHA384]
    );
    for p in [Default, Pqc, Fips1402] {
        assert_eq!(suites(&policy(p, true)), [C::TLS13_AES_256_GCM_SHA384]);
        assert_eq!(policy(p, true).groups(), p.groups());
    }
    assert_eq!(groups(&legacy()), [G::X25519, G::secp256r1]);
    for p in [Default, Pqc, Fips1402] {
        policy(p, false).warm_up();
    }

    // A policy that leaves nothing the data path can carry is an error naming both.
    let only = CryptoPolicy {
        compliance_policy: Fips1402,
        require_aes256_gcm: false,
    };
    let err = MeshCrypto::new(only, &[MeshSuite::Chacha20Poly1305]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "crypto compliancePolicy fips-140-2 allows none of the suites this node's data path \
         carries ([Chacha20Poly1305])"
    );
    let aes256 = CryptoPolicy {
        compliance_policy: Default,
        require_aes256_gcm: true,
    };
    assert!(matches!(
        MeshCrypto::new(aes256, &[MeshSuite::Aes128Gcm]),
        Err(TlsConfigError::PolicyExcludesSuites { .. })
    ));
}

#[test]
fn open_sessions_are_judged_against_the_current_policy() {
    use rustls::{CipherSuite as C, NamedGroup as G};
    let pqc = policy(CompliancePolicy::Pqc, false);
    assert_eq!(
        pqc.refuses(C::TLS13_AES_128_GCM_SHA256, Some(G::X25519MLKEM768)),
        None
    );
    let why = pqc
        .refuses(C::TLS13_AES_128_GCM_SHA256, Some(G::X25519))
        .unwrap();
    assert_eq!(
        why,
        "TLS13_AES_128_GCM_SHA256 with x25519 is not allowed by compliancePolicy pqc (groups \
         X25519MLKEM768; suites TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384)"
    );
    let aes256 = policy(CompliancePolicy::Default, true);
    assert!(
        aes256
            .refuses(C::TLS13_AES_128_GCM_SHA256, Some(G::X25519MLKEM768))
            .is_some()
    );
    assert!(
        aes256
            .refuses(C::TLS13_AES_256_GCM_SHA384, Some(G::X25519))
            .is_none()
    );
    assert!(aes256.refuses(C::TLS13_AES_256_GCM_SHA384, None).is_some());
}

#[test]
fn originated_tls_follows_the_policy() {
    use CompliancePolicy::*;
    use rustls::{CipherSuite as C, NamedGroup as G};
    let origin = |p, aes256| {
        origination_provider(CryptoPolicy {
            compliance_policy: p,
            require_aes256_gcm: aes256,
        })
    };
    let groups = |p: &rustls::crypto::CryptoProvider| -> Vec<G> {
        p.kx_groups.iter().map(|g| g.name()).collect()
    };
    let default = origin(Default, false);
    assert_eq!(
        groups(&default),
        [G::X25519MLKEM768, G::X25519, G::secp256r1, G::secp384r1]
    );
    assert!(
        default.cipher_suites.len() > 3,
        "TLS 1.2 suites stay for outside servers"
    );
    let pqc = origin(Pqc, false);
    assert_eq!(groups(&pqc), [G::X25519MLKEM768]);
    let names = |p: &rustls::crypto::CryptoProvider| -> Vec<C> {
        p.cipher_suites.iter().map(|s| s.suite()).collect()
    };
    assert_eq!(
        names(&pqc),
        [C::TLS13_AES_256_GCM_SHA384, C::TLS13_AES_128_GCM_SHA256]
    );
    let fips = origin(Fips1402, false);
    assert_eq!(groups(&fips), [G::secp256r1, G::secp384r1]);
    assert!(
        names(&fips)
            .iter()
            .all(|s| format!("{s:?}").contains("AES_") && format!("{s:?}").contains("GCM")),
        "{:?}",
        names(&fips)
    );
    assert!(names(&fips).contains(&C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256));
    assert!(
        names(&origin(Default, true))
            .iter()
            .all(|s| format!("{s:?}").contains("AES_256_GCM"))
    );
    assert_eq!(
        origination_versions(CryptoPolicy {
            compliance_policy: Pqc,
            require_aes256_gcm: false,
        })
        .len(),
        1
    );
}

// === resumption ===

fn resuming(lifetime: Duration) -> (SessionResumption, Arc<std::sync::atomic::AtomicU64>) {
    let epoch = Arc::new(std::sync::atomic::AtomicU64::new(7));
    (SessionResumption::new(lifetime, Arc::clone(&epoch)), epoch)
}

/// The configs of a client and a server that resume sessions under `crules` and `srules`.
fn resuming_configs(
    client: &Node,
    server: &Node,
    crules: &SessionResumption,
    srules: &SessionResumption,
) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    (
        client.resuming_client(SERVER_ID, crules),
        server.resuming_server(srules),
    )
}

/// The second connection between two nodes with tickets for a minute: it resumes the
/// first's session.
fn second_connection() -> (Connection, Connection) {
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let (cc, sc) = resuming_configs(&client, &server, &rules, &rules);
    connect(Arc::clone(&cc), Arc::clone(&sc));
    connect(cc, sc)
}

impl Node {
    fn resuming_server(&self, rules: &SessionResumption) -> Arc<ServerConfig> {
        server_config_with(
            &self.leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            &MeshCrypto::default_aes_gcm(),
            rules,
        )
        .unwrap()
    }

    fn resuming_client(&self, expected: &str, rules: &SessionResumption) -> Arc<ClientConfig> {
        client_config_with(
            &self.leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            &id(expected),
            &MeshCrypto::default_aes_gcm(),
            rules,
        )
        .unwrap()
    }
}

/// Whether each side saw a resumed handshake, and the peer each side authenticated.
fn resumed(c: &Connection, s: &Connection) -> (bool, bool) {
    let (at_client, at_server) = (negotiated(c).unwrap(), negotiated(s).unwrap());
    assert_eq!(at_client.peer, id(SERVER_ID));
    assert_eq!(at_server.peer, id(CLIENT_ID));
    (at_client.resumed, at_server.resumed)
}

#[test]
fn a_second_connection_resumes_and_both_sides_keep_the_peer_identity() {
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let (cc, sc) = resuming_configs(&client, &server, &rules, &rules);
    let (c, s) = connect(Arc::clone(&cc), Arc::clone(&sc));
    assert_eq!(resumed(&c, &s), (false, false));
    let Connection::Client(first) = &c else {
        unreachable!()
    };
    assert_eq!(first.tls13_tickets_received(), 1);

    // The identities come from the certificates the first handshake verified, which rustls
    // keeps in the ticket's state on both sides: no certificate crosses the wire now.
    let (c, s) = connect(Arc::clone(&cc), Arc::clone(&sc));
    assert_eq!(resumed(&c, &s), (true, true));
    assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
    // Each resumed connection brings the next ticket, so a steady caller keeps resuming.
    let (c, s) = connect(cc, sc);
    assert_eq!(resumed(&c, &s), (true, true));
}

#[test]
fn resumed_sessions_extract_matching_secrets_for_the_kernel() {
    let (c, s) = second_connection();
    assert_eq!(resumed(&c, &s), (true, true));
    let (c, s) = (
        c.dangerous_extract_secrets().unwrap(),
        s.dangerous_extract_secrets().unwrap(),
    );
    // The server's ticket went out under its traffic keys before the extraction: its
    // sequence number is counted, and the client's receive side starts where it must.
    assert_eq!(s.tx.0, 1, "one ticket record sent");
    assert_eq!(
        c.rx.0, 1,
        "the ticket record was read by the client's rustls"
    );
    assert_eq!((c.tx.0, s.rx.0), (0, 0));
    assert_same(&c.tx.1, &s.rx.1);
    assert_same(&c.rx.1, &s.tx.1);
}

#[test]
fn a_ticket_resumes_once() {
    let (rules, _) = resuming(Duration::from_secs(60));
    let store = resumption::ServerTickets::new(rules, 4);
    use rustls::server::StoresServerSessions as _;
    assert!(store.put(b"ticket".to_vec(), b"state".to_vec()));
    assert_eq!(store.take(b"ticket"), Some(b"state".to_vec()));
    assert_eq!(
        store.take(b"ticket"),
        None,
        "a replayed ticket does not resume"
    );
    assert_eq!(store.get(b"ticket"), None);
}

#[test]
fn stores_stay_bounded() {
    use rustls::server::StoresServerSessions as _;
    let (rules, _) = resuming(Duration::from_secs(60));
    let store = resumption::ServerTickets::new(rules, 2);
    assert!(store.put(b"a".to_vec(), vec![]));
    assert!(store.put(b"b".to_vec(), vec![]));
    assert!(
        !store.put(b"c".to_vec(), vec![]),
        "full of live tickets: none issued"
    );
    assert_eq!(store.len(), 2);

    // A client keeps the newest few per server address, however many the server sends.
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let mut generous = ServerConfig::clone(&server.resuming_server(&rules));
    generous.send_tls13_tickets = resumption::TICKETS_PER_SERVER + 5;
    let store = Arc::new(resumption::ClientTickets::new(rules.clone()));
    let mut cc = ClientConfig::clone(&client.resuming_client(SERVER_ID, &rules));
    cc.resumption = rustls::client::Resumption::store(Arc::clone(&store) as _);
    connect(Arc::new(cc), Arc::new(generous));
    assert_eq!(store.held(&test_name()), resumption::TICKETS_PER_SERVER);
}

fn test_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)).into())
}

#[test]
fn tickets_expire_on_both_sides() {
    let (client, server) = two_nodes();
    // Client and server each enforce the lifetime: either one alone stops resumption.
    for (client_lifetime, server_lifetime) in [(1, 60_000), (60_000, 1)] {
        let (crules, _) = resuming(Duration::from_millis(client_lifetime));
        let (srules, _) = resuming(Duration::from_millis(server_lifetime));
        let (cc, sc) = resuming_configs(&client, &server, &crules, &srules);
        connect(Arc::clone(&cc), Arc::clone(&sc));
        std::thread::sleep(Duration::from_millis(20));
        let (c, s) = connect(cc, sc);
        assert_eq!(
            resumed(&c, &s),
            (false, false),
            "lifetimes {client_lifetime} ms / {server_lifetime} ms"
        );
    }
}

#[test]
fn a_new_epoch_stops_resumption_on_either_side() {
    let (client, server) = two_nodes();
    for bump_client in [true, false] {
        let (crules, cepoch) = resuming(Duration::from_secs(60));
        let (srules, sepoch) = resuming(Duration::from_secs(60));
        let (cc, sc) = resuming_configs(&client, &server, &crules, &srules);
        connect(Arc::clone(&cc), Arc::clone(&sc));
        let epoch = if bump_client { &cepoch } else { &sepoch };
        epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (c, s) = connect(Arc::clone(&cc), Arc::clone(&sc));
        assert_eq!(
            resumed(&c, &s),
            (false, false),
            "client bumped: {bump_client}"
        );
        // The full handshake under the new epoch issued a ticket that counts again.
        let (c, s) = connect(cc, sc);
        assert_eq!(resumed(&c, &s), (true, true));
    }
}

#[test]
fn new_credentials_do_not_resume_old_tickets() {
    // The agent builds new configs (new stores) for a new leaf, CA or crypto policy; even a
    // ticket carried over to a config with another certificate would not be offered.
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let sc = server.resuming_server(&rules);
    let cc = client.resuming_client(SERVER_ID, &rules);
    connect(Arc::clone(&cc), Arc::clone(&sc));
    let renewed = ClientConfig::clone(&client.resuming_client(SERVER_ID, &rules));
    let mut renewed = renewed;
    renewed.resumption = cc.resumption.clone();
    let (c, s) = connect(Arc::new(renewed), sc);
    assert_eq!(resumed(&c, &s), (false, false));
}

#[test]
fn resumption_is_off_unless_asked_for() {
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::ZERO);
    assert!(!rules.enabled());
    let (cc, sc) = resuming_configs(&client, &server, &rules, &rules);
    let (c, s) = connect(Arc::clone(&cc), Arc::clone(&sc));
    assert!(!s.wants_write());
    let Connection::Client(first) = &c else {
        unreachable!()
    };
    assert_eq!(first.tls13_tickets_received(), 0);
    drop(s);
    let (c, s) = connect(cc, sc);
    assert_eq!(resumed(&c, &s), (false, false));
}

#[test]
fn a_resumed_session_whose_peer_certificate_expired_is_refused() {
    let (c, s) = second_connection();
    let later = UnixTime::since_unix_epoch(
        Duration::from_secs(UnixTime::now().as_secs())
            + DEFAULT_LEAF_TTL
            + Duration::from_secs(3600),
    );
    for side in [&c, &s] {
        assert!(negotiated(side).unwrap().resumed);
        match negotiated_at(side, later, false) {
            Err(HandshakeError::PeerCertificate(Error::InvalidCertificate(
                CertificateError::Expired,
            ))) => {}
            other => panic!("{other:?}"),
        }
    }
    // A full handshake at that time would have run the chain check instead; the validity
    // check is only for sessions that skipped it.
    let (client, server) = two_nodes();
    let (c, _) = connect(client.client(SERVER_ID), server.server());
    assert!(negotiated_at(&c, later, false).is_ok());
}

// === the resumed offer (x25519 alone, so the ClientHello fits a SYN) ===

impl Node {
    fn mesh_client(&self, crypto: &MeshCrypto, rules: &SessionResumption) -> MeshClient {
        mesh_client_with(
            &self.leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            &id(SERVER_ID),
            crypto,
            rules,
        )
        .unwrap()
    }

    fn resuming_server_with(
        &self,
        crypto: &MeshCrypto,
        rules: &SessionResumption,
    ) -> Arc<ServerConfig> {
        server_config_with(
            &self.leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            crypto,
            rules,
        )
        .unwrap()
    }
}

/// The random of a ServerHello that is a HelloRetryRequest (RFC 8446 §4.1.3).
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// What one connection with an offer showed.
struct Offered {
    /// The client's first flight (its ClientHello record), in bytes.
    hello: usize,
    /// The server answered it with a HelloRetryRequest (read off the records: rustls reports
    /// a resumed handshake as `Resumed` whether or not it was retried).
    retried: bool,
    /// What the client negotiated (the server agrees on group and resumption).
    at_client: Negotiated,
}

fn offered(offer: &ClientOffer, server: &Arc<ServerConfig>) -> Offered {
    let (mut c, mut s) = pair(Arc::clone(&offer.config), Arc::clone(server));
    let mut hello = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut hello).unwrap();
    }
    let mut unread = &hello[..];
    while !unread.is_empty() {
        s.read_tls(&mut unread).unwrap();
    }
    s.process_new_packets().unwrap();
    let mut answer = Vec::new();
    while s.wants_write() {
        s.write_tls(&mut answer).unwrap();
    }
    // Record header (5), handshake header (4), legacy version (2), then the random.
    let retried = answer.get(11..43) == Some(&HRR_RANDOM[..]);
    let mut unread = &answer[..];
    while !unread.is_empty() {
        c.read_tls(&mut unread).unwrap();
        c.process_new_packets().unwrap();
    }
    handshake(&mut c, &mut s).unwrap();
    let (at_c, at_s) = (negotiated(&c).unwrap(), negotiated(&s).unwrap());
    assert_eq!((at_c.group, at_c.resumed), (at_s.group, at_s.resumed));
    Offered {
        hello: hello.len(),
        retried,
        at_client: at_c,
    }
}

#[test]
fn a_resumed_offer_sends_x25519_alone_and_the_server_takes_it_without_a_retry() {
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let crypto = policy(CompliancePolicy::Default, false);
    let mc = client.mesh_client(&crypto, &rules);
    let sc = server.resuming_server_with(&crypto, &rules);

    // Without a ticket: the full offer, hybrid, larger than a 1 500-byte link's SYN carries.
    let offer = mc.offer(&test_name());
    assert!(!offer.resuming);
    let full = offered(&offer, &sc);
    let c = &full.at_client;
    assert_eq!(
        (c.group, full.retried, c.resumed),
        (Some(NamedGroup::X25519MLKEM768), false, false)
    );
    // A SYN carries at most the MSS less 40 bytes of option room: 1 420 on a 1 500-byte
    // IPv4 link.
    assert!(
        full.hello > 1420,
        "full ClientHello record: {} bytes",
        full.hello
    );

    // With one: x25519 alone, resumed, no HelloRetryRequest, and small enough for the SYN.
    for round in 0..3 {
        let offer = mc.offer(&test_name());
        assert!(offer.resuming, "round {round}");
        let resumed = offered(&offer, &sc);
        let c = &resumed.at_client;
        assert_eq!(
            (c.group, resumed.retried, c.resumed),
            (Some(NamedGroup::X25519), false, true),
            "round {round}"
        );
        assert!(
            resumed.hello < 600,
            "resumed ClientHello: {} bytes",
            resumed.hello
        );
        eprintln!(
            "ClientHello records: full {} bytes, resumed {} bytes",
            full.hello, resumed.hello
        );
    }
    // Each resumed connection's ticket went back to the shared store: the full offer (a
    // spare's, for instance) resumes from it too, with the hybrid.
    let (mut c, mut s) = pair(Arc::clone(mc.full()), Arc::clone(&sc));
    handshake(&mut c, &mut s).unwrap();
    let at_c = negotiated(&c).unwrap();
    assert_eq!(
        (at_c.group, at_c.resumed),
        (Some(NamedGroup::X25519MLKEM768), true)
    );
    // The resumed offers left no key-exchange hint behind (rustls starts a full offer with
    // the hinted group's share, and a server then asks again for the hybrid the client lists
    // first): a full handshake, where no ticket is known, is still the hybrid at once.
    let restarted = server.resuming_server_with(&crypto, &rules);
    let (mut c, mut s) = pair(Arc::clone(mc.full()), restarted);
    handshake(&mut c, &mut s).unwrap();
    let at_c = negotiated(&c).unwrap();
    assert_eq!(
        (at_c.group, at_c.resumed, at_c.retried),
        (Some(NamedGroup::X25519MLKEM768), false, false)
    );
}

#[test]
fn a_declined_ticket_is_a_classical_full_handshake_and_the_client_offers_in_full_again() {
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let crypto = policy(CompliancePolicy::Default, false);
    let mc = client.mesh_client(&crypto, &rules);
    let sc = server.resuming_server_with(&crypto, &rules);
    for _ in 0..3 {
        offered(&mc.offer(&test_name()), &sc);
    }
    // A server that does not know the ticket (restarted): a full handshake on x25519, which
    // the caller must not use.
    let restarted = server.resuming_server_with(&crypto, &rules);
    let offer = mc.offer(&test_name());
    assert!(offer.resuming);
    let declined = offered(&offer, &restarted);
    let c = &declined.at_client;
    assert_eq!(
        (c.group, c.resumed, declined.retried),
        (Some(NamedGroup::X25519), false, false)
    );
    // The caller dials again with the full offer; the other tickets are gone too.
    let again = mc.declined(&test_name());
    assert!(!again.resuming);
    let c = offered(&again, &restarted).at_client;
    assert_eq!(
        (c.group, c.resumed),
        (Some(NamedGroup::X25519MLKEM768), false)
    );
    // That full handshake's ticket is the one held now.
    let offer = mc.offer(&test_name());
    assert!(offer.resuming);
    let c = offered(&offer, &restarted).at_client;
    assert_eq!((c.group, c.resumed), (Some(NamedGroup::X25519), true));
}

#[test]
fn only_a_hybrid_first_policy_with_x25519_makes_a_resumed_offer() {
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    // pqc allows the hybrid alone, fips-140-2 no x25519, the legacy offer is classical and
    // small already: each resumes with its full offer.
    for crypto in [
        policy(CompliancePolicy::Pqc, false),
        policy(CompliancePolicy::Fips1402, false),
        legacy(),
    ] {
        let mc = client.mesh_client(&crypto, &rules);
        let sc = server.resuming_server_with(&crypto, &rules);
        let first = offered(&mc.offer(&test_name()), &sc).at_client;
        let offer = mc.offer(&test_name());
        assert!(!offer.resuming, "{}", crypto.offer());
        let c = offered(&offer, &sc).at_client;
        assert_eq!(
            (c.group, c.resumed),
            (first.group, true),
            "{}",
            crypto.offer()
        );
    }
    // Without resumption there is nothing to resume with.
    let (off, _) = resuming(Duration::ZERO);
    let crypto = policy(CompliancePolicy::Default, false);
    let mc = client.mesh_client(&crypto, &off);
    offered(
        &mc.offer(&test_name()),
        &server.resuming_server_with(&crypto, &off),
    );
    assert!(!mc.offer(&test_name()).resuming);
}

#[test]
fn a_server_without_x25519_asks_for_its_own_group_and_the_session_still_resumes() {
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let crypto = policy(CompliancePolicy::Default, false);
    let mc = client.mesh_client(&crypto, &rules);
    for (server_policy, group, full_retried) in [
        (CompliancePolicy::Pqc, NamedGroup::X25519MLKEM768, false),
        (CompliancePolicy::Fips1402, NamedGroup::secp256r1, true),
    ] {
        let sc = server.resuming_server_with(&policy(server_policy, false), &rules);
        let full = offered(&mc.offer(&test_name()), &sc);
        assert_eq!(
            (full.at_client.group, full.retried, full.at_client.resumed),
            (Some(group), full_retried, false),
            "{server_policy}"
        );
        // x25519 is listed first but not allowed there: one retry for the server's group
        // (what a full offer costs such a server too), and the ticket is still accepted.
        let offer = mc.offer(&test_name());
        assert!(offer.resuming);
        let resumed = offered(&offer, &sc);
        assert_eq!(
            (
                resumed.at_client.group,
                resumed.retried,
                resumed.at_client.resumed
            ),
            (Some(group), true, true),
            "{server_policy}"
        );
    }
}

/// A resumed handshake that went through a HelloRetryRequest is reported as retried by the
/// drivers on both sides (rustls itself reports such a handshake as merely `Resumed`), with
/// either record layer's client.
#[tokio::test]
async fn the_drivers_report_the_retry_of_a_resumed_handshake() {
    use tokio::io::AsyncReadExt as _;

    use crate::test_tls::tcp_pair;
    const TIMEOUT: Duration = Duration::from_secs(10);
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let mc = client.mesh_client(&policy(CompliancePolicy::Default, false), &rules);
    // A server that allows neither x25519 nor the hybrid: the resumed offer's x25519 share
    // draws a retry for secp256r1.
    let sc = server.resuming_server_with(&policy(CompliancePolicy::Fips1402, false), &rules);
    // A full handshake (retried as well) brings the first ticket; each resumed one the next.
    for (kernel, resumed) in [(false, false), (false, true), (true, true)] {
        let offer = mc.offer(&test_name());
        assert_eq!(offer.resuming, resumed, "kernel {kernel}");
        let (mut c, mut s) = tcp_pair().await;
        let server_side = {
            let sc = Arc::clone(&sc);
            tokio::spawn(async move {
                let est = driver::server_handshake(&mut s, sc, TIMEOUT).await;
                (s, est)
            })
        };
        let at_client = if kernel {
            let conn = driver::kernel_client_connection(offer.config, test_name()).unwrap();
            driver::client_handshake_kernel(&mut c, conn, TIMEOUT, false)
                .await
                .unwrap()
                .negotiated
        } else {
            let mut est = driver::client_handshake(&mut c, offer.config, test_name(), TIMEOUT)
                .await
                .unwrap();
            // The server's ticket follows the handshake: read it, as the relay would.
            let conn = est.conn.rustls().unwrap();
            let mut header = [0u8; 5];
            c.read_exact(&mut header).await.unwrap();
            let mut body = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
            c.read_exact(&mut body).await.unwrap();
            conn.read_tls(&mut &header[..]).unwrap();
            conn.read_tls(&mut &body[..]).unwrap();
            conn.process_new_packets().unwrap();
            est.negotiated
        };
        let (_s, at_server) = server_side.await.unwrap();
        let at_server = at_server.unwrap().negotiated;
        for (side, n) in [("client", &at_client), ("server", &at_server)] {
            assert_eq!(
                (n.group, n.retried, n.resumed),
                (Some(NamedGroup::secp256r1), true, resumed),
                "{side}, kernel {kernel}"
            );
        }
    }
}

/// A resumed offer's config is lent, not copied: once the connection built from it is gone,
/// the next resumed connection gets the same config with its own ticket; one still in use
/// is never lent twice, so two connections set up at once each resume with their own ticket.
#[test]
fn resumed_offers_reuse_their_config_once_its_connection_is_gone() {
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let crypto = policy(CompliancePolicy::Default, false);
    let mc = client.mesh_client(&crypto, &rules);
    let sc = server.resuming_server_with(&crypto, &rules);
    let resumed = mc.resumed.as_ref().expect("a resumed offer");
    // Two full handshakes under way at once: two tickets.
    let mut pairs = [
        pair(Arc::clone(mc.full()), Arc::clone(&sc)),
        pair(Arc::clone(mc.full()), Arc::clone(&sc)),
    ];
    for (c, s) in &mut pairs {
        handshake(c, s).unwrap();
    }
    drop(pairs);
    let first = mc.offer(&test_name());
    assert!(first.resuming);
    let c = offered(&first, &sc).at_client;
    assert_eq!((c.group, c.resumed), (Some(NamedGroup::X25519), true));
    let config = Arc::as_ptr(&first.config);
    drop(first);
    // Its connection (dropped in `offered`) and the offer are gone: the same config again.
    let second = mc.offer(&test_name());
    assert!(
        std::ptr::eq(Arc::as_ptr(&second.config), config),
        "not lent again"
    );
    // While `second` holds it, a third offer gets another config.
    let third = mc.offer(&test_name());
    assert!(third.resuming);
    assert!(!Arc::ptr_eq(&second.config, &third.config));
    assert_eq!(resumed.pooled(), 2);
    // Each resumes with the ticket taken for it.
    for offer in [&third, &second] {
        let c = offered(offer, &sc).at_client;
        assert_eq!((c.group, c.resumed), (Some(NamedGroup::X25519), true));
    }
    // And many in sequence use no more configs than were ever in use at once.
    drop((second, third));
    for _ in 0..10 {
        let offer = mc.offer(&test_name());
        assert!(offer.resuming);
        assert!(offered(&offer, &sc).at_client.resumed);
    }
    assert_eq!(resumed.pooled(), 2);
}

/// The app's first bytes sent again on a kTLS client's unbuffered session (after a refused
/// derived header, toward an agent that keeps no roots) arrive at the server as its first
/// application record, and the kernel's send sequence number then counts that record. Fails
/// if the unbuffered session cannot seal (the flow failed that way in the VM) or if the
/// kernel would reuse record number 0.
#[tokio::test]
async fn an_unbuffered_client_session_sends_the_first_bytes_and_counts_them() {
    use std::io::Read as _;

    use tokio::io::AsyncReadExt as _;

    use crate::test_tls::tcp_pair;
    const TIMEOUT: Duration = Duration::from_secs(10);
    let (client, server) = two_nodes();
    let (rules, _) = resuming(Duration::from_secs(60));
    let crypto = policy(CompliancePolicy::Default, false);
    let mc = client.mesh_client(&crypto, &rules);
    let sc = server.resuming_server_with(&crypto, &rules);
    let (mut c, mut s) = tcp_pair().await;
    let server_side = tokio::spawn(async move {
        let est = driver::server_handshake(&mut s, sc, TIMEOUT).await;
        (s, est)
    });
    let conn = driver::kernel_client_connection(Arc::clone(mc.full()), test_name()).unwrap();
    let mut est = driver::client_handshake_kernel(&mut c, conn, TIMEOUT, false)
        .await
        .unwrap();
    let first = b"GET / HTTP/1.1\r\nHost: again\r\n\r\n";
    est.send_first(&mut c, first).await.unwrap();
    let driver::Session::KernelClient(conn) = est.conn else {
        panic!("not the unbuffered client");
    };
    let (secrets, _) = conn.dangerous_into_kernel_connection().unwrap();
    assert_eq!(
        (secrets.tx.0, secrets.rx.0),
        (1, 0),
        "the kernel continues after the record"
    );
    let (mut s, at_server) = server_side.await.unwrap();
    let mut at_server = at_server.unwrap();
    let conn = at_server.conn.rustls().unwrap();
    let mut header = [0u8; 5];
    s.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], 23, "an application_data record");
    let mut body = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
    s.read_exact(&mut body).await.unwrap();
    conn.read_tls(&mut &header[..]).unwrap();
    conn.read_tls(&mut &body[..]).unwrap();
    conn.process_new_packets().unwrap();
    let mut got = vec![0u8; first.len()];
    conn.reader().read_exact(&mut got).unwrap();
    assert_eq!(&got[..], &first[..]);
}
