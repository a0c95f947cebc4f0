//! Test topologies: pods as network namespaces on a node bridge, each with its own cgroup, and
//! a two-node variant where two node namespaces are joined by a veth "wire". Everything is
//! torn down on drop, also when the test panics.
//!
//! ```text
//!   node ns (bridge br0 = 10.88.N.1/24)                 node ns of the other node
//!     ├─ veth ─ pod ns (eth0 = 10.88.N.x, cgroup)         ...
//!     └─ veth ─ pod ns ...
//!   wire: veth between the two node namespaces (10.99.0.1 ↔ 10.99.0.2), routes 10.88.M.0/24
//! ```

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command},
};

use crate::{Cgroup, NetNs, unique_name};

/// One simulated node: a namespace with a bridge that its pods hang off.
pub struct Node {
    pub ns: NetNs,
    /// 10.88.<index>.0/24
    pub index: u8,
    pub bridge: String,
}

/// One simulated pod: its own netns (eth0 on the node bridge) and cgroup.
pub struct Pod {
    pub name: String,
    pub ns: NetNs,
    pub cgroup: Cgroup,
    pub ip: std::net::Ipv4Addr,
    /// fd00:88:<node>::<host>
    pub ip6: std::net::Ipv6Addr,
    /// The veth end in the node namespace.
    pub host_if: String,
    children: Vec<Child>,
}

impl Node {
    pub fn new(index: u8) -> Self {
        let ns = NetNs::new("node");
        let bridge = "br0".to_owned();
        ns.ip(&["link", "add", &bridge, "type", "bridge"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("10.88.{index}.1/24"),
            "dev",
            &bridge,
        ]);
        ns.ip(&["link", "set", &bridge, "up"]);
        // /proc/sys/net resolves to the netns of the task that opens it.
        ns.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"));
        Self { ns, index, bridge }
    }

    /// Adds a pod with address 10.88.<node>.<host>.
    pub fn pod(&self, name: &str, host: u8) -> Pod {
        let ns = NetNs::new("pod");
        let host_if = unique_name("vh");
        let ip = std::net::Ipv4Addr::new(10, 88, self.index, host);
        self.ns.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.ns
            .ip(&["link", "set", &host_if, "master", &self.bridge, "up"]);
        let ip6 = std::net::Ipv6Addr::new(
            0xfd00,
            0x88,
            u16::from(self.index),
            0,
            0,
            0,
            0,
            u16::from(host),
        );
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let gw4 = format!("10.88.{}.1", self.index);
        let gw6 = format!("fd00:88:{}::1", self.index);
        ns.ip(&["route", "add", "default", "via", &gw4]);
        // The v6 prefix route appears only once the link is operationally up; `onlink`
        // does not wait for it.
        ns.ip(&[
            "-6", "route", "add", "default", "via", &gw6, "dev", "eth0", "onlink",
        ]);
        Pod {
            name: name.to_owned(),
            ns,
            cgroup: Cgroup::new("pod"),
            ip,
            ip6,
            host_if,
            children: Vec::new(),
        }
    }
}

/// Joins two nodes with a veth pair and routes each node's pod subnet through it.
/// Returns the interface name of the wire in `a`'s namespace (capture there).
pub fn wire(a: &Node, b: &Node) -> String {
    let ia = unique_name("wa");
    let ib = unique_name("wb");
    a.ns.ip(&[
        "link", "add", &ia, "type", "veth", "peer", "name", &ib, "netns", &b.ns.name,
    ]);
    a.ns.ip(&["addr", "add", "10.99.0.1/30", "dev", &ia]);
    b.ns.ip(&["addr", "add", "10.99.0.2/30", "dev", &ib]);
    a.ns.ip(&["link", "set", &ia, "up"]);
    b.ns.ip(&["link", "set", &ib, "up"]);
    a.ns.ip(&[
        "route",
        "add",
        &format!("10.88.{}.0/24", b.index),
        "via",
        "10.99.0.2",
    ]);
    b.ns.ip(&[
        "route",
        "add",
        &format!("10.88.{}.0/24", a.index),
        "via",
        "10.99.0.1",
    ]);
    ia
}

impl Pod {
    /// A command that will run inside this pod: it joins the pod's cgroup first, then its netns
    /// (in that order: entering the netns first would not matter for cgroupfs writes, but
    /// `ip netns exec` would also remount /sys and hide the cgroup2 mount).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd, true);
        cmd
    }

    /// Like [`Pod::command`] but outside the pod's cgroup: same netns, not enrolled (a
    /// "legacy" process sharing the network).
    pub fn command_unenrolled(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd, false);
        cmd
    }

    fn enter(&self, cmd: &mut Command, join_cgroup: bool) {
        let procs = join_cgroup.then(|| {
            std::ffi::CString::new(
                self.cgroup
                    .path
                    .join("cgroup.procs")
                    .into_os_string()
                    .into_encoded_bytes(),
            )
            .expect("cgroup path")
        });
        let ns = std::fs::File::open(self.ns.path()).expect("open pod netns");
        // SAFETY: the closure runs between fork and exec and only makes raw syscalls on memory
        // prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                use std::os::fd::AsRawFd as _;
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Starts a long-running process in the pod; it is killed when the pod is dropped.
    pub fn spawn(&mut self, mut cmd: Command) -> u32 {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn in pod {}: {e}", self.name));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    pub fn netns_path(&self) -> PathBuf {
        self.ns.path()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
