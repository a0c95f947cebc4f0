//! The ABI between the eBPF programs and the agent.
//!
//! Every type here crosses the kernel/user boundary as raw bytes in a BPF map, so the rules
//! are strict: `#[repr(C)]`, explicit zeroed padding (the kernel hashes every key byte, so
//! stray padding makes lookups silently miss), no `bool`, byte order stated in the field name,
//! and a compile-time size assertion per type. Reason codes are never renumbered.
#![no_std]

/// Map names, shared so the loader and the programs can never disagree.
pub mod maps {
    /// `cookie of the app's socket → original destination` ([`crate::OrigDst`]), written by
    /// connect4/6, read by getpeername4/6 for the socket's lifetime and freed by
    /// sock_release when the socket is released (or by the agent when it unenrolls the pod).
    /// A plain hash: when it is full, connect4/6 refuse the connect (fail closed) rather than
    /// evict the entry of another live socket.
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    /// `4-tuple seen by the agent → original destination`, re-keyed by sockops at
    /// ACTIVE_ESTABLISHED, read by the agent after accept(), freed by sockops at TCP_CLOSE
    /// (or by the agent when it unenrolls the pod). A plain hash: when it is full the flow
    /// reaches the agent without a destination and is reset.
    pub const ORIG_DST_BY_FLOW: &str = "ORIG_DST_BY_FLOW";
    /// `netns cookie → where the agent listens in that pod`: present only for enrolled pods.
    pub const POD_CONFIG: &str = "POD_CONFIG";
    /// `(netns cookie, address) → ()`: the pod's own addresses, never steered.
    pub const POD_ADDRS: &str = "POD_ADDRS";
    /// `destination address → action`: which destinations are steered to the agent.
    pub const DEST_POLICY: &str = "DEST_POLICY";
    /// sk_msg local-leg option: `LegKey → socket` for the plain app↔agent loopback sockets
    /// (never a kTLS socket: the kernel refuses that combination, and older kernels leaked).
    pub const LOCAL_LEGS: &str = "LOCAL_LEGS";
    /// sk_msg local-leg option: `LegKey of the sending socket → bytes sk_msg redirected`,
    /// created with the LOCAL_LEGS entry and removed when the socket closes. See
    /// [`crate::SKMSG_LEG_BUDGET`].
    pub const LEG_BYTES: &str = "LEG_BYTES";
    /// Kernel-only leg joins, measured by `interceptor-bench legs-probe` (not used by the
    /// agent): `socket cookie of one leg → the other leg`, with the stream verdict attached.
    pub const JOIN_SKB: &str = "JOIN_SKB";
    /// Leg joins by sk_msg: `LegKey → app socket`, with the sk_msg join program attached.
    pub const JOIN_MSG: &str = "JOIN_MSG";
    /// Leg joins by sk_msg: `LegKey of an app socket → the leg its bytes leave by`.
    pub const JOIN_MSG_PEERS: &str = "JOIN_MSG_PEERS";
    /// Leg joins by sk_msg: `LegKey of an app socket → what it sent` ([`crate::JoinSent`]),
    /// written only by the join program, created by sockops when the socket is established
    /// (so it counts from the first byte) and removed when it closes.
    pub const JOIN_SENT: &str = "JOIN_SENT";
    /// Leg joins by sk_msg: `LegKey of an app socket → what the agent allows`
    /// ([`crate::JoinGrant`]), written only by the agent. No entry: never redirect.
    pub const JOIN_GRANT: &str = "JOIN_GRANT";
    /// Per-CPU counters indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// sk_lookup: `pod address → slot` of the agent's inbound listener for that pod.
    pub const INBOUND_SLOTS: &str = "INBOUND_SLOTS";
    /// sk_lookup: the agent's inbound listening sockets, a SOCKMAP indexed by
    /// [`crate::inbound_index`]: one IPv4 and one IPv6 listener per pod, because sk_assign
    /// only hands a connection to a listener of its own family.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";

