//! The TLS 1.3 record layer the userspace relay switches to once rustls has nothing left to
//! do on a flow (handshake done, the session ticket received, every record it was given
//! processed).
//!
//! Why: rustls' buffered connection keeps a receive buffer of at least 4 KiB, its session
//! state and the peer's certificate for as long as the flow lives, even while the flow is idle.
//! After the switch a flow end holds only the two AEAD contexts and two sequence numbers; every
//! buffer is the relay's own and is released when the flow goes quiet.
//!
//! RFC 8446 §5 on aws-lc's AEAD (the one rustls uses), with the keys of
//! `dangerous_extract_secrets`: nonce = IV XOR the 64-bit sequence number, additional data =
//! the record header, inner plaintext = content, type, zero padding (stripped on receipt),
//! record size limits, sequence numbers continuing where rustls stopped. rustls' own AES-GCM
//! sealing key cannot be used for this: aws-lc's TLS 1.3 sealing key insists the first record it
//! seals is number 0. Sealing writes straight into the relay's output buffer and opening
//! decrypts in place, so no record is copied into a buffer of its own. Its limits match the
//! kernel relay's:
//! no KeyUpdate (refused, the flow is reset), reset before the AEAD usage limit, a
//! NewSessionTicket that arrives after the switch is dropped (resumption keeps the one taken
//! before it), any other post-handshake message is refused.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{AlertDescription, ConnectionTrafficSecrets, ContentType, ExtractedSecrets};

/// Bytes of a record header: content type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// The most plaintext one record carries (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The longest encrypted record body a peer may send (RFC 8446 §5.2).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// The longest whole record on the wire.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;

const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// Why a record from the peer (or a record to it) cannot be handled. Every one ends the flow;
/// [`RecordError::alert`] is what to tell the peer first.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum RecordError {
    /// The header announces a body longer than RFC 8446 allows.
    #[error("record body of {0} bytes; TLS 1.3 allows at most {MAX_CIPHERTEXT}")]
    Oversized(usize),
    /// The outer content type is not application_data (nothing else is valid after the
    /// handshake).
    #[error("record with outer content type {0}; only application_data (23) follows the handshake")]
    OuterType(u8),
    /// Decryption failed: wrong key, wrong sequence number, or tampering.
    #[error("record failed authentication (bad_record_mac)")]
    BadRecordMac,
    /// Decryption worked but the inner plaintext is invalid (all padding, too long, or a
    /// protected change_cipher_spec).
    #[error("invalid inner plaintext: {0}")]
    InnerPlaintext(String),
    /// The peer sent a fatal alert.
    #[error("peer sent alert {0:?}")]
    Alert(AlertDescription),
    /// An alert record that is not exactly one alert.
    #[error("malformed alert record of {0} bytes")]
    MalformedAlert(usize),
    /// A KeyUpdate: refused, as the kernel record layer refuses it.
    #[error("peer sent KeyUpdate, which this record layer does not support")]
    KeyUpdate,
    /// A post-handshake message other than NewSessionTicket (to a client) or KeyUpdate, or one
    /// cut across records.
    #[error("unexpected post-handshake message: {0}")]
    UnexpectedHandshake(String),
    /// An inner content type TLS 1.3 does not define after the handshake.
    #[error("unexpected inner content type {0}")]
    InnerType(u8),
    /// The AEAD usage limit for this key was reached (RFC 8446 §5.5).
    #[error("{0} records under one key, the AEAD usage limit")]
    RecordLimit(u64),
    /// A record to seal was larger than one record may carry (a caller bug).
    #[error("{0} bytes of plaintext do not fit one record")]
    PlaintextTooLong(usize),
}

