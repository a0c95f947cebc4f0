//! Runs a mesh handshake over a real socket without reading past it.
//!
//! Once the handshake ends, the session's record layer moves either into the kernel (kTLS) or
//! into the userspace relay. For the kernel hand-off, every byte after the last handshake
//! record must still be in the socket's receive queue: the kernel decrypts from there, with a
//! record sequence number that has to match the keys rustls hands over. A buffered reader
//! would swallow the peer's first application records (the client's request right behind its
//! Finished, or a server's 0.5-RTT banner) and the kernel would then start mid-stream. So the
//! driver reads each record exactly: the 5-byte header, then that record's body, and stops at
//! the record that completes the handshake.
//!
//! When no kernel hand-off can follow (the node relays in userspace), [`Reads::Ahead`] reads
//! as much as the socket holds instead, one system call per flight rather than two per
//! record: the records are still fed to rustls one at a time and feeding stops at the record
//! that completes the handshake, so whatever was read past it comes back as
//! [`Established::leftover_ciphertext`] for the userspace relay to decrypt first. The kernel
//! path cannot take such bytes, so [`Established::into_ktls_secrets`] refuses a session that
//! has any.
//!
//! Either way a refused peer produces the same [`HandshakeError`], and the same checks run on
//! the same records.

use std::{io, sync::Arc, time::Duration};

