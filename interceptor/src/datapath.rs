//! The kernel half of interception, behind a typed facade: loads the eBPF object, attaches its
//! programs per cgroup (outbound) and per netns (inbound), and owns the maps. The only module
//! that imports aya; the rest of the agent speaks [`SocketAddr`]s and [`PodConfig`]s.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash, SockMap},
    programs::{CgroupAttachMode, Program, ProgramError, SkLookup, links::FdLink},
};
pub use interceptor_common::Counter;
use interceptor_common::{
    ACTION_PASSTHROUGH, ACTION_STEER, DestAction, FlowKey, JoinGrant, JoinSent, LegKey, OrigDst,
    POD_FLAG_JOIN_SKMSG, POD_FLAG_LOCAL_LEG_SKMSG, POD_FLAG_STEER_INBOUND, PodAddrKey, PodConfig,
    SockAddr, maps,
};

/// The compiled eBPF object, built by aya-build from `interceptor-ebpf`. Empty in `cfg(fuzzing)`
/// builds (see `build.rs`), where loading fails.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

/// Programs attached to every enrolled cgroup, in attach order. sockops goes first so a flow is
/// never steered by connect4 before something is ready to re-key it, and sock_release before
/// connect4 so no recorded destination outlives its socket.
pub const CGROUP_PROGRAMS: [&str; 6] = [
    "intercept_sockops",
    "intercept_sock_release",
    "intercept_connect4",
    "intercept_connect6",
    "intercept_getpeername4",
    "intercept_getpeername6",
];
pub const SK_LOOKUP_PROGRAM: &str = "intercept_sk_lookup";
/// The leg joins [`LegJoins`] measures; the agent loads only the sk_msg one, and only with
/// `tuning.sameNodeJoin: skMsg` ([`Datapath::enable_join`]). The probe does not report them
/// (a kernel without them lacks nothing the default agent uses).
const LEG_JOIN_PROGRAMS: [&str; 2] = ["join_legs_skb", "join_legs_msg"];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed (need root or CAP_BPF + CAP_NET_ADMIN)")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel rejected program `{name}`")]
    Program {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("program `{name}` was attached without a bpf_link (kernel older than 5.7?)")]
    Link {
        name: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF map `{0}` is missing from the object (build mismatch)")]
    MissingMap(&'static str),
    #[error("eBPF map `{name}` operation failed")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning under {path} failed")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("system setup failed: {0}")]
    Sys(#[source] std::io::Error),
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// How the datapath keeps its state.
#[derive(Debug, Clone, Default)]
pub struct DatapathOptions {
    /// A directory on a bpffs. When set, the links are pinned there, so enrolled pods stay
    /// steered (and therefore fail closed) while the agent is down, and so are the maps
    /// (`maps/<layout>/<NAME>`, see [`map_layout`]). A restarted agent loads fresh maps
    /// (replacing those pins), fills them, and attaches its links before removing the old
    /// ones. `None` keeps everything tied to this process (tests).
    pub pin_dir: Option<PathBuf>,
    /// Use the maps a running agent pinned instead of fresh ones (a handover): both agents'
    /// programs then record into and read from the same maps, so a connection steered by
    /// either agent's connect4 is found by whichever agent accepts it. Only maps of the same
    /// [`map_layout`] are shared; a build whose maps differ gets fresh ones.
    pub adopt_maps: bool,
}

/// Every map with its key and value size and capacity, as this build's programs and
/// agent see them. Its hash names the directory the maps are pinned in, so an agent only
/// ever adopts maps laid out exactly as it expects. Bump the revision when a map's meaning
/// changes without its sizes changing.
const MAP_LAYOUT_REVISION: u32 = 1;

/// The directory name for this build's pinned maps (see [`MAP_LAYOUT_REVISION`]).
pub fn map_layout() -> String {
    use interceptor_common::maps::{MAX_DESTS, MAX_PENDING_FLOWS, MAX_POD_ADDRS, MAX_PODS};
    use std::mem::size_of;
    let layout: [(&str, usize, usize, u32); 10] = [
        (
            maps::ORIG_DST_BY_COOKIE,
            size_of::<u64>(),
            size_of::<OrigDst>(),
            MAX_PENDING_FLOWS,
        ),
        (
            maps::ORIG_DST_BY_FLOW,
            size_of::<FlowKey>(),
            size_of::<SockAddr>(),
            MAX_PENDING_FLOWS,
        ),
        (
            maps::POD_CONFIG,
            size_of::<u64>(),
            size_of::<PodConfig>(),
            MAX_PODS,
        ),
        (
            maps::POD_ADDRS,
            size_of::<PodAddrKey>(),
            size_of::<u32>(),
            MAX_POD_ADDRS,
        ),
        (
            maps::DEST_POLICY,
            size_of::<SockAddr>(),
            size_of::<DestAction>(),
            MAX_DESTS,
        ),
        (
            maps::INBOUND_SLOTS,
            size_of::<SockAddr>(),
            size_of::<u32>(),
            MAX_POD_ADDRS,
        ),
        (
            maps::INBOUND_LISTENERS,
            size_of::<u32>(),
            size_of::<u32>(),
            2 * MAX_PODS,
        ),
        (
            maps::LOCAL_LEGS,
            size_of::<LegKey>(),
            size_of::<u32>(),
            MAX_PENDING_FLOWS,
        ),
        (
            maps::LEG_BYTES,
            size_of::<LegKey>(),
            size_of::<u64>(),
            MAX_PENDING_FLOWS,
        ),
        (
            maps::COUNTERS,
            size_of::<u32>(),
            size_of::<u64>(),
            interceptor_common::maps::COUNTER_SLOTS,
        ),
    ];
    let text = format!("{MAP_LAYOUT_REVISION}:{layout:?}");
    let hex = sha256_hex(text.as_bytes());
    format!("v{MAP_LAYOUT_REVISION}-{}", hex.get(..16).unwrap_or(&hex))
}

/// The maps every program shares, pinned by name when there is a pin directory.
const PINNED_MAPS: [&str; 10] = [
    maps::ORIG_DST_BY_COOKIE,
    maps::ORIG_DST_BY_FLOW,
    maps::POD_CONFIG,
    maps::POD_ADDRS,
    maps::DEST_POLICY,
    maps::INBOUND_SLOTS,
    maps::INBOUND_LISTENERS,
    maps::LOCAL_LEGS,
    maps::LEG_BYTES,
    maps::COUNTERS,
];

/// What the loader learned about each program: used by `interceptor probe`.
#[derive(Debug, Clone)]
pub struct ProgramReport {
    pub name: String,
    pub kind: &'static str,
    pub result: Result<(), String>,
}

/// The loaded datapath. Dropping it detaches every link that is not pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pod_config: HashMap<MapData, u64, PodConfig>,
    pod_addrs: HashMap<MapData, PodAddrKey, u32>,
    dest_policy: HashMap<MapData, SockAddr, DestAction>,
    orig_by_cookie: HashMap<MapData, u64, OrigDst>,
    orig_by_flow: HashMap<MapData, FlowKey, SockAddr>,
    inbound_slots: HashMap<MapData, SockAddr, u32>,
    inbound_listeners: SockMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
    local_legs: SockHash<MapData, LegKey>,
    /// sockops on the agent's own cgroup (sk_msg local-leg option), so the agent's ends of
    /// local legs enter LOCAL_LEGS too.
    agent_cgroup_link: Option<FdLink>,
    /// The sk_msg leg join's maps, once [`Datapath::enable_join`] attached its program.
    join: Option<std::sync::Arc<std::sync::Mutex<JoinMaps>>>,
    cgroups: StdHashMap<PathBuf, Vec<FdLink>>,
    netns: StdHashMap<u64, FdLink>,
    /// With adopted maps, until [`Datapath::refresh_adopted`]: what this process wrote.
    written: Option<Written>,
    options: DatapathOptions,
}

fn kind_of(p: &Program) -> &'static str {
    match p {
        Program::SockOps(_) => "sock_ops",
        Program::CgroupSockAddr(_) => "cgroup_sock_addr",
        Program::CgroupSock(_) => "cgroup_sock",
        Program::SkLookup(_) => "sk_lookup",
        Program::SkMsg(_) => "sk_msg",
        _ => "other",
    }
}

fn load_program(p: &mut Program) -> Result<(), ProgramError> {
    match p {
        Program::SockOps(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        _ => Ok(()),
    }
}

/// Loads every program of the object one by one and reports each verdict, without attaching
/// anything. The verifier is the only honest answer to "does this kernel run our programs".
pub fn probe_programs() -> Result<Vec<ProgramReport>> {
    raise_memlock();
    let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(DatapathError::Load)?;
    let mut reports: Vec<ProgramReport> = ebpf
        .programs_mut()
        .filter(|(name, _)| !LEG_JOIN_PROGRAMS.contains(name))
        .map(|(name, p)| ProgramReport {
            name: name.to_owned(),
            kind: kind_of(p),
            result: load_program(p).map_err(|e| crate::error::chain(&e)),
        })
        .collect();
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(reports)
}

/// Kernels since 5.11 account BPF memory to the cgroup and ignore RLIMIT_MEMLOCK; older ones
/// need it lifted. Without CAP_SYS_RESOURCE the lift fails, which only matters on those older
/// kernels, and there the load itself reports the problem.
fn raise_memlock() {
    if let Err(e) = crate::sys::raise_memlock_rlimit() {
        tracing::debug!(error = %e, "could not lift RLIMIT_MEMLOCK; relying on memcg accounting");
    }
}

fn take<K, V>(ebpf: &mut Ebpf, name: &'static str) -> Result<HashMap<MapData, K, V>>
where
    K: aya::Pod,
    V: aya::Pod,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// The program `name` in `ebpf` as its kind, with an error naming it when it is missing or of
/// another kind.
fn typed_program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProgramError::NotLoaded)
        .and_then(TryInto::try_into)
        .map_err(|source| DatapathError::Program {
            name: name.to_owned(),
            source,
        })
}

fn sock_hash<K: aya::Pod>(ebpf: &mut Ebpf, name: &'static str) -> Result<SockHash<MapData, K>> {
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    SockHash::try_from(map).map_err(map_err(name))
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl Datapath {
    /// Loads the object and every program (so verifier failures surface at start-up, with the
    /// verifier log), attaching nothing yet.
    pub fn load(options: DatapathOptions) -> Result<Self> {
        raise_memlock();
        let mut loader = EbpfLoader::new();
        let map_dir = options
            .pin_dir
            .as_ref()
            .map(|d| d.join("maps").join(map_layout()));
        if let Some(dir) = &map_dir {
            std::fs::create_dir_all(dir).map_err(DatapathError::Sys)?;
            if !options.adopt_maps {
                // Fresh maps, as a restart always had: unpinning leaves the old maps alive
                // for as long as the old programs (still pinned) use them.
                for name in PINNED_MAPS {
                    let _ = std::fs::remove_file(dir.join(name));
                }
            }
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Load)?;
        if let Some(dir) = &map_dir
            && let Some(maps_root) = dir.parent()
        {
            // Maps of other layouts belong to builds that are gone or going; their programs
            // keep them alive as long as they are attached.
            if let Ok(entries) = std::fs::read_dir(maps_root) {
                for e in entries.flatten() {
                    if e.path() != *dir {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        for (name, p) in ebpf.programs_mut() {
            if LEG_JOIN_PROGRAMS.contains(&name) {
                continue;
            }
            load_program(p).map_err(|source| DatapathError::Program {
                name: name.to_owned(),
                source,
            })?;
        }
        let pod_config = take(&mut ebpf, maps::POD_CONFIG)?;
        let pod_addrs = take(&mut ebpf, maps::POD_ADDRS)?;
        let dest_policy = take(&mut ebpf, maps::DEST_POLICY)?;
        let orig_by_cookie = take(&mut ebpf, maps::ORIG_DST_BY_COOKIE)?;
        let orig_by_flow = take(&mut ebpf, maps::ORIG_DST_BY_FLOW)?;
        let inbound_slots = take(&mut ebpf, maps::INBOUND_SLOTS)?;
        let inbound_listeners = ebpf
            .take_map(maps::INBOUND_LISTENERS)
            .ok_or(DatapathError::MissingMap(maps::INBOUND_LISTENERS))
            .and_then(|m| SockMap::try_from(m).map_err(map_err(maps::INBOUND_LISTENERS)))?;
        let counters = ebpf
            .take_map(maps::COUNTERS)
            .ok_or(DatapathError::MissingMap(maps::COUNTERS))
            .and_then(|m| PerCpuArray::try_from(m).map_err(map_err(maps::COUNTERS)))?;
        let local_legs = ebpf
            .take_map(maps::LOCAL_LEGS)
            .ok_or(DatapathError::MissingMap(maps::LOCAL_LEGS))
            .and_then(|m| SockHash::try_from(m).map_err(map_err(maps::LOCAL_LEGS)))?;
        Ok(Self {
            ebpf,
            pod_config,
            pod_addrs,
            dest_policy,
            orig_by_cookie,
            orig_by_flow,
            inbound_slots,
            inbound_listeners,
            counters,
            local_legs,
            agent_cgroup_link: None,
            join: None,
            cgroups: StdHashMap::new(),
            netns: StdHashMap::new(),
            written: options.adopt_maps.then(Written::default),
            options,
        })
    }

    /// Attaches one cgroup program (sockops or sock_addr) to the cgroup open as `dir`.
    ///
    /// Through bpf_link (5.7+) cgroup attachments always stack (multi) and the kernel refuses
    /// any mode flag, hence the flag-less `Single`. Stacking is what a restart needs: the new
    /// link goes on before the old one comes off, so there is no plaintext window.
    fn attach_to_cgroup(&mut self, name: &str, dir: &File) -> Result<FdLink> {
        let program_error = |source| DatapathError::Program {
            name: name.to_owned(),
            source,
        };
        let link_error = |source| DatapathError::Link {
            name: name.to_owned(),
            source,
        };
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| program_error(ProgramError::NotLoaded))?;
        match prog {
            Program::SockOps(p) => {
                let id = p
                    .attach(dir.as_fd(), CgroupAttachMode::Single)
                    .map_err(program_error)?;
                let link = p.take_link(id).map_err(program_error)?;
                FdLink::try_from(link).map_err(link_error)
            }
            Program::CgroupSockAddr(p) => {
                let id = p
                    .attach(dir.as_fd(), CgroupAttachMode::Single)
                    .map_err(program_error)?;
                let link = p.take_link(id).map_err(program_error)?;
                FdLink::try_from(link).map_err(link_error)
            }
            Program::CgroupSock(p) => {
                let id = p
                    .attach(dir.as_fd(), CgroupAttachMode::Single)
                    .map_err(program_error)?;
                let link = p.take_link(id).map_err(program_error)?;
                FdLink::try_from(link).map_err(link_error)
            }
            _ => Err(program_error(ProgramError::UnexpectedProgramType)),
        }
    }

    /// Attaches the outbound programs to a pod's cgroup. They act on sockets created by
    /// processes in that cgroup (including already-running ones), whatever their netns.
    pub fn enroll_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        if self.cgroups.contains_key(cgroup) {
            return Ok(());
        }
        let links = self.attach_cgroup_links(cgroup)?;
        let links = self.pin_links(&cgroup_pin_name(cgroup), &CGROUP_PROGRAMS, links)?;
        self.cgroups.insert(cgroup.to_owned(), links);
        Ok(())
    }

    /// Attaches a pod's programs: the outbound ones to its cgroup, sk_lookup to its netns. An
    /// empty `cgroup` is a pod enrolled by netns alone: the outbound programs already run for
    /// it from the parent cgroup they were attached to once ([`Datapath::enroll_cgroup`]),
    /// and act on its sockets because its netns has a [`PodConfig`].
    ///
    /// Everything is attached before anything is pinned. A previous agent's pins for the pod
    /// keep it fail-closed while this agent is not serving it, so an attempt that fails (the
    /// cgroup is gone, the kernel refuses) must leave them as they were: the new links are
    /// dropped, which detaches them, and the old pins stay. Only once every link is attached
    /// are the pins replaced, each atomically (pinned beside, then renamed over).
    pub fn attach_pod(&mut self, cgroup: &Path, netns_cookie: u64, netns: &Path) -> Result<()> {
        let cgroup_links = if cgroup.as_os_str().is_empty() || self.cgroups.contains_key(cgroup) {
            None
        } else {
            Some(self.attach_cgroup_links(cgroup)?)
        };
        let lookup_link = if self.netns.contains_key(&netns_cookie) {
            None
        } else {
            Some(self.attach_sk_lookup(netns)?)
        };
        if let Some(links) = cgroup_links {
            let links = self.pin_links(&cgroup_pin_name(cgroup), &CGROUP_PROGRAMS, links)?;
            self.cgroups.insert(cgroup.to_owned(), links);
        }
        if let Some(link) = lookup_link {
            // Pinned so inbound stays fail-closed (SK_DROP for pod addresses with no agent
            // listener) while the agent is down.
            let mut links = self.pin_links(
                &netns_pin_name(netns_cookie),
                &[SK_LOOKUP_PROGRAM],
                vec![link],
            )?;
            if let Some(link) = links.pop() {
                self.netns.insert(netns_cookie, link);
            }
        }
        Ok(())
    }

    fn attach_cgroup_links(&mut self, cgroup: &Path) -> Result<Vec<FdLink>> {
        let dir = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let mut links = Vec::with_capacity(CGROUP_PROGRAMS.len());
        for name in CGROUP_PROGRAMS {
            links.push(self.attach_to_cgroup(name, &dir)?);
        }
        Ok(links)
    }

    fn attach_sk_lookup(&mut self, netns: &Path) -> Result<FdLink> {
        let ns = File::open(netns).map_err(DatapathError::Sys)?;
        let program_error = |source| DatapathError::Program {
            name: SK_LOOKUP_PROGRAM.to_owned(),
            source,
        };
        let prog: &mut SkLookup = typed_program(&mut self.ebpf, SK_LOOKUP_PROGRAM)?;
        let id = prog.attach(ns.as_fd()).map_err(program_error)?;
        let link = prog.take_link(id).map_err(program_error)?;
        Ok(FdLink::from(link))
    }

    /// Pins `links` as `links/<dir>/<name>` (without a pin directory, returns them as they
    /// are). Each is pinned as `<name>_new` first and renamed over the old pin only when all
    /// are pinned, so a failure leaves the previous pins untouched.
    fn pin_links(&self, dir: &str, names: &[&str], links: Vec<FdLink>) -> Result<Vec<FdLink>> {
        let Some(root) = &self.options.pin_dir else {
            return Ok(links);
        };
        let link_dir = root.join("links").join(dir);
        std::fs::create_dir_all(&link_dir).map_err(DatapathError::Sys)?;
        let mut pinned = Vec::with_capacity(links.len());
        let mut staged = Vec::with_capacity(links.len());
        for (link, name) in links.into_iter().zip(names) {
            // Not `.new`: bpffs refuses names with a dot.
            let new = link_dir.join(format!("{name}_new"));
            let _ = std::fs::remove_file(&new);
            match link.pin(&new) {
                Ok(p) => {
                    pinned.push(FdLink::from(p));
                    staged.push((new, link_dir.join(name)));
                }
                Err(e) => {
                    for (new, _) in &staged {
                        let _ = std::fs::remove_file(new);
                    }
                    return Err(DatapathError::Pin {
                        path: new,
                        source: Box::new(e),
                    });
                }
            }
        }
        for (new, path) in staged {
            std::fs::rename(&new, &path).map_err(|e| DatapathError::Pin {
                path,
                source: Box::new(e),
            })?;
        }
        Ok(pinned)
    }

    /// Lets go of this process's links without touching a pin: after a handover the
    /// successor's links are pinned in their place, so ours detach here, and any link still
    /// pinned (a pod the successor did not take) stays attached through its pin.
    pub fn release_links(&mut self) {
        self.cgroups.clear();
        self.netns.clear();
    }

    /// Detaches the outbound programs from a cgroup: its new connections use plain
    /// networking again.
    pub fn unenroll_cgroup(&mut self, cgroup: &Path) {
        // A pod enrolled by netns alone has none (and an empty name would be the whole
        // `links` directory).
        if cgroup.as_os_str().is_empty() {
            return;
        }
        self.cgroups.remove(cgroup);
        if let Some(dir) = &self.options.pin_dir {
            let _ = std::fs::remove_dir_all(dir.join("links").join(cgroup_pin_name(cgroup)));
        }
    }

    /// Removes the pins any agent made for a cgroup that is gone, under this version's name
    /// and the one agents before it used (see [`legacy_cgroup_pin_name`]).
    pub fn forget_cgroup(&mut self, cgroup: &Path) {
        if cgroup.as_os_str().is_empty() {
            return;
        }
        self.unenroll_cgroup(cgroup);
        let legacy = legacy_cgroup_pin_name(cgroup);
        if let Some(dir) = &self.options.pin_dir
            && !legacy.is_empty()
            && !legacy.starts_with("netns-")
        {
            let _ = std::fs::remove_dir_all(dir.join("links").join(legacy));
        }
    }

    /// Registers a pod's netns: connect4/6 in an enrolled cgroup steer only in a netns that has
    /// a [`PodConfig`], and never to the pod's own addresses.
    pub fn enroll_pod_netns(
        &mut self,
        netns_cookie: u64,
        settings: PodSettings,
        own_addrs: &[IpAddr],
    ) -> Result<()> {
        let config = settings.abi();
        for ip in own_addrs {
            let key = PodAddrKey {
                netns_cookie,
                addr: sock_addr(SocketAddr::new(*ip, 0)).without_port(),
            };
            self.pod_addrs
                .insert(key, 1, 0)
                .map_err(map_err(maps::POD_ADDRS))?;
        }
        self.pod_config
            .insert(netns_cookie, config, 0)
            .map_err(map_err(maps::POD_CONFIG))
    }

    /// Forgets a pod's netns, and frees the original destinations its sockets recorded: once
    /// the pod's cgroup is no longer enrolled, sock_release and sockops no longer run for
    /// them.
    pub fn unenroll_pod_netns(&mut self, netns_cookie: u64, own_addrs: &[IpAddr]) {
        self.forget_original_destinations(netns_cookie);
        let _ = self.pod_config.remove(&netns_cookie);
        for ip in own_addrs {
            let key = PodAddrKey {
                netns_cookie,
                addr: sock_addr(SocketAddr::new(*ip, 0)).without_port(),
            };
            let _ = self.pod_addrs.remove(&key);
        }
    }

    /// Decides what connect() does for a destination address (any port when `port` is None).
    pub fn set_destination(
        &mut self,
        ip: IpAddr,
        port: Option<u16>,
        action: Destination,
    ) -> Result<()> {
        let key = dest_key(ip, port);
        let action = match action {
            Destination::Steer => ACTION_STEER,
            Destination::Passthrough => ACTION_PASSTHROUGH,
        };
        self.dest_policy
            .insert(key, DestAction { action, _pad: 0 }, 0)
            .map_err(map_err(maps::DEST_POLICY))?;
        self.note(|w| w.dest_policy.insert(key));
        Ok(())
    }

    pub fn clear_destination(&mut self, ip: IpAddr, port: Option<u16>) {
        let key = dest_key(ip, port);
        let _ = self.dest_policy.remove(&key);
        self.note(|w| w.dest_policy.remove(&key));
    }

    /// The original destination of a steered connection, looked up by the netns it was made
    /// in and the app socket's address (the peer address of the accepted socket). The entry
    /// stays until the app socket closes: getpeername needs it for the socket's lifetime.
    pub fn original_destination(&self, netns_cookie: u64, app: SocketAddr) -> Option<SocketAddr> {
        let key = FlowKey {
            netns_cookie,
            local: sock_addr(app),
        };
        self.orig_by_flow.get(&key, 0).ok().map(socket_addr)
    }

    /// Original destinations recorded for sockets still open in the netns `netns_cookie`:
    /// `(by socket cookie, by flow)`.
    pub fn original_destinations_held(&self, netns_cookie: u64) -> (usize, usize) {
        let by_cookie = self
            .orig_by_cookie
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.netns_cookie == netns_cookie)
            .count();
        let by_flow = self
            .orig_by_flow
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == netns_cookie)
            .count();
        (by_cookie, by_flow)
    }

    fn forget_original_destinations(&mut self, netns_cookie: u64) {
        let cookies: Vec<u64> = self
            .orig_by_cookie
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.netns_cookie == netns_cookie)
            .map(|(k, _)| k)
            .collect();
        for c in cookies {
            let _ = self.orig_by_cookie.remove(&c);
        }
        let flows: Vec<FlowKey> = self
            .orig_by_flow
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == netns_cookie)
            .collect();
        for k in flows {
            let _ = self.orig_by_flow.remove(&k);
        }
    }

    /// Fills the socket-cookie map with `n` entries for the netns `netns_cookie` under
    /// cookies no socket has (they count down from `u64::MAX`), as a flood of open sockets
    /// would; returns how many fitted. Only for tests of the full-map behaviour; the entries
    /// go with [`Datapath::unenroll_pod_netns`].
    #[doc(hidden)]
    pub fn occupy_original_destinations(&mut self, netns_cookie: u64, n: usize) -> usize {
        let value = OrigDst {
            dst: SockAddr::default(),
            netns_cookie,
        };
        (0..n as u64)
            .take_while(|i| self.orig_by_cookie.insert(u64::MAX - i, value, 0).is_ok())
            .count()
    }

    /// Steers inbound TCP to `addrs` to the agent's listeners of inbound slot `slot`
    /// (`listener6` for IPv6 connections, when the pod has IPv6). Only the maps: the netns's
    /// sk_lookup link comes with [`Datapath::attach_pod`].
    pub fn steer_inbound<L: std::os::fd::AsRawFd>(
        &mut self,
        slot: u32,
        listener4: &L,
        listener6: Option<&L>,
        addrs: &[IpAddr],
    ) -> Result<()> {
        self.inbound_listeners
            .set(interceptor_common::inbound_index(slot, false), listener4, 0)
            .map_err(map_err(maps::INBOUND_LISTENERS))?;
        if let Some(l6) = listener6 {
            self.inbound_listeners
                .set(interceptor_common::inbound_index(slot, true), l6, 0)
                .map_err(map_err(maps::INBOUND_LISTENERS))?;
        }
        for ip in addrs {
            self.inbound_slots
                .insert(sock_addr(SocketAddr::new(*ip, 0)).without_port(), slot, 0)
                .map_err(map_err(maps::INBOUND_SLOTS))?;
        }
        Ok(())
    }

    /// Undoes what a failed enrollment wrote into the maps (pod config and addresses, inbound
    /// slot and listeners, destination steering), leaving links and pins alone: those are
    /// only made once nothing else can fail.
    pub fn rollback_pod(&mut self, netns_cookie: u64, slot: u32, addrs: &[IpAddr]) {
        self.unenroll_pod_netns(netns_cookie, addrs);
        self.clear_inbound(slot, addrs);
        for ip in addrs {
            self.clear_destination(*ip, None);
        }
    }

    fn clear_inbound(&mut self, slot: u32, addrs: &[IpAddr]) {
        for ip in addrs {
            let _ = self
                .inbound_slots
                .remove(&sock_addr(SocketAddr::new(*ip, 0)).without_port());
        }
        for v6 in [false, true] {
            let _ = self
                .inbound_listeners
                .clear_index(&interceptor_common::inbound_index(slot, v6));
        }
    }

    /// Stops steering inbound connections for a pod: its addresses reach the app directly.
    pub fn stop_inbound(&mut self, netns_cookie: u64, slot: u32, addrs: &[IpAddr]) {
        self.clear_inbound(slot, addrs);
        self.netns.remove(&netns_cookie);
        if let Some(dir) = &self.options.pin_dir {
            let _ = std::fs::remove_dir_all(dir.join("links").join(netns_pin_name(netns_cookie)));
        }
    }

    /// Removes links a previous agent pinned for pods that are no longer enrolled. Called after
    /// start-up enrollment: until then those pins keep the old pods fail-closed. `keep` are
    /// pods that are not enrolled now but must stay fail-closed (persisted enrollments that
    /// could not be restored): the pins of their cgroups and network namespaces stay, under
    /// either naming.
    pub fn prune_stale_pins(&self, keep_cgroups: &[PathBuf], keep_netns: &[u64]) -> Vec<String> {
        let Some(dir) = &self.options.pin_dir else {
            return Vec::new();
        };
        let mut keep: Vec<String> = self.cgroups.keys().map(|c| cgroup_pin_name(c)).collect();
        keep.extend(self.netns.keys().map(|c| netns_pin_name(*c)));
        for c in keep_cgroups {
            keep.push(cgroup_pin_name(c));
            keep.push(legacy_cgroup_pin_name(c));
        }
        keep.extend(keep_netns.iter().map(|c| netns_pin_name(*c)));
        let mut removed = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir.join("links")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) && std::fs::remove_dir_all(e.path()).is_ok() {
                    removed.push(name);
                }
            }
        }
        removed
    }

    /// Turns on the sk_msg local-leg option: sk_msg runs on every socket in LOCAL_LEGS, and
    /// sockops also watches the agent's own cgroup so the agent's accepted ends are added.
    /// Only plain loopback sockets ever enter the map (sockops checks the port); the agent's
    /// kTLS sockets never do, which the kernel would refuse anyway.
    pub fn enable_local_leg(&mut self, agent_cgroup: &Path) -> Result<()> {
        if self.agent_cgroup_link.is_some() {
            return Ok(());
        }
        let program_error = |name: &str| {
            let name = name.to_owned();
            move |source| DatapathError::Program { name, source }
        };
        let prog: &mut aya::programs::SkMsg = typed_program(&mut self.ebpf, "intercept_sk_msg")?;
        prog.attach(self.local_legs.fd())
            .map_err(program_error("intercept_sk_msg"))?;
        let dir = File::open(agent_cgroup).map_err(|source| DatapathError::Cgroup {
            path: agent_cgroup.to_owned(),
            source,
        })?;
        let link = self.attach_to_cgroup("intercept_sockops", &dir)?;
        self.agent_cgroup_link = Some(link);
        Ok(())
    }

    /// Turns on the sk_msg leg join (`tuning.sameNodeJoin: skMsg`): the join program runs
    /// on every socket sockops puts in JOIN_MSG (pods enrolled with
    /// [`PodSettings::join_skmsg`]) and redirects only what [`JoinMaps`] allows. Its maps are
    /// not pinned: a successor agent starts with empty ones, and the old agent's flows keep
    /// the old maps through their sockets' program.
    pub fn enable_join(&mut self) -> Result<()> {
        if self.join.is_some() {
            return Ok(());
        }
        let name = LEG_JOIN_PROGRAMS[1];
        let program_error = |source| DatapathError::Program {
            name: name.to_owned(),
            source,
        };
        let apps: SockHash<MapData, LegKey> = sock_hash(&mut self.ebpf, maps::JOIN_MSG)?;
        let peers = sock_hash(&mut self.ebpf, maps::JOIN_MSG_PEERS)?;
        let sent = take(&mut self.ebpf, maps::JOIN_SENT)?;
        let grant = take(&mut self.ebpf, maps::JOIN_GRANT)?;
        let prog: &mut aya::programs::SkMsg = typed_program(&mut self.ebpf, name)?;
        prog.load().map_err(program_error)?;
        prog.attach(apps.fd()).map_err(program_error)?;
        self.join = Some(std::sync::Arc::new(std::sync::Mutex::new(JoinMaps {
            _apps: apps,
            peers,
            sent,
            grant,
        })));
        Ok(())
    }

    /// The sk_msg leg join's maps, when it is on.
    pub fn join_maps(&self) -> Option<std::sync::Arc<std::sync::Mutex<JoinMaps>>> {
        self.join.clone()
    }

    /// How many entries each per-pod map holds, by map name: what a removed pod must leave
    /// behind is none of its own.
    pub fn occupancy(&self) -> Vec<(&'static str, usize)> {
        vec![
            (maps::POD_CONFIG, self.pod_config.keys().flatten().count()),
            (maps::POD_ADDRS, self.pod_addrs.keys().flatten().count()),
            (
                maps::INBOUND_SLOTS,
                self.inbound_slots.keys().flatten().count(),
            ),
            (
                maps::ORIG_DST_BY_COOKIE,
                self.orig_by_cookie.keys().flatten().count(),
            ),
            (
                maps::ORIG_DST_BY_FLOW,
                self.orig_by_flow.keys().flatten().count(),
            ),
            (maps::DEST_POLICY, self.dest_policy.keys().flatten().count()),
        ]
    }

    /// Whether the netns `netns_cookie` has a [`PodConfig`] (its sockets are steered).
    pub fn has_pod(&self, netns_cookie: u64) -> bool {
        self.pod_config.get(&netns_cookie, 0).is_ok()
    }

    /// The network namespaces with an sk_lookup link of this agent, by cookie.
    pub fn netns_links(&self) -> Vec<u64> {
        self.netns.keys().copied().collect()
    }

    /// [`Datapath::occupancy`] with each map's capacity, for the fill-level metrics. Counted
    /// by walking the keys (one syscall each), so a full original-destination map costs a few
    /// tens of milliseconds per scrape.
    pub fn map_fill(&self) -> Vec<(&'static str, u64, u64)> {
        self.occupancy()
            .into_iter()
            .map(|(name, used)| {
                let capacity = match name {
                    maps::ORIG_DST_BY_COOKIE | maps::ORIG_DST_BY_FLOW => maps::MAX_PENDING_FLOWS,
                    maps::POD_CONFIG => maps::MAX_PODS,
                    maps::DEST_POLICY => maps::MAX_DESTS,
                    _ => maps::MAX_POD_ADDRS,
                };
                (name, used as u64, u64::from(capacity))
            })
            .collect()
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Counters {
        let mut out = [0u64; Counter::COUNT as usize];
        for c in Counter::ALL {
            if let Ok(values) = self.counters.get(&(c as u32), 0) {
                out[c as usize] = values.iter().sum();
            }
        }
        Counters(out)
    }
}