    /// Capacities. Sized for a node with a few hundred pods and tens of thousands of
    /// steered connections open at once: the two original-destination maps hold one entry
    /// per open steered app socket.
    pub const MAX_PENDING_FLOWS: u32 = 65_536;
    pub const MAX_PODS: u32 = 1_024;
    pub const MAX_POD_ADDRS: u32 = 4_096;
    pub const MAX_DESTS: u32 = 65_536;
    /// Slots of the pinned `COUNTERS` array: more than [`super::Counter::COUNT`], so that a
    /// build adding a counter keeps the map layout and its successor still adopts the pinned
    /// maps in an upgrade (a layout change means fresh maps and a window of resets).
    pub const COUNTER_SLOTS: u32 = 32;
    const _: () = assert!(super::Counter::COUNT <= COUNTER_SLOTS);
}

/// Bytes one direction of a local leg may move through sk_msg before it falls back to the
/// loopback TCP path for the rest of its life.
///
/// The kernel charges an ingress redirect to the receiving socket but gives the sender no
/// back-pressure: a writer faster than its reader queues without bound, pushes the node's TCP
/// memory into pressure and finally gets `ENOMEM` from send() (cilium/cilium#6431). Capping
/// what a leg may redirect caps what can queue. The fallback is one-way because it preserves
/// byte order: everything redirected is already on the reader's ingress list before the first
/// byte takes TCP, and a reader drains that list before its TCP receive queue. Request/response
/// traffic and short connections (where skipping the loopback stack pays) stay within it;
/// bulk transfers leave it early, and the benchmark shows they are no slower on TCP.
pub const SKMSG_LEG_BUDGET: u64 = 1 << 20;

/// Index of a pod's inbound listener in [`maps::INBOUND_LISTENERS`].
#[inline(always)]
pub const fn inbound_index(slot: u32, v6: bool) -> u32 {
    slot * 2 + v6 as u32
}

/// `AF_INET` / `AF_INET6` as the kernel spells them (`u16`, host byte order).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A socket address in the layout the kernel's `bpf_sock_addr` / `bpf_sock_ops` use.
///
/// `addr_be` holds four 32-bit words in network byte order; IPv4 is stored IPv4-mapped
/// (`::ffff:a.b.c.d`, i.e. words `[0, 0, be(0xffff), ip4_be]`) so one key type serves both
/// families. `port_be` is in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    /// [`AF_INET`] or [`AF_INET6`]: how the application spoke, kept so getpeername answers
    /// in the family the application used.
    pub family: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockAddr>() == 24);

impl SockAddr {
    /// The IPv4-mapped prefix word, in network byte order.
    pub const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

    #[inline(always)]
    pub const fn v4(ip4_be: u32, port_be: u16) -> Self {
        Self {
            addr_be: [0, 0, Self::V4_MAPPED_WORD, ip4_be],
            port_be,
            family: AF_INET,
            _pad: 0,
        }
    }

    #[inline(always)]
    pub const fn v6(addr_be: [u32; 4], port_be: u16) -> Self {
        Self {
            addr_be,
            port_be,
            family: AF_INET6,
            _pad: 0,
        }
    }

    /// The same address with the port cleared: the key form of [`maps::DEST_POLICY`] entries
    /// that match every port.
    #[inline(always)]
    pub const fn without_port(self) -> Self {
        Self {
            port_be: 0,
            family: 0,
            ..self
        }
    }
}

/// Key of [`maps::ORIG_DST_BY_FLOW`]: the application socket's local address as the agent's
/// listener sees it in `getpeername()` of the accepted socket, qualified by the netns,
/// because every pod has its own 127.0.0.1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns_cookie: u64,
    pub local: SockAddr,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 32);

/// Value of [`maps::ORIG_DST_BY_COOKIE`]: where the app meant to connect, and the netns it
/// connected from, so the agent can free a pod's entries when it stops steering the pod (the
/// pod's sockets then no longer run sock_release).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDst {
    pub dst: SockAddr,
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);

