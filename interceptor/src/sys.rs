//! Linux plumbing the rest of the agent needs and the standard library lacks: network
//! namespaces, socket cookies, cgroup2 and bpffs mounts, rlimits. Every `unsafe` block here is
//! a single syscall with its argument invariants stated.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

/// Runs `f` on a short-lived thread that has entered the network namespace at `netns`.
///
/// `setns(CLONE_NEWNET)` changes only the calling thread, and sockets keep the namespace they
/// were created in, so listeners and upstream sockets for a pod are made here and then used
/// from any thread.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(netns)?;
    std::thread::spawn(move || {
        setns_net(ns.as_fd())?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("netns worker thread panicked"))?
}

/// Creates a non-blocking, close-on-exec TCP socket in the network namespace `ns`, marked
/// [`AGENT_SOCKET_MARK`](interceptor_common::AGENT_SOCKET_MARK), without leaving the caller's
/// thread there: enter, `socket()`, return. Costs two setns calls, far
/// less than handing the work to a thread parked in the pod's namespace.
pub fn tcp_socket_in(ns: BorrowedFd<'_>, v6: bool) -> io::Result<std::os::fd::OwnedFd> {
    tcp_sockets_in(ns, v6, 1)?
        .pop()
        .ok_or_else(|| io::Error::other("no socket made"))
}

