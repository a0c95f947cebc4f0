//! kTLS regression guards: the kernel behaviours the data path (Design B) relies on, checked on
//! every supported kernel (`cargo xtask vm-test`, Debian 6.1 and 6.12). Each guard corresponds
//! to a probe result in `shared/research/kernel-mechanics.md`:
//! * T0/T5: what a kTLS socket puts on the wire is TLS records, never plaintext, including when
//!   fed and drained with splice(2);
//! * T1: TLS and sockmap refuse to be combined (the 6.1.184–6.1.188 plaintext leak);
//! * T6: a non-data record (ticket, alert) stops splice with EINVAL and is read with a cmsg;
//! * a negative control proving the wire oracle does find plaintext.
//!
//! Each test runs in its own network namespace (unshare on the test thread), so captures on `lo`
//! and `/proc/thread-self/net/tls_stat` see only that test's traffic.
//!
//! On a host without kernel TLS every kTLS guard fails (never skips), pointing at the VM runner.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use std::{collections::HashMap, io, mem, thread};

use interceptor::ktls::{
    self, Cipher, DirectionSecrets, KtlsError, content_type,
    sys::{self, Direction, SpliceFlags},
};
use interceptor_tests::digest::{Sha256, sha256};
use interceptor_tests::wire::{
    self, Capture, Filter, Frame, Streams, assert_no_plaintext, assert_tls_records, find_plaintext,
    parse_tls_records,
};

// Fixed, public test keys: TLS 1.3 AES-128-GCM, one key/IV per direction.
const KEY_AB: [u8; 16] = *b"kTLS-guard-key-A";
const IV_AB: [u8; 12] = *b"guard-iv-A->";
const KEY_BA: [u8; 16] = *b"kTLS-guard-key-B";
const IV_BA: [u8; 12] = *b"guard-iv-B->";

const IO_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Shared setup

/// Fails the test unless this kernel can do TLS 1.3 AES-128-GCM in both directions.
fn require_ktls() {
    let s = ktls::probe();
    assert!(
        s.supports(Cipher::Aes128Gcm),
        "kernel TLS is not usable here ({}). The kTLS guards must run on the supported kernels: \
         `cargo xtask vm-test` (in_vm={})",
        s.summary(),
        std::env::var_os("INTERCEPTOR_IN_VM").is_some()
    );
}

/// Moves the calling thread into a fresh network namespace with `lo` up.
fn private_netns() {
    // SAFETY: unshare(CLONE_NEWNET) only changes this thread's namespace; no memory involved.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET): {} (needs root: run via `cargo xtask vm-test`)",
        io::Error::last_os_error()
    );
    // SAFETY: plain socket(2); wrapped in OwnedFd immediately.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let s = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { mem::zeroed() };
    ifr.ifr_name[..2].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char]);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the flags of a valid ifreq.
    unsafe {
        assert_eq!(
            libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut ifr),
            0
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut ifr),
            0,
            "bring lo up: {}",
            io::Error::last_os_error()
        );
    }
}

/// A connected loopback TCP pair `(client, server)` with I/O timeouts, so a kernel that
/// misbehaves fails the test instead of hanging it.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let a = TcpStream::connect(l.local_addr().unwrap()).expect("connect");
    let (b, _) = l.accept().expect("accept");
    for s in [&a, &b] {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    }
    (a, b)
}

fn secrets(key: &[u8; 16], iv: [u8; 12]) -> DirectionSecrets {
    DirectionSecrets::new(key, iv, 0).unwrap()
}

/// Installs kTLS TX+RX on both ends of a fresh pair with mirrored fixed keys: A sends with
/// KEY_AB and receives with KEY_BA, B the other way round.
fn ktls_pair() -> (TcpStream, TcpStream) {
    let (a, b) = tcp_pair();
    ktls::install(
        a.as_fd(),
        Cipher::Aes128Gcm,
        &secrets(&KEY_AB, IV_AB),
        &secrets(&KEY_BA, IV_BA),
        false,
    )
    .expect("install kTLS on A");
    ktls::install(
        b.as_fd(),
        Cipher::Aes128Gcm,
        &secrets(&KEY_BA, IV_BA),
        &secrets(&KEY_AB, IV_AB),
        true,
    )
    .expect("install kTLS on B");
    (a, b)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut v))
        .expect("/dev/urandom");
    v
}