/// Key of [`maps::POD_ADDRS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodAddrKey {
    pub netns_cookie: u64,
    /// Address with port and family zeroed ([`SockAddr::without_port`]).
    pub addr: SockAddr,
}
const _: () = assert!(core::mem::size_of::<PodAddrKey>() == 32);

/// Value of [`maps::POD_CONFIG`]: where connect4/6 send this pod's steered connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodConfig {
    /// The agent's outbound listener inside the pod's netns, on loopback.
    pub outbound_port_be: u16,
    /// The agent's inbound listener inside the pod's netns.
    pub inbound_port_be: u16,
    /// Index of the inbound listener in [`maps::INBOUND_LISTENERS`].
    pub inbound_slot: u32,
    /// [`POD_FLAG_*`](POD_FLAG_STEER_INBOUND) bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PodConfig>() == 16);

/// sk_lookup steers inbound connections to this pod's addresses.
pub const POD_FLAG_STEER_INBOUND: u32 = 1;
/// The plain app↔agent leg of this pod is short-circuited with sk_msg (the agent then copies
/// with read/write on that leg: bytes redirected into a socket's ingress cannot be spliced).
pub const POD_FLAG_LOCAL_LEG_SKMSG: u32 = 2;

/// The app sockets of this pod that talk to the agent (steered connects, and connections
/// the agent dials to the pod's apps) enter the sk_msg leg join (`tuning.sameNodeJoin:
/// skMsg`): the join program runs in their `sendmsg`, and redirects only for flows the agent
/// joined.
pub const POD_FLAG_JOIN_SKMSG: u32 = 4;

/// Value of [`maps::JOIN_SENT`], written by the join program under the sending socket's lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct JoinSent {
    /// Bytes the socket sent over TCP to the agent's leg (the program passed them).
    pub passed: u64,
    /// Bytes the program redirected (out of the agent's other leg, or into the agent's own
    /// end for [`JOIN_INGRESS`]).
    pub redirected: u64,
    /// [`JOIN_INGRESS`]: 1 when the last message was redirected, 0 when it took TCP.
    pub redirecting: u64,
}
const _: () = assert!(core::mem::size_of::<JoinSent>() == 24);

/// Value of [`maps::JOIN_GRANT`], written whole by the agent.
///
/// [`JOIN_EGRESS`] (the same-node join): the program redirects a message out of the agent's
/// other leg only when `passed == relayed` (every byte that took TCP is already in the
/// outgoing leg's send queue, so the redirected one lands behind it) and `redirected + size
/// <= granted` (the outgoing leg has room: the agent grants what its send buffer can take,
/// so a non-blocking sender never meets a full leg it cannot poll).
///
/// [`JOIN_INGRESS`] (`tuning.relayAppLeg: skMsg`, the userspace relay's app leg): the program
/// puts a message straight into the receive queue of the agent's own end of the app's
/// connection. The agent's reader takes that queue before its TCP queue, so order holds as
/// long as no byte that took TCP is still unread when a message is redirected: the program
/// redirects only while its previous message was redirected too ([`JoinSent::redirecting`]),
/// or once the agent has read every byte the socket sent (`passed + redirected <= relayed`,
/// `relayed` then counting every byte the agent read from its end). `passed + redirected +
/// size <= granted` bounds what waits unread: the kernel charges an ingress redirect to no
/// socket buffer and gives the sender no back-pressure, so the agent grants a window ahead of
/// what it has read, and a sender beyond it takes TCP (with TCP's flow control) instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct JoinGrant {
    /// [`JOIN_EGRESS`]: bytes of this socket's TCP stream the agent has written into the
    /// outgoing leg. [`JOIN_INGRESS`]: bytes the agent has read from its end in all.
    pub relayed: u64,
    /// [`JOIN_EGRESS`]: total the program may have redirected, counted like
    /// [`JoinSent::redirected`]. [`JOIN_INGRESS`]: total the socket may have sent.
    pub granted: u64,
    /// [`JOIN_EGRESS`] or [`JOIN_INGRESS`].
    pub kind: u64,
}
const _: () = assert!(core::mem::size_of::<JoinGrant>() == 24);