/// The destination entries this process wrote into a `DEST_POLICY` it adopted from a running
/// agent (a handover), so that [`Datapath::refresh_adopted`] can tell them from the
/// predecessor's.
#[derive(Debug, Default)]
struct Written {
    dest_policy: HashSet<SockAddr>,
}

/// What a stale enrollment (a pod this agent keeps fail-closed without serving it) still
/// needs in `DEST_POLICY`: its addresses stay mesh destinations.
#[derive(Debug, Default, Clone)]
pub struct KeepSteering {
    pub ips: Vec<IpAddr>,
}

impl Datapath {
    fn note(&mut self, f: impl FnOnce(&mut Written) -> bool) {
        if let Some(w) = &mut self.written {
            f(w);
        }
    }

    /// Removes from an adopted `DEST_POLICY` the destinations this agent did not steer itself
    /// and `keep` does not name: a peer, service or pod the predecessor steered that this
    /// agent's configuration, cluster view and policy no longer do. Without this they would
    /// stay steered until the address is unenrolled, which for an address this agent never
    /// knew is never. Call it once the predecessor stopped writing (it released the node):
    /// until then its entries are its own. Returns how many entries each map lost; with maps
    /// this process created (no adoption) there is nothing to do.
    ///
    /// Entries keyed by a pod's netns (pod config and addresses, inbound slot and listener)
    /// stay. A pod this agent does not enroll may still exist (enrolled by the predecessor
    /// after it sent its pods, or stale): with its entries it stays fail-closed (its
    /// connects go to a port nobody listens on, inbound finds no listener and is dropped);
    /// without them its connects would leave unsteered, in clear. A pod that is really gone
    /// leaves entries no socket ever matches, bounded by the map sizes.
    pub fn refresh_adopted(&mut self, keep: &KeepSteering) -> Vec<(&'static str, usize)> {
        let Some(w) = self.written.take() else {
            return Vec::new();
        };
        let kept: HashSet<SockAddr> = keep.ips.iter().map(|ip| dest_key(*ip, None)).collect();
        let stale: Vec<SockAddr> = self
            .dest_policy
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !w.dest_policy.contains(k) && !kept.contains(k))
            .collect();
        for k in &stale {
            let _ = self.dest_policy.remove(k);
        }
        vec![(maps::DEST_POLICY, stale.len())]
    }

    /// Whether connect() to `ip` (`port`, or any port for `None`) is steered to the agent.
    pub fn steers(&self, ip: IpAddr, port: Option<u16>) -> bool {
        self.dest_policy
            .get(&dest_key(ip, port), 0)
            .is_ok_and(|a| a.action == ACTION_STEER)
    }

    /// The inbound slot the maps give the pod of netns `netns_cookie`, if it has one.
    pub fn pod_slot(&self, netns_cookie: u64) -> Option<u32> {
        self.pod_config
            .get(&netns_cookie, 0)
            .ok()
            .map(|p| p.inbound_slot)
    }

    /// The inbound slots the maps give pods: the one of `netns_cookie`'s pod, and those of
    /// every other pod. With adopted maps these are the predecessor's until this agent
    /// rewrites them: a pod enrolled here must keep its slot, and never take another pod's,
    /// or sk_lookup would hand that pod's connections to its listener meanwhile.
    pub fn slots_in_maps(&self, netns_cookie: Option<u64>) -> (Option<u32>, Vec<u32>) {
        let mut own = None;
        let mut others = Vec::new();
        for (cookie, pod) in self.pod_config.iter().filter_map(Result::ok) {
            if Some(cookie) == netns_cookie {
                own = Some(pod.inbound_slot);
            } else {
                others.push(pod.inbound_slot);
            }
        }
        (own, others)
    }
}

