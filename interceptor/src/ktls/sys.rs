//! Raw kernel-TLS uapi: the only `unsafe` code on the kTLS path.
//!
//! Everything here is a thin, typed wrapper around one syscall. Policy (which cipher, what to do
//! with a non-data record, when to send close_notify) lives in the parent module; this file only
//! guarantees that pointers and lengths handed to the kernel are right and that key material in
//! the uapi structs is wiped when they are dropped.
//!
//! Layouts follow `include/uapi/linux/tls.h` (identical in Debian's 6.1 and 6.12 trees); the size
//! assertions below pin them so a typo cannot silently hand the kernel a short key.

use std::fmt;
use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{Ordering, compiler_fence};

use libc::{c_int, c_void, socklen_t};

/// `SOL_TLS` socket option level (`include/linux/socket.h`).
pub const SOL_TLS: c_int = 282;
/// Install transmit keys (`setsockopt`) / read them back with the current record sequence.
pub const TLS_TX: c_int = 1;
/// Install receive keys / read them back.
pub const TLS_RX: c_int = 2;
/// Zero-copy sendfile opt-in. Only has an effect with NIC offload (research §3 feature table);
/// defined for completeness, never set by the agent.
pub const TLS_TX_ZEROCOPY_RO: c_int = 3;
/// Promise that the peer sends no TLS 1.3 record padding, enabling decrypt-in-place (6.0+).
pub const TLS_RX_EXPECT_NO_PAD: c_int = 4;
/// cmsg type on `sendmsg`: the content type of the record being sent.
pub const TLS_SET_RECORD_TYPE: c_int = 1;
/// cmsg type on `recvmsg`: the content type of the record just received.
pub const TLS_GET_RECORD_TYPE: c_int = 2;
/// `TCP_ULP` (`include/uapi/linux/tcp.h`): attach an upper-layer protocol such as `tls`.
pub const TCP_ULP: c_int = 31;
/// `TLS_1_3_VERSION` as the kernel spells it (major 3, minor 4).
pub const TLS_1_3_VERSION: u16 = 0x0304;
/// `TLS_CIPHER_AES_GCM_128`.
pub const TLS_CIPHER_AES_GCM_128: u16 = 51;
/// `TLS_CIPHER_AES_GCM_256`.
pub const TLS_CIPHER_AES_GCM_256: u16 = 52;
/// `TLS_CIPHER_CHACHA20_POLY1305` (5.11+).
pub const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// Which half of the connection a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Records this socket sends (`TLS_TX`).
    Tx,
    /// Records this socket receives (`TLS_RX`).
    Rx,
}

impl Direction {
    fn optname(self) -> c_int {
        match self {
            Direction::Tx => TLS_TX,
            Direction::Rx => TLS_RX,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Tx => "TX",
            Direction::Rx => "RX",
        })
    }
}

/// `struct tls_crypto_info`: the header every cipher-specific struct starts with.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsCryptoInfo {
    /// [`TLS_1_3_VERSION`] (the agent never uses TLS 1.2).
    pub version: u16,
    /// One of the `TLS_CIPHER_*` numbers.
    pub cipher_type: u16,
}

/// `struct tls12_crypto_info_aes_gcm_128` (the "tls12" prefix is historical; TLS 1.3 uses it too).
/// For TLS 1.3 the 12-byte static IV is split: `salt` = first 4 bytes, `iv` = last 8.
#[repr(C)]
pub struct Tls12CryptoInfoAesGcm128 {
    pub info: TlsCryptoInfo,
    pub iv: [u8; 8],
    pub key: [u8; 16],
    pub salt: [u8; 4],
    /// Big-endian sequence number of the next record.
    pub rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_aes_gcm_256`; same IV split as AES-128-GCM.
#[repr(C)]
pub struct Tls12CryptoInfoAesGcm256 {
    pub info: TlsCryptoInfo,
    pub iv: [u8; 8],
    pub key: [u8; 32],
    pub salt: [u8; 4],
    pub rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_chacha20_poly1305`: the whole 12-byte IV goes in `iv`; the uapi
/// `salt[0]` member is zero-sized.
#[repr(C)]
pub struct Tls12CryptoInfoChacha20Poly1305 {
    pub info: TlsCryptoInfo,
    pub iv: [u8; 12],
    pub key: [u8; 32],
    pub rec_seq: [u8; 8],
}

const _: () = assert!(mem::size_of::<TlsCryptoInfo>() == 4);
const _: () = assert!(mem::size_of::<Tls12CryptoInfoAesGcm128>() == 40);
const _: () = assert!(mem::size_of::<Tls12CryptoInfoAesGcm256>() == 56);
const _: () = assert!(mem::size_of::<Tls12CryptoInfoChacha20Poly1305>() == 56);
const _: () = assert!(mem::align_of::<Tls12CryptoInfoAesGcm128>() == 2);

/// Overwrites `bytes` with zeros in a way the optimiser may not elide, so keys do not linger in
/// freed memory (they would otherwise survive in a core dump or a later heap allocation).
pub fn wipe(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to one initialised byte.
        unsafe { ptr::write_volatile(b, 0) };
    }
    compiler_fence(Ordering::SeqCst);
}