/// [`JoinGrant::kind`]: out of the agent's other leg (the same-node join).
pub const JOIN_EGRESS: u64 = 0;
/// [`JoinGrant::kind`]: into the agent's own end of the app's connection.
pub const JOIN_INGRESS: u64 = 1;

/// Key of [`maps::LOCAL_LEGS`]: one end of a loopback connection, seen from that end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LegKey {
    pub netns_cookie: u64,
    pub local: SockAddr,
    pub remote: SockAddr,
}
const _: () = assert!(core::mem::size_of::<LegKey>() == 56);

/// Value of [`maps::DEST_POLICY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestAction {
    /// One of the `ACTION_*` constants.
    pub action: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DestAction>() == 8);

/// `SO_MARK` of the sockets the agent opens inside a pod's netns. connect4/6 never steer a
/// socket carrying it, so the agent's own dial is not sent back to the agent when the
/// programs are attached at a cgroup that holds the agent too (netns-keyed enrollment). The
/// mark only matters inside pod network namespaces (a packet crossing a veth into another
/// netns loses it); its two bits are outside the ones kube-proxy (0x4000, 0x8000), Cilium
/// (0x0f00), Calico (0xffff0000) and Istio's 0x539 use.
pub const AGENT_SOCKET_MARK: u32 = 0x0000_3000;

/// Leave the connect() alone (plaintext, kernel networking).
pub const ACTION_PASSTHROUGH: u32 = 0;
/// Steer the connect() to the agent's outbound listener.
pub const ACTION_STEER: u32 = 1;

/// Per-CPU counters, the eBPF side's only voice: programs never log on the hot path.
/// Values are an ABI: never renumber, retire to `_Reserved`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4/6 ran in an enrolled pod (its netns has a [`PodConfig`]).
    ConnectSeen = 0,
    /// connect4/6 rewrote the destination to the agent.
    ConnectSteered = 1,
    /// connect4/6 could not record the original destination and refused the connect.
    ConnectRecordFailed = 2,
    /// sockops saw an actively established connection in an enrolled pod (its netns has a
    /// [`PodConfig`]).
    SockopsActiveEstablished = 3,
    /// sockops re-keyed a steered flow from cookie to 4-tuple.
    SockopsRekeyed = 4,
    /// getpeername4/6 answered with the original destination.
    GetpeernameRewritten = 5,
    /// sk_lookup assigned a connection to the agent's inbound listener.
    LookupSteered = 6,
    /// sk_lookup found no listener for an enrolled pod (agent down): connection refused.
    LookupNoListener = 7,
    /// sk_msg redirected a message to the other end of a local leg.
    SkMsgRedirected = 8,
    /// sk_msg let a message take the loopback TCP path because its leg had spent
    /// [`SKMSG_LEG_BUDGET`] (or was never given one).
    SkMsgBudgetSpent = 9,
    /// The sk_msg leg join redirected a message out of the agent's other leg.
    JoinRedirected = 10,
    /// The sk_msg leg join let a message of a joined socket take TCP to the agent: the
    /// agent had not yet relayed the bytes before it, or the outgoing leg had no room.
    JoinFellBack = 11,
}

impl Counter {
    pub const COUNT: u32 = 12;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Self::ConnectSeen,
        Self::ConnectSteered,
        Self::ConnectRecordFailed,
        Self::SockopsActiveEstablished,
        Self::SockopsRekeyed,
        Self::GetpeernameRewritten,
        Self::LookupSteered,
        Self::LookupNoListener,
        Self::SkMsgRedirected,
        Self::SkMsgBudgetSpent,
        Self::JoinRedirected,
        Self::JoinFellBack,
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, has no implicit padding (explicit `_pad`
    // fields, sizes asserted above) and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodAddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DestAction {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LegKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::JoinSent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::JoinGrant {}
}
