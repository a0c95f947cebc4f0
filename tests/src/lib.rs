//! Shared harness for the privileged host tests and the VM tests: throwaway network namespaces
//! and cgroups that are removed even when a test fails, a way to run a connect() from inside a
//! cgroup + netns, and the wire oracle (its own crate, `interceptor-wire`, built optimised).
//!
//! Tests that need root never skip: without privileges they fail, saying why.

pub mod agent;
pub mod apiserver;
pub mod apps;
pub mod crypto;
pub mod demo;
pub mod digest;
pub mod flood;
pub mod identity;
pub mod mesh;
pub mod pair;
pub mod podman;
pub mod process;
pub mod scenario;
pub mod topology;
pub mod upgrade;

/// The wire oracle lives in its own crate so the dev profile can optimise it alone.
pub use interceptor_wire as wire;

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Fails the test unless it runs as root: a privileged test that silently passes without
/// privileges proves nothing.
pub fn require_privileged() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run it through `cargo xtask test`"
    );
}

/// True inside the `cargo xtask vm-test` guest.
pub fn in_vm() -> bool {
    std::env::var_os("INTERCEPTOR_IN_VM").is_some()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for interface names (15 bytes).
pub fn unique_name(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A unique pin directory under /sys/fs/bpf, with a bpffs mounted there first (once per
/// process, so tests starting together do not stack two mounts and hide each other's pins).
/// A fresh machine has none mounted; without this, a test loading pinned maps passes only
/// after some other test's agent happened to mount it.
pub fn pin_dir(prefix: &str) -> PathBuf {
    static MOUNTED: std::sync::Once = std::sync::Once::new();
    let root = Path::new("/sys/fs/bpf");
    MOUNTED.call_once(|| interceptor::sys::ensure_bpffs(root).expect("mount bpffs"));
    root.join(unique_name(prefix))
}

/// Runs a command to completion; the error carries its output when it does not succeed.
pub fn try_run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{cmd} {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and fails with its output when it does not succeed.
pub fn run(cmd: &str, args: &[&str]) -> String {
    try_run(cmd, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates the namespace with loopback up.
    pub fn new(prefix: &str) -> Self {
        Self::named(unique_name(prefix)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Creates the namespace `name` with loopback up; deleted again if that fails.
    pub fn named(name: String) -> anyhow::Result<Self> {
        try_run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.try_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `ip -n <ns> ...`, failing with its output.
    pub fn try_ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        try_run("ip", &full)
    }

    /// Sets a per-namespace sysctl (`net.*`) by writing `/proc/sys` from a thread inside the
    /// namespace (`/proc/sys/net` resolves to the netns of the task that opens it).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_owned();
        interceptor::sys::in_netns(&self.path(), move || std::fs::write(&path, value))
            .with_context(|| format!("sysctl {key} in netns {}", self.name))
    }

    /// Reads a file under `/proc/thread-self/net` (per-namespace statistics such as
    /// `tls_stat`) from inside the namespace.
    pub fn proc_net(&self, file: &str) -> anyhow::Result<String> {
        use anyhow::Context as _;
        let path = PathBuf::from("/proc/thread-self/net").join(file);
        interceptor::sys::in_netns(&self.path(), move || std::fs::read_to_string(&path))
            .with_context(|| format!("read /proc/net/{file} in netns {}", self.name))
    }

    /// A `TcpExt` counter of this namespace's `/proc/net/netstat` (e.g. `TCPFastOpenPassive`).
    pub fn tcp_ext(&self, name: &str) -> u64 {
        let text = self.proc_net("netstat").expect("read /proc/net/netstat");
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            panic!(
                "no TcpExt lines in /proc/net/netstat of netns {}",
                self.name
            )
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no TcpExt {name} in netns {}", self.name))
    }

    /// Runs `f` on a thread inside this namespace (sockets made there stay in it).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> T {
        interceptor::sys::in_netns(&self.path(), f)
            .unwrap_or_else(|e| panic!("in netns {}: {e}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup v2 directory under the cgroup2 mount, removed on drop after its processes are
/// moved back to the root.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(prefix: &str) -> Self {
        let root = interceptor::sys::cgroup2_mount().expect("cgroup2 mount");
        let path = root.join(unique_name(prefix));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let (Ok(procs), Ok(root)) = (
            std::fs::read_to_string(self.path.join("cgroup.procs")),
            interceptor::sys::cgroup2_mount(),
        ) {
            for pid in procs.lines() {
                let _ = std::fs::write(root.join("cgroup.procs"), pid);
            }
        }
        // rmdir succeeds only once the cgroup is empty; processes we forked are reaped by then.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child process that connected from inside a cgroup + netns and keeps its socket open
/// until this handle is dropped (sockops forgets a flow when the app socket closes).
pub struct ConnectedChild {
    /// `Ok(getpeername())` after a successful connect, or the errno of the failed step.
    pub peer: Result<SocketAddr, i32>,
    pid: libc::pid_t,
    hold: Option<OwnedFd>,
}

impl Drop for ConnectedChild {
    fn drop(&mut self) {
        self.hold.take();
        let mut status = 0;
        // SAFETY: waiting for our own child, which exits once `hold` is closed.
        unsafe { libc::waitpid(self.pid, &raw mut status, 0) };
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the fds were just created and are owned here.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Forks a child that joins `cgroup` (if any), enters the netns at `netns`, connects to `dst`,
/// sends `payload` and reports getpeername().
///
/// A process is needed, not a thread: the cgroup of a socket is the cgroup of the process
/// that created it, and whole processes move between cgroups. Everything the child does is a
/// raw syscall on memory prepared before fork(), so it is safe in a multithreaded test.
pub fn connect_from(
    cgroup: Option<&Path>,
    netns: &Path,
    dst: SocketAddr,
    payload: &[u8],
) -> ConnectedChild {
    connect_from_marked(cgroup, netns, dst, payload, 0)
}

/// [`connect_from`] with `SO_MARK` set to `mark` (unless 0) before the connect, as the agent
/// marks its own sockets in pod network namespaces.
pub fn connect_from_marked(
    cgroup: Option<&Path>,
    netns: &Path,
    dst: SocketAddr,
    payload: &[u8],
    mark: u32,
) -> ConnectedChild {
    let procs = cgroup.map(|c| {
        std::ffi::CString::new(c.join("cgroup.procs").into_os_string().into_encoded_bytes())
            .expect("cgroup path")
    });
    let ns = std::fs::File::open(netns).expect("open netns");
    let (sa, sa_len) = to_sockaddr(dst);
    let (report_rd, report_wr) = pipe();
    let (hold_rd, hold_wr) = pipe();
    // SAFETY: the child only performs async-signal-safe syscalls on pre-allocated memory and
    // leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let child = ChildArgs {
            procs: procs.as_deref(),
            ns: ns.as_raw_fd(),
            sa: &sa,
            sa_len,
            payload,
            mark,
            report: report_wr.as_raw_fd(),
            hold: hold_rd.as_raw_fd(),
        };
        // SAFETY: we are the freshly forked child.
        unsafe { child.run() }
    }
    drop((report_wr, hold_rd));
    let mut report = [0u8; 4 + 128];
    let n = read_full(&report_rd, &mut report, Duration::from_secs(10));
    let mut child = ConnectedChild {
        peer: Err(-1),
        pid,
        hold: Some(hold_wr),
    };
    assert!(n >= 4, "connecting child reported nothing");
    let code = i32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
    child.peer = if code == 0 {
        Ok(from_sockaddr(&report[4..n]))
    } else {
        Err(code)
    };
    child
}

/// Closes every descriptor of a freshly forked child above stderr except `keep`.
///
/// fork() copies all of the parent's descriptors, and other test threads create pipes and
/// listeners at the same time: a child that kept them would hold another test's hold pipe
/// open (two such children deadlock, each waiting for the EOF the other withholds) and keep
/// closed listeners' ports busy. Its own parent's pipe ends go too, or it would never see EOF
/// on its hold pipe.
///
/// # Safety
/// Only in a freshly forked child (it closes descriptors other code may think it owns).
pub unsafe fn close_all_but(keep: &mut [i32]) {
    keep.sort_unstable();
    let mut first = 3u32;
    for &fd in keep.iter() {
        let fd = fd as u32;
        if fd > first {
            // SAFETY: close_range takes no pointers; descriptors in the range are not used
            // again in this process.
            unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0u32) };
        }
        first = first.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
}

struct ChildArgs<'a> {
    procs: Option<&'a std::ffi::CStr>,
    ns: i32,
    sa: &'a libc::sockaddr_storage,
    sa_len: libc::socklen_t,
    payload: &'a [u8],
    mark: u32,
    report: i32,
    hold: i32,
}

impl ChildArgs<'_> {
    /// The child's half of [`connect_from`]: never returns.
    ///
    /// # Safety
    /// Must only be called in a freshly forked child.
    unsafe fn run(&self) -> ! {
        // SAFETY: (whole block) raw syscalls on valid pointers owned by the parent's frame,
        // which the child has its own copy of.
        unsafe {
            let fail = |step: i32| -> ! {
                let e = *libc::__errno_location();
                let code = if e == 0 { step } else { e };
                let b = code.to_ne_bytes();
                libc::write(self.report, b.as_ptr().cast(), 4);
                libc::_exit(1)
            };
            close_all_but(&mut [self.ns, self.report, self.hold]);
            if let Some(procs) = self.procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    fail(1000);
                }
                libc::close(fd);
            }
            if libc::setns(self.ns, libc::CLONE_NEWNET) != 0 {
                fail(1001);
            }
            let s = libc::socket(i32::from(self.sa.ss_family), libc::SOCK_STREAM, 0);
            if s < 0 {
                fail(1002);
            }
            if self.mark != 0
                && libc::setsockopt(
                    s,
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&raw const self.mark).cast(),
                    4,
                ) != 0
            {
                fail(1005);
            }
            if libc::connect(
                s,
                (self.sa as *const libc::sockaddr_storage).cast(),
                self.sa_len,
            ) != 0
            {
                fail(1003);
            }
            if !self.payload.is_empty() {
                libc::write(s, self.payload.as_ptr().cast(), self.payload.len());
            }
            let mut peer: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if libc::getpeername(s, (&raw mut peer).cast(), &raw mut len) != 0 {
                fail(1004);
            }
            let mut buf = [0u8; 4 + 128];
            let len = (len as usize).min(128);
            buf[4..4 + len].copy_from_slice(std::slice::from_raw_parts(
                (&raw const peer).cast::<u8>(),
                len,
            ));
            libc::write(self.report, buf.as_ptr().cast(), 4 + len);
            // Hold the connection until the parent closes its end of the hold pipe.
            libc::read(self.hold, buf.as_mut_ptr().cast(), 1);
            libc::_exit(0)
        }
    }
}

fn read_full(fd: &OwnedFd, buf: &mut [u8], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as i32;
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&raw mut pfd, 1, left) } <= 0 {
        return 0;
    }
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    n.max(0) as usize
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn from_sockaddr(b: &[u8]) -> SocketAddr {
    let family = u16::from_ne_bytes([b[0], b[1]]);
    let port = u16::from_be_bytes([b[2], b[3]]);
    if i32::from(family) == libc::AF_INET {
        SocketAddr::from(([b[4], b[5], b[6], b[7]], port))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[8..24]);
        SocketAddr::from((o, port))
    }
}

/// Accepts one connection within `timeout`, or None.
pub fn accept_within(
    listener: &std::net::TcpListener,
    timeout: Duration,
) -> Option<(std::net::TcpStream, SocketAddr)> {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok(c) => return Some(c),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}