/// `/proc/net/tls_stat` of this thread's netns (`/proc/net` would follow the main thread).
fn tls_stat() -> HashMap<String, i64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/tls_stat")
        .expect("read /proc/thread-self/net/tls_stat (is the tls module loaded?)");
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn stat_delta(before: &HashMap<String, i64>, after: &HashMap<String, i64>, k: &str) -> i64 {
    after
        .get(k)
        .copied()
        .unwrap_or_else(|| panic!("tls_stat has no {k}"))
        - before.get(k).copied().unwrap_or(0)
}

/// Sends `p_ab` from A to B and `p_ba` back, concurrently, and checks both arrive intact.
fn exchange(a: &TcpStream, b: &TcpStream, p_ab: &[u8], p_ba: &[u8]) {
    thread::scope(|s| {
        let w1 = s.spawn(|| (&*a).write_all(p_ab));
        let w2 = s.spawn(|| (&*b).write_all(p_ba));
        let mut got_ab = vec![0u8; p_ab.len()];
        (&*b).read_exact(&mut got_ab).expect("B reads A's data");
        let mut got_ba = vec![0u8; p_ba.len()];
        (&*a).read_exact(&mut got_ba).expect("A reads B's data");
        w1.join().unwrap().expect("A writes");
        w2.join().unwrap().expect("B writes");
        assert!(got_ab == p_ab, "B received different bytes than A sent");
        assert!(got_ba == p_ba, "A received different bytes than B sent");
    });
}

/// What an exchange looked like on the wire.
struct Observed {
    frames: Vec<Frame>,
    streams: Streams,
    a: SocketAddr,
    b: SocketAddr,
    p_ab: Vec<u8>,
    p_ba: Vec<u8>,
}

/// Captures `lo` while `pair` exchanges random payloads (odd sizes, so records and segments
/// do not line up with anything).
fn observe_exchange(pair: (TcpStream, TcpStream)) -> Observed {
    let (a, b) = pair;
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let p_ab = random_bytes(200_003);
    let p_ba = random_bytes(70_001);
    let cap = Capture::start("lo");
    exchange(&a, &b, &p_ab, &p_ba);
    let frames = cap.stop();
    let streams = Streams::from_frames(frames.clone());
    Observed {
        frames,
        streams,
        a: a_addr,
        b: b_addr,
        p_ab,
        p_ba,
    }
}

/// Decrypts a TLS 1.3 AES-128-GCM record stream with aws-lc (not the kernel), returning each
/// record's inner content type and content. Proves the wire carries real TLS 1.3 under our key,
/// not merely something that parses as record headers.
fn userspace_decrypt(stream: &[u8], key: &[u8; 16], iv: &[u8; 12]) -> Vec<(u8, Vec<u8>)> {
    use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, key).unwrap());
    let mut out = Vec::new();
    for (seq, r) in assert_tls_records(stream).into_iter().enumerate() {
        let hdr = &stream[r.offset..r.offset + 5];
        let mut body = stream[r.offset + 5..r.offset + 5 + r.len].to_vec();
        let mut nonce = *iv;
        for (n, s) in nonce[4..].iter_mut().zip((seq as u64).to_be_bytes()) {
            *n ^= s;
        }
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(hdr),
                &mut body,
            )
            .unwrap_or_else(|_| panic!("record {seq} does not decrypt with the known key"));
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .expect("inner content type");
        out.push((plain[end], plain[..end].to_vec()));
    }
    out
}

fn errno(r: &io::Result<impl Sized>) -> Option<i32> {
    r.as_ref().err().and_then(io::Error::raw_os_error)
}

// ---------------------------------------------------------------------------------------------
// (a) kTLS on both ends: only TLS records on the wire, readable with the key, counted by the
// kernel.

