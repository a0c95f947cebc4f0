//! Kernel TLS: hands a finished rustls session's record layer to the kernel so the data path can
//! `splice(2)` plaintext in and out without the agent touching every byte.
//!
//! The research note (`shared/research/kernel-mechanics.md`) fixes the constraints this module
//! encodes:
//! * Design B only: kTLS goes on the agent's *own* upstream/downstream socket, never on an app
//!   socket, because syscalls already in flight on an app socket bypass the ULP (T10, T11).
//! * Keys are installed exactly once per direction; Debian's 6.1 and 6.12 have no rekey (second
//!   `TLS_TX` is `EBUSY`, T0), so there is no KeyUpdate and the connection must be closed before
//!   the AEAD limit ([`Cipher::record_limit`]).
//! * A kTLS socket and a sockmap never mix (T1, CVE-2026-93824); [`install`] reports that case.
//! * Non-data records (tickets, alerts) make `read()` fail with `EIO` and `splice()` with
//!   `EINVAL`; they are read with [`sys::recv_record`] (T6). The kernel never sends
//!   close_notify on close (T6b), hence [`send_close_notify`].
//! * TLS 1.3 only, AES-128-GCM, AES-256-GCM or ChaCha20-Poly1305: what both target kernels offer
//!   in software (§3 feature table).

#[allow(unsafe_code)] // the kTLS uapi, each block with its SAFETY comment
pub mod sys;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

pub use sys::Direction;

/// TLS record content types (RFC 8446 §5.1), as carried in the kTLS record-type cmsg.
pub mod content_type {
    /// Only seen in TLS 1.3 middlebox-compatibility mode, never after the handshake.
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    /// Alerts, close_notify included: an app `read()` on kTLS gets `EIO` for these (T6).
    pub const ALERT: u8 = 21;
    /// Post-handshake messages (NewSessionTicket, KeyUpdate): `splice` fails with `EINVAL`.
    pub const HANDSHAKE: u8 = 22;
    /// The only type `read()`/`splice()` deliver.
    pub const APPLICATION_DATA: u8 = 23;
}

/// The TLS 1.3 AEADs that Debian's 6.1 and 6.12 kernels implement in software.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    /// Every supported cipher, in the order the probe tries them.
    pub const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
        }
    }

    /// The kernel's `TLS_CIPHER_*` number.
    pub fn kernel_id(self) -> u16 {
        match self {
            Cipher::Aes128Gcm => sys::TLS_CIPHER_AES_GCM_128,
            Cipher::Aes256Gcm => sys::TLS_CIPHER_AES_GCM_256,
            Cipher::Chacha20Poly1305 => sys::TLS_CIPHER_CHACHA20_POLY1305,
        }
    }

    /// How many records one direction may protect before the connection must be closed.
    ///
    /// Nothing enforces the AEAD confidentiality limit once the kernel owns the keys (rustls'
    /// automatic KeyUpdate only works while rustls owns the record layer, and these kernels
    /// cannot rekey; research §3 point 2). RFC 8446 §5.5 allows 2^24.5 full-size records for
    /// AES-GCM; ChaCha20-Poly1305 has no practical limit.
    pub fn record_limit(self) -> Option<u64> {
        match self {
            // floor(2^24.5)
            Cipher::Aes128Gcm | Cipher::Aes256Gcm => Some(23_726_566),
            Cipher::Chacha20Poly1305 => None,
        }
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cipher::Aes128Gcm => "TLS13_AES_128_GCM_SHA256",
            Cipher::Aes256Gcm => "TLS13_AES_256_GCM_SHA384",
            Cipher::Chacha20Poly1305 => "TLS13_CHACHA20_POLY1305_SHA256",
        })
    }
}