/// What the agent asks of the eBPF programs for one pod's netns; [`PodConfig`] is its ABI
/// form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodSettings {
    /// The agent's outbound listener in the pod (connect4/6 steer to it).
    pub outbound_port: u16,
    /// The agent's inbound listener in the pod.
    pub inbound_port: u16,
    /// The pod's index in sk_lookup's listener sockmap.
    pub inbound_slot: u32,
    /// sk_lookup hands connections to the pod's addresses to the agent.
    pub steer_inbound: bool,
    /// sockops and sk_msg short-cut the app <-> agent loopback leg (`tuning.skMsgLocalLeg`).
    pub local_leg_skmsg: bool,
    /// sockops puts the pod's app sockets that talk to the agent in the sk_msg leg join
    /// (`tuning.sameNodeJoin: skMsg`).
    pub join_skmsg: bool,
}

impl PodSettings {
    fn abi(self) -> PodConfig {
        let mut flags = 0;
        if self.steer_inbound {
            flags |= POD_FLAG_STEER_INBOUND;
        }
        if self.local_leg_skmsg {
            flags |= POD_FLAG_LOCAL_LEG_SKMSG;
        }
        if self.join_skmsg {
            flags |= POD_FLAG_JOIN_SKMSG;
        }
        PodConfig {
            outbound_port_be: self.outbound_port.to_be(),
            inbound_port_be: self.inbound_port.to_be(),
            inbound_slot: self.inbound_slot,
            flags,
            _pad: 0,
        }
    }
}