#[test]
fn ktls_tx_rx_wire_is_tls_records_only() {
    require_ktls();
    private_netns();
    let before = tls_stat();
    let pair = ktls_pair();
    let during = tls_stat();
    let obs = observe_exchange(pair);
    let after = tls_stat();

    for (k, want) in [
        ("TlsCurrTxSw", 2),
        ("TlsCurrRxSw", 2),
        ("TlsTxSw", 2),
        ("TlsRxSw", 2),
    ] {
        assert_eq!(stat_delta(&before, &during, k), want, "{k}: {during:?}");
    }
    assert_eq!(
        stat_delta(&before, &after, "TlsDecryptError"),
        0,
        "{after:?}"
    );

    let tls = obs.streams.between(obs.a, obs.b);
    assert_eq!(
        tls.len(),
        2,
        "expected both directions between {} and {}",
        obs.a,
        obs.b
    );
    for (src, key, iv, payload) in [
        (obs.a, &KEY_AB, &IV_AB, &obs.p_ab),
        (obs.b, &KEY_BA, &IV_BA, &obs.p_ba),
    ] {
        let s = tls.iter().find(|s| s.src == src).expect("stream");
        s.assert_complete();
        let recs = assert_tls_records(&s.bytes);
        // TLS 1.3 hides the real type: every record on the wire is outer type 23.
        assert!(recs.iter().all(|r| r.content_type == 23 && r.len > 16));
        let plain: Vec<u8> = userspace_decrypt(&s.bytes, key, iv)
            .into_iter()
            .inspect(|(ty, _)| assert_eq!(*ty, content_type::APPLICATION_DATA))
            .flat_map(|(_, c)| c)
            .collect();
        assert!(
            plain == **payload,
            "decrypted wire bytes differ from the payload"
        );
    }
    for p in [&obs.p_ab, &obs.p_ba] {
        assert_no_plaintext(&obs.frames, p);
        assert_no_plaintext(&obs.streams, p);
    }
    // The capture holds nothing but this connection's TCP payload.
    assert_eq!(
        obs.streams.total_bytes(),
        tls.iter().map(|s| s.bytes.len()).sum::<usize>()
    );
}

// ---------------------------------------------------------------------------------------------
// (b) splice plain -> pipe -> kTLS TX -> wire -> kTLS RX -> pipe -> plain, 4 MiB and a tail.

/// The smallest size that crosses every boundary of this path many times over: the pipe's
/// capacity (64 KiB, 64 times), the 1 MiB a splice asks for (4 times), the 16 KiB TLS record
/// (257 records and the close_notify, so the record sequence number carries into its second
/// byte, which the nonce XORs in too) and the send buffer's autotuning ceiling (4 MiB). The odd
/// tail leaves the last record, pipe load and segment partial. (It was 64 MiB: 16 times the
/// bytes for no boundary more, ~60 s per VM kernel under emulation.)
const SPLICE_PAYLOAD: usize = (4 << 20) + 4099;

/// Moves exactly `n` bytes from a pipe into `to`.
fn splice_out_all(
    pipe_r: &OwnedFd,
    to: std::os::fd::BorrowedFd<'_>,
    mut n: usize,
) -> io::Result<()> {
    while n > 0 {
        let m = sys::splice(pipe_r.as_fd(), to, n, SpliceFlags::MOVE)?;
        if m == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        n -= m;
    }
    Ok(())
}

/// The TX half of the proxy loop: plain socket -> pipe -> kTLS socket, then close_notify and
/// FIN. Returns bytes moved.
fn pump_into_ktls(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (pr, pw) = sys::pipe2(false)?;
    let mut total = 0u64;
    loop {
        let n = sys::splice(from.as_fd(), pw.as_fd(), 1 << 20, SpliceFlags::MOVE)?;
        if n == 0 {
            break;
        }
        splice_out_all(&pr, to.as_fd(), n)?;
        total += n as u64;
    }
    ktls::send_close_notify(to.as_fd())?;
    to.shutdown(Shutdown::Write)?;
    Ok(total)
}

/// The RX half: kTLS socket -> pipe -> plain socket. A non-data record stops splice with
/// EINVAL; it is read with recv_record and must be the close_notify. Returns bytes moved.
fn pump_out_of_ktls(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (pr, pw) = sys::pipe2(false)?;
    let mut total = 0u64;
    let mut closed = false;
    loop {
        match sys::splice(from.as_fd(), pw.as_fd(), 1 << 20, SpliceFlags::MOVE) {
            Ok(0) => break,
            Ok(n) => {
                assert!(!closed, "application data after close_notify");
                splice_out_all(&pr, to.as_fd(), n)?;
                total += n as u64;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let mut buf = [0u8; 64];
                let (ty, n) = sys::recv_record(from.as_fd(), &mut buf)?;
                assert_eq!((ty, &buf[..n]), (content_type::ALERT, &[1u8, 0][..]));
                closed = true;
            }
            Err(e) => return Err(e),
        }
    }
    assert!(closed, "stream ended without close_notify (truncation)");
    to.shutdown(Shutdown::Write)?;
    Ok(total)
}