/// Why kTLS could not be used. Messages say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error(
        "kernel TLS unavailable: cannot attach the `tls` TCP ULP ({source}); load the `tls` \
         module (`modprobe tls`) or run a kernel built with CONFIG_TLS"
    )]
    Unavailable {
        #[source]
        source: io::Error,
    },
    #[error(
        "kernel TLS needs an ESTABLISHED TCP socket ({source}); install keys only after the \
         handshake on a connected socket"
    )]
    NotEstablished {
        #[source]
        source: io::Error,
    },
    #[error("socket already carries the `{ulp}` TCP ULP; kernel TLS cannot be layered on it")]
    OtherUlp { ulp: String },
    #[error(
        "kernel TLS {direction} keys already installed on this socket ({source}); these kernels \
         cannot rekey (research T0), so each socket gets keys exactly once"
    )]
    AlreadyInstalled {
        direction: Direction,
        #[source]
        source: io::Error,
    },
    #[error(
        "kernel has no {cipher} implementation for kTLS {direction} ({source}); load the crypto \
         modules (`modprobe gcm aesni_intel chacha20poly1305`) or restrict rustls to a cipher \
         that `ktls::probe()` reports as supported"
    )]
    CipherUnavailable {
        cipher: Cipher,
        direction: Direction,
        #[source]
        source: io::Error,
    },
    #[error(
        "kernel rejected {cipher} {direction} keys with EINVAL: the socket is probably in a \
         sockmap/sockhash (TLS and sockmap are mutually exclusive since 6.1.189/6.12.111, \
         CVE-2026-93824, research T1b), or this kernel lacks TLS 1.3 support for the cipher"
    )]
    Rejected {
        cipher: Cipher,
        direction: Direction,
        #[source]
        source: io::Error,
    },
    #[error("unsupported TLS session secrets: {0}")]
    UnsupportedSecrets(String),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One direction's traffic secrets plus the sequence number of the next record.
///
/// `iv` is the full 12-byte TLS 1.3 static IV; [`DirectionSecrets::to_crypto_info`] splits it the
/// way each kernel struct wants (salt 4 + iv 8 for AES-GCM, all 12 in `iv` for ChaCha).
/// Key material is wiped on drop and never printed.
pub struct DirectionSecrets {
    key: [u8; 32],
    key_len: usize,
    iv: [u8; 12],
    seq: u64,
}

impl DirectionSecrets {
    /// `key` must be 16 or 32 bytes.
    pub fn new(key: &[u8], iv: [u8; 12], seq: u64) -> Result<Self, KtlsError> {
        if key.len() != 16 && key.len() != 32 {
            return Err(KtlsError::UnsupportedSecrets(format!(
                "{}-byte key (expected 16 or 32)",
                key.len()
            )));
        }
        let mut k = [0u8; 32];
        k[..key.len()].copy_from_slice(key);
        Ok(DirectionSecrets {
            key: k,
            key_len: key.len(),
            iv,
            seq,
        })
    }

