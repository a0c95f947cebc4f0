//! Spare mesh sessions: a session opened ([`super::SPARE_ALPN`]) before an app connection
//! needs it, and claimed when one does.
//!
//! The claim is one TLS record from the client's agent holding exactly [`CLAIM`], the first
//! application data of the session. Until it arrives the server's agent decides nothing and
//! dials nothing: the destination is the connection's own (the pod address and port it was
//! dialed to, as for any mesh connection), and the flow is decided when it is claimed, under
//! the policy of that moment. The app's bytes follow the claim, so a claimed spare costs the
//! app no round trip the fresh dial would not.

use std::{io, time::Duration};

use tokio::{io::AsyncReadExt as _, io::AsyncWriteExt as _, net::TcpStream};

use super::driver::{DriveError, Established, Session};

/// What a client's agent sends to claim a spare session.
pub const CLAIM: &[u8] = b"interceptor-claim/1";

const RECORD_HEADER: usize = 5;
/// Largest protected TLS 1.3 record (RFC 8446 §5.2).
const MAX_RECORD: usize = RECORD_HEADER + (1 << 14) + 256;

fn buffered(est: &mut Established) -> io::Result<&mut rustls::Connection> {
    match &mut est.conn {
        Session::Rustls(conn) => Ok(conn),
        Session::KernelClient(_) | Session::Derived { .. } => Err(io::Error::other(
            "a spare session must be driven by rustls' buffered connection",
        )),
    }
}

/// Whether an idle spare is still usable: reads (without waiting) what the server's agent
/// sent since the handshake, which may be a resumption ticket (kept in the client config's
/// store as usual), and reports it dead on end of stream, a reset, an alert, or application
/// data (a server never sends any before the claim).
pub fn alive(sock: &TcpStream, est: &mut Established) -> bool {
    let mut pending = std::mem::take(&mut est.leftover_ciphertext);
    let mut buf = [0u8; 4096];
    loop {
        match sock.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return false,
        }
    }
    let Ok(conn) = buffered(est) else {
        return false;
    };
    let mut rest = &pending[..];
    while !rest.is_empty() {
        match conn.read_tls(&mut rest) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        match conn.process_new_packets() {
            Ok(state) if state.peer_has_closed() || state.plaintext_bytes_to_read() > 0 => {
                return false;
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Claims a spare: writes [`CLAIM`] as a record of its own. The app's bytes may follow at once.
pub async fn claim(sock: &mut TcpStream, est: &mut Established) -> io::Result<()> {
    let conn = buffered(est)?;
    io::Write::write_all(&mut conn.writer(), CLAIM)?;
    let mut out = Vec::with_capacity(64);
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    sock.write_all(&out).await
}

/// The server's side: waits up to `timeout` for the claim, reading record by record (nothing
/// past the claim's record leaves the socket, so the session can still go to the kernel).
/// Plaintext in the same record after the claim is kept for the app in
/// [`Established::leftover_plaintext`]. End of stream before the claim is
/// [`DriveError::PeerClosed`]: the client's agent let the spare go unused.
pub async fn await_claim(
    sock: &mut TcpStream,
    est: &mut Established,
    timeout: Duration,
) -> Result<(), DriveError> {
    match tokio::time::timeout(timeout, read_claim(sock, est)).await {
        Ok(r) => r,
        Err(_) => Err(DriveError::Timeout(timeout)),
    }
}

async fn read_claim(sock: &mut TcpStream, est: &mut Established) -> Result<(), DriveError> {
    let mut ahead = std::mem::take(&mut est.leftover_ciphertext);
    let mut plaintext = Vec::new();
    while plaintext.len() < CLAIM.len() {
        let record = match next_record(&ahead) {
            Some(len) => ahead.drain(..len).collect::<Vec<u8>>(),
            None => read_record(sock, &mut ahead).await?,
        };
        let conn = buffered(est).map_err(DriveError::Io)?;
        let mut slice = &record[..];
        while !slice.is_empty() {
            conn.read_tls(&mut slice).map_err(DriveError::Io)?;
        }
        let state = conn
            .process_new_packets()
            .map_err(|e| DriveError::Handshake(e.into()))?;
        let n = state.plaintext_bytes_to_read();
        if n > 0 {
            let start = plaintext.len();
            plaintext.resize(start + n, 0);
            io::Read::read_exact(&mut conn.reader(), &mut plaintext[start..])
                .map_err(DriveError::Io)?;
        }
        if state.peer_has_closed() && plaintext.len() < CLAIM.len() {
            return Err(DriveError::PeerClosed);
        }
        if !CLAIM.starts_with(&plaintext[..plaintext.len().min(CLAIM.len())]) {
            return Err(DriveError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "a spare session's first bytes are not a claim",
            )));
        }
    }
    est.leftover_plaintext = plaintext.split_off(CLAIM.len());
    est.leftover_ciphertext = ahead;
    Ok(())
}

/// The length of the first whole record in `bytes`, if there is one.
fn next_record(bytes: &[u8]) -> Option<usize> {
    let header = bytes.get(..RECORD_HEADER)?;
    let len = RECORD_HEADER + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (bytes.len() >= len).then_some(len)
}

/// Completes the record `partial` starts (it holds less than one) from the socket, exactly.
async fn read_record(sock: &mut TcpStream, partial: &mut Vec<u8>) -> Result<Vec<u8>, DriveError> {
    let mut record = std::mem::take(partial);
    if record.len() < RECORD_HEADER {
        let have = record.len();
        record.resize(RECORD_HEADER, 0);
        read_exact(sock, &mut record[have..]).await?;
    }
    let len = RECORD_HEADER + usize::from(u16::from_be_bytes([record[3], record[4]]));
    if len > MAX_RECORD {
        return Err(DriveError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            "record longer than TLS allows",
        )));
    }
    let have = record.len();
    record.resize(len, 0);
    read_exact(sock, &mut record[have..]).await?;
    Ok(record)
}