impl Drop for Tls12CryptoInfoAesGcm128 {
    fn drop(&mut self) {
        wipe(&mut self.key);
        wipe(&mut self.iv);
        wipe(&mut self.salt);
    }
}

impl Drop for Tls12CryptoInfoAesGcm256 {
    fn drop(&mut self) {
        wipe(&mut self.key);
        wipe(&mut self.iv);
        wipe(&mut self.salt);
    }
}

impl Drop for Tls12CryptoInfoChacha20Poly1305 {
    fn drop(&mut self) {
        wipe(&mut self.key);
        wipe(&mut self.iv);
    }
}

/// One direction's kernel crypto state, as passed to / read back from `SOL_TLS`.
///
/// Holds key material: it is wiped on drop, cannot be cloned, and its `Debug` prints only the
/// cipher and the record sequence.
pub enum CryptoInfo {
    Aes128Gcm(Tls12CryptoInfoAesGcm128),
    Aes256Gcm(Tls12CryptoInfoAesGcm256),
    Chacha20Poly1305(Tls12CryptoInfoChacha20Poly1305),
}

impl CryptoInfo {
    /// The uapi header (version and cipher number).
    pub fn header(&self) -> TlsCryptoInfo {
        match self {
            CryptoInfo::Aes128Gcm(c) => c.info,
            CryptoInfo::Aes256Gcm(c) => c.info,
            CryptoInfo::Chacha20Poly1305(c) => c.info,
        }
    }

    /// Sequence number of the next record in this direction. After `get_crypto` this is how many
    /// records the kernel has sent/received, which is what the AEAD usage limit is counted in.
    pub fn rec_seq(&self) -> u64 {
        u64::from_be_bytes(match self {
            CryptoInfo::Aes128Gcm(c) => c.rec_seq,
            CryptoInfo::Aes256Gcm(c) => c.rec_seq,
            CryptoInfo::Chacha20Poly1305(c) => c.rec_seq,
        })
    }

    fn as_bytes(&self) -> (*const c_void, socklen_t) {
        fn raw<T>(v: &T) -> (*const c_void, socklen_t) {
            (ptr::from_ref(v).cast(), mem::size_of::<T>() as socklen_t)
        }
        match self {
            CryptoInfo::Aes128Gcm(c) => raw(c),
            CryptoInfo::Aes256Gcm(c) => raw(c),
            CryptoInfo::Chacha20Poly1305(c) => raw(c),
        }
    }
}

impl fmt::Debug for CryptoInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = self.header();
        f.debug_struct("CryptoInfo")
            .field("version", &format_args!("{:#06x}", h.version))
            .field("cipher_type", &h.cipher_type)
            .field("rec_seq", &self.rec_seq())
            .field("key", &"<redacted>")
            .finish()
    }
}

fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn setsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> io::Result<()> {
    // SAFETY: callers pass a pointer to at least `len` readable bytes that outlive the call; the
    // kernel copies them before returning and keeps no reference. `fd` is a live descriptor.
    cvt(unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, val, len) }).map(drop)
}

/// `setsockopt(fd, SOL_TCP, TCP_ULP, "tls")`. Fails with `ENOENT` when the `tls` module is
/// neither loaded nor auto-loadable, `ENOTCONN` unless the socket is ESTABLISHED, and `EEXIST` if
/// any ULP is already attached.
pub fn set_ulp_tls(fd: BorrowedFd<'_>) -> io::Result<()> {
    const NAME: &[u8] = b"tls";
    setsockopt_bytes(
        fd,
        libc::SOL_TCP,
        TCP_ULP,
        NAME.as_ptr().cast(),
        NAME.len() as socklen_t,
    )
}