    /// Converts one half of rustls' `ExtractedSecrets`.
    pub fn from_rustls(
        seq: u64,
        secrets: rustls::ConnectionTrafficSecrets,
    ) -> Result<(Cipher, Self), KtlsError> {
        use rustls::ConnectionTrafficSecrets as S;
        let (cipher, key, iv) = match &secrets {
            S::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            S::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            S::Chacha20Poly1305 { key, iv } => (Cipher::Chacha20Poly1305, key, iv),
            _ => {
                return Err(KtlsError::UnsupportedSecrets(
                    "rustls negotiated a cipher the kernel cannot take over; offer only \
                     AES-GCM or ChaCha20-Poly1305 with TLS 1.3"
                        .into(),
                ));
            }
        };
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| {
            KtlsError::UnsupportedSecrets(format!("{}-byte IV (expected 12)", iv.as_ref().len()))
        })?;
        let s = DirectionSecrets::new(key.as_ref(), iv, seq)?;
        if s.key_len != cipher.key_len() {
            return Err(KtlsError::UnsupportedSecrets(format!(
                "{cipher} with a {}-byte key",
                s.key_len
            )));
        }
        Ok((cipher, s))
    }

    /// Sequence number of the next record in this direction.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The kernel uapi struct for `cipher`. Fails if the key length does not fit the cipher.
    pub fn to_crypto_info(&self, cipher: Cipher) -> Result<sys::CryptoInfo, KtlsError> {
        if self.key_len != cipher.key_len() {
            return Err(KtlsError::UnsupportedSecrets(format!(
                "{cipher} needs a {}-byte key, got {}",
                cipher.key_len(),
                self.key_len
            )));
        }
        let info = sys::TlsCryptoInfo {
            version: sys::TLS_1_3_VERSION,
            cipher_type: cipher.kernel_id(),
        };
        let rec_seq = self.seq.to_be_bytes();
        let (salt, iv8) = self.iv.split_at(4);
        let mut ci = match cipher {
            Cipher::Aes128Gcm => sys::CryptoInfo::Aes128Gcm(sys::Tls12CryptoInfoAesGcm128 {
                info,
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq,
            }),
            Cipher::Aes256Gcm => sys::CryptoInfo::Aes256Gcm(sys::Tls12CryptoInfoAesGcm256 {
                info,
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq,
            }),
            Cipher::Chacha20Poly1305 => {
                sys::CryptoInfo::Chacha20Poly1305(sys::Tls12CryptoInfoChacha20Poly1305 {
                    info,
                    iv: [0; 12],
                    key: [0; 32],
                    rec_seq,
                })
            }
        };
        // Fill in place so no unwiped temporary copy of the key exists.
        match &mut ci {
            sys::CryptoInfo::Aes128Gcm(c) => {
                c.key.copy_from_slice(&self.key[..16]);
                c.salt.copy_from_slice(salt);
                c.iv.copy_from_slice(iv8);
            }
            sys::CryptoInfo::Aes256Gcm(c) => {
                c.key.copy_from_slice(&self.key);
                c.salt.copy_from_slice(salt);
                c.iv.copy_from_slice(iv8);
            }
            sys::CryptoInfo::Chacha20Poly1305(c) => {
                c.key.copy_from_slice(&self.key);
                c.iv.copy_from_slice(&self.iv);
            }
        }
        Ok(ci)
    }

    #[cfg(test)]
    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

impl Drop for DirectionSecrets {
    fn drop(&mut self) {
        sys::wipe(&mut self.key);
        sys::wipe(&mut self.iv);
    }
}

impl fmt::Debug for DirectionSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectionSecrets")
            .field("key_len", &self.key_len)
            .field("seq", &self.seq)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Both directions of a finished TLS 1.3 session, ready for [`SessionSecrets::install`].
#[derive(Debug)]
pub struct SessionSecrets {
    pub cipher: Cipher,
    pub tx: DirectionSecrets,
    pub rx: DirectionSecrets,
}

impl SessionSecrets {
    /// See [`install`].
    pub fn install(&self, fd: BorrowedFd<'_>, expect_no_pad: bool) -> Result<(), KtlsError> {
        install(fd, self.cipher, &self.tx, &self.rx, expect_no_pad)
    }
}

impl TryFrom<rustls::ExtractedSecrets> for SessionSecrets {
    type Error = KtlsError;

    /// Accepts the output of `dangerous_extract_secrets()` or of
    /// `dangerous_into_kernel_connection()`; the sequence numbers rustls reports are the ones
    /// the kernel must continue from.
    fn try_from(s: rustls::ExtractedSecrets) -> Result<Self, KtlsError> {
        let (tx_seq, tx) = s.tx;
        let (rx_seq, rx) = s.rx;
        let (cipher, tx) = DirectionSecrets::from_rustls(tx_seq, tx)?;
        let (rx_cipher, rx) = DirectionSecrets::from_rustls(rx_seq, rx)?;
        if cipher != rx_cipher {
            return Err(KtlsError::UnsupportedSecrets(format!(
                "TX uses {cipher} but RX uses {rx_cipher}"
            )));
        }
        Ok(SessionSecrets { cipher, tx, rx })
    }
}