/// What connect() in an enrolled pod does for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Steered to the agent's outbound listener.
    Steer,
    /// Left alone (kernel networking).
    Passthrough,
}

/// A snapshot of the eBPF counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; Counter::COUNT as usize]);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
}

/// The directory under `links/` holding a cgroup's pins: the path with `%`, `/` and `.`
/// percent-encoded, which no two paths share (`/a/b` is `%2Fa%2Fb`, `/a_b` is `%2Fa_b`).
/// A path whose encoding would not fit in a file name (255 bytes) is named by its SHA-256
/// instead (`sha256-<hex>`, which no encoded absolute path starts with).
pub fn cgroup_pin_name(cgroup: &Path) -> String {
    let bytes = cgroup.as_os_str().as_encoded_bytes();
    let mut name = String::with_capacity(bytes.len() + 8);
    for &b in bytes {
        match b {
            // bpffs refuses names with a dot (EPERM: reserved by the kernel), which systemd
            // cgroup paths (`kubepods.slice`) always have.
            b'%' | b'/' | b'.' => name.push_str(&format!("%{b:02X}")),
            // Non-ASCII and control bytes too, so the name is the path's bytes exactly.
            b if b.is_ascii_graphic() || b == b' ' => name.push(char::from(b)),
            b => name.push_str(&format!("%{b:02X}")),
        }
    }
    if name.len() <= PIN_NAME_MAX {
        return name;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256-{hex}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// File names on bpffs, as anywhere, are at most 255 bytes.
const PIN_NAME_MAX: usize = 255;

/// How agents before the injective [`cgroup_pin_name`] named a cgroup's pin directory
/// (slashes to underscores, so `/a/b` and `/a_b` collided). A restarted agent pins its links
/// under the new name and [`Datapath::prune_stale_pins`] then removes these, after the new
/// links are attached, so an upgrade leaves no unsteered window.
pub fn legacy_cgroup_pin_name(cgroup: &Path) -> String {
    cgroup.to_string_lossy().trim_matches('/').replace('/', "_")
}

fn netns_pin_name(netns_cookie: u64) -> String {
    format!("netns-{netns_cookie}")
}

fn dest_key(ip: IpAddr, port: Option<u16>) -> SockAddr {
    let a = sock_addr(SocketAddr::new(ip, port.unwrap_or(0)));
    if port.is_some() { a } else { a.without_port() }
}

/// Converts to the ABI layout: IPv4 as IPv4-mapped words, everything in network byte order.
pub fn sock_addr(addr: SocketAddr) -> SockAddr {
    let port_be = addr.port().to_be();
    match addr.ip() {
        IpAddr::V4(v4) => SockAddr::v4(u32::from_ne_bytes(v4.octets()), port_be),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SockAddr::v4(u32::from_ne_bytes(v4.octets()), port_be),
            None => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                SockAddr::v6([w(0), w(4), w(8), w(12)], port_be)
            }
        },
    }
}