use rustls::{
    ClientConfig, ClientConnection, CommonState, Connection, ExtractedSecrets, HandshakeKind,
    ServerConfig, ServerConnection,
    client::{ClientConnectionData, UnbufferedClientConnection},
    kernel::KernelConnection,
    pki_types::ServerName,
    unbuffered::{ConnectionState, EncodeError, UnbufferedStatus},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{HandshakeError, Negotiated, negotiated_after};
use crate::{
    identity::SpiffeId,
    ktls::{KtlsError, SessionSecrets},
};

/// Largest TLS record the peer may send: 2^14 bytes of plaintext plus the 256 bytes of
/// expansion RFC 8446 §5.2 allows a protected record.
const MAX_RECORD_BODY: usize = (1 << 14) + 256;

const RECORD_HEADER: usize = 5;

/// A finished mesh handshake whose record layer has not been handed anywhere yet.
///
/// Either keep `conn` for the userspace relay, or call [`Established::into_ktls_secrets`] to
/// give the session to the kernel. In both cases `leftover_plaintext` must reach the app
/// before anything else the peer sends.
pub struct Established {
    /// Who the peer is and which suite protects the session.
    pub negotiated: Negotiated,
    /// Application data rustls already decrypted while finishing the handshake. Record-exact
    /// reading makes this empty in practice; it is kept so that a future change in how the
    /// handshake is read cannot silently drop the peer's first bytes.
    pub leftover_plaintext: Vec<u8>,
    /// Records read past the end of the handshake and not given to rustls yet ([`Reads::Ahead`]
    /// only; always empty with [`Reads::RecordExact`]). They precede anything still on the
    /// socket: the userspace relay feeds them to `conn` first.
    pub leftover_ciphertext: Vec<u8>,
    /// The live session, with nothing buffered in either direction.
    pub conn: Session,
}

/// A finished session's rustls state, in the form its handshake used.
///
/// Both forms are boxed because a session is over a kilobyte and every future that carries it
/// toward the relay (and each of them lives as long as the flow) would otherwise hold a copy
/// of that space.
pub enum Session {
    /// rustls' buffered connection: it can stay in userspace or give its keys to the kernel.
    Rustls(Box<Connection>),
    /// A client session driven through rustls' unbuffered API, meant for the kernel only: it
    /// is the form that can become a [`KernelConnection`], which keeps the resumption tickets
    /// the server sends after the hand-off (they reach the relay as kTLS control records).
    /// It cannot be relayed in userspace.
    KernelClient(Box<UnbufferedClientConnection>),
    /// A connection whose keys were derived from an earlier session's exported secret
    /// (`handshake::derived`): no rustls state at all, only this end's two directions with
    /// their sequence numbers, which the kernel or the relay's own record layer takes.
    Derived {
        secrets: Box<ExtractedSecrets>,
        is_client: bool,
    },
}

impl Session {
    /// The buffered connection, for the userspace relay; `None` for a kernel-only session.
    pub fn rustls(&mut self) -> Option<&mut Connection> {
        match self {
            Session::Rustls(conn) => Some(conn),
            Session::KernelClient(_) | Session::Derived { .. } => None,
        }
    }

    /// The buffered connection, or the session back if it is kernel-only.
    pub fn into_rustls(self) -> Result<Box<Connection>, Session> {
        match self {
            Session::Rustls(conn) => Ok(conn),
            other => Err(other),
        }
    }
}

/// What a kTLS client keeps of rustls after the hand-off: the state that turns the server's
/// NewSessionTicket messages into resumable sessions in the client config's ticket store.
pub type TicketSink = Box<KernelConnection<ClientConnectionData>>;

/// An [`Established`] session converted for the kernel: keys for `SessionSecrets::install`.
pub struct KtlsHandoff {
    pub negotiated: Negotiated,
    /// Bytes to write to the app before splicing anything the kernel decrypts.
    pub leftover_plaintext: Vec<u8>,
    pub secrets: SessionSecrets,
    /// For a [`Session::KernelClient`]: where the relay feeds the tickets the kernel hands it.
    pub tickets: Option<TicketSink>,
}

/// Why a handshake over a socket did not produce a usable session.
///
/// [`DriveError::Handshake`] carries the TLS-level reason (wrong identity, foreign CA, refused
/// by the peer, not a mesh endpoint); the other variants are transport failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriveError {
    /// The TLS handshake itself failed; this is the reason to log for a refused peer.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The peer did not finish within the handshake timeout (a stalled or non-TLS peer).
    #[error("handshake did not finish within {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection before the handshake finished, without an alert.
    #[error("peer closed the connection during the handshake")]
    PeerClosed,
    /// The peer announced a record longer than TLS allows, so it does not speak TLS.
    #[error("peer sent a {len}-byte record; TLS records are at most {MAX_RECORD_BODY} bytes")]
    RecordTooLong { len: usize },
    /// Reading or writing the socket failed.
    #[error("socket error during the handshake")]
    Io(#[source] io::Error),
}

impl Established {
    /// A connection on derived keys (`handshake::derived`), for the relay.
    pub fn derived(negotiated: Negotiated, secrets: ExtractedSecrets, is_client: bool) -> Self {
        Established {
            negotiated,
            leftover_plaintext: Vec::new(),
            leftover_ciphertext: Vec::new(),
            conn: Session::Derived {
                secrets: Box::new(secrets),
                is_client,
            },
        }
    }

    /// The root of derived connection keys this session leaves both ends, and what it is
    /// bound to (the peer identity, its leaf's notAfter and `own_not_after`, the one this end
    /// presented, policy generation `generation`, an expiry `lifetime` from now, at most
    /// `max_connections` derived from it). Call before
    /// the keys move on. `None` for a session that
    /// cannot export: a kTLS client's (rustls' unbuffered client has no exporter), a derived
    /// one, or a peer leaf that does not parse.
    pub fn derived_root(
        &self,
        generation: u64,
        lifetime: Duration,
        max_connections: u64,
        own_not_after: std::time::SystemTime,
    ) -> Option<(super::derived::Root, super::derived::Binding)> {
        let Session::Rustls(conn) = &self.conn else {
            return None;
        };
        let len = self
            .negotiated
            .suite
            .tls13()?
            .common
            .hash_provider
            .output_len();
        let mut secret = zeroize::Zeroizing::new([0u8; 64]);
        let secret = conn
            .export_keying_material(
                &mut secret[..len.min(64)],
                super::derived::EXPORTER_LABEL,
                None,
            )
            .ok()?;
        let root = super::derived::Root::new(self.negotiated.suite, secret)?;
        let leaf = conn.peer_certificates()?.first()?;
        let (_, peer_not_after) = super::cache::validity(leaf)?;
        Some((
            root,
            super::derived::Binding {
                peer: self.negotiated.peer.clone(),
                group: self.negotiated.group,
                peer_not_after,
                own_not_after: own_not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                generation,
                expires: std::time::Instant::now() + lifetime,
                max_connections,
            },
        ))
    }

    /// Seals `data` as this session's first application records and writes them to `sock`,
    /// before any relay runs: the app's bytes that rode behind a refused derived header
    /// (`handshake::derived`), sent again on the handshake that replaced it. The sequence
    /// numbers move on with them, so the kernel or the relay continues after. Only a buffered
    /// rustls session can seal here; the others report it (the caller then fails the flow
    /// rather than lose the bytes).
    pub async fn send_first(&mut self, sock: &mut TcpStream, data: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        if data.is_empty() {
            return Ok(());
        }
        let records = match &mut self.conn {
            Session::Rustls(conn) => {
                conn.writer().write_all(data)?;
                let mut records = Vec::with_capacity(data.len() + 64);
                while conn.wants_write() {
                    conn.write_tls(&mut records)?;
                }
                records
            }
            // A kTLS client's unbuffered session (after a refused root, toward an agent that
            // keeps none): rustls seals them too, and the sequence number it hands the kernel
            // afterwards counts them.
            Session::KernelClient(conn) => seal_unbuffered(conn, data)?,
            Session::Derived { .. } => {
                return Err(io::Error::other(
                    "this session cannot seal records before its hand-off",
                ));
            }
        };
        sock.write_all(&records).await
    }

    /// The authenticated identity of the other end.
    pub fn peer(&self) -> &SpiffeId {
        &self.negotiated.peer
    }

    /// Extracts the session keys and record sequence numbers for kernel TLS.
    ///
    /// Consumes the session: after this nothing in userspace can encrypt for it, so a failure
    /// here or in the install that follows means the connection must be closed.
    pub fn into_ktls_secrets(self) -> Result<KtlsHandoff, KtlsError> {
        if !self.leftover_ciphertext.is_empty() {
            // The kernel would start decrypting mid-stream: only record-exact reads hand off.
            return Err(KtlsError::UnsupportedSecrets(format!(
                "{} bytes of the peer's records were read past the handshake; kernel TLS needs \
                 them still on the socket (record-exact handshake reads)",
                self.leftover_ciphertext.len()
            )));
        }
        let unsupported = |e: rustls::Error| KtlsError::UnsupportedSecrets(e.to_string());
        let (secrets, tickets) = match self.conn {
            Session::Rustls(conn) => (conn.dangerous_extract_secrets().map_err(unsupported)?, None),
            Session::KernelClient(conn) => {
                let (secrets, kernel) = conn
                    .dangerous_into_kernel_connection()
                    .map_err(unsupported)?;
                (secrets, Some(Box::new(kernel)))
            }
            Session::Derived { secrets, .. } => (*secrets, None),
        };
        Ok(KtlsHandoff {
            negotiated: self.negotiated,
            leftover_plaintext: self.leftover_plaintext,
            secrets: SessionSecrets::try_from(secrets)?,
            tickets,
        })
    }
}

impl std::fmt::Debug for KtlsHandoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KtlsHandoff")
            .field("negotiated", &self.negotiated)
            .field("leftover_plaintext", &self.leftover_plaintext.len())
            .field("secrets", &self.secrets)
            .field("tickets", &self.tickets.is_some())
            .finish()
    }
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("negotiated", &self.negotiated)
            .field("leftover_plaintext", &self.leftover_plaintext.len())
            .field("leftover_ciphertext", &self.leftover_ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// How the driver reads the peer's handshake records from the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    /// The 5-byte header, then that record's body: nothing past the handshake leaves the
    /// kernel's queue. Required when kernel TLS may take the session over.
    RecordExact,
    /// As much as the socket holds (up to one maximal record): fewer system calls. Bytes past
    /// the handshake come back in [`Established::leftover_ciphertext`]; only for a session
    /// that stays in userspace.
    Ahead,
}