impl RecordError {
    /// The alert RFC 8446 §6.2 names for this failure; `None` where none is sent (the peer
    /// already failed, or nothing can be sealed any more).
    pub fn alert(&self) -> Option<AlertDescription> {
        match self {
            RecordError::Oversized(_) => Some(AlertDescription::RecordOverflow),
            RecordError::BadRecordMac => Some(AlertDescription::BadRecordMac),
            RecordError::MalformedAlert(_) => Some(AlertDescription::DecodeError),
            RecordError::InnerPlaintext(_)
            | RecordError::OuterType(_)
            | RecordError::KeyUpdate
            | RecordError::UnexpectedHandshake(_)
            | RecordError::InnerType(_) => Some(AlertDescription::UnexpectedMessage),
            RecordError::PlaintextTooLong(_) => Some(AlertDescription::InternalError),
            RecordError::Alert(_) | RecordError::RecordLimit(_) => None,
        }
    }
}

/// What one opened record means for the relay.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: `len` bytes of plaintext now at `record[HEADER_LEN..HEADER_LEN + len]`.
    Data(usize),
    /// A record with nothing for the app (a late session ticket, a user_canceled warning).
    Nothing,
    /// close_notify: the peer sends nothing more.
    CloseNotify,
}

/// One direction's key, IV and next sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<(Direction, u64), rustls::Error> {
        use ConnectionTrafficSecrets as S;
        // AES-GCM: 2^24.5 full records per key (RFC 8446 §5.5); stop at 2^24 like the kernel
        // relay. ChaCha20-Poly1305 has no practical limit; the sequence number must not wrap.
        let (alg, key, iv, limit) = match &secrets {
            S::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, 1 << 24),
            S::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, 1 << 24),
            S::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv, u64::MAX),
            _ => {
                return Err(rustls::Error::General(
                    "the session's cipher has no TLS 1.3 record layer here".into(),
                ));
            }
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| {
            rustls::Error::General(format!("a {}-byte key for {alg:?}", key.as_ref().len()))
        })?;
        let iv: [u8; aead::NONCE_LEN] = iv.as_ref().try_into().map_err(|_| {
            rustls::Error::General(format!("a {}-byte IV (expected 12)", iv.as_ref().len()))
        })?;
        Ok((
            Direction {
                key: LessSafeKey::new(key),
                iv,
                seq,
            },
            limit,
        ))
    }

    /// RFC 8446 §5.3: the sequence number, big-endian and left-padded, XORed into the IV.
    fn nonce(&self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        Nonce::assume_unique_for_key(nonce)
    }

    fn tag_len(&self) -> usize {
        self.key.algorithm().tag_len()
    }
}

/// Both directions of one TLS 1.3 session after the handshake.
pub struct RecordLayer {
    tx: Direction,
    rx: Direction,
    /// Records this end may seal under its key before it must stop.
    tx_limit: u64,
    /// Only a server sends NewSessionTicket: a client may receive one, a server may not.
    is_client: bool,
}

impl RecordLayer {
    /// Takes over a session from rustls. `secrets` come from `dangerous_extract_secrets`;
    /// their sequence numbers are where rustls stopped.
    pub fn new(secrets: ExtractedSecrets, is_client: bool) -> Result<RecordLayer, rustls::Error> {
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let (tx, tx_limit) = Direction::new(tx_seq, tx)?;
        let (rx, _) = Direction::new(rx_seq, rx)?;
        if tx.key.algorithm() != rx.key.algorithm() {
            return Err(rustls::Error::General(
                "the two directions use different ciphers".into(),
            ));
        }
        Ok(RecordLayer {
            tx,
            rx,
            tx_limit,
            is_client,
        })
    }

    /// Records sealed so far under the current key (rustls' count included).
    pub fn tx_seq(&self) -> u64 {
        self.tx.seq
    }

    /// Records opened so far under the current key (rustls' count included).
    pub fn rx_seq(&self) -> u64 {
        self.rx.seq
    }

    /// Appends one application-data record carrying `plain` (at most [`MAX_PLAINTEXT`]
    /// bytes) to `out`.
    pub fn seal_data(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal(ContentType::ApplicationData, plain, out)
    }

