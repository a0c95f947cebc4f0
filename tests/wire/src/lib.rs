//! The wire oracle: what really crossed an interface, and whether any of it was plaintext.
//!
//! A test starts a [`Capture`] on an interface of its network namespace (an `AF_PACKET` socket,
//! the same tap tcpdump uses), runs traffic, and stops it. [`Streams::from_frames`] parses the
//! frames (Ethernet or raw IP → IPv4/IPv6 → TCP) and reassembles each TCP direction by sequence
//! number, so a secret split across two segments is still found. Then:
//! * [`assert_no_plaintext`] fails if any 16-byte window of a known payload occurs anywhere in
//!   the captured bytes (research: "Tests that prove no plaintext reaches the wire", item 1);
//! * [`assert_tls_records`] fails unless a byte stream is exactly a sequence of TLS records.
//!
//! An oracle that cannot fail proves nothing, so every user should also run a negative control
//! (the same exchange without kTLS must be *found* by [`find_plaintext`]); see
//! `tests/tests/ktls_guards.rs`.

use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// Length of the windows [`find_plaintext`] looks for: long enough that a chance match in
/// ciphertext is impossible in practice (2^-128 per position), short enough to catch partial
/// leaks such as one plaintext TCP segment.
pub const WINDOW: usize = 16;

// <linux/if_packet.h>; spelled out here because libc's coverage differs between versions.
const PACKET_OUTGOING: u8 = 4;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    _tp_packets: u32,
    tp_drops: u32,
}

/// One link-layer frame as the capture socket saw it.
#[derive(Clone)]
pub struct Frame {
    /// `PACKET_HOST`, `PACKET_OUTGOING`, ... from `sockaddr_ll`.
    pub pkt_type: u8,
    /// `ARPHRD_*` of the interface: Ethernet/loopback frames start with a 14-byte Ethernet
    /// header, others (tun, ipip) with the IP header.
    pub hatype: u16,
    pub data: Vec<u8>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Frame {{ pkt_type: {}, hatype: {}, len: {} }}",
            self.pkt_type,
            self.hatype,
            self.data.len()
        )
    }
}

impl Frame {
    /// An Ethernet frame (what `lo` and veth deliver).
    pub fn ethernet(data: Vec<u8>) -> Frame {
        Frame {
            pkt_type: 0,
            hatype: ARPHRD_ETHER,
            data,
        }
    }

    /// The TCP segment inside, if this is an unfragmented IPv4/IPv6 TCP packet.
    pub fn tcp(&self) -> Option<Segment<'_>> {
        match self.hatype {
            ARPHRD_ETHER | ARPHRD_LOOPBACK => parse_ethernet(&self.data),
            _ => parse_ip(&self.data),
        }
    }
}

/// A running capture on one interface of the netns the calling thread is in.
pub struct Capture {
    ifname: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<CaptureResult>>>,
}

struct CaptureResult {
    frames: Vec<Frame>,
    truncated: usize,
    drops: u32,
}

/// Which frames a capture keeps.
#[derive(Debug, Clone, Default)]
pub enum Filter {
    /// Everything.
    #[default]
    All,
    /// TCP segments with a source or destination port in the list (saves memory when other
    /// flows on the same interface carry plaintext legitimately, e.g. the app side of a proxy).
    TcpPorts(Vec<u16>),
}

impl Capture {
    /// Starts capturing every frame on `ifname`. Panics, saying why, if that is impossible
    /// (it needs CAP_NET_RAW: run as root or in the VM).
    ///
    /// Frames are recorded from the moment this returns. On loopback each packet would be seen
    /// twice (once `PACKET_OUTGOING` on transmit, once `PACKET_HOST` on receive); the outgoing
    /// copy is suppressed with `PACKET_IGNORE_OUTGOING` (4.20+) and, as a second line, dropped
    /// in userspace, so each packet is recorded exactly once.
    pub fn start(ifname: &str) -> Capture {
        Self::start_filtered(ifname, Filter::All)
    }

    /// Like [`Capture::start`], for an interface inside the network namespace at `netns` (a
    /// packet socket stays bound to the namespace it was opened in).
    pub fn start_in(netns: &std::path::Path, ifname: &str) -> Capture {
        let name = ifname.to_owned();
        let fd = interceptor::sys::in_netns(netns, move || open_packet_socket(&name))
            .unwrap_or_else(|e| panic!("wire capture on {ifname} in {}: {e}", netns.display()));
        Self::from_fd(fd, ifname, Filter::All)
    }

    /// Like [`Capture::start`], keeping only frames that match `filter`.
    pub fn start_filtered(ifname: &str, filter: Filter) -> Capture {
        let fd = open_packet_socket(ifname).unwrap_or_else(|e| {
            panic!(
                "wire capture on {ifname}: {e} (AF_PACKET needs CAP_NET_RAW: run as root, or via \
                 `cargo xtask vm-test`)"
            )
        });
        Self::from_fd(fd, ifname, filter)
    }