/// The outbound side: handshakes as a client on `sock`, which is connected to the peer agent.
///
/// `server_name` is never checked or sent (see `handshake::client_config`); the destination IP
/// is a natural choice.
pub async fn client_handshake(
    sock: &mut TcpStream,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timeout: Duration,
) -> Result<Established, DriveError> {
    client_handshake_with(sock, config, server_name, timeout, Reads::RecordExact).await
}

/// [`client_handshake`] with a choice of [`Reads`].
pub async fn client_handshake_with(
    sock: &mut TcpStream,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timeout: Duration,
    reads: Reads,
) -> Result<Established, DriveError> {
    let conn = client_connection(config, server_name)?;
    client_handshake_prepared(sock, conn, timeout, reads).await
}

/// A client connection whose first flight (the ClientHello, with its key shares) is already
/// built. Building it before the TCP connect keeps key generation (ML-KEM-768 is the costly
/// part) off the path between connect and ClientHello: the peer agent times that gap to tell
/// mesh clients from server-speaks-first plaintext ones.
pub fn client_connection(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
) -> Result<ClientConnection, HandshakeError> {
    ClientConnection::new(config, server_name).map_err(HandshakeError::from)
}

/// [`client_handshake_with`] on a connection from [`client_connection`].
pub async fn client_handshake_prepared(
    sock: &mut TcpStream,
    conn: ClientConnection,
    timeout: Duration,
    reads: Reads,
) -> Result<Established, DriveError> {
    drive_boxed(sock, Box::new(conn.into()), timeout, reads).await
}