async fn read_exact(sock: &mut TcpStream, buf: &mut [u8]) -> Result<(), DriveError> {
    match sock.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(DriveError::PeerClosed),
        Err(e) => Err(DriveError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        ca::{Ca, CertificateAuthority, DEFAULT_LEAF_TTL},
        handshake::{
            Credentials, MeshCrypto, SessionResumption,
            driver::{client_handshake, server_handshake},
            mesh_roots,
        },
        identity::{SpiffeId, TrustDomain},
        test_tls::{loopback_name as name, tcp_pair},
    };

    const CLIENT_ID: &str = "spiffe://cluster.local/ns/frontend/sa/web";
    const SERVER_ID: &str = "spiffe://cluster.local/ns/backend/sa/api";
    const TIMEOUT: Duration = Duration::from_secs(10);

    /// The client's and the server's credentials, from one CA.
    fn credentials() -> (Credentials, Credentials) {
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let ca = Ca::generate(&td).unwrap();
        let roots = mesh_roots(ca.roots()).unwrap();
        let make = |id: &str| {
            let leaf = ca.issue(&id.parse().unwrap(), DEFAULT_LEAF_TTL).unwrap();
            Credentials::new(
                leaf,
                Arc::clone(&roots),
                &td,
                Arc::new(MeshCrypto::default_aes_gcm()),
                &SessionResumption::disabled(),
                Arc::default(),
            )
            .unwrap()
        };
        (make(CLIENT_ID), make(SERVER_ID))
    }

    fn server_id() -> SpiffeId {
        SERVER_ID.parse().unwrap()
    }

    /// A spare handshake on both ends, as the agents run it.
    async fn spare_pair() -> ((TcpStream, Established), (TcpStream, Established)) {
        let (client, server) = credentials();
        let config = client.spare_client(&server_id()).unwrap();
        let (mut c, mut s) = tcp_pair().await;
        let cl = tokio::spawn(async move {
            let est = client_handshake(&mut c, config, name(), TIMEOUT)
                .await
                .unwrap();
            (c, est)
        });
        let est = server_handshake(&mut s, Arc::clone(server.server()), TIMEOUT)
            .await
            .unwrap();
        (cl.await.unwrap(), (s, est))
    }

    /// A spare is negotiated as one on both ends, waits for its claim, and the app's first
    /// bytes sent right behind the claim reach the server's relay intact and in order.
    #[tokio::test]
    async fn a_claimed_spare_carries_the_app_bytes_behind_the_claim() {
        let ((mut c, mut cest), (mut s, mut sest)) = spare_pair().await;
        assert!(cest.negotiated.spare && sest.negotiated.spare);
        assert!(alive(&c, &mut cest));
        claim(&mut c, &mut cest).await.unwrap();
        let conn = cest.conn.rustls().unwrap();
        io::Write::write_all(&mut conn.writer(), b"GET / HTTP/1.1\r\n").unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        c.write_all(&out).await.unwrap();
        await_claim(&mut s, &mut sest, TIMEOUT).await.unwrap();
        assert!(sest.leftover_plaintext.is_empty());
        // Nothing past the claim's record left the socket: the request is still there.
        let conn = sest.conn.rustls().unwrap();
        assert_eq!(
            conn.process_new_packets()
                .unwrap()
                .plaintext_bytes_to_read(),
            0
        );
        let mut wire = vec![0u8; out.len()];
        s.read_exact(&mut wire).await.unwrap();
        conn.read_tls(&mut &wire[..]).unwrap();
        conn.process_new_packets().unwrap();
        let mut got = [0u8; 16];
        io::Read::read_exact(&mut conn.reader(), &mut got).unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
    }

    /// A plain mesh client to the same server is not a spare: the server decides at once.
    #[tokio::test]
    async fn a_plain_client_is_not_a_spare() {
        let (client, server) = credentials();
        let config = client.client(&server_id()).unwrap();
        let (mut c, mut s) = tcp_pair().await;
        let cl =
            tokio::spawn(async move { client_handshake(&mut c, config, name(), TIMEOUT).await });
        let est = server_handshake(&mut s, Arc::clone(server.server()), TIMEOUT)
            .await
            .unwrap();
        assert!(!est.negotiated.spare);
        assert!(!cl.await.unwrap().unwrap().negotiated.spare);
    }

    /// A spare the client's agent closes is unclaimed on the server, and a spare whose server
    /// went away (an agent restart) is dead on the client.
    #[tokio::test]
    async fn closed_spares_are_unclaimed_or_dead() {
        let ((c, cest), (mut s, mut sest)) = spare_pair().await;
        drop((c, cest));
        assert!(matches!(
            await_claim(&mut s, &mut sest, TIMEOUT).await,
            Err(DriveError::PeerClosed)
        ));
        let ((c, mut cest), (s, sest)) = spare_pair().await;
        drop((s, sest));
        let deadline = std::time::Instant::now() + TIMEOUT;
        while alive(&c, &mut cest) {
            assert!(std::time::Instant::now() < deadline, "still alive");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Application data instead of a claim is refused, and a silent client times out.
    #[tokio::test]
    async fn anything_but_a_claim_is_refused() {
        let ((mut c, mut cest), (mut s, mut sest)) = spare_pair().await;
        let conn = cest.conn.rustls().unwrap();
        io::Write::write_all(&mut conn.writer(), b"interceptor-claim/2").unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        c.write_all(&out).await.unwrap();
        let e = await_claim(&mut s, &mut sest, TIMEOUT).await.unwrap_err();
        assert!(e.to_string().contains("socket error"), "{e}");
        let (_c, (mut s, mut sest)) = spare_pair().await;
        let short = Duration::from_millis(50);
        assert!(matches!(
            await_claim(&mut s, &mut sest, short).await,
            Err(DriveError::Timeout(_))
        ));
    }
}
