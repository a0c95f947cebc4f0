//! The benchmark topology: pods as network namespaces on a node bridge, each with its own
//! cgroup v2 directory, and a cross-node variant where two node namespaces are joined by a
//! veth "wire". The namespaces, the bridge, the veth plumbing and the wire are the test
//! harness's (`interceptor_tests::topology`, through its `Result`-returning constructors:
//! a benchmark must clean up and report, not panic); what is the bench's own is here: names
//! [`sweep_stale`] recognises, cgroups that kill what they hold, the pods' sysctls for
//! connection churn and CPU pinning.
//!
//! ```text
//! same-node:   node ns (br0 10.88.1.1/24) ─┬─ veth ─ client pod ns (10.88.1.2)
//!                                           └─ veth ─ server pod ns (10.88.1.3)
//! cross-node:  node1 ns (br0 10.88.1.1/24) ─ veth ─ client pod (10.88.1.2)
//!                 │ wire 10.99.0.1/30 ↔ 10.99.0.2/30 (routes for the other /24)
//!              node2 ns (br0 10.88.2.1/24) ─ veth ─ server pod (10.88.2.3)
//! ```
//!
//! Every namespace and cgroup is removed on drop, in reverse creation order, also when the
//! run fails or is interrupted. Names carry the bench's PID so [`sweep_stale`] can remove what
//! a killed run left behind without touching anything else.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
pub use interceptor_tests::{NetNs, topology::Node};

/// Listening ports in the pods (apps, sidecars at +20000, agent listeners), kept out of the
/// widened ephemeral range.
const RESERVED_PORTS: &str = "5201-5204,7000,8080,11111,15000-15099,25201-25204,27000,28080,31111";

/// Prefix of every netns and cgroup this program creates.
const PREFIX: &str = "ibench";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `ibench-<pid>-<what><n>`: unique per process and call, and recognisable by [`sweep_stale`].
fn unique(what: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}-{}-{what}{n}", std::process::id())
}

/// Interface names are limited to 15 bytes, so they are short; they live inside namespaces
/// this process owns, which makes them unique enough.
fn short_if(what: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{what}{n}")
}

/// A network namespace named by [`unique`], with loopback up.
fn netns(what: &str) -> Result<NetNs> {
    NetNs::named(unique(what))
}

