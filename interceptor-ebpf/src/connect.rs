//! cgroup connect4/6 and getpeername4/6: steer a pod's outbound TCP connects to the agent's
//! listener inside the pod's own netns, and keep the redirect invisible to the application.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockContext},
};
use interceptor_common::{ACTION_STEER, AGENT_SOCKET_MARK, Counter, OrigDst, PodAddrKey, SockAddr};

use crate::maps::{DEST_POLICY, ORIG_DST_BY_COOKIE, POD_ADDRS, POD_CONFIG, count};

/// Return values of cgroup sock_addr programs: 1 lets the syscall proceed, 0 fails it with
/// EPERM.
pub const ALLOW: i32 = 1;
pub const REFUSE: i32 = 0;

pub(crate) const IPPROTO_TCP: u32 = 6;

/// Context fields must be accessed as whole 32-bit words: an array copy compiles to a byte-wise
/// memcpy, which the verifier rejects for `bpf_sock_addr`.
#[inline(always)]
pub(crate) fn read_ip6(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: each element is an aligned, readable u32 of the context.
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(words: &mut [u32; 4], value: [u32; 4]) {
    // SAFETY: each element is an aligned, writable u32 of the context.
    unsafe {
        core::ptr::write_volatile(&mut words[0], value[0]);
        core::ptr::write_volatile(&mut words[1], value[1]);
        core::ptr::write_volatile(&mut words[2], value[2]);
        core::ptr::write_volatile(&mut words[3], value[3]);
    }
}
const LOOPBACK4_BE: u32 = 0x7f00_0001u32.to_be();

/// Whether a destination is steered: the pod is enrolled, the socket is not the agent's own,
/// the destination is neither loopback nor the pod itself, and the agent marked it (mesh
/// workload or a policy that needs the agent). A socket in a netns without a [`PodConfig`]
/// leaves after one map lookup, untouched and uncounted: with the programs attached at a
/// parent cgroup that is every socket on the node outside the mesh.
///
/// [`PodConfig`]: interceptor_common::PodConfig
#[inline(always)]
fn should_steer(ctx: &SockAddrContext, dst: &SockAddr) -> Option<(u16, u64)> {
    // SAFETY: helper valid for sock_addr programs; the context pointer comes from the kernel.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied before any other map call.
    let pod = unsafe { POD_CONFIG.get(netns) }?;
    let port = pod.outbound_port_be;
    count(Counter::ConnectSeen);
    if is_agent_socket(ctx) {
        return None;
    }
    let own = PodAddrKey {
        netns_cookie: netns,
        addr: dst.without_port(),
    };
    // SAFETY: read-only lookup, value unused.
    if unsafe { POD_ADDRS.get(own) }.is_some() {
        return None;
    }
    // SAFETY: read-only lookups; `action` is copied out.
    let action = unsafe {
        DEST_POLICY
            .get(dst)
            .or_else(|| DEST_POLICY.get(dst.without_port()))
    }?;
    (action.action == ACTION_STEER).then_some((port, netns))
}

/// The agent's own sockets in a pod's netns (its dials to the original destination) carry
/// [`AGENT_SOCKET_MARK`]. Per-cgroup attachment never sees them (the agent is outside every
/// pod cgroup), but programs attached at a parent cgroup that also holds the agent would
/// steer the agent's dial back to itself.
#[inline(always)]
fn is_agent_socket(ctx: &SockAddrContext) -> bool {
    // SAFETY: `sk` of bpf_sock_addr is a non-null PTR_TO_SOCKET for the program's duration,
    // and `mark` is an aligned u32 field the verifier lets sock_addr programs read.
    let mark = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        core::ptr::read_volatile(&raw const (*sk).mark)
    };
    mark == AGENT_SOCKET_MARK
}

/// Records `cookie → original destination`. A connection we cannot record (the map is full)
/// would reach the agent without a destination, so it is refused instead (fail closed).
#[inline(always)]
fn record(ctx: &SockAddrContext, dst: &SockAddr, netns_cookie: u64) -> Result<(), ()> {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let value = OrigDst {
        dst: *dst,
        netns_cookie,
    };
    ORIG_DST_BY_COOKIE.insert(cookie, value, 0).map_err(|_| ())
}

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr; the verifier checks each field access.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    // Loopback is the pod's own business (and where the agent listens): never steered.
    if sa.user_ip4 & 0xff_u32.to_be() == 0x7f_u32.to_be() {
        return ALLOW;
    }
    let dst = SockAddr::v4(sa.user_ip4, sa.user_port as u16);
    let Some((port_be, netns)) = should_steer(ctx, &dst) else {
        return ALLOW;
    };
    if record(ctx, &dst, netns).is_err() {
        count(Counter::ConnectRecordFailed);
        return REFUSE;
    }
    sa.user_ip4 = LOOPBACK4_BE;
    sa.user_port = u32::from(port_be);
    count(Counter::ConnectSteered);
    ALLOW
}

pub fn connect6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `connect4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let ip = read_ip6(&sa.user_ip6);
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == SockAddr::V4_MAPPED_WORD;
    let dst = if mapped {
        if ip[3] & 0xff_u32.to_be() == 0x7f_u32.to_be() {
            return ALLOW;
        }
        SockAddr::v4(ip[3], sa.user_port as u16)
    } else {
        if ip == [0, 0, 0, 1u32.to_be()] {
            return ALLOW;
        }
        SockAddr::v6(ip, sa.user_port as u16)
    };
    let Some((port_be, netns)) = should_steer(ctx, &dst) else {
        return ALLOW;
    };
    if record(ctx, &dst, netns).is_err() {
        count(Counter::ConnectRecordFailed);
        return REFUSE;
    }
    // A dual-stack socket aimed at an IPv4 peer must stay IPv4: ::ffff:127.0.0.1.
    let lo = if mapped {
        [0, 0, SockAddr::V4_MAPPED_WORD, LOOPBACK4_BE]
    } else {
        [0, 0, 0, 1u32.to_be()]
    };
    write_ip6(&mut sa.user_ip6, lo);
    sa.user_port = u32::from(port_be);
    count(Counter::ConnectSteered);
    ALLOW
}

/// getpeername on a steered socket answers with the original destination.
pub fn getpeername4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup, value copied.
    if let Some(dst) = unsafe { ORIG_DST_BY_COOKIE.get(cookie) } {
        // SAFETY: as in `connect4`.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = dst.dst.addr_be[3];
        sa.user_port = u32::from(dst.dst.port_be);
        count(Counter::GetpeernameRewritten);
    }
    ALLOW
}

pub fn getpeername6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup, value copied.
    if let Some(dst) = unsafe { ORIG_DST_BY_COOKIE.get(cookie) } {
        // SAFETY: as in `connect4`.
        let sa = unsafe { &mut *ctx.sock_addr };
        write_ip6(&mut sa.user_ip6, dst.dst.addr_be);
        sa.user_port = u32::from(dst.dst.port_be);
        count(Counter::GetpeernameRewritten);
    }
    ALLOW
}

/// cgroup sock_release: the socket is gone, and with it any need for its original destination
/// (getpeername can no longer be asked). Covers the sockets that never reach TCP_CLOSE through
/// sockops: connects that failed or were never established, and sockets closed before.
pub fn release(ctx: &SockContext) {
    // SAFETY: the kernel passes a valid bpf_sock; the verifier checks the field access.
    let protocol = unsafe { core::ptr::read_volatile(&raw const (*ctx.sock).protocol) };
    if protocol != IPPROTO_TCP {
        return;
    }
    // SAFETY: helper valid for cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
}