/// The name of the ULP attached to a TCP socket (`getsockopt(TCP_ULP)`), `None` if there is none.
pub fn get_ulp(fd: BorrowedFd<'_>) -> io::Result<Option<String>> {
    let mut buf = [0u8; 16]; // TCP_ULP_NAME_MAX
    let mut len = buf.len() as socklen_t;
    // SAFETY: `buf` is writable for `len` bytes and `len` is a valid in/out length.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            TCP_ULP,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    let s = &buf[..(len as usize).min(buf.len())];
    let s = s.split(|&b| b == 0).next().unwrap_or_default();
    Ok((!s.is_empty()).then(|| String::from_utf8_lossy(s).into_owned()))
}

/// `setsockopt(fd, SOL_TLS, TLS_TX|TLS_RX, info)`. `EBUSY` if this direction already has keys
/// (no rekey before 6.14), `EINVAL` for a socket held in a sockmap on 6.1.189+/6.12.111+.
pub fn set_crypto(fd: BorrowedFd<'_>, dir: Direction, info: &CryptoInfo) -> io::Result<()> {
    let (p, len) = info.as_bytes();
    setsockopt_bytes(fd, SOL_TLS, dir.optname(), p, len)
}

/// Reads back one direction's crypto state, chiefly for its record sequence (the kernel
/// advances it per record). The result contains the key and is wiped on drop.
pub fn get_crypto(fd: BorrowedFd<'_>, dir: Direction) -> io::Result<CryptoInfo> {
    // The kernel wants either exactly the header size or exactly the cipher's struct size.
    let mut hdr = TlsCryptoInfo::default();
    getsockopt_exact(fd, dir, &mut hdr)?;
    fn full<T>(fd: BorrowedFd<'_>, dir: Direction, v: T) -> io::Result<T> {
        let mut v = v;
        getsockopt_exact(fd, dir, &mut v)?;
        Ok(v)
    }
    match hdr.cipher_type {
        TLS_CIPHER_AES_GCM_128 => Ok(CryptoInfo::Aes128Gcm(full(
            fd,
            dir,
            Tls12CryptoInfoAesGcm128 {
                info: hdr,
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq: [0; 8],
            },
        )?)),
        TLS_CIPHER_AES_GCM_256 => Ok(CryptoInfo::Aes256Gcm(full(
            fd,
            dir,
            Tls12CryptoInfoAesGcm256 {
                info: hdr,
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq: [0; 8],
            },
        )?)),
        TLS_CIPHER_CHACHA20_POLY1305 => Ok(CryptoInfo::Chacha20Poly1305(full(
            fd,
            dir,
            Tls12CryptoInfoChacha20Poly1305 {
                info: hdr,
                iv: [0; 12],
                key: [0; 32],
                rec_seq: [0; 8],
            },
        )?)),
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("kernel reports TLS cipher type {other}, which this agent does not use"),
        )),
    }
}

/// `getsockopt` into a plain-old-data uapi struct; `T` is only ever one of the `repr(C)`
/// byte-array structs above, for which every bit pattern is valid.
fn getsockopt_exact<T>(fd: BorrowedFd<'_>, dir: Direction, out: &mut T) -> io::Result<()> {
    let want = mem::size_of::<T>() as socklen_t;
    let mut len = want;
    // SAFETY: `out` is an exclusive reference to `size_of::<T>()` writable bytes; T is one of the
    // uapi structs made only of integers and byte arrays, so any bytes the kernel writes form a
    // valid value.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_TLS,
            dir.optname(),
            ptr::from_mut(out).cast(),
            &mut len,
        )
    })?;
    if len != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("getsockopt(SOL_TLS) returned {len} bytes, expected {want}"),
        ));
    }
    Ok(())
}

/// `setsockopt(fd, SOL_TLS, TLS_RX_EXPECT_NO_PAD, 1)`. Only valid after `TLS_RX` with TLS 1.3.
pub fn set_rx_expect_no_pad(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: c_int = 1;
    setsockopt_bytes(
        fd,
        SOL_TLS,
        TLS_RX_EXPECT_NO_PAD,
        ptr::from_ref(&one).cast(),
        mem::size_of::<c_int>() as socklen_t,
    )
}

// SAFETY: CMSG_SPACE is pure arithmetic on its argument.
const CMSG_SPACE_1: usize = unsafe { libc::CMSG_SPACE(1) } as usize;
// SAFETY: CMSG_LEN is pure arithmetic on its argument.
const CMSG_LEN_1: usize = unsafe { libc::CMSG_LEN(1) } as usize;