    /// Appends an alert record to `out`: close_notify as a warning, anything else fatal.
    pub fn seal_alert(
        &mut self,
        alert: AlertDescription,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let level = if alert == AlertDescription::CloseNotify {
            1
        } else {
            2
        };
        self.seal(ContentType::Alert, &[level, u8::from(alert)], out)
    }

    /// Seals in place at the end of `out`: header, content, type byte, then the tag. We
    /// never pad.
    fn seal(
        &mut self,
        typ: ContentType,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if plain.len() > MAX_PLAINTEXT {
            return Err(RecordError::PlaintextTooLong(plain.len()));
        }
        self.seal_body(plain, Some(u8::from(typ)), out)
    }

    /// Seals `inner` as a whole TLSInnerPlaintext (content, type, padding: whatever the caller
    /// wrote, up to the largest record body), so a fuzz target can reach every path behind
    /// the AEAD. Nothing in the agent calls it.
    #[doc(hidden)]
    pub fn seal_inner_plaintext(
        &mut self,
        inner: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if inner.len() + self.tx.tag_len() > MAX_CIPHERTEXT {
            return Err(RecordError::PlaintextTooLong(inner.len()));
        }
        self.seal_body(inner, None, out)
    }

    fn seal_body(
        &mut self,
        content: &[u8],
        typ: Option<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let start = out.len();
        out.resize(start + self.sealed_len(content.len(), typ.is_some()), 0);
        self.seal_into(content, typ, &mut out[start..])
            .inspect_err(|_| out.truncate(start))
            .map(|_| ())
    }

    /// The length of the record that carries `content` bytes (and the content type byte).
    fn sealed_len(&self, content: usize, typed: bool) -> usize {
        HEADER_LEN + content + usize::from(typed) + self.tx.tag_len()
    }

    /// The length of the application-data record that carries `plain` bytes.
    pub fn sealed_data_len(&self, plain: usize) -> usize {
        self.sealed_len(plain, true)
    }

    /// Seals one application-data record carrying `plain` (at most [`MAX_PLAINTEXT`] bytes)
    /// at the start of `out`, which must hold [`RecordLayer::sealed_data_len`] bytes, and
    /// returns its length. The AEAD reads `plain` and writes the ciphertext into `out`, so
    /// the plaintext is never copied first.
    pub fn seal_data_into(&mut self, plain: &[u8], out: &mut [u8]) -> Result<usize, RecordError> {
        if plain.len() > MAX_PLAINTEXT {
            return Err(RecordError::PlaintextTooLong(plain.len()));
        }
        self.seal_into(plain, Some(u8::from(ContentType::ApplicationData)), out)
    }

    /// Header, then the ciphertext of `content` and of the type byte, then the tag: sealed out
    /// of place from `content` into `out`. We never pad.
    fn seal_into(
        &mut self,
        content: &[u8],
        typ: Option<u8>,
        out: &mut [u8],
    ) -> Result<usize, RecordError> {
        if self.tx.seq >= self.tx_limit {
            return Err(RecordError::RecordLimit(self.tx.seq));
        }
        let total = self.sealed_len(content.len(), typ.is_some());
        let Some(out) = out.get_mut(..total) else {
            // A caller bug: the room given does not fit the record.
            return Err(RecordError::PlaintextTooLong(content.len()));
        };
        let header = header(total - HEADER_LEN);
        let (head, body) = out.split_at_mut(HEADER_LEN);
        head.copy_from_slice(&header);
        let (ciphertext, extra_and_tag) = body.split_at_mut(content.len());
        let typ = typ.map(|t| [t]);
        self.tx
            .key
            .seal_out_of_place_scatter(
                self.tx.nonce(),
                Aad::from(header),
                content,
                ciphertext,
                typ.as_ref().map_or(&[][..], |t| &t[..]),
                extra_and_tag,
            )
            .map_err(|_| RecordError::InnerPlaintext("the AEAD refused to seal".into()))?;
        self.tx.seq += 1;
        Ok(total)
    }