    fn from_fd(fd: OwnedFd, ifname: &str, filter: Filter) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("capture-{ifname}"))
            .spawn(move || capture_loop(&fd, &stop2, &filter))
            .expect("spawn capture thread");
        Capture {
            ifname: ifname.to_string(),
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the capture after draining everything already queued, and returns the frames in
    /// arrival order. Panics if the kernel dropped or truncated any frame: an incomplete
    /// capture cannot prove the absence of plaintext.
    ///
    /// Call it only after the receiving side has read all the data: on loopback a frame is
    /// queued to the capture before TCP delivers its payload, so everything received is in.
    pub fn stop(mut self) -> Vec<Frame> {
        self.stop.store(true, Ordering::SeqCst);
        let r = self
            .thread
            .take()
            .expect("capture thread")
            .join()
            .expect("capture thread panicked")
            .unwrap_or_else(|e| panic!("wire capture on {}: {e}", self.ifname));
        assert_eq!(
            r.drops, 0,
            "wire capture on {}: the kernel dropped {} frames (capture incomplete)",
            self.ifname, r.drops
        );
        assert_eq!(
            r.truncated, 0,
            "wire capture on {}: {} frames were larger than the capture buffer",
            self.ifname, r.truncated
        );
        r.frames
    }

    /// [`Capture::stop`], then [`Streams::from_frames`].
    pub fn stop_streams(self) -> Streams {
        Streams::from_frames(self.stop())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` is a live c_int and the length matches it.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn open_packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let cname = CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `cname` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {ifname} in this network namespace"),
        ));
    }
    // Protocol 0: the socket receives nothing until bind() names the protocol and interface,
    // so no frame from another interface can slip in between socket() and bind().
    // SAFETY: plain socket(2) call.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Big enough to hold a whole 64 MiB transfer should the reader fall behind (needs
    // CAP_NET_ADMIN for the FORCE variant; the plain one is capped by rmem_max).
    if setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 512 << 20).is_err() {
        setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 512 << 20)?;
    }
    if is_loopback(ifname)? {
        // Best effort (4.20+); capture_loop also skips PACKET_OUTGOING on loopback.
        let _ = setsockopt_int(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll and the length matches it.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

fn is_loopback(ifname: &str) -> io::Result<bool> {
    // SAFETY: plain socket(2) call; the fd is wrapped immediately.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fresh descriptor.
    let s = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { mem::zeroed() };
    for (d, b) in ifr
        .ifr_name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads ifr_name and writes ifr_ifru.ifru_flags of a valid ifreq.
    cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut ifr) })?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    Ok(flags & libc::IFF_LOOPBACK as libc::c_short != 0)
}

fn capture_loop(fd: &OwnedFd, stop: &AtomicBool, filter: &Filter) -> io::Result<CaptureResult> {
    let mut buf = vec![0u8; 256 << 10];
    let mut res = CaptureResult {
        frames: Vec::new(),
        truncated: 0,
        drops: 0,
    };
    loop {
        // Read the flag before draining: once it is set, the drain that follows sees every
        // frame queued before stop() was called.
        let stopping = stop.load(Ordering::SeqCst);
        loop {
            // SAFETY: sockaddr_ll is plain old data.
            let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
            let mut sl = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its length, `sll`/`sl` form a valid address buffer.
            let n = unsafe {
                libc::recvfrom(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    (&raw mut sll).cast(),
                    &mut sl,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n > buf.len() {
                res.truncated += 1;
                continue;
            }
            if sll.sll_hatype == ARPHRD_LOOPBACK && sll.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            let frame = Frame {
                pkt_type: sll.sll_pkttype,
                hatype: sll.sll_hatype,
                data: buf[..n].to_vec(),
            };
            let keep = match filter {
                Filter::All => true,
                Filter::TcpPorts(ports) => frame.tcp().is_some_and(|s| {
                    ports.contains(&s.src.port()) || ports.contains(&s.dst.port())
                }),
            };
            if keep {
                res.frames.push(frame);
            }
        }
        if stopping {
            break;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&raw mut pfd, 1, 20) };
    }
    let mut st = TpacketStats::default();
    let mut len = mem::size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: `st` is writable for `len` bytes, the layout of struct tpacket_stats.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_STATISTICS,
            (&raw mut st).cast(),
            &mut len,
        )
    })?;
    res.drops = st.tp_drops;
    Ok(res)
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// TCP header flags.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// One TCP segment, borrowed from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub flags: u8,
    pub payload: &'a [u8],
}

/// Parses an Ethernet frame (with up to two VLAN tags). Loopback frames carry an Ethernet
/// header too (zero MACs).
pub fn parse_ethernet(frame: &[u8]) -> Option<Segment<'_>> {
    let mut off = 12;
    loop {
        let et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
        off += 2;
        match et {
            0x8100 | 0x88a8 => off += 2, // skip the TCI, read the inner ethertype
            0x0800 | 0x86dd => return parse_ip(frame.get(off..)?),
            _ => return None,
        }
    }
}

/// Parses an IPv4 or IPv6 packet carrying TCP. Fragments are not reassembled (loopback and
/// veth never fragment TCP: it segments by MSS), so they yield `None`.
pub fn parse_ip(pkt: &[u8]) -> Option<Segment<'_>> {
    match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if ihl < 20 || pkt.len() < ihl {
                return None;
            }
            // A zero total length appears on GSO super-packets (BIG TCP); use what is there.
            let tot = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            let end = if tot == 0 {
                pkt.len()
            } else {
                tot.min(pkt.len())
            };
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
            if frag & 0x3fff != 0 || pkt[9] != 6 || end < ihl {
                return None;
            }
            let src = IpAddr::V4(Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]));
            parse_tcp(src, dst, &pkt[ihl..end])
        }
        6 => {
            if pkt.len() < 40 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            let end = if plen == 0 {
                pkt.len()
            } else {
                (40 + plen).min(pkt.len())
            };
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&pkt[8..24]).ok()?));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&pkt[24..40]).ok()?));
            let mut next = pkt[6];
            let mut off = 40;
            loop {
                match next {
                    6 => return parse_tcp(src, dst, pkt.get(off..end)?),
                    0 | 43 | 60 => {
                        let h = pkt.get(off..off + 2)?;
                        next = h[0];
                        off += (usize::from(h[1]) + 1) * 8;
                    }
                    51 => {
                        let h = pkt.get(off..off + 2)?;
                        next = h[0];
                        off += (usize::from(h[1]) + 2) * 4;
                    }
                    _ => return None, // includes 44 (fragment)
                }
            }
        }
        _ => None,
    }
}

fn parse_tcp(src: IpAddr, dst: IpAddr, t: &[u8]) -> Option<Segment<'_>> {
    if t.len() < 20 {
        return None;
    }
    let doff = usize::from(t[12] >> 4) * 4;
    if doff < 20 || t.len() < doff {
        return None;
    }
    Some(Segment {
        src: SocketAddr::new(src, u16::from_be_bytes([t[0], t[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([t[2], t[3]])),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags: t[13],
        payload: &t[doff..],
    })
}

// ---------------------------------------------------------------------------------------------
// Reassembly

/// One direction of one TCP connection, reassembled.
#[derive(Debug, Clone)]
pub struct Stream {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Payload bytes in sequence order, retransmissions removed. Holes (see `gaps`) are
    /// skipped, not zero-filled.
    pub bytes: Vec<u8>,
    /// Missing sequence ranges, relative to the first byte: the capture lost them.
    pub gaps: Vec<(u64, u64)>,
    /// Bytes seen more than once whose contents differed between copies. TCP never does that;
    /// non-zero means something other than TCP retransmission wrote into the stream.
    pub conflicting_bytes: u64,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    /// Segments carrying payload.
    pub segments: usize,
}

impl Stream {
    /// Panics unless the stream was captured without holes or conflicting copies, so that
    /// byte-level assertions on it are sound.
    pub fn assert_complete(&self) {
        assert!(
            self.gaps.is_empty(),
            "stream {} -> {}: capture has holes at {:?}",
            self.src,
            self.dst,
            &self.gaps[..self.gaps.len().min(8)]
        );
        assert_eq!(
            self.conflicting_bytes, 0,
            "stream {} -> {}: retransmitted bytes differ from the original",
            self.src, self.dst
        );
    }
}

struct FlowState {
    last_seq: u32,
    last_abs: i64,
    segs: Vec<(i64, Vec<u8>)>,
    syn_abs: Option<i64>,
    fin: bool,
    rst: bool,
}

/// All TCP streams of a capture, in order of first appearance.
#[derive(Debug, Clone, Default)]
pub struct Streams {
    pub streams: Vec<Stream>,
}

impl Streams {
    /// Parses and reassembles. Consumes the frames so a 64 MiB capture is not held twice.
    ///
    /// Sequence numbers are unwrapped incrementally (each segment relative to the previous one
    /// of its flow), so streams longer than 4 GiB and ISNs near 2^32 both work. The stream
    /// starts at the SYN if it was captured, otherwise at the lowest sequence seen.
    pub fn from_frames(frames: Vec<Frame>) -> Streams {
        let mut order: Vec<(SocketAddr, SocketAddr)> = Vec::new();
        let mut flows: HashMap<(SocketAddr, SocketAddr), FlowState> = HashMap::new();
        for frame in frames {
            let Some(seg) = frame.tcp() else { continue };
            let syn = seg.flags & tcp_flags::SYN != 0;
            // The SYN occupies one sequence number; its data (TFO) starts after it.
            let data_seq = seg.seq.wrapping_add(u32::from(syn));
            let key = (seg.src, seg.dst);
            let st = flows.entry(key).or_insert_with(|| {
                order.push(key);
                FlowState {
                    last_seq: data_seq,
                    last_abs: 0,
                    segs: Vec::new(),
                    syn_abs: None,
                    fin: false,
                    rst: false,
                }
            });
            let abs = st.last_abs + i64::from(data_seq.wrapping_sub(st.last_seq) as i32);
            st.last_seq = data_seq;
            st.last_abs = abs;
            if syn {
                st.syn_abs = Some(abs);
            }
            st.fin |= seg.flags & tcp_flags::FIN != 0;
            st.rst |= seg.flags & tcp_flags::RST != 0;
            if !seg.payload.is_empty() {
                st.segs.push((abs, seg.payload.to_vec()));
            }
        }
        let streams = order
            .into_iter()
            .map(|key| {
                let st = flows.remove(&key).expect("flow");
                assemble(key, st)
            })
            .collect();
        Streams { streams }
    }

    /// The stream from `src` to `dst`.
    pub fn get(&self, src: SocketAddr, dst: SocketAddr) -> Option<&Stream> {
        self.streams.iter().find(|s| s.src == src && s.dst == dst)
    }

    /// Both directions between `a` and `b` (whichever were captured).
    pub fn between(&self, a: SocketAddr, b: SocketAddr) -> Vec<&Stream> {
        self.streams
            .iter()
            .filter(|s| (s.src == a && s.dst == b) || (s.src == b && s.dst == a))
            .collect()
    }

    /// Total reassembled payload bytes.
    pub fn total_bytes(&self) -> usize {
        self.streams.iter().map(|s| s.bytes.len()).sum()
    }
}

fn assemble(key: (SocketAddr, SocketAddr), mut st: FlowState) -> Stream {
    let segments = st.segs.len();
    // Longest first among equal starts, so a shorter duplicate is fully covered.
    st.segs
        .sort_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
    let origin = st
        .syn_abs
        .or_else(|| st.segs.first().map(|s| s.0))
        .unwrap_or(0);
    let mut bytes: Vec<u8> = Vec::new();
    let mut gaps = Vec::new();
    let mut conflicting_bytes = 0u64;
    let mut cursor = origin; // absolute seq of the next byte we do not have
    let mut skipped = 0i64; // bytes missing so far (holes are not zero-filled)
    for (start, data) in st.segs {
        let end = start + data.len() as i64;
        if end <= origin {
            continue; // before the SYN: not part of this connection
        }
        let (start, data) = if start < origin {
            (origin, &data[(origin - start) as usize..])
        } else {
            (start, &data[..])
        };
        if start > cursor {
            gaps.push(((cursor - origin) as u64, (start - origin) as u64));
            skipped += start - cursor;
            cursor = start;
        }
        // Overlap with what we already have: compare, then append only the new tail.
        let overlap = (cursor - start).min(data.len() as i64) as usize;
        if overlap > 0 {
            let have_from = (start - origin - skipped) as usize;
            let have = &bytes[have_from..have_from + overlap];
            conflicting_bytes += have
                .iter()
                .zip(&data[..overlap])
                .filter(|(a, b)| a != b)
                .count() as u64;
        }
        if end > cursor {
            bytes.extend_from_slice(&data[overlap..]);
            cursor = end;
        }
    }
    Stream {
        src: key.0,
        dst: key.1,
        bytes,
        gaps,
        conflicting_bytes,
        syn: st.syn_abs.is_some(),
        fin: st.fin,
        rst: st.rst,
        segments,
    }
}

// ---------------------------------------------------------------------------------------------
// Plaintext search

/// Things [`find_plaintext`] can search: each yields labelled byte strings.
pub trait Haystacks {
    fn for_each(&self, f: &mut dyn FnMut(String, &[u8]));
}

impl Haystacks for [u8] {
    fn for_each(&self, f: &mut dyn FnMut(String, &[u8])) {
        f("bytes".into(), self);
    }
}

impl Haystacks for Vec<u8> {
    fn for_each(&self, f: &mut dyn FnMut(String, &[u8])) {
        f("bytes".into(), self);
    }
}

/// The whole raw frame, headers included: catches plaintext in any packet, TCP or not, but
/// not a window split across two segments (use [`Streams`] for that).
impl Haystacks for Frame {
    fn for_each(&self, f: &mut dyn FnMut(String, &[u8])) {
        f(format!("raw frame ({} bytes)", self.data.len()), &self.data);
    }
}

impl Haystacks for Stream {
    fn for_each(&self, f: &mut dyn FnMut(String, &[u8])) {
        f(
            format!("TCP stream {} -> {}", self.src, self.dst),
            &self.bytes,
        );
    }
}

impl Haystacks for Streams {
    fn for_each(&self, f: &mut dyn FnMut(String, &[u8])) {
        self.streams.as_slice().for_each(f);
    }
}

impl<T: Haystacks> Haystacks for [T] {
    fn for_each(&self, f: &mut dyn FnMut(String, &[u8])) {
        for (i, h) in self.iter().enumerate() {
            h.for_each(&mut |label, b| f(format!("#{i} {label}"), b));
        }
    }
}

impl<T: Haystacks> Haystacks for Vec<T> {
    fn for_each(&self, f: &mut dyn FnMut(String, &[u8])) {
        self.as_slice().for_each(f);
    }
}

impl<T: Haystacks + ?Sized> Haystacks for &T {
    fn for_each(&self, f: &mut dyn FnMut(String, &[u8])) {
        (**self).for_each(f);
    }
}

/// Where a payload window was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub haystack: String,
    /// Offset of the match in the haystack.
    pub at: usize,
    /// Offset of the match in the payload.
    pub payload_offset: usize,
    /// Length of the maximal common run around the hit (≥ [`WINDOW`]).
    pub len: usize,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes of plaintext (payload offset {}) at offset {} of {}",
            self.len, self.payload_offset, self.at, self.haystack
        )
    }
}

/// An index of a payload for finding any [`WINDOW`]-byte window of it in other bytes.
///
/// Exact and complete (no sampling), in one of two layouts, chosen by which side is larger:
///
/// * **sparse** ([`PlaintextIndex::new`]): the 8-byte blocks of the payload that start at every
///   9th offset (P/9 entries, ~2.3 bytes of memory per payload byte). Any 16-byte window
///   `payload[p..p+16]` contains the block at the first multiple of 9 at or after `p` (that
///   block ends at most at `p+8+8`), so every occurrence of any window in a haystack contains
///   an indexed block at some haystack offset: the search looks up the 8 bytes at *every*
///   haystack offset.
/// * **dense** ([`PlaintextIndex::for_haystacks`], when the haystacks hold many times more
///   bytes than the payload): the block at *every* payload offset (~20 bytes of memory per
///   payload byte), so the search needs to look up only every 9th haystack offset: an
///   occurrence of a window at haystack offset `h` contains the haystack block at the first
///   multiple of 9 at or after `h`, and that block is some payload offset's block. A long
///   capture of a small payload (upgrade_ktls: ~100 MB against 1 MiB) is searched several
///   times faster, which is what those VM tests' time went to under emulation.
///
/// A lookup is one hash probe (a 32-bit fingerprint in the slot avoids touching the payload on
/// misses); on a hit the match is extended left and right byte by byte to decide whether a
/// common run of ≥ 16 bytes exists.
///
/// Meant for high-entropy payloads (random bytes or markers). A payload with many identical
/// 8-byte blocks still gives correct answers but is searched more slowly.
pub struct PlaintextIndex<'p> {
    payload: &'p [u8],
    /// 0 = empty; else fingerprint << 32 | (block index + 1).
    slots: Vec<u64>,
    /// Chains payload blocks that share an 8-byte value: block index -> next block index + 1.
    next: Vec<u32>,
    mask: usize,
    /// Payload offset of block `k`: `k * stride` (1: dense, [`STRIDE`]: sparse).
    stride: usize,
}

const BLOCK: usize = 8;
const STRIDE: usize = WINDOW - BLOCK + 1;
/// The largest payload given a dense index (~20 bytes of memory per payload byte).
const DENSE_MAX: usize = 8 << 20;
/// How many times the payload's size the haystacks must hold for a dense index to pay: an
/// insertion costs about three sparse lookups and a dense lookup (a table too big for the
/// caches) about two and a half (measured unoptimised: 4 MiB against 7 MiB is faster sparse,
/// 1 MiB against 32 MiB four times faster dense).
const DENSE_RATIO: usize = 4;

// `mix` and `block_at` run once per haystack lookup. The tests are built unoptimised, where a
// function call (or a range index, `try_into`, an iterator adapter) costs more than the work:
// they are inlined even there, and the search loop below indexes plain slices.
#[inline(always)]
fn mix(x: u64) -> u64 {
    // splitmix64 finaliser
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline(always)]
fn block_at(b: &[u8], off: usize) -> u64 {
    (b[off] as u64)
        | (b[off + 1] as u64) << 8
        | (b[off + 2] as u64) << 16
        | (b[off + 3] as u64) << 24
        | (b[off + 4] as u64) << 32
        | (b[off + 5] as u64) << 40
        | (b[off + 6] as u64) << 48
        | (b[off + 7] as u64) << 56
}

impl<'p> PlaintextIndex<'p> {
    /// Indexes `payload` (at least [`WINDOW`] bytes, under 32 GiB) sparsely: every haystack
    /// offset is looked up.
    pub fn new(payload: &'p [u8]) -> Self {
        Self::with_stride(payload, STRIDE)
    }

    /// Indexes `payload` for searching haystacks of `haystack_bytes` in all: densely when they
    /// are over [`DENSE_RATIO`] times larger than the payload (and the payload at most
    /// [`DENSE_MAX`]), else sparsely.
    pub fn for_haystacks(payload: &'p [u8], haystack_bytes: usize) -> Self {
        let dense = haystack_bytes / DENSE_RATIO > payload.len() && payload.len() <= DENSE_MAX;
        Self::with_stride(payload, if dense { 1 } else { STRIDE })
    }

    fn with_stride(payload: &'p [u8], stride: usize) -> Self {
        assert!(
            payload.len() >= WINDOW,
            "payload must be at least {WINDOW} bytes to search for"
        );
        let nblocks = (payload.len() - BLOCK) / stride + 1;
        assert!(nblocks < u32::MAX as usize, "payload too large to index");
        let cap = (nblocks * 2).next_power_of_two().max(16);
        let mask = cap - 1;
        let mut slots = vec![0u64; cap];
        let mut next = vec![0u32; nblocks];
        // Plain slices and a `while` loop: this runs once per indexed block, unoptimised.
        let (table, chain) = (slots.as_mut_slice(), next.as_mut_slice());
        let mut k = 0;
        while k < nblocks {
            let v = block_at(payload, k * stride);
            let h = mix(v);
            let fp = h >> 32;
            let mut i = (h as usize) & mask;
            loop {
                let s = table[i];
                if s == 0 {
                    table[i] = (fp << 32) | (k as u64 + 1);
                    break;
                }
                let other = (s & 0xffff_ffff) as usize - 1;
                if s >> 32 == fp && block_at(payload, other * stride) == v {
                    // Same block value: chain it behind the head so lookups see every
                    // occurrence.
                    chain[k] = chain[other];
                    chain[other] = k as u32 + 1;
                    break;
                }
                i = (i + 1) & mask;
            }
            k += 1;
        }
        PlaintextIndex {
            payload,
            slots,
            next,
            mask,
            stride,
        }
    }

    /// The first place some [`WINDOW`]-byte window of the payload occurs in `hay`, as
    /// `(haystack offset, payload offset, length of the common run)`.
    pub fn find_in(&self, hay: &[u8]) -> Option<(usize, usize, usize)> {
        if hay.len() < BLOCK {
            return None;
        }
        // Dense: every payload offset is indexed, so every 9th haystack offset suffices.
        let step = if self.stride == 1 { STRIDE } else { 1 };
        let (p, slots, mask) = (self.payload, self.slots.as_slice(), self.mask);
        let last = hay.len() - BLOCK;
        let mut i = 0;
        while i <= last {
            let v = block_at(hay, i);
            let h = mix(v);
            let fp = h >> 32;
            let mut slot = (h as usize) & mask;
            loop {
                let s = slots[slot];
                if s == 0 {
                    break;
                }
                if s >> 32 == fp {
                    let head = (s & 0xffff_ffff) as usize - 1;
                    if block_at(p, head * self.stride) == v {
                        let mut k = Some(head);
                        while let Some(kk) = k {
                            let o = kk * self.stride;
                            let mut l = 0;
                            while l < i.min(o) && hay[i - l - 1] == p[o - l - 1] {
                                l += 1;
                            }
                            let mut r = BLOCK;
                            while i + r < hay.len() && o + r < p.len() && hay[i + r] == p[o + r] {
                                r += 1;
                            }
                            if l + r >= WINDOW {
                                return Some((i - l, o - l, l + r));
                            }
                            k = self.next[kk].checked_sub(1).map(|n| n as usize);
                        }
                        break; // the block value is unique in the table
                    }
                }
                slot = (slot + 1) & mask;
            }
            i += step;
        }
        None
    }
}

/// Searches every haystack for any [`WINDOW`]-byte window of `payload`; see [`PlaintextIndex`].
pub fn find_plaintext<H: Haystacks + ?Sized>(haystacks: &H, payload: &[u8]) -> Option<Finding> {
    let mut total = 0usize;
    haystacks.for_each(&mut |_, b| total += b.len());
    let idx = PlaintextIndex::for_haystacks(payload, total);
    let mut found = None;
    haystacks.for_each(&mut |label, bytes| {
        if found.is_none()
            && let Some((at, payload_offset, len)) = idx.find_in(bytes)
        {
            found = Some(Finding {
                haystack: label,
                at,
                payload_offset,
                len,
            });
        }
    });
    found
}

/// Panics if any [`WINDOW`]-byte window of `payload` occurs in any haystack.
pub fn assert_no_plaintext<H: Haystacks + ?Sized>(haystacks: &H, payload: &[u8]) {
    let mut searched = 0usize;
    haystacks.for_each(&mut |_, b| searched += b.len());
    if let Some(f) = find_plaintext(haystacks, payload) {
        panic!("PLAINTEXT ON THE WIRE: {f} ({searched} bytes searched)");
    }
}

// ---------------------------------------------------------------------------------------------
// TLS records

/// The largest TLSCiphertext fragment RFC 8446 §5.2 allows: 2^14 + 256.
pub const MAX_RECORD_LEN: usize = (1 << 14) + 256;

/// One TLS record header found in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Offset of the 5-byte header in the stream.
    pub offset: usize,
    pub content_type: u8,
    pub len: usize,
}

/// Splits `bytes` into TLS records: content type 20..=23, legacy version 0x0303, length at most
/// [`MAX_RECORD_LEN`], and the stream ends exactly at a record boundary.
pub fn parse_tls_records(bytes: &[u8]) -> Result<Vec<RecordHeader>, String> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < bytes.len() {
        let h = bytes.get(off..off + 5).ok_or_else(|| {
            format!(
                "stream ends with a partial record header at offset {off} of {}",
                bytes.len()
            )
        })?;
        let (ty, ver, len) = (
            h[0],
            u16::from_be_bytes([h[1], h[2]]),
            usize::from(u16::from_be_bytes([h[3], h[4]])),
        );
        // RFC 8446 §5.1: a first ClientHello may carry legacy_record_version 0x0301.
        let version_ok = ver == 0x0303 || (ver == 0x0301 && ty == 22);
        if !(20..=23).contains(&ty) || !version_ok || len > MAX_RECORD_LEN {
            return Err(format!(
                "not a TLS record at offset {off}: type {ty}, version {ver:#06x}, length {len} \
                 (bytes {:02x?})",
                &bytes[off..(off + 16).min(bytes.len())]
            ));
        }
        if off + 5 + len > bytes.len() {
            return Err(format!(
                "record at offset {off} claims {len} bytes but the stream ends after {}",
                bytes.len() - off - 5
            ));
        }
        out.push(RecordHeader {
            offset: off,
            content_type: ty,
            len,
        });
        off += 5 + len;
    }
    Ok(out)
}

/// Panics unless `stream_bytes` is exactly a sequence of TLS records; returns their headers.
pub fn assert_tls_records(stream_bytes: &[u8]) -> Vec<RecordHeader> {
    parse_tls_records(stream_bytes).unwrap_or_else(|e| panic!("wire stream is not pure TLS: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Handshake hellos: what key exchange and suite the two ends really agreed on

/// `ServerHello.random` of a HelloRetryRequest (RFC 8446 §4.1.3): SHA-256("HelloRetryRequest").
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];
const EXT_SUPPORTED_GROUPS: u16 = 10;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_KEY_SHARE: u16 = 51;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_PSK_KEY_EXCHANGE_MODES: u16 = 45;

/// The server's answer in one direction of a captured connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// `cipher_suite` (IANA code point, e.g. 0x1301 for TLS_AES_128_GCM_SHA256).
    pub cipher_suite: u16,
    /// The `key_share` group (e.g. 0x11ec for X25519MLKEM768).
    pub group: u16,
    /// Bytes of the server's key share (1120 for X25519MLKEM768, 32 for x25519).
    pub key_share_len: usize,
    /// `supported_versions` (0x0304 for TLS 1.3).
    pub version: u16,
    /// The group a HelloRetryRequest asked for before this ServerHello, if there was one.
    pub retry_group: Option<u16>,
    /// `pre_shared_key`: the index of the client's PSK identity the server accepted, present
    /// only when the session resumes (RFC 8446 §4.2.11).
    pub psk_identity: Option<u16>,
}

/// The client's first flight in one direction of a captured connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The whole handshake message (4-byte header included): what one new connection sends.
    pub message_len: usize,
    pub cipher_suites: Vec<u16>,
    /// `supported_groups`, in the client's preference order.
    pub groups: Vec<u16>,
    /// `key_share` entries: `(group, share length)`.
    pub key_shares: Vec<(u16, usize)>,
    /// PSK identities (tickets) offered in `pre_shared_key`: zero unless trying to resume.
    pub psk_identities: usize,
    /// `psk_key_exchange_modes` (0 `psk_ke`, 1 `psk_dhe_ke`).
    pub psk_modes: Vec<u8>,
}

/// IANA names of the groups the tests meet.
pub fn group_name(group: u16) -> String {
    match group {
        0x001d => "x25519".to_owned(),
        0x0017 => "secp256r1".to_owned(),
        0x0018 => "secp384r1".to_owned(),
        0x11ec => "X25519MLKEM768".to_owned(),
        0x11eb => "SecP256r1MLKEM768".to_owned(),
        other => format!("{other:#06x}"),
    }
}

/// IANA names of the TLS 1.3 suites.
pub fn suite_name(suite: u16) -> String {
    match suite {
        0x1301 => "TLS_AES_128_GCM_SHA256".to_owned(),
        0x1302 => "TLS_AES_256_GCM_SHA384".to_owned(),
        0x1303 => "TLS_CHACHA20_POLY1305_SHA256".to_owned(),
        other => format!("{other:#06x}"),
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: wanted {n} bytes, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], String> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], String> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    fn u16s(mut self) -> Result<Vec<u16>, String> {
        let mut out = Vec::new();
        while !self.0.is_empty() {
            out.push(self.u16()?);
        }
        Ok(out)
    }
}

/// The plaintext handshake messages at the start of a stream, `(type, body)`, up to the first
/// record that is neither handshake nor ChangeCipherSpec (encrypted from then on). Handshake
/// messages may span records, so record bodies are joined first.
fn leading_handshake_messages(stream: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut joined = Vec::new();
    let mut off = 0;
    while let Some(h) = stream.get(off..off + 5) {
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        let body = stream
            .get(off + 5..off + 5 + len)
            .ok_or_else(|| format!("record at {off} runs past the captured bytes"))?;
        match h[0] {
            22 => joined.extend_from_slice(body),
            20 => {}
            _ => break,
        }
        off += 5 + len;
    }
    let mut out = Vec::new();
    let mut c = Cursor(&joined);
    while c.0.len() >= 4 {
        let ty = c.u8()?;
        let l = c.take(3)?;
        let len = (usize::from(l[0]) << 16) | (usize::from(l[1]) << 8) | usize::from(l[2]);
        out.push((ty, c.take(len)?.to_vec()));
    }
    Ok(out)
}

/// Extensions of a hello body after the fixed fields have been read.
fn extensions(c: &mut Cursor<'_>) -> Result<Vec<(u16, Vec<u8>)>, String> {
    let mut exts = Cursor(c.vec16()?);
    let mut out = Vec::new();
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        out.push((ty, exts.vec16()?.to_vec()));
    }
    Ok(out)
}

/// Parses the server→client direction of a captured TLS 1.3 connection: the ServerHello (and
/// the HelloRetryRequest before it, if any).
pub fn parse_server_hello(server_to_client: &[u8]) -> Result<ServerHello, String> {
    let mut retry_group = None;
    for (ty, body) in leading_handshake_messages(server_to_client)? {
        if ty != 2 {
            return Err(format!(
                "handshake message {ty} where a ServerHello belongs"
            ));
        }
        let mut c = Cursor(&body);
        c.take(2)?; // legacy_version
        let random = c.take(32)?;
        c.vec8()?; // legacy_session_id_echo
        let cipher_suite = c.u16()?;
        c.u8()?; // legacy_compression_method
        let exts = extensions(&mut c)?;
        let ext = |want: u16| exts.iter().find(|(t, _)| *t == want).map(|(_, d)| &d[..]);
        let key_share = ext(EXT_KEY_SHARE).ok_or("ServerHello without key_share")?;
        let mut ks = Cursor(key_share);
        let group = ks.u16()?;
        if random == HRR_RANDOM {
            retry_group = Some(group);
            continue;
        }
        let key_share_len = ks.vec16()?.len();
        let version = ext(EXT_SUPPORTED_VERSIONS)
            .map(|v| Cursor(v).u16())
            .transpose()?
            .unwrap_or(0x0303);
        let psk_identity = ext(EXT_PRE_SHARED_KEY)
            .map(|v| Cursor(v).u16())
            .transpose()?;
        return Ok(ServerHello {
            cipher_suite,
            group,
            key_share_len,
            version,
            retry_group,
            psk_identity,
        });
    }
    Err("no ServerHello in the stream's plaintext records".to_owned())
}

/// Parses the first ClientHello of the client→server direction of a captured connection.
pub fn parse_client_hello(client_to_server: &[u8]) -> Result<ClientHello, String> {
    let (ty, body) = leading_handshake_messages(client_to_server)?
        .into_iter()
        .next()
        .ok_or("no handshake message in the stream")?;
    if ty != 1 {
        return Err(format!(
            "handshake message {ty} where a ClientHello belongs"
        ));
    }
    let mut c = Cursor(&body);
    c.take(2)?; // legacy_version
    c.take(32)?; // random
    c.vec8()?; // legacy_session_id
    let cipher_suites = Cursor(c.vec16()?).u16s()?;
    c.vec8()?; // legacy_compression_methods
    let exts = extensions(&mut c)?;
    let ext = |want: u16| exts.iter().find(|(t, _)| *t == want).map(|(_, d)| &d[..]);
    let groups = match ext(EXT_SUPPORTED_GROUPS) {
        Some(d) => Cursor(Cursor(d).vec16()?).u16s()?,
        None => Vec::new(),
    };
    let mut key_shares = Vec::new();
    if let Some(d) = ext(EXT_KEY_SHARE) {
        let mut shares = Cursor(Cursor(d).vec16()?);
        while !shares.0.is_empty() {
            let group = shares.u16()?;
            key_shares.push((group, shares.vec16()?.len()));
        }
    }
    let mut psk_identities = 0;
    if let Some(d) = ext(EXT_PRE_SHARED_KEY) {
        let mut ids = Cursor(Cursor(d).vec16()?);
        while !ids.0.is_empty() {
            ids.vec16()?; // identity (the ticket)
            ids.take(4)?; // obfuscated_ticket_age
            psk_identities += 1;
        }
    }
    let psk_modes = match ext(EXT_PSK_KEY_EXCHANGE_MODES) {
        Some(d) => Cursor(d).vec8()?.to_vec(),
        None => Vec::new(),
    };
    Ok(ClientHello {
        message_len: 4 + body.len(),
        cipher_suites,
        groups,
        key_shares,
        psk_identities,
        psk_modes,
    })
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((a, port))
    }

    fn tcp_header(src: SocketAddr, dst: SocketAddr, seq: u32, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&src.port().to_be_bytes());
        t[2..4].copy_from_slice(&dst.port().to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    /// A synthetic Ethernet frame holding one TCP segment (IPv4 or IPv6 per the addresses),
    /// padded like a short Ethernet frame to check the IP length is honoured.
    fn frame(src: SocketAddr, dst: SocketAddr, seq: u32, flags: u8, payload: &[u8]) -> Frame {
        let mut tcp = tcp_header(src, dst, seq, flags);
        tcp.extend_from_slice(payload);
        let mut f = vec![0u8; 12];
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&[0x08, 0x00]);
                let mut ip = vec![0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
                ip[6] = 0x40; // DF
                ip[8] = 64;
                ip[9] = 6;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&[0x86, 0xdd]);
                let mut ip = vec![0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
                ip[6] = 6;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                f.extend_from_slice(&ip);
            }
            _ => unreachable!(),
        }
        f.extend_from_slice(&tcp);
        while f.len() < 60 {
            f.push(0xee); // Ethernet padding must not leak into the payload
        }
        Frame::ethernet(f)
    }

    fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = mix(s.wrapping_add(0x9e37_79b9_7f4a_7c15));
                s as u8
            })
            .collect()
    }

    #[test]
    fn parses_ipv4_with_padding() {
        let (a, b) = (v4([127, 0, 0, 1], 40000), v4([127, 0, 0, 2], 443));
        let f = frame(a, b, 1000, tcp_flags::ACK | tcp_flags::PSH, b"hi");
        let s = f.tcp().unwrap();
        assert_eq!((s.src, s.dst, s.seq, s.payload), (a, b, 1000, &b"hi"[..]));
        assert_eq!(s.flags, tcp_flags::ACK | tcp_flags::PSH);
    }

    #[test]
    fn parses_ipv6_and_vlan() {
        let a: SocketAddr = "[::1]:5000".parse().unwrap();
        let b: SocketAddr = "[fd00::2]:6000".parse().unwrap();
        let f = frame(a, b, 7, tcp_flags::ACK, b"payload");
        assert_eq!(f.tcp().unwrap().payload, b"payload");
        // Insert an 802.1Q tag.
        let mut tagged = f.data[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&f.data[12..]);
        let t = Frame::ethernet(tagged);
        let s = t.tcp().unwrap();
        assert_eq!((s.src, s.dst, s.payload), (a, b, &b"payload"[..]));
    }

    #[test]
    fn ipv6_extension_header_is_skipped() {
        let a: SocketAddr = "[::1]:1".parse().unwrap();
        let b: SocketAddr = "[::1]:2".parse().unwrap();
        let f = frame(a, b, 1, 0, b"x");
        let mut d = f.data.clone();
        // Turn next-header into hop-by-hop (0) and insert an 8-byte HBH header -> TCP.
        d[14 + 6] = 0;
        let plen = u16::from_be_bytes([d[18], d[19]]) + 8;
        d[18..20].copy_from_slice(&plen.to_be_bytes());
        let hbh = [6u8, 0, 1, 4, 0, 0, 0, 0];
        d.splice(14 + 40..14 + 40, hbh);
        assert_eq!(Frame::ethernet(d).tcp().unwrap().payload, b"x");
    }

    #[test]
    fn non_tcp_and_fragments_are_ignored() {
        let (a, b) = (v4([10, 0, 0, 1], 1), v4([10, 0, 0, 2], 2));
        let mut f = frame(a, b, 1, 0, b"abc");
        f.data[14 + 9] = 17; // UDP
        assert!(f.tcp().is_none());
        let mut f = frame(a, b, 1, 0, b"abc");
        f.data[14 + 6] = 0x20; // MF
        assert!(f.tcp().is_none());
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(Frame::ethernet(arp).tcp().is_none());
        assert!(parse_ethernet(&[0u8; 5]).is_none());
    }

    #[test]
    fn reassembles_out_of_order_with_retransmits() {
        let (a, b) = (v4([127, 0, 0, 1], 1111), v4([127, 0, 0, 1], 2222));
        let isn = 0xffff_fff0; // wraps during the stream
        let data = rand_bytes(100, 1);
        let frames = vec![
            frame(a, b, isn, tcp_flags::SYN, b""),
            frame(b, a, 555, tcp_flags::SYN | tcp_flags::ACK, b""),
            frame(
                a,
                b,
                isn.wrapping_add(1 + 30),
                tcp_flags::ACK,
                &data[30..60],
            ),
            frame(a, b, isn.wrapping_add(1), tcp_flags::ACK, &data[0..30]),
            frame(a, b, isn.wrapping_add(1), tcp_flags::ACK, &data[0..30]), // retransmit
            frame(
                a,
                b,
                isn.wrapping_add(1 + 50),
                tcp_flags::ACK,
                &data[50..80],
            ), // overlap
            frame(a, b, isn.wrapping_add(1 + 80), tcp_flags::FIN, &data[80..]),
            frame(b, a, 556, tcp_flags::ACK, b"reply"),
        ];
        let s = Streams::from_frames(frames);
        assert_eq!(s.streams.len(), 2);
        let fwd = s.get(a, b).unwrap();
        fwd.assert_complete();
        assert_eq!(fwd.bytes, data);
        assert!(fwd.syn && fwd.fin);
        assert_eq!(s.get(b, a).unwrap().bytes, b"reply");
        assert_eq!(s.between(b, a).len(), 2);
        assert_eq!(s.total_bytes(), 105);
    }

    #[test]
    fn gaps_and_conflicts_are_reported() {
        let (a, b) = (v4([1, 1, 1, 1], 1), v4([2, 2, 2, 2], 2));
        let frames = vec![
            frame(a, b, 100, 0, b"aaaa"),
            frame(a, b, 110, 0, b"cccc"),
            frame(a, b, 102, 0, b"XX"), // differs from "aa" at 102..104
        ];
        let s = Streams::from_frames(frames);
        let st = s.get(a, b).unwrap();
        assert_eq!(st.bytes, b"aaaacccc");
        assert_eq!(st.gaps, vec![(4, 10)]);
        assert_eq!(st.conflicting_bytes, 2);
        assert!(std::panic::catch_unwind(|| st.assert_complete()).is_err());
    }

    #[test]
    fn no_syn_starts_at_lowest_seq() {
        let (a, b) = (v4([1, 1, 1, 1], 1), v4([2, 2, 2, 2], 2));
        let s = Streams::from_frames(vec![
            frame(a, b, 20, 0, b"world"),
            frame(a, b, 15, 0, b"hello"),
        ]);
        assert_eq!(s.get(a, b).unwrap().bytes, b"helloworld");
    }

    #[test]
    fn finds_window_split_across_segments() {
        let (a, b) = (v4([1, 1, 1, 1], 1), v4([2, 2, 2, 2], 2));
        let payload = rand_bytes(4096, 7);
        let noise = rand_bytes(3000, 8);
        let mut wire = noise.clone();
        wire.extend_from_slice(&payload[1000..1016]); // exactly one window
        wire.extend_from_slice(&noise);
        // Split the stream so the 16-byte window straddles a segment boundary.
        let cut = noise.len() + 7;
        let frames = vec![
            frame(a, b, 0, 0, &wire[..cut]),
            frame(a, b, cut as u32, 0, &wire[cut..]),
        ];
        // Per-frame search misses it; the reassembled stream finds it.
        assert_eq!(find_plaintext(&frames, &payload), None);
        let s = Streams::from_frames(frames);
        let f = find_plaintext(&s, &payload).expect("window must be found");
        assert_eq!((f.at, f.payload_offset, f.len), (noise.len(), 1000, 16));
        assert!(std::panic::catch_unwind(|| assert_no_plaintext(&s, &payload)).is_err());
    }

    #[test]
    fn window_search_is_exact_at_every_alignment() {
        let payload = rand_bytes(1000, 3);
        let noise = rand_bytes(200, 4);
        for p in [0usize, 1, 5, 8, 9, 17, 500, 983, 984] {
            for len in [15usize, 16] {
                if p + len > payload.len() {
                    continue;
                }
                let mut hay = noise[..37].to_vec();
                hay.extend_from_slice(&payload[p..p + len]);
                hay.extend_from_slice(&noise[37..]);
                let got = find_plaintext(&hay, &payload);
                if len == 16 {
                    let f = got.unwrap_or_else(|| panic!("missed window at payload offset {p}"));
                    assert_eq!((f.at, f.payload_offset, f.len), (37, p, 16));
                } else {
                    assert_eq!(got, None, "15 bytes must not count (p={p})");
                }
            }
        }
        // Whole payload at the very start and end of a haystack.
        assert!(find_plaintext(&payload, &payload).is_some());
        assert!(find_plaintext(&payload[payload.len() - 16..].to_vec(), &payload).is_some());
        assert_eq!(find_plaintext(&noise, &payload), None);
    }

    #[test]
    fn dense_and_sparse_indexes_find_the_same_windows_at_every_alignment() {
        // Every payload offset and every haystack offset modulo the lookup step, both layouts.
        let payload = rand_bytes(64, 5);
        let noise = rand_bytes(300, 6);
        let dense = PlaintextIndex::for_haystacks(&payload, usize::MAX);
        let sparse = PlaintextIndex::new(&payload);
        assert_eq!((dense.stride, sparse.stride), (1, STRIDE));
        for at in 30..30 + 2 * STRIDE {
            for p in 0..=payload.len() - WINDOW {
                for len in [WINDOW - 1, WINDOW] {
                    let mut hay = noise[..at].to_vec();
                    hay.extend_from_slice(&payload[p..p + len]);
                    hay.extend_from_slice(&noise[at..]);
                    // The noise around the run must not happen to extend it.
                    if p > 0 {
                        hay[at - 1] = !payload[p - 1];
                    }
                    if p + len < payload.len() {
                        hay[at + len] = !payload[p + len];
                    }
                    let want = (len == WINDOW).then_some((at, p, WINDOW));
                    assert_eq!(
                        dense.find_in(&hay),
                        want,
                        "dense: at {at}, p {p}, len {len}"
                    );
                    assert_eq!(
                        sparse.find_in(&hay),
                        want,
                        "sparse: at {at}, p {p}, len {len}"
                    );
                }
            }
        }
        // A window ending the haystack exactly, and a haystack shorter than a lookup step.
        let mut hay = noise[..50].to_vec();
        hay.extend_from_slice(&payload[10..26]);
        assert_eq!(dense.find_in(&hay), Some((50, 10, 16)));
        assert_eq!(dense.find_in(&payload[3..19]), Some((0, 3, 16)));
        assert_eq!(dense.find_in(&payload[3..18]), None);
        // A big haystack picks the dense layout, a small one (or a huge payload) the sparse one.
        assert_eq!(PlaintextIndex::for_haystacks(&payload, 4 * 65).stride, 1);
        assert_eq!(
            PlaintextIndex::for_haystacks(&payload, 4 * 65 - 1).stride,
            STRIDE
        );
    }

    #[test]
    fn repetitive_payload_still_exact() {
        // Every indexed block has the same value: lookups walk the chain.
        let mut payload = vec![0xabu8; 200];
        payload[150] = 1;
        let mut hay = vec![0u8; 50];
        hay.extend_from_slice(&[0xab; 15]);
        hay.push(0);
        assert_eq!(find_plaintext(&hay, &payload), None);
        hay.extend_from_slice(&payload[140..160]);
        let f = find_plaintext(&hay, &payload).unwrap();
        assert!(f.len >= 16);
    }

    #[test]
    fn tls_record_parsing() {
        let mut s = vec![23, 3, 3, 0, 3, 1, 2, 3];
        s.extend_from_slice(&[21, 3, 3, 0, 0]);
        let r = assert_tls_records(&s);
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].offset, r[1].content_type, r[1].len), (8, 21, 0));
        assert!(parse_tls_records(&s[..7]).is_err()); // truncated body
        assert!(parse_tls_records(&s[..10]).is_err()); // partial header
        assert!(parse_tls_records(b"GET / HTTP/1.1\r\n").is_err());
        assert!(parse_tls_records(&[24, 3, 3, 0, 0]).is_err());
        assert!(parse_tls_records(&[23, 3, 1, 0, 0]).is_err());
        let mut big = vec![23, 3, 3];
        big.extend_from_slice(&((MAX_RECORD_LEN + 1) as u16).to_be_bytes());
        big.resize(5 + MAX_RECORD_LEN + 1, 0);
        assert!(parse_tls_records(&big).is_err());
        assert!(parse_tls_records(&[]).unwrap().is_empty());
    }

    #[test]
    fn large_payload_index_is_fast_enough() {
        // 4 MiB payload against 4 MiB of unrelated bytes: must complete quickly even unoptimised.
        let payload = rand_bytes(4 << 20, 11);
        let hay = rand_bytes(4 << 20, 12);
        let t = std::time::Instant::now();
        assert_eq!(find_plaintext(&hay, &payload), None);
        assert!(t.elapsed() < std::time::Duration::from_secs(60));
    }

    /// Real hellos from rustls in memory, `(client→server, server→client)` bytes of the
    /// plaintext first flights, with the given groups at each end.
    fn hellos(
        client_groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
        server_groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
    ) -> (Vec<u8>, Vec<u8>) {
        use rustls::crypto::aws_lc_rs::default_provider;
        use std::sync::Arc;
        let provider = |kx_groups| {
            Arc::new(rustls::crypto::CryptoProvider {
                kx_groups,
                ..default_provider()
            })
        };
        let ca = interceptor::ca::Ca::generate(&"cluster.local".parse().unwrap()).unwrap();
        let id = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let leaf = interceptor::ca::CertificateAuthority::issue(
            &ca,
            &id,
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider(server_groups))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(leaf.chain().to_vec(), leaf.key().clone_key())
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider(client_groups))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut c =
            rustls::ClientConnection::new(Arc::new(client), "example.org".try_into().unwrap())
                .unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        let (up, down, refused) = pump(&mut c, &mut s);
        // The client refuses the certificate (no DNS name); the hellos are all we need.
        assert!(
            refused.is_some(),
            "the client took a certificate for another name"
        );
        (up, down)
    }

    /// Runs an in-memory handshake: `(client→server, server→client)` bytes, and the client's
    /// error if it gave up (the bytes then end with the flight it refused). Four flights each
    /// way cover a full or resumed TLS 1.3 handshake and the server's tickets.
    fn pump(
        c: &mut rustls::ClientConnection,
        s: &mut rustls::ServerConnection,
    ) -> (Vec<u8>, Vec<u8>, Option<rustls::Error>) {
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            let mut out = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut out).unwrap();
            }
            up.extend_from_slice(&out);
            s.read_tls(&mut &out[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut back = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut back).unwrap();
            }
            down.extend_from_slice(&back);
            c.read_tls(&mut &back[..]).unwrap();
            if let Err(e) = c.process_new_packets() {
                return (up, down, Some(e));
            }
        }
        (up, down, None)
    }

    #[test]
    fn hellos_show_the_hybrid_group_and_its_classical_share() {
        use rustls::crypto::aws_lc_rs::kx_group::*;
        let (up, down) = hellos(vec![X25519MLKEM768, X25519], vec![X25519MLKEM768, X25519]);
        let ch = parse_client_hello(&up).unwrap();
        assert_eq!(ch.groups, [0x11ec, 0x001d]);
        assert_eq!(ch.key_shares, [(0x11ec, 1216), (0x001d, 32)]);
        assert!(ch.message_len > 1216, "{ch:?}");
        let sh = parse_server_hello(&down).unwrap();
        assert_eq!(group_name(sh.group), "X25519MLKEM768");
        assert_eq!(sh.key_share_len, 1120);
        assert_eq!(sh.version, 0x0304);
        assert_eq!(sh.retry_group, None);
        assert!(suite_name(sh.cipher_suite).starts_with("TLS_AES_"));

        // A server without the hybrid takes the classical share at once.
        let (_, down) = hellos(vec![X25519MLKEM768, X25519], vec![X25519]);
        let sh = parse_server_hello(&down).unwrap();
        assert_eq!(
            (group_name(sh.group).as_str(), sh.retry_group),
            ("x25519", None)
        );
    }

    /// Both directions of a complete in-memory handshake with the given configs, the
    /// server's ticket delivered.
    fn captured(
        client: std::sync::Arc<rustls::ClientConfig>,
        server: std::sync::Arc<rustls::ServerConfig>,
    ) -> (Vec<u8>, Vec<u8>) {
        let name =
            rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([10, 0, 0, 7]).into());
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        let (up, down, refused) = pump(&mut c, &mut s);
        assert!(refused.is_none(), "{refused:?}");
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (up, down)
    }

    #[test]
    fn a_resumed_mesh_handshake_shows_its_psk_on_the_wire() {
        use interceptor::handshake::{
            MeshCrypto, SessionResumption, client_config_with, mesh_roots, server_config_with,
        };
        use std::sync::Arc;
        let td: interceptor::identity::TrustDomain = "cluster.local".parse().unwrap();
        let ca = interceptor::ca::Ca::generate(&td).unwrap();
        let issue = |spiffe: &str| {
            interceptor::ca::CertificateAuthority::issue(
                &ca,
                &spiffe.parse().unwrap(),
                std::time::Duration::from_secs(600),
            )
            .unwrap()
        };
        let (client, server) = (
            issue("spiffe://cluster.local/ns/a/sa/client"),
            issue("spiffe://cluster.local/ns/a/sa/server"),
        );
        let roots = mesh_roots(interceptor::ca::CertificateAuthority::roots(&ca)).unwrap();
        let crypto = MeshCrypto::default_aes_gcm();
        let rules = SessionResumption::new(std::time::Duration::from_secs(60), Arc::default());
        let cc = client_config_with(
            &client,
            Arc::clone(&roots),
            &td,
            server.id(),
            &crypto,
            &rules,
        )
        .unwrap();
        let sc = server_config_with(&server, roots, &td, &crypto, &rules).unwrap();

        let (up, down) = captured(Arc::clone(&cc), Arc::clone(&sc));
        let (ch, sh) = (
            parse_client_hello(&up).unwrap(),
            parse_server_hello(&down).unwrap(),
        );
        assert_eq!((ch.psk_identities, sh.psk_identity), (0, None));
        // rustls offers psk_dhe_ke only.
        assert_eq!(ch.psk_modes, [1]);

        let (up, down) = captured(cc, sc);
        let (ch, sh) = (
            parse_client_hello(&up).unwrap(),
            parse_server_hello(&down).unwrap(),
        );
        assert_eq!((ch.psk_identities, sh.psk_identity), (1, Some(0)));
        assert_eq!(ch.psk_modes, [1]);
        // psk_dhe_ke: a fresh key exchange even when resuming.
        assert!(sh.key_share_len > 0);
    }

    #[test]
    fn a_hello_retry_request_is_seen_and_named() {
        use rustls::crypto::aws_lc_rs::kx_group::*;
        let (up, down) = hellos(vec![X25519, SECP256R1], vec![SECP256R1]);
        assert_eq!(parse_client_hello(&up).unwrap().key_shares, [(0x001d, 32)]);
        let sh = parse_server_hello(&down).unwrap();
        assert_eq!(sh.retry_group, Some(0x0017));
        assert_eq!(group_name(sh.group), "secp256r1");
        assert_eq!(sh.key_share_len, 65);
    }

    #[test]
    fn hello_parsers_refuse_what_is_not_a_hello() {
        assert!(parse_server_hello(b"").is_err());
        assert!(parse_client_hello(&[23, 3, 3, 0, 1, 0]).is_err());
        // A truncated ServerHello names the problem instead of panicking.
        let e = parse_server_hello(&[22, 3, 3, 0, 6, 2, 0, 0, 2, 3, 3]).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