/// A control-message buffer aligned for `cmsghdr`, big enough for one 1-byte cmsg (plus slack in
/// case the kernel ever adds one).
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);
const _: () = assert!(CMSG_SPACE_1 <= 64);

/// Sends `data` as one (or, above 16 KiB, several) TLS records of `content_type` through a kTLS
/// TX socket, using a `TLS_SET_RECORD_TYPE` cmsg. Returns the bytes accepted, like `sendmsg`.
pub fn send_record(fd: BorrowedFd<'_>, content_type: u8, data: &[u8]) -> io::Result<usize> {
    let mut cbuf = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is a plain C struct; all-zero is a valid "empty" value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE_1 as _;
    // SAFETY: `msg.msg_control` points at `cbuf`, which is aligned and at least CMSG_SPACE(1)
    // bytes, so CMSG_FIRSTHDR returns a non-null pointer to a cmsghdr inside `cbuf`, and
    // CMSG_DATA points at one writable byte inside it.
    unsafe {
        let cm = libc::CMSG_FIRSTHDR(&msg);
        debug_assert!(!cm.is_null());
        (*cm).cmsg_level = SOL_TLS;
        (*cm).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cm).cmsg_len = CMSG_LEN_1 as _;
        *libc::CMSG_DATA(cm) = content_type;
    }
    // SAFETY: `msg` references `iov` (pointing at `data`, only read by the kernel) and `cbuf`,
    // all alive for the duration of the call.
    cvt_size(unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })
}

/// Receives from a kTLS RX socket with a control buffer, so non-data records are returned
/// instead of failing with `EIO` (research T6). Returns `(content_type, bytes)`; a data record
/// is type 23 whether or not the kernel attached a cmsg. `(23, 0)` means end of stream. The
/// kernel never mixes record types in one call.
pub fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    let mut cbuf = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct; all-zero is a valid "empty" value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    // SAFETY: `iov` describes `buf` (writable, exclusively borrowed) and `msg_control` describes
    // `cbuf`; both outlive the call.
    let n = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) })?;
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "kTLS control message truncated (MSG_CTRUNC)",
        ));
    }
    let mut content_type = 23u8;
    // SAFETY: after recvmsg, `msg.msg_control`/`msg_controllen` describe the initialised prefix
    // of `cbuf`; CMSG_FIRSTHDR/CMSG_NXTHDR only return headers that lie inside it, and a
    // TLS_GET_RECORD_TYPE cmsg carries one data byte (checked via cmsg_len before reading).
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(&msg);
        while !cm.is_null() {
            if (*cm).cmsg_level == SOL_TLS
                && (*cm).cmsg_type == TLS_GET_RECORD_TYPE
                && (*cm).cmsg_len as usize >= CMSG_LEN_1
            {
                content_type = *libc::CMSG_DATA(cm);
            }
            cm = libc::CMSG_NXTHDR(&msg, cm);
        }
    }
    Ok((content_type, n))
}

/// `splice(2)` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceFlags(u32);

impl SpliceFlags {
    /// No flags: blocking, copy semantics.
    pub const NONE: SpliceFlags = SpliceFlags(0);
    /// `SPLICE_F_MOVE`: a hint to move pages rather than copy.
    pub const MOVE: SpliceFlags = SpliceFlags(libc::SPLICE_F_MOVE);
    /// `SPLICE_F_NONBLOCK`: do not block on the pipe (sockets follow their own O_NONBLOCK).
    pub const NONBLOCK: SpliceFlags = SpliceFlags(libc::SPLICE_F_NONBLOCK);
    /// `SPLICE_F_MORE`: more data follows (lets a kTLS TX socket fill a record before sealing).
    pub const MORE: SpliceFlags = SpliceFlags(libc::SPLICE_F_MORE);

    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl std::ops::BitOr for SpliceFlags {
    type Output = SpliceFlags;
    fn bitor(self, rhs: SpliceFlags) -> SpliceFlags {
        SpliceFlags(self.0 | rhs.0)
    }
}

/// `splice(fd_in, NULL, fd_out, NULL, len, flags)`; one end must be a pipe. Returns the bytes
/// moved; 0 means end of input. On a kTLS RX socket, `EINVAL` means the next record is not
/// application data and must be read with [`recv_record`] (research T6).
pub fn splice(
    fd_in: BorrowedFd<'_>,
    fd_out: BorrowedFd<'_>,
    len: usize,
    flags: SpliceFlags,
) -> io::Result<usize> {
    // SAFETY: null offsets are allowed (use/advance the file position); both fds are live.
    cvt_size(unsafe {
        libc::splice(
            fd_in.as_raw_fd(),
            ptr::null_mut(),
            fd_out.as_raw_fd(),
            ptr::null_mut(),
            len,
            flags.0,
        )
    })
}

/// `pipe2(O_CLOEXEC [| O_NONBLOCK])`, returning `(read end, write end)`.
pub fn pipe2(nonblock: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = MaybeUninit::<[c_int; 2]>::uninit();
    let flags = libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: `fds` is writable for two c_ints, which pipe2 fills on success.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr().cast(), flags) })?;
    // SAFETY: pipe2 succeeded, so both elements are initialised.
    let [r, w] = unsafe { fds.assume_init() };
    // SAFETY: `r` and `w` are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(r), OwnedFd::from_raw_fd(w)) })
}