    /// Decrypts one whole record (`record` is exactly [`record_len`]'s bytes, header
    /// included) in place. A record that fails leaves the sequence number where it was.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        let body_len = check_header(record)?.ok_or(RecordError::Oversized(record.len()))?;
        if record.len() != HEADER_LEN + body_len {
            return Err(RecordError::Oversized(record.len()));
        }
        if self.rx.seq == u64::MAX {
            return Err(RecordError::RecordLimit(self.rx.seq));
        }
        if body_len < self.rx.tag_len() {
            return Err(RecordError::BadRecordMac);
        }
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let aad: [u8; HEADER_LEN] = [header[0], header[1], header[2], header[3], header[4]];
        let inner = self
            .rx
            .key
            .open_in_place(self.rx.nonce(), Aad::from(aad), body)
            .map_err(|_| RecordError::BadRecordMac)?;
        self.rx.seq += 1;
        // RFC 8446 §5.4: the whole TLSInnerPlaintext, padding included, is at most 2^14 + 1.
        if inner.len() > MAX_PLAINTEXT + 1 {
            return Err(RecordError::Oversized(inner.len()));
        }
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::InnerPlaintext(
                "no content type (all padding)".into(),
            ));
        };
        let content = &inner[..type_at];
        match ContentType::from(inner[type_at]) {
            ContentType::ApplicationData => Ok(Opened::Data(content.len())),
            ContentType::Alert => match *content {
                [_, 0] => Ok(Opened::CloseNotify),
                // user_canceled is a warning followed by close_notify (RFC 8446 §6.1).
                [_, 90] => Ok(Opened::Nothing),
                [_, d] => Err(RecordError::Alert(AlertDescription::from(d))),
                _ => Err(RecordError::MalformedAlert(content.len())),
            },
            ContentType::Handshake => self.post_handshake(content),
            ContentType::ChangeCipherSpec => Err(RecordError::InnerPlaintext(
                "a protected change_cipher_spec".into(),
            )),
            other => Err(RecordError::InnerType(u8::from(other))),
        }
    }

    /// Walks the handshake messages of one record; every one must be whole.
    fn post_handshake(&self, mut messages: &[u8]) -> Result<Opened, RecordError> {
        if messages.is_empty() {
            return Err(RecordError::UnexpectedHandshake(
                "empty handshake record".into(),
            ));
        }
        while let [typ, a, b, c, rest @ ..] = messages {
            let len = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
            if rest.len() < len {
                return Err(RecordError::UnexpectedHandshake(format!(
                    "message of type {typ} cut across records ({len} bytes announced, {} here)",
                    rest.len()
                )));
            }
            match *typ {
                HANDSHAKE_NEW_SESSION_TICKET if self.is_client => {}
                HANDSHAKE_KEY_UPDATE => return Err(RecordError::KeyUpdate),
                t => {
                    return Err(RecordError::UnexpectedHandshake(format!(
                        "message of type {t}"
                    )));
                }
            }
            messages = &rest[len..];
        }
        if !messages.is_empty() {
            return Err(RecordError::UnexpectedHandshake(format!(
                "{} bytes left after the last whole message",
                messages.len()
            )));
        }
        Ok(Opened::Nothing)
    }
}

/// The length of the first record in `buf` if it is whole; `None` if more bytes are needed.
/// Fails as soon as the header is wrong, before the body arrives.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    Ok(check_header(buf)?.and_then(|body| {
        let len = HEADER_LEN + body;
        (buf.len() >= len).then_some(len)
    }))
}

/// The length of the record that starts `buf`, as its header announces it, whole or not yet
/// (`None` until the header is).
pub fn announced_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    Ok(check_header(buf)?.map(|body| HEADER_LEN + body))
}

