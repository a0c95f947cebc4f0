//! Smoke tests for the VM harness (`cargo xtask vm-test`): the guest must offer what every
//! privileged test assumes, namely a loadable kernel TLS with AES-GCM, cgroup v2 at
//! `/sys/fs/cgroup` and bpffs at `/sys/fs/bpf`. Outside the VM (`INTERCEPTOR_IN_VM` unset)
//! only cgroup v2 is checked, because development hosts may lack `CONFIG_TLS`.

use std::{
    env, fs,
    io::{self, Read as _, Write as _},
    mem,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
};

fn in_vm() -> bool {
    env::var_os("INTERCEPTOR_IN_VM").is_some_and(|v| v == "1")
}

/// `(mount point, file system type)` of every mount.
fn mounts() -> Vec<(String, String)> {
    fs::read_to_string("/proc/mounts")
        .expect("read /proc/mounts")
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .collect()
}

#[test]
fn guest_mounts_cgroup2_and_bpffs() {
    let mounts = mounts();
    let has = |point: &str, fstype: &str| mounts.iter().any(|(p, t)| p == point && t == fstype);
    if in_vm() {
        assert!(has("/sys/fs/cgroup", "cgroup2"), "mounts: {mounts:?}");
        assert!(has("/sys/fs/bpf", "bpf"), "mounts: {mounts:?}");
    } else {
        assert!(
            mounts.iter().any(|(_, t)| t == "cgroup2"),
            "no cgroup2 mount: {mounts:?}"
        );
    }
}

#[test]
fn guest_offers_tls_ulp() {
    if !in_vm() {
        eprintln!("skipping: the host kernel may lack CONFIG_TLS; runs under cargo xtask vm-test");
        return;
    }
    let ulps =
        fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").expect("read tcp_available_ulp");
    assert!(
        ulps.split_whitespace().any(|ulp| ulp == "tls"),
        "tcp_available_ulp: {ulps:?}"
    );
}

/// `struct tls12_crypto_info_aes_gcm_128` from `linux/tls.h`.
#[repr(C)]
struct AesGcm128Info {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; 16],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_TX: libc::c_int = 1;
const AES_GCM_TAG_LEN: usize = 16;

fn setsockopt<T>(socket: &TcpStream, level: libc::c_int, name: libc::c_int, value: &T, len: usize) {
    let len = libc::socklen_t::try_from(len).expect("option length fits socklen_t");
    // SAFETY: `value` points to at least `len` readable bytes for the duration of the call,
    // and the descriptor is owned by `socket`, which outlives it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            len,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}): {}",
        io::Error::last_os_error()
    );
}

/// What the rest of the suite builds on: the TLS ULP attaches and the kernel encrypts
/// application data into a well-formed TLS 1.3 record with AES-128-GCM.
#[test]
fn guest_ktls_tx_emits_encrypted_records() {
    if !in_vm() {
        eprintln!("skipping: the host kernel may lack CONFIG_TLS; runs under cargo xtask vm-test");
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");

    setsockopt(&client, libc::SOL_TCP, libc::TCP_ULP, b"tls", 3);
    let info = AesGcm128Info {
        version: TLS_1_3_VERSION,
        cipher_type: TLS_CIPHER_AES_GCM_128,
        iv: [1; 8],
        key: [2; 16],
        salt: [3; 4],
        rec_seq: [0; 8],
    };
    setsockopt(
        &client,
        libc::SOL_TLS,
        TLS_TX,
        &info,
        mem::size_of_val(&info),
    );

    let plaintext = b"interceptor vm smoke test";
    client.write_all(plaintext).expect("write through kTLS");
    // TLS 1.3 record: 5-byte header, then plaintext + inner content type, then the tag.
    let body_len = plaintext.len() + 1 + AES_GCM_TAG_LEN;
    let mut record = vec![0; 5 + body_len];
    server.read_exact(&mut record).expect("read the record");
    assert_eq!(
        record[..3],
        [0x17, 0x03, 0x03],
        "application_data, legacy 1.2 version"
    );
    assert_eq!(
        usize::from(u16::from_be_bytes([record[3], record[4]])),
        body_len
    );
    assert!(
        !record.windows(plaintext.len()).any(|w| w == plaintext),
        "plaintext leaked onto the wire"
    );
}