/// The inverse of [`sock_addr`].
pub fn socket_addr(a: SockAddr) -> SocketAddr {
    let port = u16::from_be(a.port_be);
    let mapped = a.addr_be[0] == 0 && a.addr_be[1] == 0 && a.addr_be[2] == SockAddr::V4_MAPPED_WORD;
    if mapped && a.family != interceptor_common::AF_INET6 {
        SocketAddr::new(IpAddr::from(a.addr_be[3].to_ne_bytes()), port)
    } else {
        let mut o = [0u8; 16];
        for (i, w) in a.addr_be.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        SocketAddr::new(IpAddr::from(o), port)
    }
}

/// One app socket of a joined flow, as the join program keys it: its netns and both ends,
/// seen from the app.
pub fn leg_key(netns_cookie: u64, app_local: SocketAddr, app_remote: SocketAddr) -> LegKey {
    LegKey {
        netns_cookie,
        local: sock_addr(app_local),
        remote: sock_addr(app_remote),
    }
}

/// The agent's side of the sk_msg leg join: which leg an app socket's bytes leave by, what
/// the program counted, and what the agent allows (`interceptor_common::JoinGrant` says
/// the rule).
pub struct JoinMaps {
    /// JOIN_MSG, kept so the program stays attached; sockops fills it.
    _apps: SockHash<MapData, LegKey>,
    peers: SockHash<MapData, LegKey>,
    sent: HashMap<MapData, LegKey, JoinSent>,
    grant: HashMap<MapData, LegKey, JoinGrant>,
}