/// The inbound side: handshakes as a server on an accepted `sock`.
pub async fn server_handshake(
    sock: &mut TcpStream,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<Established, DriveError> {
    server_handshake_with(sock, config, timeout, Reads::RecordExact).await
}

/// [`server_handshake`] with a choice of [`Reads`].
pub async fn server_handshake_with(
    sock: &mut TcpStream,
    config: Arc<ServerConfig>,
    timeout: Duration,
    reads: Reads,
) -> Result<Established, DriveError> {
    let conn = ServerConnection::new(config).map_err(HandshakeError::from)?;
    drive_boxed(sock, Box::new(conn.into()), timeout, reads).await
}

/// Runs `conn`'s handshake over `sock` to completion, record by record, within `timeout`.
pub async fn drive(
    sock: &mut TcpStream,
    conn: Connection,
    timeout: Duration,
) -> Result<Established, DriveError> {
    drive_boxed(sock, Box::new(conn), timeout, Reads::RecordExact).await
}

async fn drive_boxed(
    sock: &mut TcpStream,
    mut conn: Box<Connection>,
    timeout: Duration,
    reads: Reads,
) -> Result<Established, DriveError> {
    let mut retried = Retried::default();
    let exchanged = match reads {
        Reads::RecordExact => {
            tokio::time::timeout(timeout, exchange(sock, &mut conn, &mut retried))
                .await
                .map(|r| r.map(|()| Vec::new()))
        }
        Reads::Ahead => {
            tokio::time::timeout(timeout, exchange_ahead(sock, &mut conn, &mut retried)).await
        }
    };
    let leftover_ciphertext = match exchanged {
        Ok(Ok(rest)) => rest,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(DriveError::Timeout(timeout)),
    };
    let negotiated = negotiated_after(&conn, retried.0)?;
    let leftover_plaintext = drain_plaintext(&mut conn)?;
    Ok(Established {
        negotiated,
        leftover_plaintext,
        leftover_ciphertext,
        conn: Session::Rustls(conn),
    })
}

/// A client connection for a session the kernel will carry ([`Session::KernelClient`]); like
/// [`client_connection`], its first flight is built at once.
pub fn kernel_client_connection(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
) -> Result<UnbufferedClientConnection, HandshakeError> {
    UnbufferedClientConnection::new(config, server_name).map_err(HandshakeError::from)
}

/// The outbound handshake of a session bound for kernel TLS, through rustls' unbuffered API
/// and with record-exact reads: the result's keys (and its [`TicketSink`]) come from
/// [`Established::into_ktls_secrets`]; it cannot be relayed in userspace.
///
/// `attach_ulp`: attach the `tls` ULP as soon as the peer's first record header arrives. For
/// a socket whose connect waits for the ClientHello (TCP Fast Open), which the kernel refuses
/// the ULP until it is established: the server's first bytes prove it is, and arrive before
/// the server can have sent a FIN (which would make the kernel refuse the ULP too). A refusal
/// then shows when the relay attaches it again and fails the flow.
pub async fn client_handshake_kernel(
    sock: &mut TcpStream,
    mut conn: UnbufferedClientConnection,
    timeout: Duration,
    attach_ulp: bool,
) -> Result<Established, DriveError> {
    let mut retried = Retried::default();
    let exchanged = exchange_unbuffered(sock, &mut conn, attach_ulp, &mut retried);
    let leftover_plaintext = match tokio::time::timeout(timeout, exchanged).await {
        Ok(r) => r?,
        Err(_) => return Err(DriveError::Timeout(timeout)),
    };
    let negotiated = negotiated_after(&conn, retried.0)?;
    Ok(Established {
        negotiated,
        leftover_plaintext,
        leftover_ciphertext: Vec::new(),
        conn: Session::KernelClient(Box::new(conn)),
    })
}

/// `data` as application records of an unbuffered client whose handshake is done.
fn seal_unbuffered(conn: &mut UnbufferedClientConnection, data: &[u8]) -> io::Result<Vec<u8>> {
    let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
    let Ok(ConnectionState::WriteTraffic(mut traffic)) = state else {
        return Err(io::Error::other(
            "the unbuffered session cannot send application data yet",
        ));
    };
    // Per record: a 5-byte header, the content type and a 16-byte tag.
    let mut records = vec![0; data.len() + (data.len() / 16_384 + 1) * 22];
    loop {
        match traffic.encrypt(data, &mut records) {
            Ok(n) => {
                records.truncate(n);
                return Ok(records);
            }
            Err(rustls::unbuffered::EncryptError::InsufficientSize(s)) => {
                records.resize(s.required_size, 0);
            }
            Err(e) => return Err(io::Error::other(format!("sealing the first records: {e}"))),
        }
    }
}

/// [`exchange`] for an unbuffered client: the header of each record, then its body, go to
/// rustls as they arrive (so a peer that does not speak TLS is refused on its first header, as
/// in [`exchange`]), its output is written as rustls releases it, until rustls may send
/// application data. Returns application data the peer sent within the handshake (none in
/// practice).
async fn exchange_unbuffered(
    sock: &mut TcpStream,
    conn: &mut UnbufferedClientConnection,
    mut attach_ulp: bool,
    retried: &mut Retried,
) -> Result<Vec<u8>, DriveError> {
    // What rustls has not discarded yet: the record being read, plus any handshake message
    // that continues into it from earlier records.
    let mut incoming: Vec<u8> = Vec::with_capacity(RECORD_HEADER + MAX_RECORD_BODY);
    let mut outgoing: Vec<u8> = vec![0; 4096];
    let mut out_len = 0;
    let mut plaintext = Vec::new();
    // Body length of the record whose header rustls has seen, while its body is awaited.
    let mut body_due: Option<usize> = None;
    let mut failed: Option<rustls::Error> = None;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut incoming);
        let mut blocked = false;
        match state {
            // After a failure rustls hands out its alert to encode, then fails again (before
            // asking for the transmission if the failed record held more messages): send
            // what was encoded, best effort, and report the first error.
            Err(e) => match failed.take() {
                Some(first) => {
                    if out_len > 0 {
                        let _ = sock.write_all(&outgoing[..out_len]).await;
                    }
                    return Err(HandshakeError::from(first).into());
                }
                None => failed = Some(e),
            },
            Ok(ConnectionState::EncodeTlsData(mut data)) => loop {
                match data.encode(&mut outgoing[out_len..]) {
                    Ok(n) => {
                        out_len += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(s)) => {
                        outgoing.resize(out_len + s.required_size, 0);
                    }
                    Err(e) => {
                        return Err(DriveError::Io(io::Error::other(format!(
                            "rustls could not encode a handshake message: {e}"
                        ))));
                    }
                }
            },
            Ok(ConnectionState::TransmitTlsData(data)) => {
                sock.write_all(&outgoing[..out_len])
                    .await
                    .map_err(DriveError::Io)?;
                out_len = 0;
                data.done();
            }
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(HandshakeError::from)?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
            }
            Ok(ConnectionState::WriteTraffic(_)) => {
                if out_len > 0 {
                    sock.write_all(&outgoing[..out_len])
                        .await
                        .map_err(DriveError::Io)?;
                }
                return Ok(plaintext);
            }
            Ok(ConnectionState::BlockedHandshake) => blocked = true,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(DriveError::PeerClosed);
            }
            Ok(_) => {
                return Err(DriveError::Io(io::Error::other(
                    "unexpected rustls state during a client handshake",
                )));
            }
        }
        retried.note(conn);
        incoming.drain(..discard);
        if !blocked {
            continue;
        }
        if let Some(e) = failed.take() {
            if out_len > 0 {
                let _ = sock.write_all(&outgoing[..out_len]).await;
            }
            return Err(HandshakeError::from(e).into());
        }
        let start = incoming.len();
        match body_due.take() {
            Some(len) => {
                incoming.resize(start + len, 0);
                read_exact(sock, &mut incoming[start..]).await?;
            }
            None => {
                incoming.resize(start + RECORD_HEADER, 0);
                read_exact(sock, &mut incoming[start..]).await?;
                if std::mem::take(&mut attach_ulp) {
                    let _ = crate::ktls::attach_ulp(std::os::fd::AsFd::as_fd(&*sock));
                }
                let len = usize::from(u16::from_be_bytes([
                    incoming[start + 3],
                    incoming[start + 4],
                ]));
                if len > MAX_RECORD_BODY {
                    return Err(DriveError::RecordTooLong { len });
                }
                body_due = Some(len);
            }
        }
    }
}

