//! A small stand-in for the node agent that tells ztunnel which pods it serves ("ZDS", the
//! protocol istio-cni speaks to ztunnel in ambient mode), so the `ztunnel` benchmark modes
//! run ztunnel the way ambient does: one process per node, its listeners inside each pod's
//! network namespace.
//!
//! The protocol as published: ztunnel connects to a unix `SOCK_SEQPACKET` socket and sends a
//! hello; the server then sends one `AddWorkload` per pod, each with the pod's netns fd
//! attached (`SCM_RIGHTS`) and acknowledged before the next; then `SnapshotSent`, also
//! acknowledged. Every datagram is one protobuf message. The message types below are written
//! here from the published field numbers (package `istio.workload.zds`, version 1).

use std::{
    fs::File,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use prost::Message as _;

/// `Version.V1`.
pub const VERSION_V1: i32 = 1;

/// ztunnel → server, first datagram on a connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(int32, tag = "1")]
    pub version: i32,
}

/// The identity ztunnel gives the pod's proxy (its certificate's SPIFFE ID).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// Server → ztunnel.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "Request", tags = "1, 2, 3, 5")]
    pub payload: Option<Request>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "1")]
    Add(AddWorkload),
    #[prost(message, tag = "2")]
    Del(DelWorkload),
    #[prost(message, tag = "3")]
    SnapshotSent(SnapshotSent),
    #[prost(message, tag = "5")]
    Keep(KeepWorkload),
}

/// An empty `error` is an acknowledgement, anything else a refusal with its reason.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

/// ztunnel → server, one per request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "Response", tags = "1")]
    pub payload: Option<Response>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "1")]
    Ack(Ack),
}

/// One pod handed to ztunnel.
#[derive(Debug)]
pub struct Pod {
    pub uid: String,
    pub info: WorkloadInfo,
    /// The pod's network namespace (`/proc/<pid>/ns/net` or a bind mount of it).
    pub netns: PathBuf,
}

/// The serving side: bound before ztunnel starts, answered from a thread of its own. Dropping
/// it shuts the listener down and removes the socket file.
pub struct Server {
    path: PathBuf,
    listener: Arc<OwnedFd>,
    snapshot: mpsc::Receiver<Result<()>>,
}

impl Server {
    /// Binds `path` and serves `pods` to every ztunnel that connects (a restarted ztunnel gets
    /// the same snapshot again).
    pub fn start(path: &Path, pods: Vec<Pod>) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = Arc::new(
            sys::seqpacket_listener(path)
                .with_context(|| format!("ZDS socket {}", path.display()))?,
        );
        let mut opened = Vec::new();
        for p in pods {
            let fd = File::open(&p.netns)
                .with_context(|| format!("open netns {}", p.netns.display()))?;
            opened.push((p, OwnedFd::from(fd)));
        }
        let (tx, rx) = mpsc::channel();
        let l = Arc::clone(&listener);
        thread::Builder::new()
            .name("zds".to_owned())
            .spawn(move || serve(&l, &opened, &tx))
            .context("spawn the ZDS thread")?;
        Ok(Self {
            path: path.to_owned(),
            listener,
            snapshot: rx,
        })
    }

    /// Waits until a ztunnel has acknowledged every pod and the end of the snapshot.
    pub fn wait_snapshot(&self, timeout: Duration) -> Result<()> {
        match self.snapshot.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "ztunnel did not take the pods from {} within {timeout:?}",
                self.path.display()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the ZDS thread stopped before a snapshot was acknowledged")
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        sys::shutdown(&self.listener);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts connections until the listener is shut down; reports the first snapshot's outcome.
fn serve(listener: &OwnedFd, pods: &[(Pod, OwnedFd)], report: &mpsc::Sender<Result<()>>) {
    while let Ok(conn) = sys::accept(listener) {
        let outcome = handshake(&conn, pods);
        let failed = outcome.is_err();
        let _ = report.send(outcome);
        if failed {
            continue;
        }
        // ztunnel keeps the connection for its lifetime and sends nothing more unless asked;
        // hold it until ztunnel goes away.
        let mut buf = [0u8; 1024];
        while matches!(sys::recv(&conn, &mut buf), Ok(n) if n > 0) {}
    }
}

fn handshake(conn: &OwnedFd, pods: &[(Pod, OwnedFd)]) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    let n = sys::recv(conn, &mut buf).context("read the ZDS hello")?;
    let hello = ZdsHello::decode(&buf[..n]).context("decode the ZDS hello")?;
    if hello.version != VERSION_V1 {
        bail!("ztunnel speaks ZDS version {}, expected 1", hello.version);
    }
    for (pod, netns) in pods {
        let req = add_request(pod);
        sys::send(conn, &req.encode_to_vec(), Some(netns))
            .with_context(|| format!("send AddWorkload {}", pod.uid))?;
        expect_ack(conn, &mut buf).with_context(|| format!("AddWorkload {}", pod.uid))?;
    }
    let done = WorkloadRequest {
        payload: Some(Request::SnapshotSent(SnapshotSent {})),
    };
    sys::send(conn, &done.encode_to_vec(), None).context("send SnapshotSent")?;
    expect_ack(conn, &mut buf).context("SnapshotSent")
}