/// [`tcp_socket_in`] for `count` sockets (at least one) behind one pair of setns calls: a
/// socket keeps the namespace it was made in, so a batch made now serves later dials from
/// any thread.
pub fn tcp_sockets_in(
    ns: BorrowedFd<'_>,
    v6: bool,
    count: usize,
) -> io::Result<Vec<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd as _;
    thread_local! {
        static HOME_NS: io::Result<File> = File::open("/proc/thread-self/ns/net");
    }
    let made = HOME_NS.with(|home| {
        let home = home
            .as_ref()
            .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
        setns_net(ns)?;
        let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        let mut made = Vec::with_capacity(count.max(1));
        let mut failed = None;
        while made.len() < count.max(1) {
            // SAFETY: plain socket(2) call; the returned fd is owned below.
            let fd = unsafe {
                libc::socket(
                    domain,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            if fd < 0 {
                failed = Some(io::Error::last_os_error());
                break;
            }
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            made.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        }
        // Always go home, even if socket() failed: this thread runs other pods' work next.
        if let Err(e) = setns_net(home.as_fd()) {
            // The runtime would catch a panic and keep this thread, still in the pod's
            // namespace, for other pods' work: stop the agent instead, which fails closed.
            tracing::error!("cannot return to the agent's own network namespace: {e}; aborting");
            std::process::abort();
        }
        match failed {
            Some(e) if made.is_empty() => Err(e),
            _ => Ok(made),
        }
    })?;
    for sock in &made {
        // Without the mark, programs attached at a parent cgroup holding the agent would
        // steer this socket's connect back to the agent (a loop), so no mark, no socket.
        set_mark(sock.as_fd(), interceptor_common::AGENT_SOCKET_MARK)?;
    }
    Ok(made)
}

/// Sets `SO_MARK` (needs CAP_NET_ADMIN).
pub fn set_mark(sock: BorrowedFd<'_>, mark: u32) -> io::Result<()> {
    setsockopt(sock, libc::SOL_SOCKET, libc::SO_MARK, &mark)
}

/// Sets `TCP_NODELAY`. On a listener it is inherited by every connection accepted from it.
pub fn set_nodelay(sock: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(sock, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

/// Whether `TCP_NODELAY` is set.
pub fn nodelay(sock: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(getsockopt_int(sock, libc::IPPROTO_TCP, libc::TCP_NODELAY)? != 0)
}

/// Sets `SO_RCVLOWAT`; the kernel re-checks the receive queue against it at once, which
/// wakes whatever reads the socket (a psock's verdict included) if bytes are waiting.
pub fn set_rcvlowat(sock: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

fn setsockopt_int(
    sock: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    setsockopt(sock, level, name, &value)
}

/// Moves the calling thread into the network namespace `ns`.
pub fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `ns` is a valid open fd for the lifetime of the call; CLONE_NEWNET restricts the
    // kernel to network namespaces.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The netns cookie of the network namespace at `netns` (a bind mount or /proc/PID/ns/net),
/// read through a socket made there.
pub fn netns_cookie_of(netns: &Path) -> io::Result<u64> {
    let ns = File::open(netns)?;
    let sock = tcp_socket_in(ns.as_fd(), false)?;
    netns_cookie(sock.as_fd())
}

/// The netns cookie of the namespace a socket lives in: the key eBPF programs use for a pod
/// (`bpf_get_netns_cookie`). `SO_NETNS_COOKIE` needs Linux 5.14.
pub fn netns_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(sock, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE)
}

/// The socket cookie, as `bpf_get_socket_cookie` returns it.
pub fn socket_cookie(sock: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(sock, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// Whether a socket is a listening TCP socket (`SO_ACCEPTCONN`, `SO_PROTOCOL`): what a
/// descriptor received from another process must be before it is used as one.
pub fn is_listening(sock: BorrowedFd<'_>) -> io::Result<bool> {
    let tcp = getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let listening = getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)?;
    Ok(listening != 0 && tcp == libc::IPPROTO_TCP)
}

/// How many connections may wait for the agent's accept loop. std listens with 128, and a
/// pod opening a few hundred connections at once (a client pool warming up) overflowed
/// that: the kernel then drops SYNs and the client waits a full retransmit timeout. The
/// kernel caps this at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: libc::c_int = 4096;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`].
pub fn tcp_listener(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    // SAFETY: listen(2) on a socket we own; calling it again on a listening socket only
    // changes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

/// Option values the kernel fills in: plain old data for which every byte pattern is a valid
/// value, so a shorter write by an older kernel still leaves a valid value.
trait SockoptValue: Copy {}
impl SockoptValue for libc::c_int {}
impl SockoptValue for u64 {}
impl SockoptValue for libc::tcp_info {}
impl SockoptValue for libc::ucred {}

/// Reads one socket option into `value`; returns how many bytes the kernel wrote.
fn getsockopt<T: SockoptValue>(
    sock: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: &mut T,
) -> io::Result<usize> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is valid for writes of `len` bytes (its own size) and any bytes make a
    // valid `T` (`SockoptValue`); the kernel writes at most `len` bytes and reports how many.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(len as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `setsockopt(2)` with a plain value of its own size.
fn setsockopt<T>(sock: BorrowedFd<'_>, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `sock` is an open socket for the duration of the call and `value` is valid for
    // reads of `size_of::<T>()` bytes, the length passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(sock: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    getsockopt(sock, level, name, &mut value)?;
    Ok(value)
}

fn getsockopt_u64(sock: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<u64> {
    let mut value = 0u64;
    getsockopt(sock, level, name, &mut value)?;
    Ok(value)
}

/// Where cgroup v2 is mounted. Hosts with the hybrid layout mount it somewhere under
/// /sys/fs/cgroup (e.g. `/sys/fs/cgroup/unified`), so it is looked up, never assumed.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    mount_of_type("cgroup2")?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem in /proc/mounts: mount one (mount -t cgroup2 none /sys/fs/cgroup)",
        )
    })
}

/// The first mount point of a filesystem type, from /proc/mounts.
pub fn mount_of_type(fstype: &str) -> io::Result<Option<PathBuf>> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    Ok(parse_mounts(&mounts, fstype))
}

fn parse_mounts(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, ty) = (fields.next()?, fields.next()?, fields.next()?);
        (ty == fstype).then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 directory of this process (from /proc/self/cgroup's `0::` line).
pub fn own_cgroup() -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup v2 entry in /proc/self/cgroup",
            )
        })?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Makes sure a bpffs is mounted at `dir`, mounting one if not. Pins must outlive the agent so