/// Whether the handshake went through a HelloRetryRequest. rustls reports one only until the
/// handshake resumes a session (`HandshakeKind::Resumed` then replaces
/// `FullWithHelloRetryRequest`), so it is noted after each step: the retry is always
/// processed (client) or sent (server) in an earlier step than the resumption, since the
/// client's second ClientHello lies between them.
#[derive(Default)]
struct Retried(bool);

impl Retried {
    fn note(&mut self, conn: &CommonState) {
        self.0 |= conn.handshake_kind() == Some(HandshakeKind::FullWithHelloRetryRequest);
    }
}

async fn exchange(
    sock: &mut TcpStream,
    conn: &mut Connection,
    retried: &mut Retried,
) -> Result<(), DriveError> {
    let mut record = Vec::with_capacity(RECORD_HEADER + MAX_RECORD_BODY);
    loop {
        flush(sock, conn).await?;
        if !conn.is_handshaking() {
            return Ok(());
        }

        record.clear();
        record.resize(RECORD_HEADER, 0);
        read_exact(sock, &mut record).await?;
        // rustls validates the header on its own (content type, version, length), so a peer
        // that does not speak TLS is refused with the proper alert before its "body" is awaited.
        feed(sock, conn, &record, retried).await?;
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        if len > MAX_RECORD_BODY {
            return Err(DriveError::RecordTooLong { len });
        }
        record.resize(len, 0);
        read_exact(sock, &mut record).await?;
        feed(sock, conn, &record, retried).await?;
    }
}

/// [`exchange`] with reads as large as the socket offers. The records are fed exactly as
/// there (header, then body, one record at a time); returns what was read past the record
/// that completed the handshake.
async fn exchange_ahead(
    sock: &mut TcpStream,
    conn: &mut Connection,
    retried: &mut Retried,
) -> Result<Vec<u8>, DriveError> {
    // Room for one maximal record: once the consumed prefix is dropped, a record that is not
    // complete yet always fits.
    let mut buf: Vec<u8> = Vec::with_capacity(RECORD_HEADER + MAX_RECORD_BODY);
    // Start of the first record not fed completely, and whether its header was fed.
    let mut pos = 0;
    let mut header_fed = false;
    loop {
        flush(sock, conn).await?;
        if !conn.is_handshaking() {
            if pos == buf.len() {
                // The usual case; do not keep the read buffer's memory alive.
                return Ok(Vec::new());
            }
            buf.drain(..pos);
            return Ok(buf);
        }
        let avail = buf.len() - pos;
        if avail >= RECORD_HEADER {
            let header = &buf[pos..pos + RECORD_HEADER];
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if !header_fed {
                // As in `exchange`: rustls judges the header before the body is awaited.
                feed(sock, conn, header, retried).await?;
                header_fed = true;
                if len > MAX_RECORD_BODY {
                    return Err(DriveError::RecordTooLong { len });
                }
            }
            if avail >= RECORD_HEADER + len {
                let body = &buf[pos + RECORD_HEADER..pos + RECORD_HEADER + len];
                feed(sock, conn, body, retried).await?;
                pos += RECORD_HEADER + len;
                header_fed = false;
                continue;
            }
        }
        // The record at `pos` is incomplete: move it to the front and read more.
        buf.drain(..pos);
        pos = 0;
        debug_assert!(buf.len() < buf.capacity());
        match sock.read_buf(&mut buf).await {
            Ok(0) => return Err(DriveError::PeerClosed),
            Ok(_) => {}
            Err(e) => return Err(DriveError::Io(e)),
        }
    }
}