/// Hands the record layer of an established TCP socket to the kernel: attaches the `tls` ULP,
/// installs TX then RX keys, and with `expect_no_pad` enables TLS 1.3 decrypt-in-place (only
/// safe when the peer is our own agent, which never pads; tls.rst).
///
/// Call it only on a socket no other thread is reading or writing: syscalls already in flight
/// keep using plain TCP (T10/T11). On error the socket may be half-configured and must be
/// closed, never used for plaintext.
pub fn install(
    fd: BorrowedFd<'_>,
    cipher: Cipher,
    tx: &DirectionSecrets,
    rx: &DirectionSecrets,
    expect_no_pad: bool,
) -> Result<(), KtlsError> {
    let tx_info = tx.to_crypto_info(cipher)?;
    let rx_info = rx.to_crypto_info(cipher)?;
    attach_ulp(fd)?;
    sys::set_crypto(fd, Direction::Tx, &tx_info).map_err(|e| classify(cipher, Direction::Tx, e))?;
    sys::set_crypto(fd, Direction::Rx, &rx_info).map_err(|e| classify(cipher, Direction::Rx, e))?;
    if expect_no_pad {
        sys::set_rx_expect_no_pad(fd).map_err(|source| KtlsError::Io {
            op: "setsockopt(TLS_RX_EXPECT_NO_PAD) (needs kernel 6.0+)",
            source,
        })?;
    }
    Ok(())
}

/// Attaches the `tls` ULP; tolerates it being attached already (the caller may have probed).
///
/// The ULP needs an ESTABLISHED socket, the keys do not: attaching it before the handshake
/// keeps kTLS possible when the peer half-closes right after it (CLOSE_WAIT).
pub fn attach_ulp(fd: BorrowedFd<'_>) -> Result<(), KtlsError> {
    match sys::set_ulp_tls(fd) {
        Ok(()) => Ok(()),
        Err(e) => match e.raw_os_error() {
            Some(libc::EEXIST) => match sys::get_ulp(fd) {
                Ok(Some(ulp)) if ulp == "tls" => Ok(()),
                Ok(Some(ulp)) => Err(KtlsError::OtherUlp { ulp }),
                Ok(None) => Err(KtlsError::Io {
                    op: "setsockopt(TCP_ULP, \"tls\")",
                    source: e,
                }),
                Err(source) => Err(KtlsError::Io {
                    op: "getsockopt(TCP_ULP)",
                    source,
                }),
            },
            Some(libc::ENOTCONN) => Err(KtlsError::NotEstablished { source: e }),
            Some(libc::ENOENT | libc::ENOPROTOOPT | libc::EOPNOTSUPP) => {
                Err(KtlsError::Unavailable { source: e })
            }
            _ => Err(KtlsError::Io {
                op: "setsockopt(TCP_ULP, \"tls\")",
                source: e,
            }),
        },
    }
}

fn classify(cipher: Cipher, direction: Direction, source: io::Error) -> KtlsError {
    match source.raw_os_error() {
        Some(libc::EBUSY | libc::EEXIST) => KtlsError::AlreadyInstalled { direction, source },
        Some(libc::ENOENT | libc::ENOPKG | libc::EOPNOTSUPP | libc::ENOPROTOOPT) => {
            KtlsError::CipherUnavailable {
                cipher,
                direction,
                source,
            }
        }
        Some(libc::EINVAL) => KtlsError::Rejected {
            cipher,
            direction,
            source,
        },
        _ => KtlsError::Io {
            op: match direction {
                Direction::Tx => "setsockopt(SOL_TLS, TLS_TX)",
                Direction::Rx => "setsockopt(SOL_TLS, TLS_RX)",
            },
            source,
        },
    }
}

/// Sends a TLS close_notify alert (warning, close_notify = `01 00`) through a kTLS TX socket.
///
/// The kernel never emits one on `close()` (T6b), so without this the peer cannot tell a clean
/// end of stream from truncation. Send it before `shutdown(SHUT_WR)`.
pub fn send_close_notify(fd: BorrowedFd<'_>) -> io::Result<()> {
    let n = sys::send_record(fd, content_type::ALERT, &[1, 0])?;
    if n != 2 {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("close_notify: kernel accepted {n} of 2 bytes"),
        ));
    }
    Ok(())
}

/// Sequence number of the next record in `dir`, read back from the kernel. Compare the TX value
/// with [`Cipher::record_limit`] to close the connection before the AEAD limit.
pub fn record_seq(fd: BorrowedFd<'_>, dir: Direction) -> io::Result<u64> {
    Ok(sys::get_crypto(fd, dir)?.rec_seq())
}

/// A per-cipher flag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerCipher {
    pub aes128gcm: bool,
    pub aes256gcm: bool,
    pub chacha20poly1305: bool,
}