impl JoinMaps {
    /// Lets the app socket `app` redirect into `out`: up to `granted` bytes, once the agent
    /// relayed every byte that took TCP before (`relayed`). The peer goes in before the grant,
    /// so the program never sees a grant without a socket to redirect to.
    pub fn arm(&mut self, app: LegKey, out: BorrowedFd<'_>, grant: JoinGrant) -> Result<()> {
        self.peers
            .insert(app, out.as_raw_fd(), 0)
            .map_err(map_err(maps::JOIN_MSG_PEERS))?;
        self.set_grant(app, grant)
    }

    /// Replaces the app socket's grant whole.
    pub fn set_grant(&mut self, app: LegKey, grant: JoinGrant) -> Result<()> {
        self.grant
            .insert(app, grant, 0)
            .map_err(map_err(maps::JOIN_GRANT))?;
        Ok(())
    }

    /// What the program counted for the app socket; `None` once the socket closed (sockops
    /// removed its entry) or if sockops never registered it.
    pub fn sent(&self, app: LegKey) -> Option<JoinSent> {
        self.sent.get(&app, 0).ok()
    }

    /// Ends the join for the app socket: no grant, no peer.
    pub fn disarm(&mut self, app: LegKey) {
        let _ = self.grant.remove(&app);
        let _ = self.peers.remove(&app);
    }