/// Hands `bytes` to rustls and processes them. On a TLS error the alert rustls queued is sent
/// (best effort) so the peer's log can say why, then the error is returned.
async fn feed(
    sock: &mut TcpStream,
    conn: &mut Connection,
    bytes: &[u8],
    retried: &mut Retried,
) -> Result<(), DriveError> {
    let mut rest = bytes;
    while !rest.is_empty() {
        // Reading from a slice cannot fail; a zero-length read would mean rustls refuses more
        // input, which it only does for a full plaintext buffer (impossible mid-handshake).
        let n = conn.read_tls(&mut rest).map_err(DriveError::Io)?;
        if n == 0 {
            return Err(DriveError::Io(io::Error::other(
                "rustls accepted no handshake bytes",
            )));
        }
        if let Err(e) = conn.process_new_packets() {
            let _ = flush(sock, conn).await;
            return Err(HandshakeError::from(e).into());
        }
        retried.note(conn);
    }
    Ok(())
}

async fn flush(sock: &mut TcpStream, conn: &mut Connection) -> Result<(), DriveError> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).map_err(DriveError::Io)?;
    }
    if !out.is_empty() {
        sock.write_all(&out).await.map_err(DriveError::Io)?;
    }
    Ok(())
}

async fn read_exact(sock: &mut TcpStream, buf: &mut [u8]) -> Result<(), DriveError> {
    match sock.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(DriveError::PeerClosed),
        Err(e) => Err(DriveError::Io(e)),
    }
}