impl PerCipher {
    pub fn get(&self, c: Cipher) -> bool {
        match c {
            Cipher::Aes128Gcm => self.aes128gcm,
            Cipher::Aes256Gcm => self.aes256gcm,
            Cipher::Chacha20Poly1305 => self.chacha20poly1305,
        }
    }

    fn set(&mut self, c: Cipher, v: bool) {
        match c {
            Cipher::Aes128Gcm => self.aes128gcm = v,
            Cipher::Aes256Gcm => self.aes256gcm = v,
            Cipher::Chacha20Poly1305 => self.chacha20poly1305 = v,
        }
    }
}

/// What this kernel can do, measured rather than inferred from the version: Debian backports
/// (T1b changed within 6.1.x) make version checks unreliable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KtlsSupport {
    /// `/proc/sys/net/ipv4/tcp_available_ulp` listed `tls` before probing.
    pub ulp_listed: bool,
    /// The `tls` ULP could be attached to a loopback TCP socket.
    pub ulp: bool,
    /// TLS 1.3 TX keys were accepted (and a record round-tripped) per cipher.
    pub tx: PerCipher,
    /// TLS 1.3 RX keys were accepted (and a record round-tripped) per cipher.
    pub rx: PerCipher,
    /// `TLS_RX_EXPECT_NO_PAD` was accepted (6.0+).
    pub rx_expect_no_pad: bool,
    /// One line per failure, with the errno and what to do.
    pub problems: Vec<String>,
}

impl KtlsSupport {
    /// TX and RX both work for `cipher`.
    pub fn supports(&self, cipher: Cipher) -> bool {
        self.ulp && self.tx.get(cipher) && self.rx.get(cipher)
    }

    /// Ciphers usable in both directions, in preference order.
    pub fn usable_ciphers(&self) -> Vec<Cipher> {
        Cipher::ALL
            .into_iter()
            .filter(|&c| self.supports(c))
            .collect()
    }

    /// A one-paragraph summary for logs and error messages.
    pub fn summary(&self) -> String {
        let ciphers: Vec<String> = self
            .usable_ciphers()
            .iter()
            .map(|c| c.to_string())
            .collect();
        if self.ulp {
            format!(
                "kernel TLS: ULP ok, ciphers [{}], expect_no_pad {}{}",
                ciphers.join(", "),
                self.rx_expect_no_pad,
                if self.problems.is_empty() {
                    String::new()
                } else {
                    format!("; problems: {}", self.problems.join("; "))
                }
            )
        } else {
            format!("kernel TLS unavailable: {}", self.problems.join("; "))
        }
    }
}

/// Measures kTLS support: attaches the ULP and installs TLS 1.3 TX and RX with a dummy key on a
/// loopback TCP pair per cipher, then round-trips one record each way.
///
/// Does not load modules itself: an agent library shelling out to `modprobe` would hide a
/// deployment problem; the ULP setsockopt auto-loads `tls` where the kernel allows it.
pub fn probe() -> KtlsSupport {
    let ulp_listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .map(|s| s.split_whitespace().any(|w| w == "tls"))
        .unwrap_or(false);
    let mut s = KtlsSupport {
        ulp_listed,
        ulp: false,
        tx: PerCipher::default(),
        rx: PerCipher::default(),
        rx_expect_no_pad: false,
        problems: Vec::new(),
    };
    for cipher in Cipher::ALL {
        if let Err(p) = probe_cipher(cipher, &mut s) {
            s.problems.push(p);
        }
        if !s.ulp {
            break;
        }
    }
    s
}

const PROBE_MSG: &[u8] = b"ktls-probe";