/// A cgroup v2 directory, removed on drop after its processes are killed.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(what: &str) -> Result<Self> {
        let root = interceptor::sys::cgroup2_mount().context("cgroup2 mount")?;
        let path = root.join(unique(what));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }

    /// CPU time of everything that ran in this cgroup, from `cpu.stat` (`usage_usec`, which
    /// cgroup v2 keeps even without the cpu controller enabled).
    pub fn cpu_usec(&self) -> Result<u64> {
        let stat = fs::read_to_string(self.path.join("cpu.stat"))
            .with_context(|| format!("read {}/cpu.stat", self.path.display()))?;
        stat.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no usage_usec in {}/cpu.stat", self.path.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Kills whatever is left in a cgroup (`cgroup.kill`, Linux 5.14+; otherwise each PID), then
/// removes the directory once it is empty.
fn remove_cgroup(path: &Path) {
    if fs::write(path.join("cgroup.kill"), "1").is_err()
        && let Ok(procs) = fs::read_to_string(path.join("cgroup.procs"))
    {
        for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) with a PID read from a cgroup this program created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for _ in 0..100 {
        if fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("bench: warning: could not remove cgroup {}", path.display());
}

/// Removes namespaces and cgroups left by earlier runs of this program that died without
/// cleaning up (SIGKILL, power loss): only names with our prefix whose PID is gone.
pub fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            return false;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            return false;
        };
        pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                eprintln!("bench: removing stale netns {name}");
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
    if let Ok(root) = interceptor::sys::cgroup2_mount()
        && let Ok(entries) = fs::read_dir(&root)
    {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                eprintln!("bench: removing stale cgroup {name}");
                remove_cgroup(&e.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                eprintln!("bench: removing stale bpffs pins {name}");
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A bpffs directory name for one agent start, recognisable by [`sweep_stale`].
pub fn unique_bpffs_name(what: &str) -> String {
    unique(what)
}

/// One simulated node (a namespace with a bridge its pods hang off), named by [`unique`].
fn node(index: u8) -> Result<Node> {
    Node::with_ns(netns("node")?, index)
}

/// Adds a pod with address 10.88.<node>.<host> (IPv4 only, MTU 1500, default offloads).
fn pod(node: &Node, name: &str, host: u8) -> Result<Pod> {
    let ns = netns("pod")?;
    let cgroup = Cgroup::new(&format!("pod-{name}-"))?;
    let host_if = short_if("vh");
    let (ip, _) = node.plug(&ns, &host_if, host, false)?;
    // Connection churn opens tens of thousands of connections per run: reuse TIME_WAIT
    // ports and widen the range, as the baseline measurements did (these namespaces only).
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    ns.sysctl("net.ipv4.ip_local_port_range", "10000 64999")?;
    // ...but never hand out a port something listens on: the agent's 15011/15016,
    // ztunnel's 15001/15006/15008, the apps', the sidecars'. A TIME_WAIT socket left on
    // such a port by an ephemeral connection makes the next listener's bind() fail with
    // EADDRINUSE (seen: agent restarts within 60 s of a churn run), which Kubernetes'
    // default range avoids.
    ns.sysctl("net.ipv4.ip_local_reserved_ports", RESERVED_PORTS)?;
    Ok(Pod {
        name: name.to_owned(),
        ns,
        cgroup,
        ip,
        host_if,
    })
}

/// One simulated pod: its own netns (eth0 on the node bridge) and cgroup.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The veth end in the node namespace (where a capture sees the pod's wire traffic).
    pub host_if: String,
    // Field order is drop order: the cgroup (and its processes) go before the namespace.
    pub cgroup: Cgroup,
    pub ns: NetNs,
}

/// Which CPUs a process may run on (`sched_setaffinity` before exec), for the "two one-core
/// nodes" placement of §9.3.
pub type CpuSet = Option<usize>;

impl Pod {
    /// A command that runs inside this pod: it joins the pod's cgroup, then its netns. Not
    /// `ip netns exec`, which remounts /sys and would hide the cgroup2 mount from the child.
    pub fn command(&self, program: &str, cpu: CpuSet) -> Result<Command> {
        let mut cmd = Command::new(program);
        enter(
            &mut cmd,
            Some(&self.cgroup.path),
            Some(&self.ns.path()),
            cpu,
        )?;
        Ok(cmd)
    }
}

/// Prepares `cmd` to join `cgroup` (if any), enter the netns at `netns` (if any) and pin
/// itself to `cpu` (if any), between fork and exec.
pub fn enter(
    cmd: &mut Command,
    cgroup: Option<&Path>,
    netns: Option<&Path>,
    cpu: CpuSet,
) -> Result<()> {
    interceptor_tests::topology::enter(cmd, cgroup, netns)?;
    if let Some(cpu) = cpu {
        // SAFETY: the closure runs between fork and exec (after the one `enter` registered)
        // and only makes raw syscalls on its own stack.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Ok(())
}

/// The two layouts every mode runs on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    SameNode,
    CrossNode,
}

impl Layout {
    pub fn label(self) -> &'static str {
        match self {
            Layout::SameNode => "same-node",
            Layout::CrossNode => "cross-node",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "same-node" | "same" => Ok(Layout::SameNode),
            "cross-node" | "cross" => Ok(Layout::CrossNode),
            other => bail!("unknown topology {other:?}: expected same-node or cross-node"),
        }
    }
}

/// A client pod and a server pod on one or two nodes.
#[derive(Debug)]
pub struct Topology {
    pub layout: Layout,
    // Pods before nodes: a pod's veth end lives in its node's namespace.
    pub client: Pod,
    pub server: Pod,
    /// One node (same-node) or two (cross-node: client on the first, server on the second).
    pub nodes: Vec<Node>,
}

impl Topology {
    pub fn new(layout: Layout) -> Result<Self> {
        match layout {
            Layout::SameNode => {
                let node = node(1)?;
                let client = pod(&node, "client", 2)?;
                let server = pod(&node, "server", 3)?;
                Ok(Self {
                    layout,
                    client,
                    server,
                    nodes: vec![node],
                })
            }
            Layout::CrossNode => {
                let a = node(1)?;
                let b = node(2)?;
                interceptor_tests::topology::wire_named(&a, &b, &short_if("wa"), &short_if("wb"))?;
                let client = pod(&a, "client", 2)?;
                let server = pod(&b, "server", 3)?;
                Ok(Self {
                    layout,
                    client,
                    server,
                    nodes: vec![a, b],
                })
            }
        }
    }

    /// The node a pod runs on (its agent runs in that node's namespace).
    pub fn node_of_server(&self) -> &Node {
        self.nodes.last().unwrap_or(&self.nodes[0])
    }
}
