//! In-memory handshakes: a rustls client and server exchange records through `Vec<u8>`s.

use std::net::{IpAddr, Ipv4Addr};

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
        self.server_with(MeshSuite::AES_GCM)
    }

    fn server_with(&self, suites: &[MeshSuite]) -> Arc<ServerConfig> {
        server_config(
            &self.leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            suites,
        )
        .unwrap()
    }

    fn client(&self, expected: &str) -> Arc<ClientConfig> {
        self.client_with(expected, MeshSuite::AES_GCM)
    }

    fn client_with(&self, expected: &str, suites: &[MeshSuite]) -> Arc<ClientConfig> {
        client_config(
            &self.leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            &id(expected),
            suites,
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
    let (c, s) = connect(
        client.client_with(SERVER_ID, suites),
        server.server_with(suites),
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
    let client =
        build_client_config(&foreign_leaf, roots, &id(SERVER_ID), MeshSuite::AES_GCM).unwrap();

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
        MeshSuite::AES_GCM,
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
    let provider = provider(MeshSuite::AES_GCM).unwrap();
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
        provider(MeshSuite::AES_GCM)
            .unwrap()
            .signature_verification_algorithms,
        id(SERVER_ID),
    );
    let mut anonymous = ClientConfig::builder_with_provider(provider(MeshSuite::AES_GCM).unwrap())
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
    let aes = provider(MeshSuite::AES_GCM).unwrap();
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
    let groups: Vec<_> = aes.kx_groups.iter().map(|g| g.name()).collect();
    assert_eq!(
        groups,
        [rustls::NamedGroup::X25519, rustls::NamedGroup::secp256r1]
    );
    assert!(matches!(provider(&[]), Err(TlsConfigError::NoCipherSuites)));
    let deduped = provider(&[MeshSuite::Aes256Gcm, MeshSuite::Aes256Gcm]).unwrap();
    assert_eq!(deduped.cipher_suites.len(), 1);

    // A client that can only do ChaCha20 finds no common suite with an AES-only server.
    let (client, server) = two_nodes();
    let failure = refused(
        client.client_with(SERVER_ID, &[MeshSuite::Chacha20Poly1305]),
        server.server(),
    );
    assert!(matches!(
        HandshakeError::from(failure.server.unwrap()),
        HandshakeError::Tls(Error::PeerIncompatible(_))
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
        MeshSuite::AES_GCM,
    )
    .unwrap_err();
    assert!(matches!(err, TlsConfigError::ForeignPeer { .. }), "{err}");

    let err = server_config(
        &client.leaf,
        Arc::clone(&client.roots),
        &td("other.org"),
        MeshSuite::AES_GCM,
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