/// Bytes a pipe holds now (`FIONREAD` on its read end). A pipe's size (`F_GETPIPE_SZ`) bounds
/// its buffers, not its bytes: a buffer spliced from a socket may hold more than a page.
pub fn pipe_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut c_int) })?;
    usize::try_from(n).map_err(|_| io::Error::other("negative FIONREAD"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_field_offsets_match_tls_h() {
        assert_eq!(mem::offset_of!(Tls12CryptoInfoAesGcm128, iv), 4);
        assert_eq!(mem::offset_of!(Tls12CryptoInfoAesGcm128, key), 12);
        assert_eq!(mem::offset_of!(Tls12CryptoInfoAesGcm128, salt), 28);
        assert_eq!(mem::offset_of!(Tls12CryptoInfoAesGcm128, rec_seq), 32);
        assert_eq!(mem::offset_of!(Tls12CryptoInfoAesGcm256, key), 12);
        assert_eq!(mem::offset_of!(Tls12CryptoInfoAesGcm256, salt), 44);
        assert_eq!(mem::offset_of!(Tls12CryptoInfoAesGcm256, rec_seq), 48);
        assert_eq!(mem::offset_of!(Tls12CryptoInfoChacha20Poly1305, key), 16);
        assert_eq!(
            mem::offset_of!(Tls12CryptoInfoChacha20Poly1305, rec_seq),
            48
        );
    }

    #[test]
    fn wipe_zeroes() {
        let mut k = [0xAAu8; 32];
        wipe(&mut k);
        assert_eq!(k, [0u8; 32]);
    }

    #[test]
    fn debug_redacts_key() {
        let ci = CryptoInfo::Aes128Gcm(Tls12CryptoInfoAesGcm128 {
            info: TlsCryptoInfo {
                version: TLS_1_3_VERSION,
                cipher_type: TLS_CIPHER_AES_GCM_128,
            },
            iv: [0x22; 8],
            key: [0x11; 16],
            salt: [0x33; 4],
            rec_seq: 7u64.to_be_bytes(),
        });
        let s = format!("{ci:?}");
        assert!(s.contains("redacted") && s.contains("rec_seq: 7"), "{s}");
        assert!(!s.contains("17, 17") && !s.contains("34, 34"), "{s}");
    }

    #[test]
    fn pipe_len_counts_the_bytes_a_pipe_holds() {
        use std::os::fd::AsFd;
        let (r, w) = pipe2(true).unwrap();
        assert_eq!(pipe_len(r.as_fd()).unwrap(), 0);
        let mut f = std::fs::File::from(w);
        std::io::Write::write_all(&mut f, &[7u8; 5000]).unwrap();
        assert_eq!(pipe_len(r.as_fd()).unwrap(), 5000);
    }

    #[test]
    fn pipe_splice_roundtrip() {
        // splice between two pipes is not allowed by the kernel except via tee; use a pipe and a
        // socketpair instead: socket -> pipe works on any kernel.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::io::{Read, Write};
        let (r, w) = pipe2(false).unwrap();
        (&a).write_all(b"hello").unwrap();
        use std::os::fd::AsFd;
        let n = splice(
            b.as_fd(),
            w.as_fd(),
            5,
            SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
        )
        .unwrap();
        assert_eq!(n, 5);
        let mut out = [0u8; 5];
        std::fs::File::from(r).read_exact(&mut out).unwrap();
        assert_eq!(&out, b"hello");
    }
}
