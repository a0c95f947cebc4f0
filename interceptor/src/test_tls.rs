//! A finished TLS 1.3 session between two in-memory rustls peers, for the tests of the code
//! that continues a session after rustls (the kernel key conversion, the userspace record
//! layer): both need real secrets from a real handshake, not hand-made keys. Also the loopback
//! pair the handshake driver's tests (fresh and spare sessions) run both roles over.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use rustls::{
    ClientConnection, ServerConnection, SupportedCipherSuite,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use tokio::net::{TcpListener, TcpStream};

/// Client and server after a handshake restricted to `suite`, secret extraction enabled; the
/// server sends `tickets` session tickets and the client has received them all.
pub(crate) fn finished_pair(
    suite: SupportedCipherSuite,
    tickets: usize,
) -> (ClientConnection, ServerConnection) {
    let ck = rcgen::generate_simple_self_signed(vec!["pair.test".to_string()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let mut server_cfg = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server_cfg.enable_secret_extraction = true;
    server_cfg.send_tls13_tickets = tickets;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_cfg.enable_secret_extraction = true;
    let mut client =
        ClientConnection::new(Arc::new(client_cfg), "pair.test".try_into().unwrap()).unwrap();
    let mut server = ServerConnection::new(Arc::new(server_cfg)).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        server.read_tls(&mut &buf[..]).unwrap();
        server.process_new_packets().unwrap();
        buf.clear();
        server.write_tls(&mut buf).unwrap();
        client.read_tls(&mut &buf[..]).unwrap();
        client.process_new_packets().unwrap();
        if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() {
            break;
        }
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    assert_eq!(client.tls13_tickets_received() as usize, tickets);
    (client, server)
}

/// The name a test client dials its loopback server by.
pub(crate) fn loopback_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())
}

/// A connected loopback TCP pair, client end first, for tests that drive both handshake roles.
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}