#[test]
fn ktls_splice_roundtrip_no_plaintext() {
    require_ktls();
    private_netns();
    let payload = Arc::new(random_bytes(SPLICE_PAYLOAD));
    let want = sha256(&payload);

    let (app_w, proxy_in) = tcp_pair(); // app writes plaintext, proxy reads it
    let (tx, rx) = ktls_pair(); // the encrypted hop
    let (proxy_out, app_r) = tcp_pair(); // proxy delivers plaintext, app reads it
    let (tx_addr, rx_addr) = (tx.local_addr().unwrap(), rx.local_addr().unwrap());
    // The plain hops legitimately carry plaintext on lo; keep only the kTLS hop's frames.
    let cap = Capture::start_filtered("lo", Filter::TcpPorts(vec![tx_addr.port(), rx_addr.port()]));

    let started = Instant::now();
    let (got_len, got_hash, moved_in, moved_out) = thread::scope(|s| {
        let p = Arc::clone(&payload);
        let writer = s.spawn(move || {
            (&app_w).write_all(&p)?;
            app_w.shutdown(Shutdown::Write)
        });
        let pin = s.spawn(|| pump_into_ktls(&proxy_in, &tx));
        let pout = s.spawn(|| pump_out_of_ktls(&rx, &proxy_out));
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n_total = 0usize;
        loop {
            let n = (&app_r).read(&mut buf).expect("app reads");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            n_total += n;
        }
        writer.join().unwrap().expect("writer");
        let moved_in = pin.join().unwrap().expect("splice into kTLS");
        let moved_out = pout.join().unwrap().expect("splice out of kTLS");
        (n_total, h.finish(), moved_in, moved_out)
    });
    let elapsed = started.elapsed();
    eprintln!(
        "splice: {SPLICE_PAYLOAD} bytes through kTLS in {elapsed:.2?} ({:.1} MiB/s)",
        SPLICE_PAYLOAD as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(got_len, SPLICE_PAYLOAD);
    assert_eq!(
        (moved_in, moved_out),
        (SPLICE_PAYLOAD as u64, SPLICE_PAYLOAD as u64)
    );
    assert!(got_hash == want, "SHA-256 of the delivered bytes differs");

    let streams = cap.stop_streams();
    let fwd = streams
        .get(tx_addr, rx_addr)
        .expect("captured the kTLS hop");
    fwd.assert_complete();
    let recs = assert_tls_records(&fwd.bytes);
    assert!(recs.iter().all(|r| r.content_type == 23));
    // Every record adds 5 bytes of header and 17 of inner type + tag.
    assert_eq!(fwd.bytes.len(), SPLICE_PAYLOAD + 2 + recs.len() * 22);
    assert!(recs.len() > SPLICE_PAYLOAD / (1 << 14));
    // Complete check: every 16-byte window of the payload against every captured byte.
    let t = Instant::now();
    assert_no_plaintext(&streams, &payload);
    eprintln!(
        "no-plaintext check over {} MiB captured: {:.2?}",
        streams.total_bytes() >> 20,
        t.elapsed()
    );
    let stat = tls_stat();
    assert_eq!(stat.get("TlsDecryptError"), Some(&0), "{stat:?}");
}

// ---------------------------------------------------------------------------------------------
// (c) TLS and sockmap are mutually exclusive (T1a, T1b).

const LEAK: &str = "this kernel combines kTLS and sockmap: plaintext leak risk (CVE-2026-93824)";

/// A BPF_MAP_TYPE_SOCKMAP made with raw bpf(2), as in the research probe (no libbpf/aya, so the
/// guard does not depend on the agent's loader).
struct SockMap(OwnedFd);

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    rest: [u8; 112],
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
    rest: [u8; 96],
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;

impl SockMap {
    fn new() -> SockMap {
        let attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_SOCKMAP,
            key_size: 4,
            value_size: 4,
            max_entries: 4,
            rest: [0; 112],
        };
        // SAFETY: `attr` is a zero-padded prefix of union bpf_attr for BPF_MAP_CREATE and the
        // size passed matches it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                &raw const attr,
                mem::size_of::<MapCreateAttr>(),
            )
        };
        assert!(
            fd >= 0,
            "cannot create a sockmap: {} (needs root; the guard cannot run)",
            io::Error::last_os_error()
        );
        // SAFETY: the kernel returned a fresh map fd.
        SockMap(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn insert(&self, key: u32, sock: &TcpStream) -> io::Result<()> {
        let value: u32 = sock.as_raw_fd() as u32;
        let attr = MapElemAttr {
            map_fd: self.0.as_raw_fd() as u32,
            pad: 0,
            key: (&raw const key) as u64,
            value: (&raw const value) as u64,
            flags: 0, // BPF_ANY
            rest: [0; 96],
        };
        // SAFETY: `attr` is a zero-padded union bpf_attr for BPF_MAP_UPDATE_ELEM whose key and
        // value pointers refer to live u32s on this stack frame.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                &raw const attr,
                mem::size_of::<MapElemAttr>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

#[test]
fn ktls_and_sockmap_refuse_to_combine() {
    require_ktls();
    private_netns();
    let map = SockMap::new();
    let tx_info = secrets(&KEY_AB, IV_AB)
        .to_crypto_info(Cipher::Aes128Gcm)
        .unwrap();

    // A plain socket goes into the map: otherwise the rest proves nothing.
    let (plain, _peer0) = tcp_pair();
    map.insert(0, &plain)
        .unwrap_or_else(|e| panic!("a plain TCP socket must be insertable into a sockmap: {e}"));

    // (i) kTLS first (T1a): neither a kTLS socket nor one with just the ULP may enter.
    let (k, _peer1) = tcp_pair();
    sys::set_ulp_tls(k.as_fd()).expect("ULP");
    let ulp_only = map.insert(1, &k);
    assert!(
        ulp_only.is_err(),
        "sockmap accepted a socket with the tls ULP: {LEAK}"
    );
    sys::set_crypto(k.as_fd(), Direction::Tx, &tx_info).expect("TLS_TX");
    let r = map.insert(1, &k);
    assert!(r.is_err(), "sockmap accepted a kTLS TX socket: {LEAK}");
    eprintln!("kTLS socket into sockmap: {:?}", r.unwrap_err());

    // (ii) sockmap first (T1b): the ULP may attach, TLS_TX must be refused with EINVAL.
    let (m, _peer2) = tcp_pair();
    map.insert(2, &m).expect("plain socket into sockmap");
    let ulp = sys::set_ulp_tls(m.as_fd());
    eprintln!("TCP_ULP on a sockmap'd socket: {ulp:?}");
    let tx = sys::set_crypto(m.as_fd(), Direction::Tx, &tx_info);
    assert!(
        tx.is_err(),
        "TLS_TX accepted on a socket in a sockmap: {LEAK}"
    );
    assert_eq!(errno(&tx), Some(libc::EINVAL), "unexpected error: {tx:?}");
    let rx = sys::set_crypto(m.as_fd(), Direction::Rx, &tx_info);
    assert!(
        rx.is_err(),
        "TLS_RX accepted on a socket in a sockmap: {LEAK}"
    );

    // And the safe layer explains it.
    let (m2, _peer3) = tcp_pair();
    map.insert(3, &m2).expect("plain socket into sockmap");
    let ks = secrets(&KEY_AB, IV_AB);
    match ktls::install(m2.as_fd(), Cipher::Aes128Gcm, &ks, &ks, false) {
        Err(e @ KtlsError::Rejected { .. }) => assert!(e.to_string().contains("sockmap"), "{e}"),
        Ok(()) => panic!("ktls::install succeeded on a sockmap'd socket: {LEAK}"),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// (d) A post-handshake record stops splice; recv_record consumes it; data then flows (T6).

/// A plausible TLS 1.3 NewSessionTicket handshake message with a random ticket.
fn new_session_ticket() -> Vec<u8> {
    let ticket = random_bytes(48);
    let mut body = Vec::new();
    body.extend_from_slice(&7200u32.to_be_bytes()); // ticket_lifetime
    body.extend_from_slice(&random_bytes(4)); // ticket_age_add
    body.extend_from_slice(&[8]);
    body.extend_from_slice(&random_bytes(8)); // ticket_nonce
    body.extend_from_slice(&(ticket.len() as u16).to_be_bytes());
    body.extend_from_slice(&ticket);
    body.extend_from_slice(&[0, 0]); // no extensions
    let mut msg = vec![4]; // new_session_ticket
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    msg
}

fn splice_to_vec(from: &TcpStream, pipe: &(OwnedFd, OwnedFd)) -> io::Result<Vec<u8>> {
    let n = sys::splice(from.as_fd(), pipe.1.as_fd(), 1 << 16, SpliceFlags::NONE)?;
    let mut out = vec![0u8; n];
    std::fs::File::from(pipe.0.try_clone()?).read_exact(&mut out)?;
    Ok(out)
}

#[test]
fn ktls_non_data_record_stops_splice_until_recvmsg() {
    require_ktls();
    private_netns();
    let (a, b) = ktls_pair();
    let cap = Capture::start("lo");
    let pipe = sys::pipe2(false).unwrap();
    let nst = new_session_ticket();
    let data = random_bytes(1000);

    assert_eq!(
        sys::send_record(a.as_fd(), content_type::HANDSHAKE, &nst).unwrap(),
        nst.len()
    );
    (&a).write_all(&data).unwrap();

    let r = splice_to_vec(&b, &pipe);
    assert_eq!(
        errno(&r),
        Some(libc::EINVAL),
        "splice over a handshake record: {r:?}"
    );
    let mut buf = vec![0u8; 4096];
    let (ty, n) = sys::recv_record(b.as_fd(), &mut buf).expect("recvmsg with cmsg");
    assert_eq!(ty, content_type::HANDSHAKE);
    assert!(buf[..n] == nst[..], "ticket bytes differ");
    let got = splice_to_vec(&b, &pipe).expect("splice after the ticket was consumed");
    assert!(got == data, "data after the ticket differs");

    // The same for close_notify, then EOF.
    ktls::send_close_notify(a.as_fd()).unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    let r = splice_to_vec(&b, &pipe);
    assert_eq!(
        errno(&r),
        Some(libc::EINVAL),
        "splice over an alert record: {r:?}"
    );
    let (ty, n) = sys::recv_record(b.as_fd(), &mut buf).unwrap();
    assert_eq!((ty, &buf[..n]), (content_type::ALERT, &[1u8, 0][..]));
    assert_eq!(splice_to_vec(&b, &pipe).expect("EOF").len(), 0);
    assert_eq!(sys::recv_record(b.as_fd(), &mut buf).unwrap(), (23, 0));

    // On the wire: three records, all outer type 23 (TLS 1.3 hides the ticket's type).
    let frames = cap.stop();
    let streams = Streams::from_frames(frames.clone());
    let s = streams
        .get(a.local_addr().unwrap(), b.local_addr().unwrap())
        .expect("stream");
    s.assert_complete();
    let recs = assert_tls_records(&s.bytes);
    assert!(recs.iter().all(|r| r.content_type == 23), "{recs:?}");
    let inner: Vec<u8> = userspace_decrypt(&s.bytes, &KEY_AB, &IV_AB)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(inner, [22, 23, 21]);
    for p in [&nst, &data] {
        assert_no_plaintext(&frames, p);
        assert_no_plaintext(&streams, p);
    }
}

// ---------------------------------------------------------------------------------------------
// (e) Negative control: without kTLS the oracle must see the plaintext and reject the stream.

#[test]
fn oracle_negative_control_plain_tcp_is_caught() {
    private_netns();
    let obs = observe_exchange(tcp_pair());
    let s = obs.streams.get(obs.a, obs.b).expect("stream A->B");
    s.assert_complete();
    assert!(
        s.bytes == obs.p_ab,
        "reassembly must reproduce the plain stream exactly"
    );
    assert!(obs.streams.get(obs.b, obs.a).unwrap().bytes == obs.p_ba);
    let f = find_plaintext(&obs.streams, &obs.p_ab).expect("oracle missed plaintext A->B");
    assert!(f.len >= wire::WINDOW);
    assert!(
        find_plaintext(&obs.frames, &obs.p_ba).is_some(),
        "oracle missed plaintext in frames"
    );
    assert!(
        std::panic::catch_unwind(|| assert_no_plaintext(&obs.streams, &obs.p_ba)).is_err(),
        "assert_no_plaintext did not fail on plaintext"
    );
    assert!(
        parse_tls_records(&s.bytes).is_err(),
        "random plaintext parsed as TLS"
    );
    // Loopback shows each packet on transmit and on receive; the capture must keep one copy
    // (TCP timestamps make even a retransmission differ byte-wise from the original).
    let distinct: std::collections::HashSet<&[u8]> =
        obs.frames.iter().map(|f| &f.data[..]).collect();
    assert_eq!(
        distinct.len(),
        obs.frames.len(),
        "capture recorded packets twice"
    );
    // A 16-byte marker in the middle of one write is found too.
    let marker = *b"MARKER-0123456789abcdef";
    let mut p = random_bytes(5000);
    p[2500..2500 + marker.len()].copy_from_slice(&marker);
    let (a, b) = tcp_pair();
    let cap = Capture::start("lo");
    exchange(&a, &b, &p, b"");
    let streams = cap.stop_streams();
    assert!(find_plaintext(&streams, &marker).is_some());
}