/// The body length the header at the start of `buf` announces, once the header is whole.
fn check_header(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        // A wrong content type shows in the first byte: no need to wait for the rest.
        return match buf.first() {
            Some(&t) if t != u8::from(ContentType::ApplicationData) => {
                Err(RecordError::OuterType(t))
            }
            _ => Ok(None),
        };
    };
    if header[0] != u8::from(ContentType::ApplicationData) {
        return Err(RecordError::OuterType(header[0]));
    }
    // legacy_record_version is ignored for every purpose but the additional data
    // (RFC 8446 §5.1, §5.2), so a changed one fails authentication.
    let body = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if body > MAX_CIPHERTEXT {
        return Err(RecordError::Oversized(body));
    }
    Ok(Some(body))
}

/// The header every record we seal carries: application_data, 0x0303 (RFC 8446 §5.1).
fn header(body_len: usize) -> [u8; HEADER_LEN] {
    let [hi, lo] = (body_len as u16).to_be_bytes();
    [u8::from(ContentType::ApplicationData), 3, 3, hi, lo]
}

/// Tracks where records start in a byte stream given to rustls piecemeal, so the relay knows
/// when rustls holds no partial record (the condition for taking the session over).
#[derive(Default)]
pub struct Boundary {
    header: [u8; HEADER_LEN],
    have: usize,
    body_left: usize,
}