/// enrolled pods stay fail-closed while it restarts, and only a bpffs keeps them.
pub fn ensure_bpffs(dir: &Path) -> io::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (_d, m, t) = (f.next(), f.next(), f.next());
        t == Some("bpf") && m.map(unescape_mount_path).as_deref() == dir.to_str()
    });
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let target = cstr(dir)?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call; no
    // mount data is passed.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads from `sock` into the spare capacity of `buf` (none of it need be initialised) and
/// appends what arrived; `Pending` once the socket has nothing, with the waker registered.
///
/// Through tokio's `poll_read`, unlike `try_read_buf`: a read shorter than the room given
/// proves the socket drained and clears its readiness, so the next attempt waits for epoll
/// instead of costing a `recvfrom` that returns `EAGAIN` (one per message on a
/// request/response flow).
pub fn poll_read_spare(
    sock: &mut tokio::net::TcpStream,
    cx: &mut std::task::Context<'_>,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::task::Poll<io::Result<usize>> {
    use tokio::io::AsyncRead as _;
    let spare = buf.spare_capacity_mut();
    let room = spare.len().min(limit);
    let mut read = tokio::io::ReadBuf::uninit(&mut spare[..room]);
    match std::pin::Pin::new(sock).poll_read(cx, &mut read) {
        std::task::Poll::Ready(Ok(())) => {}
        other => return other.map_ok(|()| 0),
    }
    let n = read.filled().len();
    // SAFETY: `ReadBuf::filled` is the prefix of the spare capacity the read initialised, so
    // the first `len + n` bytes of `buf` are initialised and within its capacity.
    unsafe { buf.set_len(buf.len() + n) };
    std::task::Poll::Ready(Ok(n))
}