pub fn add_request(pod: &Pod) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Request::Add(AddWorkload {
            uid: pod.uid.clone(),
            workload_info: Some(pod.info.clone()),
        })),
    }
}

fn expect_ack(conn: &OwnedFd, buf: &mut [u8]) -> Result<()> {
    let n = sys::recv(conn, buf).context("read the acknowledgement")?;
    if n == 0 {
        bail!("ztunnel closed the ZDS connection");
    }
    parse_ack(&buf[..n])
}

/// `Ok` for an acknowledgement, the refusal's reason otherwise.
pub fn parse_ack(datagram: &[u8]) -> Result<()> {
    let resp = WorkloadResponse::decode(datagram).context("decode WorkloadResponse")?;
    match resp.payload {
        Some(Response::Ack(a)) if a.error.is_empty() => Ok(()),
        Some(Response::Ack(a)) => bail!("ztunnel refused: {}", a.error),
        None => bail!("WorkloadResponse without a payload"),
    }
}

/// The few socket calls std lacks: `SOCK_SEQPACKET` and passing a descriptor.
mod sys {
    use std::{
        ffi::CString,
        io,
        os::{
            fd::{AsRawFd, FromRawFd, OwnedFd},
            unix::ffi::OsStrExt,
        },
        path::Path,
    };

    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    pub fn seqpacket_listener(path: &Path) -> io::Result<OwnedFd> {
        let bytes = path.as_os_str().as_bytes();
        // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        if bytes.len() >= addr.sun_path.len() || CString::new(bytes).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unix socket path too long or contains NUL",
            ));
        }
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: plain syscall; the returned descriptor is owned right below.
        let fd = check(unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `addr` is a valid sockaddr_un and the length is its size.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        })?;
        // SAFETY: plain syscall on a descriptor we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), 4) })?;
        Ok(fd)
    }

    pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
        loop {
            // SAFETY: null address arguments are allowed; the descriptor is owned below.
            let rc = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            match check(rc) {
                // SAFETY: accept4 returned a fresh descriptor.
                Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Wakes a thread blocked in `accept` (it then fails with EINVAL).
    pub fn shutdown(fd: &OwnedFd) {
        // SAFETY: plain syscall on a descriptor we own.
        unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    pub fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
            let rc = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = rc as usize;
            if n > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "datagram of {n} bytes exceeds the {}-byte buffer",
                        buf.len()
                    ),
                ));
            }
            return Ok(n);
        }
    }

    /// One datagram, with `pass` attached as `SCM_RIGHTS` when given.
    pub fn send(fd: &OwnedFd, data: &[u8], pass: Option<&OwnedFd>) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        };
        // u64 storage keeps the control buffer aligned for cmsghdr.
        let mut control = [0u64; 8];
        // SAFETY: msghdr is plain data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        if let Some(pass) = pass {
            let raw = pass.as_raw_fd();
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) };
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as usize;
            // SAFETY: msg_control points at `control` (64 bytes, aligned), which holds
            // `space` bytes; CMSG_FIRSTHDR returns a pointer into it, and the fd is written
            // within CMSG_LEN(sizeof(int)) of that header.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len =
                    libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), raw);
            }
        }
        loop {
            // SAFETY: `msg` points at `iov` and `control`, both alive for the call.
            let rc = unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        Pod {
            uid: "bench//Pod/bench/client".to_owned(),
            info: WorkloadInfo {
                name: "bench-client".to_owned(),
                namespace: "bench".to_owned(),
                service_account: "client".to_owned(),
            },
            netns: PathBuf::from("/proc/self/ns/net"),
        }
    }

    /// The bytes on the wire, checked by hand against the published field numbers: a field
    /// key is (tag << 3) | wire type, wire type 2 for strings and messages.
    #[test]
    fn add_workload_wire_bytes() {
        let bytes = add_request(&pod()).encode_to_vec();
        let uid = b"bench//Pod/bench/client";
        let mut info = Vec::new();
        for (tag, s) in [(1u8, "bench-client"), (2, "bench"), (3, "client")] {
            info.push(tag << 3 | 2);
            info.push(s.len() as u8);
            info.extend_from_slice(s.as_bytes());
        }
        let mut add = vec![1 << 3 | 2, uid.len() as u8];
        add.extend_from_slice(uid);
        add.push(2 << 3 | 2);
        add.push(info.len() as u8);
        add.extend_from_slice(&info);
        // WorkloadRequest.add is field 1.
        let mut want = vec![1 << 3 | 2, add.len() as u8];
        want.extend_from_slice(&add);
        assert_eq!(bytes, want);
    }

    #[test]
    fn snapshot_sent_is_field_3_empty() {
        let req = WorkloadRequest {
            payload: Some(Request::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(req.encode_to_vec(), vec![3 << 3 | 2, 0]);
        let keep = WorkloadRequest {
            payload: Some(Request::Keep(KeepWorkload { uid: "u".into() })),
        };
        assert_eq!(
            keep.encode_to_vec(),
            vec![5 << 3 | 2, 3, 1 << 3 | 2, 1, b'u']
        );
        let del = WorkloadRequest {
            payload: Some(Request::Del(DelWorkload { uid: "u".into() })),
        };
        assert_eq!(
            del.encode_to_vec(),
            vec![2 << 3 | 2, 3, 2 << 3 | 2, 1, b'u']
        );
    }

    #[test]
    fn hello_and_acks_decode() {
        // ZdsHello { version: V1 }: field 1, varint.
        assert_eq!(
            ZdsHello::decode(&[1 << 3, 1][..]).unwrap().version,
            VERSION_V1
        );
        // WorkloadResponse { ack: Ack {} } and one carrying an error.
        assert!(parse_ack(&[1 << 3 | 2, 0]).is_ok());
        let mut nack = vec![1 << 3 | 2, 6, 1 << 3 | 2, 4];
        nack.extend_from_slice(b"nope");
        let err = parse_ack(&nack).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        assert!(parse_ack(&[]).is_err(), "an empty response is not an ack");
    }

    /// The whole exchange over a real SEQPACKET pair, ztunnel's side played by the test: the
    /// hello, one AddWorkload with a netns descriptor attached, the snapshot marker.
    #[test]
    fn serves_a_snapshot_with_the_netns_fd() {
        let dir = std::env::temp_dir().join(format!("zds-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("zds.sock");
        let server = Server::start(&path, vec![pod()]).unwrap();
        let conn = test_sys::connect_seqpacket(&path);
        sys::send(&conn, &ZdsHello { version: 1 }.encode_to_vec(), None).unwrap();
        let (bytes, fd) = test_sys::recv_with_fd(&conn);
        let req = WorkloadRequest::decode(&bytes[..]).unwrap();
        assert_eq!(req, add_request(&pod()));
        let fd = fd.expect("the AddWorkload carries the pod's netns descriptor");
        let got = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .unwrap();
        let want = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_eq!(got, want);
        let ack = WorkloadResponse {
            payload: Some(Response::Ack(Ack::default())),
        };
        sys::send(&conn, &ack.encode_to_vec(), None).unwrap();
        let (bytes, fd) = test_sys::recv_with_fd(&conn);
        assert!(fd.is_none());
        assert_eq!(
            WorkloadRequest::decode(&bytes[..]).unwrap().payload,
            Some(Request::SnapshotSent(SnapshotSent {}))
        );
        sys::send(&conn, &ack.encode_to_vec(), None).unwrap();
        server.wait_snapshot(Duration::from_secs(5)).unwrap();
        drop(server);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    mod test_sys {
        use std::os::{
            fd::{AsRawFd, FromRawFd, OwnedFd},
            unix::ffi::OsStrExt,
        };

        pub fn connect_seqpacket(path: &std::path::Path) -> OwnedFd {
            // SAFETY: test helper; plain syscalls with a zeroed, filled-in sockaddr_un.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
                assert!(fd >= 0);
                let fd = OwnedFd::from_raw_fd(fd);
                let mut addr: libc::sockaddr_un = std::mem::zeroed();
                addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
                for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
                    *d = *s as libc::c_char;
                }
                let rc = libc::connect(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                );
                assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
                fd
            }
        }

        pub fn recv_with_fd(fd: &OwnedFd) -> (Vec<u8>, Option<OwnedFd>) {
            let mut buf = vec![0u8; 4096];
            let mut control = [0u64; 8];
            // SAFETY: test helper; msghdr points at live buffers; CMSG_* walk `control` only.
            unsafe {
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &raw mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&control);
                let n = libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC);
                assert!(n >= 0, "{}", std::io::Error::last_os_error());
                buf.truncate(n as usize);
                let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
                let passed = (!cmsg.is_null()
                    && (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_RIGHTS)
                    .then(|| {
                        OwnedFd::from_raw_fd(std::ptr::read_unaligned(
                            libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
                        ))
                    });
                (buf, passed)
            }
        }
    }
}