impl Boundary {
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let k = self.body_left.min(bytes.len());
                self.body_left -= k;
                bytes = &bytes[k..];
                continue;
            }
            let k = (HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + k].copy_from_slice(&bytes[..k]);
            self.have += k;
            bytes = &bytes[k..];
            if self.have == HEADER_LEN {
                self.have = 0;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
            }
        }
    }

    /// Every byte given so far ends a whole record.
    pub fn at_record_start(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, io::Write as _};

    use rustls::{Connection, SupportedCipherSuite, crypto::aws_lc_rs::cipher_suite as cs};

    use super::*;
    use crate::test_tls::finished_pair;

    const SUITES: [SupportedCipherSuite; 3] = [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];

    fn take_over(conn: Connection) -> RecordLayer {
        let is_client = matches!(conn, Connection::Client(_));
        RecordLayer::new(conn.dangerous_extract_secrets().unwrap(), is_client).unwrap()
    }

    /// Two of our own layers with mirrored keys: the client's and the server's.
    fn own_pair(suite: SupportedCipherSuite) -> (RecordLayer, RecordLayer) {
        let (c, s) = finished_pair(suite, 1);
        (take_over(c.into()), take_over(s.into()))
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Opens every whole record in `wire`, returning the data and whether close_notify came.
    fn open_all(layer: &mut RecordLayer, wire: &mut [u8]) -> Result<(Vec<u8>, bool), RecordError> {
        let mut data = Vec::new();
        let mut at = 0;
        while let Some(len) = record_len(&wire[at..])? {
            match layer.open(&mut wire[at..at + len])? {
                Opened::Data(n) => data.extend_from_slice(&wire[at + HEADER_LEN..][..n]),
                Opened::Nothing => {}
                Opened::CloseNotify => return Ok((data, true)),
            }
            at += len;
        }
        assert_eq!(at, wire.len(), "a partial record was left");
        Ok((data, false))
    }

    fn seal_all(layer: &mut RecordLayer, data: &[u8], close: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        for chunk in data.chunks(MAX_PLAINTEXT) {
            layer.seal_data(chunk, &mut wire).unwrap();
        }
        if close {
            layer
                .seal_alert(AlertDescription::CloseNotify, &mut wire)
                .unwrap();
        }
        wire
    }

    /// Our layer talks to rustls in both roles and both directions, for every suite, and
    /// continues rustls' sequence numbers (the ticket and any data before the switch).
    #[test]
    fn own_layer_and_rustls_understand_each_other() {
        for suite in SUITES {
            for own_is_client in [false, true] {
                let (client, server) = finished_pair(suite, 1);
                let (mut peer, own): (Connection, Connection) = if own_is_client {
                    (server.into(), client.into())
                } else {
                    (client.into(), server.into())
                };
                let mut own = take_over(own);
                let data = payload(100_000);

                // rustls → ours.
                peer.set_buffer_limit(None);
                peer.writer().write_all(&data).unwrap();
                peer.send_close_notify();
                let mut wire = Vec::new();
                while peer.wants_write() {
                    peer.write_tls(&mut wire).unwrap();
                }
                let (got, closed) = open_all(&mut own, &mut wire).unwrap();
                assert!(
                    got == data && closed,
                    "{suite:?} own client {own_is_client}"
                );

                // ours → rustls.
                let wire = seal_all(&mut own, &data, true);
                let mut got = Vec::new();
                let mut rd = &wire[..];
                while !rd.is_empty() {
                    peer.read_tls(&mut rd).unwrap();
                    peer.process_new_packets().unwrap();
                    let mut chunk = Vec::new();
                    match peer.reader().read_to_end(&mut chunk) {
                        Ok(_) => {}
                        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
                    }
                    got.extend_from_slice(&chunk);
                }
                assert!(got == data, "{suite:?} own client {own_is_client}");
                // close_notify arrived: the reader reports a clean end.
                assert_eq!(peer.reader().read(&mut [0u8; 1]).unwrap(), 0);
            }
        }
    }

    #[test]
    fn tampering_replay_and_reordering_fail_authentication() {
        let (mut c, mut s) = own_pair(cs::TLS13_AES_128_GCM_SHA256);
        let one = seal_all(&mut c, b"first", false);
        let two = seal_all(&mut c, b"second", false);
        // Every flipped bit of the header's version and of the body fails, and a failure does
        // not move the receiver on.
        for i in (1..3).chain(HEADER_LEN..one.len()) {
            for bit in [0x01, 0x80] {
                let mut bad = one.clone();
                bad[i] ^= bit;
                assert_eq!(s.open(&mut bad), Err(RecordError::BadRecordMac), "byte {i}");
            }
        }
        // Out of order: the second record where the first is expected.
        assert_eq!(s.open(&mut two.clone()), Err(RecordError::BadRecordMac));
        assert_eq!(s.open(&mut one.clone()), Ok(Opened::Data(5)));
        // Replay: the first record again.
        assert_eq!(s.open(&mut one.clone()), Err(RecordError::BadRecordMac));
        assert_eq!(s.open(&mut two.clone()), Ok(Opened::Data(6)));
        // Another session's keys.
        let (mut other, _) = own_pair(cs::TLS13_AES_128_GCM_SHA256);
        let foreign = seal_all(&mut other, b"third", false);
        assert_eq!(s.open(&mut foreign.clone()), Err(RecordError::BadRecordMac));
    }

    #[test]
    fn framing_errors_are_named_before_decryption() {
        // Oversized announced length: refused from the header alone.
        let mut hdr = vec![23, 3, 3, 0x41, 0x01];
        assert_eq!(
            record_len(&hdr),
            Err(RecordError::Oversized(MAX_CIPHERTEXT + 1))
        );
        hdr[3] = 0x41;
        hdr[4] = 0x00;
        assert_eq!(record_len(&hdr), Ok(None));
        // Only application_data may follow the handshake; one byte is enough to tell.
        for t in [20u8, 21, 22, 24, 0, 255] {
            assert_eq!(record_len(&[t]), Err(RecordError::OuterType(t)));
        }
        assert_eq!(record_len(&[]), Ok(None));
        assert_eq!(record_len(&[23, 3, 3, 0]), Ok(None));
        assert_eq!(record_len(&[23, 3, 3, 0, 2, 9]), Ok(None));
        assert_eq!(record_len(&[23, 3, 3, 0, 2, 9, 9, 1]), Ok(Some(7)));
        // Too short to hold a tag.
        let (_, mut s) = own_pair(cs::TLS13_AES_128_GCM_SHA256);
        assert_eq!(
            s.open(&mut [23, 3, 3, 0, 2, 9, 9]),
            Err(RecordError::BadRecordMac)
        );
        // A record longer or shorter than its header says.
        assert!(s.open(&mut [23, 3, 3, 0, 2, 9, 9, 1]).is_err());
    }

    #[test]
    fn inner_content_types() {
        let (mut c, mut s) = own_pair(cs::TLS13_AES_256_GCM_SHA384);
        let mut seal = |typ: ContentType, body: &[u8]| {
            let mut w = Vec::new();
            c.seal(typ, body, &mut w).unwrap();
            w
        };
        let late_ticket = seal(ContentType::Handshake, &[4, 0, 0, 2, 1, 2]);
        let key_update = seal(ContentType::Handshake, &[24, 0, 0, 1, 0]);
        let finished = seal(ContentType::Handshake, &[20, 0, 0, 1, 0]);
        let cut = seal(ContentType::Handshake, &[4, 0, 0, 9, 1]);
        let empty_hs = seal(ContentType::Handshake, &[]);
        let fatal = seal(ContentType::Alert, &[2, 20]);
        let bad_alert = seal(ContentType::Alert, &[2, 20, 0]);
        let canceled = seal(ContentType::Alert, &[1, 90]);
        let ccs = seal(ContentType::ChangeCipherSpec, &[1]);
        let all_padding = seal(ContentType::Unknown(0), &[0, 0, 0]);
        let heartbeat = seal(ContentType::Heartbeat, &[1]);
        let empty_data = seal(ContentType::ApplicationData, &[]);
        let close = seal(ContentType::Alert, &[1, 0]);

        let mut open = |mut rec: Vec<u8>| s.open(&mut rec);
        // A server sends tickets, a client drops the ones after the switch.
        assert_eq!(
            open(late_ticket.clone()),
            Err(RecordError::UnexpectedHandshake("message of type 4".into()))
        );
        assert_eq!(open(key_update), Err(RecordError::KeyUpdate));
        assert!(matches!(
            open(finished),
            Err(RecordError::UnexpectedHandshake(_))
        ));
        assert!(matches!(
            open(cut),
            Err(RecordError::UnexpectedHandshake(_))
        ));
        assert!(matches!(
            open(empty_hs),
            Err(RecordError::UnexpectedHandshake(_))
        ));
        assert_eq!(
            open(fatal),
            Err(RecordError::Alert(AlertDescription::BadRecordMac))
        );
        assert_eq!(open(bad_alert), Err(RecordError::MalformedAlert(3)));
        assert_eq!(open(canceled), Ok(Opened::Nothing));
        assert!(matches!(open(ccs), Err(RecordError::InnerPlaintext(_))));
        assert!(matches!(
            open(all_padding),
            Err(RecordError::InnerPlaintext(_))
        ));
        assert_eq!(open(heartbeat), Err(RecordError::InnerType(24)));
        assert_eq!(open(empty_data), Ok(Opened::Data(0)));
        assert_eq!(open(close), Ok(Opened::CloseNotify));

        // Server → client: the late ticket is dropped, the next record still opens.
        let (mut c, mut s) = own_pair(cs::TLS13_AES_128_GCM_SHA256);
        let mut w = Vec::new();
        s.seal(
            ContentType::Handshake,
            &[4, 0, 0, 2, 1, 2, 4, 0, 0, 0],
            &mut w,
        )
        .unwrap();
        s.seal_data(b"after", &mut w).unwrap();
        assert_eq!(
            open_all(&mut c, &mut w).unwrap(),
            (b"after".to_vec(), false)
        );
    }

    #[test]
    fn padding_from_a_peer_is_stripped() {
        let (mut c, mut s) = own_pair(cs::TLS13_AES_128_GCM_SHA256);
        let mut w = Vec::new();
        // Sealed with type 0, the inner plaintext is "hi", 23, then four zeros: a padded
        // application_data record as RFC 8446 §5.4 allows (we never pad, peers may).
        c.seal(ContentType::Unknown(0), &[b'h', b'i', 23, 0, 0, 0], &mut w)
            .unwrap();
        assert_eq!(s.open(&mut w[..]), Ok(Opened::Data(2)));
        assert_eq!(&w[HEADER_LEN..HEADER_LEN + 2], b"hi");
    }

    #[test]
    fn oversized_inner_plaintext_is_a_record_overflow() {
        let (mut c, mut s) = own_pair(cs::TLS13_AES_128_GCM_SHA256);
        // 2^14 bytes of content, its type, and one byte of padding: one byte over §5.4's limit,
        // though the record itself is within §5.2's.
        let mut inner = payload(MAX_PLAINTEXT);
        inner.extend_from_slice(&[23, 0]);
        let mut w = Vec::new();
        c.seal_inner_plaintext(&inner, &mut w).unwrap();
        assert_eq!(record_len(&w), Ok(Some(w.len())));
        let e = s.open(&mut w).unwrap_err();
        assert_eq!(e, RecordError::Oversized(MAX_PLAINTEXT + 2));
        assert_eq!(e.alert(), Some(AlertDescription::RecordOverflow));
        // Exactly at the limit it opens.
        let mut w = Vec::new();
        c.seal_data(&payload(MAX_PLAINTEXT), &mut w).unwrap();
        assert_eq!(s.open(&mut w), Ok(Opened::Data(MAX_PLAINTEXT)));
    }

    #[test]
    fn sealing_stops_at_the_aead_limit_and_rejects_oversized_plaintext() {
        let (mut c, _) = own_pair(cs::TLS13_AES_128_GCM_SHA256);
        let mut w = Vec::new();
        assert_eq!(
            c.seal_data(&vec![0; MAX_PLAINTEXT + 1], &mut w),
            Err(RecordError::PlaintextTooLong(MAX_PLAINTEXT + 1))
        );
        assert_eq!(
            c.tx_limit,
            1 << 24,
            "AES-GCM stops where the kernel relay does"
        );
        c.tx_limit = c.tx.seq + 1;
        c.seal_data(b"last", &mut w).unwrap();
        assert_eq!(
            c.seal_data(b"one too many", &mut w),
            Err(RecordError::RecordLimit(c.tx.seq))
        );
        assert!(w.len() < 64, "nothing sealed past the limit");
    }

    #[test]
    fn key_update_from_rustls_is_refused() {
        let (mut client, server) = finished_pair(cs::TLS13_AES_128_GCM_SHA256, 1);
        let mut own = take_over(server.into());
        client.refresh_traffic_keys().unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        assert_eq!(open_all(&mut own, &mut wire), Err(RecordError::KeyUpdate));
    }

    #[test]
    fn boundary_tracks_records_fed_in_pieces() {
        let (mut c, _) = own_pair(cs::TLS13_AES_128_GCM_SHA256);
        let wire = seal_all(&mut c, &payload(40_000), true);
        for step in [1, 3, 5, 7, 4096, wire.len()] {
            let mut b = Boundary::default();
            let mut fed = 0;
            let mut ends = 0;
            for piece in wire.chunks(step) {
                b.advance(piece);
                fed += piece.len();
                if b.at_record_start() {
                    ends += 1;
                    assert!(record_len(&wire[..fed]).is_ok());
                }
            }
            assert!(b.at_record_start());
            assert!(ends >= 1);
        }
        let mut b = Boundary::default();
        b.advance(&wire[..HEADER_LEN]);
        assert!(!b.at_record_start());
        b.advance(&wire[HEADER_LEN..]);
        assert!(b.at_record_start());
    }
}