/// Copies what is queued on a socket into `buf` without consuming it and without blocking
/// (`MSG_PEEK | MSG_DONTWAIT`): `WouldBlock` when nothing is queued, `Ok(0)` at end of stream.
pub fn peek(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, and the kernel writes at most
    // that many.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Takes what is queued on a socket now, without waiting (`MSG_DONTWAIT`): `WouldBlock` when
/// nothing is, `Ok(0)` at end of stream. Unlike tokio's `try_read` it asks the kernel even
/// before the runtime has seen the socket readable (a connection accepted a moment ago).
pub fn recv_now(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, and the kernel writes at most
    // that many.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Whether each of two sockets has something to read (bytes, end of stream or an error: a
/// read would not block), asked without waiting (`poll(2)` with a zero timeout). For a relay
/// that spins on its flow's sockets: tokio's readiness only changes when its reactor runs.
pub fn readable_now(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<(bool, bool)> {
    let events = libc::POLLIN | libc::POLLRDHUP;
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structs, its length is passed, and the
    // kernel writes only their `revents`; a zero timeout never blocks.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}

/// [`recv_now`] into `buf`'s spare capacity (at most `limit` bytes), growing its length by
/// what arrived: the read a spinning relay makes once [`readable_now`] said there is
/// something, before tokio's reactor has seen the socket readable.
pub fn recv_spare(sock: BorrowedFd<'_>, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let room = spare.len().min(limit);
    // SAFETY: the first `room` bytes of the spare capacity are valid for writes, and the
    // kernel writes at most that many.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            room,
            libc::MSG_DONTWAIT,
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel initialised the first `n` (≤ `room`) bytes of the spare capacity,
    // so the first `len + n` bytes of `buf` are initialised and within its capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// The CPU whose network stack last received for the socket (`SO_INCOMING_CPU`): where its
/// peer's packets land. `None` before any was received.
pub fn incoming_cpu(sock: BorrowedFd<'_>) -> io::Result<Option<usize>> {
    let cpu = getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_INCOMING_CPU)?;
    Ok(usize::try_from(cpu).ok())
}

/// The CPUs the calling thread may run on (its affinity mask, e.g. a cgroup's cpuset).
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed, written by the kernel only.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's capacity.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed, only read by the kernel.
    let rc = unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the calling thread's fair-scheduler slice (`sched_setattr`, `SCHED_OTHER` at the
/// thread's nice, `sched_runtime` = `slice`; EEVDF on Linux ≥ 6.12 uses it as the task's
/// request size, older kernels accept and ignore it). Zero gives the thread the kernel's
/// default back.
pub fn set_current_thread_slice(slice: std::time::Duration) -> io::Result<()> {
    /// `struct sched_attr` (include/uapi/linux/sched/types.h), its first version's fields.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        sched_policy: u32,
        sched_flags: u64,
        sched_nice: i32,
        sched_priority: u32,
        sched_runtime: u64,
        sched_deadline: u64,
        sched_period: u64,
        sched_util_min: u32,
        sched_util_max: u32,
    }
    // getpriority returns -1 for nice -1 too, so errno tells an error apart.
    // SAFETY: plain calls with no pointers; `who` 0 is the calling thread.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    if nice == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
        return Err(io::Error::last_os_error());
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        sched_deadline: 0,
        sched_period: 0,
        sched_util_min: 0,
        sched_util_max: 0,
    };
    // SAFETY: `attr` is a valid sched_attr whose `size` is its own, only read by the kernel;
    // pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lifts RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps against it.
pub fn raise_memlock_rlimit() -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `lim` is a valid rlimit for the duration of the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const lim) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lifts the soft RLIMIT_NOFILE to the hard limit: a kTLS flow holds six descriptors in the
/// agent (two sockets, two pipes of two ends), so the default soft 1024 caps a node at ~170
/// flows.
pub fn raise_nofile_rlimit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is valid for writes for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Opens `path`, relative to the directory open as `dir`, for reading, without leaving that
/// directory: openat2(2) with `RESOLVE_BENEATH` (no `..` above it, no absolute path or symlink,
/// and a relative symlink only if it stays inside, so Kubernetes' `..data` links in a mounted
/// Secret or ConfigMap work) and `RESOLVE_NO_MAGICLINKS` (no `/proc/<pid>/...` jumps into
/// another mount namespace). `O_NONBLOCK` so that opening a FIFO does not wait for a writer;
/// callers check the file type on the descriptor before reading.
pub fn open_beneath(dir: BorrowedFd<'_>, path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let c_path = cstr(path)?;
    // SAFETY: open_how is plain integers; all-zero is its documented "no options" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `c_path` is a NUL-terminated string and `how` a valid open_how, both alive for the
    // call; the size passed is the struct's own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_path.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("openat2 returned a bad fd"))?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// How many bytes the kernel has ever queued on a TCP socket for sending since it connected:
/// acknowledged bytes plus what is still in the send queue.
///
/// Kernel TLS may hold encrypted records back when the TCP send buffer is full and push them
/// later from a work item; a `shutdown(SHUT_WR)` before that would put the FIN ahead of them
/// and lose the records. Comparing this counter with what kTLS should have produced tells the
/// relay when the kernel holds nothing back. The acknowledged count is read first: an ACK
/// arriving between the two reads can only make the sum smaller, never claim bytes that are
/// not queued yet.
pub fn tcp_bytes_queued(sock: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let len = getsockopt(sock, libc::SOL_TCP, libc::TCP_INFO, &mut info)?;
    let acked_end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    if len < acked_end {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel tcp_info has no tcpi_bytes_acked (needs Linux 4.1)",
        ));
    }
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int, the bytes in the send queue not yet
    // acknowledged, into `outq`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + u64::try_from(outq).unwrap_or(0))
}

/// What a TCP socket's send queue can still take before a writer would wait: half its send
/// buffer (the kernel's own accounting also charges each buffer's overhead, which loopback
/// segments keep well under the payload) less the bytes queued and not yet acknowledged.
pub fn tcp_send_room(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut sndbuf: libc::c_int = 0;
    getsockopt(sock, libc::SOL_SOCKET, libc::SO_SNDBUF, &mut sndbuf)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int, the bytes in the send queue not yet
    // acknowledged, into `outq`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let half = u64::try_from(sndbuf).unwrap_or(0) / 2;
    Ok(half.saturating_sub(u64::try_from(outq).unwrap_or(0)))
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (IPv4 and IPv6 sockets alike): a later `bind` to an
/// address with port 0 takes the address only, and `connect` picks the port once the whole
/// 4-tuple is known. A port chosen at bind time must be free of every socket on it,
/// TIME_WAIT included, and is searched for under the bind-hash locks; one chosen at connect
/// time only has to make the 4-tuple unique, and may take over a TIME_WAIT socket on a
/// loopback address (`tcp_tw_reuse`, default 2).
pub fn bind_address_no_port(sock: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(sock, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// Resizes a pipe (`F_SETPIPE_SZ`) and returns the size the kernel chose (it rounds up to a
/// power-of-two number of pages). A larger pipe lets one `splice(2)` move more per call.
pub fn set_pipe_size(pipe: BorrowedFd<'_>, bytes: usize) -> io::Result<usize> {
    let want = libc::c_int::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pipe size too large"))?;
    // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours.
    let rc = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// Gives the heap's free pages back to the kernel (glibc keeps them otherwise).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `shutdown(SHUT_WR)`: the FIN after everything queued. Acts on the socket, not the
/// descriptor, so a borrowed one is enough (the relays used to duplicate the descriptor to call
/// the standard library's version: two more system calls per half-close).
pub fn shutdown_write(sock: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `sock` is an open descriptor for the duration of the call; shutdown(2) touches
    // no memory of ours.
    if unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// SO_LINGER with a zero timeout: the socket is reset (RST) when its last descriptor closes.
pub fn set_zero_linger(sock: BorrowedFd<'_>) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(sock, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

/// Lets a connect on `sock` (not connected yet) carry the first write in its SYN (TCP Fast
/// Open, `TCP_FASTOPEN_CONNECT`): with a Fast Open cookie cached for the destination,
/// `connect()` returns at once and the first `write` sends SYN + data; without one it is an
/// ordinary connect whose SYN asks the server for a cookie. `EOPNOTSUPP` when the socket's
/// network namespace has client Fast Open off (`net.ipv4.tcp_fastopen` bit 1).
pub fn set_fastopen_connect(sock: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(sock, libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT, 1)
}

/// Lets a listener accept connections whose SYN carries data with a valid Fast Open cookie
/// (`TCP_FASTOPEN`), at most `queue` of them not yet acknowledged by their client; beyond
/// that, and without the namespace's server bit ([`enable_fastopen_server`]), SYN data is
/// ignored and the client's kernel sends it again after the handshake.
pub fn set_fastopen_listener(sock: BorrowedFd<'_>, queue: libc::c_int) -> io::Result<()> {
    setsockopt_int(sock, libc::IPPROTO_TCP, libc::TCP_FASTOPEN, queue)
}

/// Whether `sock`'s connection was opened with data in its SYN that the other side accepted
/// (`TCPI_OPT_SYN_DATA`): true on both ends of a Fast Open connection.
pub fn syn_data_acked(sock: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt(sock, libc::SOL_TCP, libc::TCP_INFO, &mut info)?;
    Ok(info.tcpi_options & TCPI_OPT_SYN_DATA != 0)
}

/// Whether `sock` is still in SYN_SENT: a connect deferred by `TCP_FASTOPEN_CONNECT` until
/// the first write, or one whose SYN is not answered yet.
pub fn syn_sent(sock: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt(sock, libc::SOL_TCP, libc::TCP_INFO, &mut info)?;
    Ok(info.tcpi_state == TCP_SYN_SENT)
}

/// `tcp_info.tcpi_state` of a socket whose SYN is not answered yet (`include/net/tcp_states.h`).
const TCP_SYN_SENT: u8 = 2;
/// `tcp_info.tcpi_state` of an accepted Fast Open socket whose client has not acknowledged the
/// SYN-ACK yet.
const TCP_SYN_RECV: u8 = 3;

/// Whether an accepted `sock` is still in SYN_RECV: a Fast Open connection handed to accept
/// with its SYN's data, before the client's ACK of the SYN-ACK (the kernel refuses the `tls`
/// ULP until it is established).
pub fn syn_received(sock: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt(sock, libc::SOL_TCP, libc::TCP_INFO, &mut info)?;
    Ok(info.tcpi_state == TCP_SYN_RECV)
}

/// `tcp_info.tcpi_options` bit: data in the SYN was acknowledged (uapi `linux/tcp.h`).
const TCPI_OPT_SYN_DATA: u8 = 32;

/// `net.ipv4.tcp_fastopen` bit: listeners that ask for it (`TCP_FASTOPEN`) accept SYN data.
const TFO_SERVER_ENABLE: u32 = 2;

/// Turns on the server bit of `net.ipv4.tcp_fastopen` in the calling thread's network
/// namespace, keeping the other bits. Returns whether this call set it (to undo with
/// [`disable_fastopen_server`]).
///
/// What it changes: listeners in this namespace that set `TCP_FASTOPEN` accept SYN data from
/// clients holding a valid cookie. Cookies stay required (bit 0x200 is never set): a cookie
/// is a MAC of the client's address under this namespace's own random key, so a SYN from a
/// forged address never delivers data. A listener that does not set the option sees no
/// change.
pub fn enable_fastopen_server() -> io::Result<bool> {
    let path = net_sysctl_path("ipv4/tcp_fastopen");
    let current = parse_fastopen(&std::fs::read_to_string(&path)?)?;
    if current & TFO_SERVER_ENABLE != 0 {
        return Ok(false);
    }
    std::fs::write(&path, (current | TFO_SERVER_ENABLE).to_string())?;
    Ok(true)
}

/// Clears the bit [`enable_fastopen_server`] set (a failed enrollment undoes what it did).
pub fn disable_fastopen_server() -> io::Result<()> {
    let path = net_sysctl_path("ipv4/tcp_fastopen");
    let current = parse_fastopen(&std::fs::read_to_string(&path)?)?;
    std::fs::write(&path, (current & !TFO_SERVER_ENABLE).to_string())
}

fn parse_fastopen(text: &str) -> io::Result<u32> {
    // The kernel prints the value in decimal; it accepts hex written back too, not needed.
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("net.ipv4.tcp_fastopen reads {text:?}, not a number"),
        )
    })
}

/// A `net` sysctl of the calling thread's network namespace: through `/host/proc/sys/net`
/// when the node's copy is mounted there (see [`RESERVED_PORTS_HOST`]), else `/proc/sys/net`.
fn net_sysctl_path(name: &str) -> PathBuf {
    if Path::new(HOST_NET_SYSCTLS).exists() {
        Path::new(HOST_NET_SYSCTLS).join(name)
    } else {
        Path::new("/proc/sys/net").join(name)
    }
}

const HOST_NET_SYSCTLS: &str = "/host/proc/sys/net";

/// Where the calling thread's network namespace keeps its reserved local ports (the sysctl is
/// per namespace, and covers IPv6 too).
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The same sysctl through the node's `/proc/sys/net` mounted at `/host/proc/sys/net`: a
/// container that is not privileged gets `/proc/sys` read-only, and the DaemonSet mounts the
/// node's copy there. The kernel resolves `net` sysctls by the network namespace of the thread
/// that opens them, whichever mount they are reached through, so this path too reaches the pod.
const RESERVED_PORTS_HOST: &str = "/host/proc/sys/net/ipv4/ip_local_reserved_ports";

fn reserved_ports_path() -> &'static str {
    if Path::new(RESERVED_PORTS_HOST).exists() {
        RESERVED_PORTS_HOST
    } else {
        RESERVED_PORTS
    }
}

/// Keeps the kernel from handing `ports` out as ephemeral ports in the calling thread's
/// network namespace, adding them to what is reserved already.
///
/// The agent's listeners in a pod sit on fixed loopback ports. A pod that widens
/// `ip_local_port_range` would otherwise let its own connections take those ports while the
/// agent is down, and the agent's restart would then fail with `EADDRINUSE` until they close.
pub fn reserve_local_ports(ports: &[u16]) -> io::Result<Vec<u16>> {
    let current = std::fs::read_to_string(reserved_ports_path())?;
    let Some(merged) = merge_port_list(&current, ports) else {
        return Ok(Vec::new());
    };
    std::fs::write(reserved_ports_path(), merged)?;
    let added = ports
        .iter()
        .copied()
        .filter(|p| !port_list_covers(&current, *p))
        .collect();
    Ok(added)
}

/// Takes `ports` (as [`reserve_local_ports`] returned them) out of the calling thread's
/// network namespace's reserved ports again: what a failed enrollment added, it removes.
/// Only single-port items equal to one of `ports` go; ranges stay.
pub fn release_local_ports(ports: &[u16]) -> io::Result<()> {
    if ports.is_empty() {
        return Ok(());
    }
    let current = std::fs::read_to_string(reserved_ports_path())?;
    let kept: Vec<&str> = current
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty() && !item.parse().is_ok_and(|p: u16| ports.contains(&p)))
        .collect();
    // An empty write is refused by the kernel; a newline clears the list.
    let text = if kept.is_empty() {
        "\n".to_owned()
    } else {
        kept.join(",")
    };
    std::fs::write(reserved_ports_path(), text)
}

fn port_list_covers(list: &str, port: u16) -> bool {
    list.trim().split(',').any(|item| {
        let item = item.trim();
        match item.split_once('-') {
            Some((lo, hi)) => matches!(
                (lo.parse::<u16>(), hi.parse::<u16>()),
                (Ok(lo), Ok(hi)) if (lo..=hi).contains(&port)
            ),
            None => item.parse() == Ok(port),
        }
    })
}

/// `current` (the sysctl's `a,b-c` syntax) with `ports` added, or `None` if every port is
/// already covered.
fn merge_port_list(current: &str, ports: &[u16]) -> Option<String> {
    let covered = |port: u16| port_list_covers(current, port);
    let missing: Vec<String> = ports
        .iter()
        .copied()
        .filter(|&p| !covered(p))
        .map(|p| p.to_string())
        .collect();
    if missing.is_empty() {
        return None;
    }
    let current = current.trim();
    Some(if current.is_empty() {
        missing.join(",")
    } else {
        format!("{current},{}", missing.join(","))
    })
}

/// Creates a FIFO at `path`: tests use one to prove a reader never blocks on what policy names.
pub fn mkfifo(path: &Path, mode: u32) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Most descriptors one handover message may carry. The kernel's own cap is 253
/// (`SCM_MAX_FD`); a pod's listeners or one flow's sockets need far fewer.
pub const MAX_PASSED_FDS: usize = 16;

/// The credentials the kernel recorded for the other end of a unix socket when it connected
/// (`SO_PEERCRED`): not what the peer claims, so it can be trusted for an access decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// `SO_PEERCRED` of a connected unix socket.
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    getsockopt(sock, libc::SOL_SOCKET, libc::SO_PEERCRED, &mut cred)?;
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends `data` with `fds` attached (`SCM_RIGHTS`) in one `sendmsg` on a unix socket. The
/// descriptors ride on the first byte: the receiver gets them with the read that consumes it.
/// Returns how many bytes went out (the caller sends the rest without descriptors). Sending
/// duplicates the descriptors into the receiver; ours stay open.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message (at most {MAX_PASSED_FDS})",
                fds.len()
            ),
        ));
    }
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors need at least one byte to ride on",
        ));
    }
    let raw: Vec<libc::c_int> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 elements keep the buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` zeroed, aligned bytes, enough for one header
        // with `payload` bytes of data, so CMSG_FIRSTHDR is non-null and CMSG_DATA lies
        // inside the buffer; `raw` holds exactly `payload` bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    // SAFETY: `msg` points at `iov` (which points at `data`) and `control`, all alive for the
    // call; the descriptors in the control message are open (borrowed from the caller).
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads up to `buf.len()` bytes from a unix socket, taking ownership of any descriptors that
/// arrived with them (close-on-exec). More than [`MAX_PASSED_FDS`] descriptors, or a control
/// message of another kind, is an error; the descriptors received are closed then.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::FromRawFd as _;
    let fd_size = std::mem::size_of::<libc::c_int>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_PASSED_FDS * fd_size) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `iov` (into `buf`) and `control`, both writable and alive for
    // the call, with their true lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    let mut foreign = false;
    // SAFETY: the kernel filled `msg.msg_control` up to `msg_controllen`; CMSG_FIRSTHDR and
    // CMSG_NXTHDR stay within it, and each SCM_RIGHTS payload holds `cmsg_len - CMSG_LEN(0)`
    // bytes of descriptors that are now ours (read unaligned: CMSG_DATA need not be aligned
    // for c_int).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg);
                for i in 0..bytes / fd_size {
                    let raw = std::ptr::read_unaligned(data.add(i * fd_size).cast::<libc::c_int>());
                    fds.push(std::os::fd::OwnedFd::from_raw_fd(raw));
                }
            } else {
                foreign = true;
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_PASSED_FDS} descriptors in one message"),
        ));
    }
    if foreign {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected control message (not SCM_RIGHTS)",
        ));
    }
    Ok((n as usize, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent sets TCP_NODELAY once on its listeners instead of on every accepted
    /// connection: this holds only if the kernel copies it to the accepted socket.
    #[test]
    fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener = tcp_listener((std::net::Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        set_nodelay(listener.as_fd()).unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(nodelay(accepted.as_fd()).unwrap());
        assert!(!nodelay(client.as_fd()).unwrap());
    }

    #[test]
    fn reserved_ports_merge_keeps_what_is_there() {
        assert_eq!(
            merge_port_list("\n", &[15001, 15006]).as_deref(),
            Some("15001,15006")
        );
        assert_eq!(
            merge_port_list("8080,15000-15002\n", &[15001, 15006]).as_deref(),
            Some("8080,15000-15002,15006")
        );
        assert_eq!(merge_port_list("15001,15006\n", &[15001, 15006]), None);
    }

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(
            parse_mounts(mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_mounts(mounts, "bpf"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        assert_eq!(
            unescape_mount_path(r"/mnt/with\040space"),
            "/mnt/with space"
        );
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }

    #[test]
    fn descriptors_cross_a_unix_socket_and_stay_usable() {
        use std::io::{Read as _, Write as _};
        use std::os::fd::AsFd as _;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut p1, mut p2) = std::os::unix::net::UnixStream::pair().unwrap();
        let n = send_with_fds(a.as_fd(), b"hello", &[p2.as_fd()]).unwrap();
        assert_eq!(n, 5);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same socket: writing to it reaches p1.
        let mut got = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
        got.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        p1.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        p2.write_all(b"y").unwrap();
        p1.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"y");
        // Same process on both ends: the kernel's credentials are ours.
        let cred = peer_cred(a.as_fd()).unwrap();
        assert_eq!(cred.pid, std::process::id() as i32);
        assert_eq!(cred.uid, euid());
    }

    #[test]
    fn too_many_descriptors_are_refused_before_sending() {
        use std::os::fd::AsFd as _;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let many: Vec<_> = (0..=MAX_PASSED_FDS).map(|_| a.as_fd()).collect();
        assert!(send_with_fds(a.as_fd(), b"x", &many).is_err());
        assert!(send_with_fds(a.as_fd(), b"", &[]).is_err());
    }
}
