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
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
};

use anyhow::Context as _;

use crate::{Cgroup, NetNs, unique_name};

/// One simulated node: a namespace with a bridge that its pods hang off.
#[derive(Debug)]
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
    pub ip: Ipv4Addr,
    /// fd00:88:<node>::<host>
    pub ip6: Ipv6Addr,
    /// The veth end in the node namespace.
    pub host_if: String,
    children: Vec<Child>,
}

impl Node {
    pub fn new(index: u8) -> Self {
        Self::with_ns(NetNs::new("node"), index).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Makes `ns` a node: bridge `br0` with 10.88.<index>.1/24, IPv4 forwarding on.
    pub fn with_ns(ns: NetNs, index: u8) -> anyhow::Result<Self> {
        let bridge = "br0".to_owned();
        ns.try_ip(&["link", "add", &bridge, "type", "bridge"])?;
        ns.try_ip(&[
            "addr",
            "add",
            &format!("10.88.{index}.1/24"),
            "dev",
            &bridge,
        ])?;
        ns.try_ip(&["link", "set", &bridge, "up"])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(Self { ns, index, bridge })
    }

    /// Adds a pod with address 10.88.<node>.<host>.
    pub fn pod(&self, name: &str, host: u8) -> Pod {
        let ns = NetNs::new("pod");
        let host_if = unique_name("vh");
        let (ip, ip6) = self
            .plug(&ns, &host_if, host, true)
            .unwrap_or_else(|e| panic!("{e:#}"));
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

    /// Plugs the pod namespace `pod` into the bridge with a veth pair (`host_if` here, `eth0`
    /// there): 10.88.<node>.<host>/24 with a default route via the bridge and, with `ipv6`,
    /// fd00:88:<node>::<host>/64 likewise. Returns both addresses (the v6 one is assigned
    /// only with `ipv6`).
    pub fn plug(
        &self,
        pod: &NetNs,
        host_if: &str,
        host: u8,
        ipv6: bool,
    ) -> anyhow::Result<(Ipv4Addr, Ipv6Addr)> {
        let ip = Ipv4Addr::new(10, 88, self.index, host);
        let ip6 = Ipv6Addr::new(
            0xfd00,
            0x88,
            u16::from(self.index),
            0,
            0,
            0,
            0,
            u16::from(host),
        );
        self.ns.try_ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ])?;
        self.ns
            .try_ip(&["link", "set", host_if, "master", &self.bridge, "up"])?;
        pod.try_ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        if ipv6 {
            pod.try_ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        }
        pod.try_ip(&["link", "set", "eth0", "up"])?;
        let gw4 = format!("10.88.{}.1", self.index);
        pod.try_ip(&["route", "add", "default", "via", &gw4])?;
        if ipv6 {
            let gw6 = format!("fd00:88:{}::1", self.index);
            // The v6 prefix route appears only once the link is operationally up; `onlink`
            // does not wait for it.
            pod.try_ip(&[
                "-6", "route", "add", "default", "via", &gw6, "dev", "eth0", "onlink",
            ])?;
        }
        Ok((ip, ip6))
    }
}

/// Joins two nodes with a veth pair and routes each node's pod subnet through it.
/// Returns the interface name of the wire in `a`'s namespace (capture there).
pub fn wire(a: &Node, b: &Node) -> String {
    let ia = unique_name("wa");
    let ib = unique_name("wb");
    wire_named(a, b, &ia, &ib).unwrap_or_else(|e| panic!("{e:#}"));
    ia
}

/// [`wire`] with the interface names given: `ia` in `a`'s namespace, `ib` in `b`'s.
pub fn wire_named(a: &Node, b: &Node, ia: &str, ib: &str) -> anyhow::Result<()> {
    a.ns.try_ip(&[
        "link", "add", ia, "type", "veth", "peer", "name", ib, "netns", &b.ns.name,
    ])?;
    a.ns.try_ip(&["addr", "add", "10.99.0.1/30", "dev", ia])?;
    b.ns.try_ip(&["addr", "add", "10.99.0.2/30", "dev", ib])?;
    a.ns.try_ip(&["link", "set", ia, "up"])?;
    b.ns.try_ip(&["link", "set", ib, "up"])?;
    for (from, to, via) in [(a, b, "10.99.0.2"), (b, a, "10.99.0.1")] {
        from.ns.try_ip(&[
            "route",
            "add",
            &format!("10.88.{}.0/24", to.index),
            "via",
            via,
        ])?;
    }
    Ok(())
}

/// Prepares `cmd` to join `cgroup` (if any), then enter the netns at `netns` (if any), between
/// fork and exec. In that order: entering the netns first would not matter for cgroupfs
/// writes, but `ip netns exec` would also remount /sys and hide the cgroup2 mount.
pub fn enter(cmd: &mut Command, cgroup: Option<&Path>, netns: Option<&Path>) -> anyhow::Result<()> {
    let procs = cgroup
        .map(|c| {
            std::ffi::CString::new(c.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .context("cgroup path contains NUL")
        })
        .transpose()?;
    let ns = netns
        .map(|p| std::fs::File::open(p).with_context(|| format!("open netns {}", p.display())))
        .transpose()?;
    // SAFETY: the closure runs between fork and exec and only makes raw syscalls on memory
    // prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd as _;
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            if let Some(ns) = &ns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

impl Pod {
    /// A command that will run inside this pod: it joins the pod's cgroup first, then its netns
    /// (see [`enter`]).
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
        let cgroup = join_cgroup.then_some(self.cgroup.path.as_path());
        enter(cmd, cgroup, Some(&self.ns.path()))
            .unwrap_or_else(|e| panic!("pod {}: {e:#}", self.name));
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