/// Takes whatever application data rustls decrypted during the handshake.
fn drain_plaintext(conn: &mut Connection) -> Result<Vec<u8>, DriveError> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match io::Read::read(&mut conn.reader(), &mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
            Err(e) => return Err(DriveError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ca::{Ca, CertificateAuthority, DEFAULT_LEAF_TTL},
        handshake::{MeshCrypto, client_config, mesh_roots, server_config},
        identity::TrustDomain,
        test_tls::{loopback_name as name, tcp_pair},
    };

    const CLIENT_ID: &str = "spiffe://cluster.local/ns/frontend/sa/web";
    const SERVER_ID: &str = "spiffe://cluster.local/ns/backend/sa/api";
    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Configs {
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    }

    fn configs(expected_server: &str) -> Configs {
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let ca = Ca::generate(&td).unwrap();
        let roots = mesh_roots(ca.roots()).unwrap();
        let c = ca
            .issue(&CLIENT_ID.parse().unwrap(), DEFAULT_LEAF_TTL)
            .unwrap();
        let s = ca
            .issue(&SERVER_ID.parse().unwrap(), DEFAULT_LEAF_TTL)
            .unwrap();
        Configs {
            client: client_config(
                &c,
                Arc::clone(&roots),
                &td,
                &expected_server.parse().unwrap(),
                &MeshCrypto::default_aes_gcm(),
            )
            .unwrap(),
            server: server_config(&s, roots, &td, &MeshCrypto::default_aes_gcm()).unwrap(),
        }
    }

    /// The client's first application record follows its Finished immediately; the server
    /// must leave it in the socket for the kernel (or the relay) to decrypt.
    #[tokio::test]
    async fn stops_at_the_last_handshake_record() {
        let cfg = configs(SERVER_ID);
        let (mut c, mut s) = tcp_pair().await;
        let client = tokio::spawn(async move {
            let mut est = client_handshake(&mut c, cfg.client, name(), TIMEOUT)
                .await
                .unwrap();
            io::Write::write_all(&mut est.conn.rustls().unwrap().writer(), b"first request")
                .unwrap();
            let mut out = Vec::new();
            est.conn.rustls().unwrap().write_tls(&mut out).unwrap();
            c.write_all(&out).await.unwrap();
            (c, est)
        });
        let server_cfg = cfg.server;
        let mut est = server_handshake(&mut s, server_cfg, TIMEOUT).await.unwrap();
        let (_c, client_est) = client.await.unwrap();
        assert!(est.leftover_plaintext.is_empty());
        assert_eq!(est.peer().to_string(), CLIENT_ID);
        assert_eq!(client_est.peer().to_string(), SERVER_ID);

        // What is left on the socket is exactly one application-data record...
        let mut header = [0u8; RECORD_HEADER];
        s.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[..3], &[23, 3, 3]);
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        // ...that the session, continuing from where the driver stopped, decrypts.
        est.conn
            .rustls()
            .unwrap()
            .read_tls(&mut &header[..])
            .unwrap();
        est.conn.rustls().unwrap().read_tls(&mut &body[..]).unwrap();
        est.conn.rustls().unwrap().process_new_packets().unwrap();
        let mut got = vec![0u8; 64];
        let n = io::Read::read(&mut est.conn.rustls().unwrap().reader(), &mut got).unwrap();
        assert_eq!(&got[..n], b"first request");
    }

    /// A kTLS client (unbuffered handshake, then [`KernelConnection`]) keeps the ticket the
    /// server sends right after the handshake, though it arrives only once the keys have left
    /// rustls; the next connection resumes with it. The record is decrypted here with the
    /// extracted keys, as the kernel does for the relay.
    #[tokio::test]
    async fn a_kernel_client_keeps_the_ticket_that_follows_the_hand_off() {
        use std::sync::atomic::AtomicU64;

        use rustls::{
            ConnectionTrafficSecrets as S, ContentType, ProtocolVersion,
            crypto::{
                aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256, cipher::InboundOpaqueMessage,
            },
        };

        use crate::handshake::{SessionResumption, client_config_with, server_config_with};

        let td: TrustDomain = "cluster.local".parse().unwrap();
        let ca = Ca::generate(&td).unwrap();
        let roots = mesh_roots(ca.roots()).unwrap();
        let crypto = MeshCrypto::default_aes_gcm();
        let rules = SessionResumption::new(Duration::from_secs(60), Arc::new(AtomicU64::new(1)));
        let c = ca
            .issue(&CLIENT_ID.parse().unwrap(), DEFAULT_LEAF_TTL)
            .unwrap();
        let s = ca
            .issue(&SERVER_ID.parse().unwrap(), DEFAULT_LEAF_TTL)
            .unwrap();
        let cc = client_config_with(
            &c,
            Arc::clone(&roots),
            &td,
            &SERVER_ID.parse().unwrap(),
            &crypto,
            &rules,
        )
        .unwrap();
        let sc = server_config_with(&s, roots, &td, &crypto, &rules).unwrap();

        let connect = |cc: Arc<ClientConfig>, sc: Arc<ServerConfig>| async move {
            let (mut c, mut s) = tcp_pair().await;
            let server = tokio::spawn(async move {
                let est = server_handshake(&mut s, sc, TIMEOUT).await.unwrap();
                (s, est)
            });
            let conn = kernel_client_connection(cc, name()).unwrap();
            let est = client_handshake_kernel(&mut c, conn, TIMEOUT, false)
                .await
                .unwrap();
            let (s, server_est) = server.await.unwrap();
            (c, est, s, server_est)
        };

        let (mut c, est, _s, server_est) = connect(Arc::clone(&cc), Arc::clone(&sc)).await;
        assert!(!est.negotiated.resumed && !server_est.negotiated.resumed);
        let Session::KernelClient(conn) = est.conn else {
            panic!("a kernel client session")
        };
        let (secrets, mut sink) = conn.dangerous_into_kernel_connection().unwrap();
        assert_eq!(secrets.rx.0, 0, "the ticket is still on the socket");
        let S::Aes128Gcm { key, iv } = secrets.rx.1 else {
            panic!("AES-128-GCM")
        };
        let mut record = vec![0u8; RECORD_HEADER];
        c.read_exact(&mut record).await.unwrap();
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).await.unwrap();
        let mut decrypter = TLS13_AES_128_GCM_SHA256
            .tls13()
            .unwrap()
            .aead_alg
            .decrypter(key, iv);
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut body,
        );
        let plain = decrypter.decrypt(msg, 0).unwrap();
        assert_eq!(plain.typ, ContentType::Handshake);
        let [4, l0, l1, l2, ticket @ ..] = plain.payload else {
            panic!("a NewSessionTicket")
        };
        assert_eq!(
            u32::from_be_bytes([0, *l0, *l1, *l2]) as usize,
            ticket.len()
        );
        sink.handle_new_session_ticket(ticket).unwrap();

        let (_c, est, _s, server_est) = connect(cc, sc).await;
        assert!(est.negotiated.resumed, "the kept ticket resumes");
        assert!(server_est.negotiated.resumed);
        assert_eq!(est.peer().to_string(), SERVER_ID);
    }

    #[tokio::test]
    async fn secrets_continue_where_the_handshake_stopped() {
        let cfg = configs(SERVER_ID);
        let (mut c, mut s) = tcp_pair().await;
        let client =
            tokio::spawn(
                async move { client_handshake(&mut c, cfg.client, name(), TIMEOUT).await },
            );
        let server = server_handshake(&mut s, cfg.server, TIMEOUT).await.unwrap();
        let client = client.await.unwrap().unwrap();
        let c = client.into_ktls_secrets().unwrap();
        let s = server.into_ktls_secrets().unwrap();
        assert_eq!(c.secrets.cipher, crate::ktls::Cipher::Aes128Gcm);
        // Nothing was sent under the traffic keys yet, in either direction.
        assert_eq!((c.secrets.tx.seq(), c.secrets.rx.seq()), (0, 0));
        assert_eq!((s.secrets.tx.seq(), s.secrets.rx.seq()), (0, 0));
        assert_eq!(c.negotiated.peer.to_string(), SERVER_ID);
    }

    /// Reading ahead: the client's first application record arrives in the same write as its
    /// Finished. The server reads both at once, feeds rustls only up to the Finished and
    /// returns the record, which the session then decrypts; the kernel refuses such a session.
    #[tokio::test]
    async fn reading_ahead_returns_the_records_past_the_handshake() {
        let cfg = configs(SERVER_ID);
        let (mut c, mut s) = tcp_pair().await;
        let server = tokio::spawn(async move {
            let est = server_handshake_with(&mut s, cfg.server, TIMEOUT, Reads::Ahead).await;
            (s, est)
        });
        // A client driven by hand, so that its Finished and its first record go out in one
        // write.
        let mut conn = Connection::from(ClientConnection::new(cfg.client, name()).unwrap());
        let mut buf = vec![0u8; 1 << 16];
        while conn.is_handshaking() {
            let mut out = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut out).unwrap();
            }
            if !conn.is_handshaking() {
                break;
            }
            c.write_all(&out).await.unwrap();
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0);
            conn.read_tls(&mut &buf[..n]).unwrap();
            conn.process_new_packets().unwrap();
        }
        io::Write::write_all(&mut conn.writer(), b"first request").unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        c.write_all(&out).await.unwrap();

        let (_s, est) = server.await.unwrap();
        let mut est = est.unwrap();
        assert_eq!(est.peer().to_string(), CLIENT_ID);
        assert!(est.leftover_plaintext.is_empty());
        assert!(!est.leftover_ciphertext.is_empty());
        let rest = est.leftover_ciphertext.clone();
        est.conn.rustls().unwrap().read_tls(&mut &rest[..]).unwrap();
        est.conn.rustls().unwrap().process_new_packets().unwrap();
        let mut got = vec![0u8; 64];
        let n = io::Read::read(&mut est.conn.rustls().unwrap().reader(), &mut got).unwrap();
        assert_eq!(&got[..n], b"first request");

        // The same session shape, unfed records and all, cannot go to the kernel.
        let (mut c2, mut s2) = tcp_pair().await;
        let cfg = configs(SERVER_ID);
        let client = tokio::spawn(async move {
            client_handshake_with(&mut c2, cfg.client, name(), TIMEOUT, Reads::Ahead).await
        });
        let mut server = server_handshake(&mut s2, cfg.server, TIMEOUT)
            .await
            .unwrap();
        client.await.unwrap().unwrap();
        server.leftover_ciphertext = b"unfed".to_vec();
        assert!(matches!(
            server.into_ktls_secrets(),
            Err(KtlsError::UnsupportedSecrets(_))
        ));
    }

    #[tokio::test]
    async fn wrong_identity_is_reported_on_both_sides() {
        wrong_identity(false).await;
    }

    /// The same through the unbuffered client of kTLS nodes: its alert reaches the server.
    #[tokio::test]
    async fn wrong_identity_is_reported_on_both_sides_by_a_kernel_client() {
        wrong_identity(true).await;
    }

    async fn wrong_identity(kernel: bool) {
        let cfg = configs("spiffe://cluster.local/ns/backend/sa/other");
        let (mut c, mut s) = tcp_pair().await;
        let client = tokio::spawn(async move {
            if kernel {
                let conn = kernel_client_connection(cfg.client, name()).unwrap();
                client_handshake_kernel(&mut c, conn, TIMEOUT, false).await
            } else {
                client_handshake(&mut c, cfg.client, name(), TIMEOUT).await
            }
        });
        let server = server_handshake(&mut s, cfg.server, TIMEOUT).await;
        let client = client.await.unwrap();
        match client {
            Err(DriveError::Handshake(e @ HandshakeError::PeerIdentity(_))) => assert_eq!(
                e.to_string(),
                "peer presented spiffe://cluster.local/ns/backend/sa/api, expected \
                 spiffe://cluster.local/ns/backend/sa/other"
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(
                server,
                Err(DriveError::Handshake(HandshakeError::RefusedByPeer(_)))
            ),
            "{server:?}"
        );
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let cfg = configs(SERVER_ID);
        let (_c, mut s) = tcp_pair().await;
        let t = Duration::from_millis(200);
        let r = server_handshake(&mut s, cfg.server, t).await;
        assert!(matches!(r, Err(DriveError::Timeout(d)) if d == t), "{r:?}");
    }

    /// A plaintext client is refused from its first five bytes, not after the timeout.
    #[tokio::test]
    async fn non_tls_peer_is_refused_at_once() {
        let cfg = configs(SERVER_ID);
        let (mut c, mut s) = tcp_pair().await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let r = server_handshake(&mut s, cfg.server, TIMEOUT).await;
        assert!(
            matches!(r, Err(DriveError::Handshake(HandshakeError::Tls(_)))),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn peer_hanging_up_mid_handshake() {
        let cfg = configs(SERVER_ID);
        let (c, mut s) = tcp_pair().await;
        drop(c);
        let r = server_handshake(&mut s, cfg.server, TIMEOUT).await;
        assert!(matches!(r, Err(DriveError::PeerClosed)), "{r:?}");
    }
}