    /// Entries in JOIN_GRANT, JOIN_MSG_PEERS and JOIN_SENT: what flows that ended must not
    /// leave behind (the agent disarms its grants, the kernel drops closed sockets from the
    /// socket map, sockops the counts of closed app sockets).
    pub fn entries(&self) -> (usize, usize, usize) {
        (
            self.grant.keys().flatten().count(),
            self.peers.keys().flatten().count(),
            self.sent.keys().flatten().count(),
        )
    }
}

/// Two plain TCP legs joined inside the kernel, for measuring against the splice relay
/// (`interceptor-bench legs-probe`, ARCHITECTURE.md "Same-node fast path"). Its own copy of
/// the object: nothing of the agent's maps or links is touched.
pub struct LegJoins {
    _ebpf: Ebpf,
    skb: SockHash<MapData, u64>,
    msg: SockHash<MapData, LegKey>,
    msg_peers: SockHash<MapData, LegKey>,
    msg_sent: HashMap<MapData, LegKey, JoinSent>,
    msg_grant: HashMap<MapData, LegKey, JoinGrant>,
}

impl LegJoins {
    /// Loads the two join programs and attaches each to its map.
    pub fn load() -> Result<Self> {
        raise_memlock();
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(DatapathError::Load)?;
        let skb: SockHash<MapData, u64> = sock_hash(&mut ebpf, maps::JOIN_SKB)?;
        let msg: SockHash<MapData, LegKey> = sock_hash(&mut ebpf, maps::JOIN_MSG)?;
        let msg_peers = sock_hash(&mut ebpf, maps::JOIN_MSG_PEERS)?;
        let msg_sent = take(&mut ebpf, maps::JOIN_SENT)?;
        let msg_grant = take(&mut ebpf, maps::JOIN_GRANT)?;
        let program_error = |name: &'static str| {
            move |source| DatapathError::Program {
                name: name.to_owned(),
                source,
            }
        };
        let name = LEG_JOIN_PROGRAMS[0];
        let verdict: &mut aya::programs::SkSkb = typed_program(&mut ebpf, name)?;
        verdict.load().map_err(program_error(name))?;
        verdict.attach(skb.fd()).map_err(program_error(name))?;
        let name = LEG_JOIN_PROGRAMS[1];
        let sk_msg: &mut aya::programs::SkMsg = typed_program(&mut ebpf, name)?;
        sk_msg.load().map_err(program_error(name))?;
        sk_msg.attach(msg.fd()).map_err(program_error(name))?;
        Ok(LegJoins {
            _ebpf: ebpf,
            skb,
            msg,
            msg_peers,
            msg_sent,
            msg_grant,
        })
    }

    /// What `a` receives leaves by `b` and the other way round, by the stream verdict. Bytes
    /// `a` or `b` already hold are judged at their next wake-up; `SO_RCVLOWAT` is set again
    /// to cause one.
    pub fn join_skb(&mut self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<()> {
        let cookie = |fd| crate::sys::socket_cookie(fd).map_err(DatapathError::Sys);
        let (ca, cb) = (cookie(a)?, cookie(b)?);
        self.skb
            .insert(ca, b.as_raw_fd(), 0)
            .map_err(map_err(maps::JOIN_SKB))?;
        self.skb
            .insert(cb, a.as_raw_fd(), 0)
            .map_err(map_err(maps::JOIN_SKB))?;
        for fd in [a, b] {
            crate::sys::set_rcvlowat(fd, 1).map_err(DatapathError::Sys)?;
        }
        Ok(())
    }

    /// What the app's socket `app` (bound to `local`, connected to `remote`) sends leaves
    /// by `out`, by sk_msg in the app's `sendmsg`: the agent's program with an unlimited
    /// grant and nothing sent before (the probe joins before the first byte).
    pub fn join_msg(
        &mut self,
        app: BorrowedFd<'_>,
        local: SocketAddr,
        remote: SocketAddr,
        out: BorrowedFd<'_>,
    ) -> Result<LegKey> {
        let key = LegKey {
            netns_cookie: crate::sys::netns_cookie(app).map_err(DatapathError::Sys)?,
            local: sock_addr(local),
            remote: sock_addr(remote),
        };
        self.msg_peers
            .insert(key, out.as_raw_fd(), 0)
            .map_err(map_err(maps::JOIN_MSG_PEERS))?;
        self.msg_sent
            .insert(key, JoinSent::default(), 0)
            .map_err(map_err(maps::JOIN_SENT))?;
        let unlimited = JoinGrant {
            relayed: 0,
            granted: u64::MAX,
            kind: interceptor_common::JOIN_EGRESS,
        };
        self.msg_grant
            .insert(key, unlimited, 0)
            .map_err(map_err(maps::JOIN_GRANT))?;
        self.msg
            .insert(key, app.as_raw_fd(), 0)
            .map_err(map_err(maps::JOIN_MSG))?;
        Ok(key)
    }

    /// Replaces the grant of a joined app socket (what the agent's relay does), for tests of
    /// the program's rules.
    pub fn set_grant(&mut self, key: LegKey, grant: JoinGrant) -> Result<()> {
        self.msg_grant
            .insert(key, grant, 0)
            .map_err(map_err(maps::JOIN_GRANT))
    }

    /// What the program counted for a joined app socket.
    pub fn sent(&self, key: LegKey) -> Option<JoinSent> {
        self.msg_sent.get(&key, 0).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_pin_names_are_injective_and_fit() {
        let name = |p: &str| cgroup_pin_name(Path::new(p));
        assert_ne!(name("/a/b"), name("/a_b"));
        assert_ne!(name("/a/b"), name("/a%2Fb"));
        assert_eq!(name("/a/b"), "%2Fa%2Fb");
        assert_eq!(name("/sys/fs/cgroup/x_y"), "%2Fsys%2Ffs%2Fcgroup%2Fx_y");
        assert!(!name("/a/b").contains('/'));
        let systemd = name("/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice");
        assert!(!systemd.contains('.'), "bpffs refuses dots: {systemd}");
        // The legacy scheme is what collided.
        let legacy = |p: &str| legacy_cgroup_pin_name(Path::new(p));
        assert_eq!(legacy("/a/b"), legacy("/a_b"));
        let long = format!("/sys/fs/cgroup/{}", "d/".repeat(100));
        let long2 = format!("/sys/fs/cgroup/{}x", "d/".repeat(100));
        let (a, b) = (name(&long), name(&long2));
        assert!(a.starts_with("sha256-") && a.len() <= PIN_NAME_MAX, "{a}");
        assert_ne!(a, b);
        assert!(!name("/short").starts_with("sha256-"));
        // Not `.`/`..`, and never the netns pins' prefix.
        assert!(name("/").starts_with('%') && !name("/netns-1").starts_with("netns-"));
    }

    #[test]
    fn abi_addresses_round_trip() {
        for s in [
            "10.88.0.2:80",
            "[fd00:88::2]:8443",
            "127.0.0.1:15001",
            "[::1]:1",
        ] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(socket_addr(sock_addr(a)), a, "{s}");
        }
    }

    #[test]
    fn ipv4_is_stored_mapped_in_network_order() {
        let a = sock_addr("10.0.0.1:443".parse().unwrap());
        assert_eq!(a.addr_be[3].to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(a.addr_be[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(a.port_be.to_ne_bytes(), [1, 187]);
        // v4-mapped IPv6 and plain IPv4 give the same key, as the eBPF side builds it.
        let m = sock_addr("[::ffff:10.0.0.1]:443".parse().unwrap());
        assert_eq!(a, m);
    }
}