fn probe_cipher(cipher: Cipher, s: &mut KtlsSupport) -> Result<(), String> {
    let (a, b) = loopback_pair().map_err(|e| format!("loopback TCP pair for probing: {e}"))?;
    let key_ab = [0x5a; 32];
    let key_ba = [0xa5; 32];
    let k = cipher.key_len();
    let ab = DirectionSecrets::new(&key_ab[..k], [0x11; 12], 0).map_err(|e| e.to_string())?;
    let ba = DirectionSecrets::new(&key_ba[..k], [0x22; 12], 0).map_err(|e| e.to_string())?;

    if let Err(e) = sys::set_ulp_tls(a.as_fd()) {
        let hint = if s.ulp_listed {
            "".to_string()
        } else {
            " (`tls` not in /proc/sys/net/ipv4/tcp_available_ulp: load the module with \
             `modprobe tls`, or use a kernel with CONFIG_TLS)"
                .to_string()
        };
        return Err(format!("attaching the `tls` TCP ULP failed: {e}{hint}"));
    }
    s.ulp = true;
    let tx_info = ab.to_crypto_info(cipher).map_err(|e| e.to_string())?;
    let rx_info = ba.to_crypto_info(cipher).map_err(|e| e.to_string())?;
    let tx = sys::set_crypto(a.as_fd(), Direction::Tx, &tx_info);
    let rx = sys::set_crypto(a.as_fd(), Direction::Rx, &rx_info);
    let mut problems = Vec::new();
    if let Err(e) = &tx {
        problems.push(format!("{cipher} TX refused: {e}"));
    }
    if let Err(e) = &rx {
        problems.push(format!("{cipher} RX refused: {e}"));
    }
    if tx.is_ok() && rx.is_ok() {
        if !s.rx_expect_no_pad {
            s.rx_expect_no_pad = sys::set_rx_expect_no_pad(a.as_fd()).is_ok();
        }
        // Mirror on the peer and prove a record decrypts both ways: a setsockopt that succeeds
        // with a crypto backend that then fails would otherwise go unnoticed until traffic.
        let verified = install(b.as_fd(), cipher, &ba, &ab, false)
            .map_err(|e| e.to_string())
            .and_then(|()| roundtrip(&a, &b).map_err(|e| format!("round trip: {e}")));
        match verified {
            Ok(()) => {
                s.tx.set(cipher, true);
                s.rx.set(cipher, true);
            }
            Err(e) => problems.push(format!("{cipher}: keys accepted but {e}")),
        }
    } else {
        s.tx.set(cipher, false);
        s.rx.set(cipher, false);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn roundtrip(a: &TcpStream, b: &TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 64];
    for (w, r) in [(a, b), (b, a)] {
        (&*w).write_all(PROBE_MSG)?;
        let mut got = 0;
        while got < PROBE_MSG.len() {
            let n = (&*r).read(&mut buf[got..])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        if &buf[..got] != PROBE_MSG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "decrypted bytes differ from what was sent",
            ));
        }
    }
    Ok(())
}

fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_iv_is_split_salt_then_iv() {
        let iv: [u8; 12] = core::array::from_fn(|i| i as u8);
        let s = DirectionSecrets::new(&[7; 16], iv, 0x0102_0304_0506_0708).unwrap();
        match s.to_crypto_info(Cipher::Aes128Gcm).unwrap() {
            sys::CryptoInfo::Aes128Gcm(c) => {
                assert_eq!(c.info.version, 0x0304);
                assert_eq!(c.info.cipher_type, 51);
                assert_eq!(c.salt, [0, 1, 2, 3]);
                assert_eq!(c.iv, [4, 5, 6, 7, 8, 9, 10, 11]);
                assert_eq!(c.key, [7; 16]);
                assert_eq!(c.rec_seq, [1, 2, 3, 4, 5, 6, 7, 8]);
            }
            other => panic!("{other:?}"),
        }
        assert!(s.to_crypto_info(Cipher::Aes256Gcm).is_err());
    }

    #[test]
    fn chacha_takes_whole_iv() {
        let iv: [u8; 12] = core::array::from_fn(|i| i as u8 + 100);
        let s = DirectionSecrets::new(&[9; 32], iv, 3).unwrap();
        match s.to_crypto_info(Cipher::Chacha20Poly1305).unwrap() {
            sys::CryptoInfo::Chacha20Poly1305(c) => {
                assert_eq!(c.info.cipher_type, 54);
                assert_eq!(c.iv, iv);
                assert_eq!(c.key, [9; 32]);
                assert_eq!(u64::from_be_bytes(c.rec_seq), 3);
            }
            other => panic!("{other:?}"),
        }
        match s.to_crypto_info(Cipher::Aes256Gcm).unwrap() {
            sys::CryptoInfo::Aes256Gcm(c) => {
                assert_eq!(c.info.cipher_type, 52);
                assert_eq!(c.salt, iv[..4]);
                assert_eq!(c.iv, iv[4..]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_key_length_rejected() {
        assert!(matches!(
            DirectionSecrets::new(&[0; 24], [0; 12], 0),
            Err(KtlsError::UnsupportedSecrets(_))
        ));
    }

    #[test]
    fn debug_never_prints_key() {
        let s = DirectionSecrets::new(&[0xab; 16], [0xcd; 12], 5).unwrap();
        let d = format!("{s:?}");
        assert!(d.contains("redacted") && !d.contains("171"), "{d}");
    }

    /// Runs a real in-memory rustls TLS 1.3 handshake restricted to `suite`, extracts both
    /// sides' secrets and checks they convert into mirrored kernel key sets.
    fn handshake_and_extract(
        suite: rustls::SupportedCipherSuite,
    ) -> (SessionSecrets, SessionSecrets) {
        let (client, server) = crate::test_tls::finished_pair(suite, 0);
        let c = SessionSecrets::try_from(client.dangerous_extract_secrets().unwrap()).unwrap();
        let s = SessionSecrets::try_from(server.dangerous_extract_secrets().unwrap()).unwrap();
        (c, s)
    }

    #[test]
    fn rustls_secrets_convert_mirrored() {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        for (suite, want) in [
            (cs::TLS13_AES_128_GCM_SHA256, Cipher::Aes128Gcm),
            (cs::TLS13_AES_256_GCM_SHA384, Cipher::Aes256Gcm),
            (cs::TLS13_CHACHA20_POLY1305_SHA256, Cipher::Chacha20Poly1305),
        ] {
            let (c, s) = handshake_and_extract(suite);
            assert_eq!(c.cipher, want);
            assert_eq!(s.cipher, want);
            assert_eq!(c.tx.key(), s.rx.key());
            assert_eq!(c.rx.key(), s.tx.key());
            assert_eq!(c.tx.iv, s.rx.iv);
            assert_eq!(c.rx.iv, s.tx.iv);
            assert_eq!(c.tx.seq(), s.rx.seq());
            assert_eq!(c.rx.seq(), s.tx.seq());
            assert_ne!(c.tx.key(), c.rx.key());
            assert_eq!(c.tx.key().len(), want.key_len());
            c.tx.to_crypto_info(want).unwrap();
        }
    }

    #[test]
    fn probe_reports_without_panicking() {
        let s = probe();
        // On the sandbox host (no CONFIG_TLS) this explains why; in the VM it lists ciphers.
        assert!(s.ulp || !s.problems.is_empty(), "{s:?}");
        eprintln!("{}", s.summary());
        if std::env::var_os("INTERCEPTOR_IN_VM").is_some() {
            // Both supported Debian kernels (6.1, 6.12) offer all three ciphers and no-pad.
            assert_eq!(s.usable_ciphers(), Cipher::ALL, "{s:?}");
            assert!(s.rx_expect_no_pad, "{s:?}");
        }
        if !s.ulp {
            assert!(!s.supports(Cipher::Aes128Gcm));
        }
    }

    #[test]
    fn install_without_ktls_is_actionable() {
        let (a, _b) = loopback_pair().unwrap();
        let ks = DirectionSecrets::new(&[1; 16], [2; 12], 0).unwrap();
        match install(a.as_fd(), Cipher::Aes128Gcm, &ks, &ks, true) {
            Ok(()) => {} // a kTLS kernel: fine
            Err(KtlsError::Unavailable { .. }) => {
                let msg = install(a.as_fd(), Cipher::Aes128Gcm, &ks, &ks, true)
                    .unwrap_err()
                    .to_string();
                assert!(msg.contains("modprobe tls"), "{msg}");
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }

    #[test]
    fn not_established_socket_is_reported() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let ks = DirectionSecrets::new(&[1; 16], [2; 12], 0).unwrap();
        match install(l.as_fd(), Cipher::Aes128Gcm, &ks, &ks, false) {
            Err(KtlsError::NotEstablished { .. } | KtlsError::Unavailable { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
