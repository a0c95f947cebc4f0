//! sockops: re-key a steered flow from the app socket's cookie to the 4-tuple the agent sees
//! after accept(), and forget it when the socket closes.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use interceptor_common::{
    AF_INET6, Counter, FlowKey, JoinSent, LegKey, POD_FLAG_JOIN_SKMSG, POD_FLAG_LOCAL_LEG_SKMSG,
    SockAddr,
};

use crate::{
    connect::read_ip6,
    lookup::{AGENT_SOURCE4_BE, AGENT_SOURCE6_BE},
    maps::{
        JOIN_MSG, JOIN_SENT, LEG_BYTES, LOCAL_LEGS, ORIG_DST_BY_COOKIE, ORIG_DST_BY_FLOW,
        POD_CONFIG, count,
    },
    skmsg::addr,
};

const TCP_CLOSE: u32 = 7;

/// The app socket's local address: the peer address of the socket the agent accepts.
///
/// Every context field is read once, up front, with a volatile load: otherwise LLVM selects
/// between two context pointers (`local_ip4` vs `local_ip6[3]`) and loads through the result,
/// which the verifier rejects ("dereference of modified ctx ptr").
#[inline(always)]
fn flow_key(ctx: &SockOpsContext) -> FlowKey {
    // SAFETY: helper valid for sock_ops programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let ops = ctx.ops;
    // SAFETY: `ops` is the kernel's bpf_sock_ops; each read is an aligned u32 field.
    let (family, ip4, ip6, port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ops).family),
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            read_ip6(&(*ops).local_ip6),
            core::ptr::read_volatile(&raw const (*ops).local_port),
        )
    };
    // local_port is in host byte order in bpf_sock_ops (unlike remote_port).
    let port_be = (port as u16).to_be();
    let local = if family == u32::from(AF_INET6) {
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == SockAddr::V4_MAPPED_WORD {
            SockAddr::v4(ip6[3], port_be)
        } else {
            SockAddr::v6(ip6, port_be)
        }
    } else {
        SockAddr::v4(ip4, port_be)
    };
    FlowKey {
        netns_cookie,
        local,
    }
}

/// Both ends of the socket, for the sk_msg local-leg map.
#[inline(always)]
fn leg_key(ctx: &SockOpsContext, netns_cookie: u64) -> LegKey {
    let ops = ctx.ops;
    // SAFETY: `ops` is the kernel's bpf_sock_ops; each read is an aligned u32 field, read once
    // (see `flow_key`).
    let (family, lip4, rip4, lip6, rip6, lport, rport) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ops).family),
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            core::ptr::read_volatile(&raw const (*ops).remote_ip4),
            read_ip6(&(*ops).local_ip6),
            read_ip6(&(*ops).remote_ip6),
            core::ptr::read_volatile(&raw const (*ops).local_port),
            core::ptr::read_volatile(&raw const (*ops).remote_port),
        )
    };
    LegKey {
        netns_cookie,
        local: addr(family, lip4, lip6, (lport as u16).to_be()),
        // remote_port holds the network-order port in its upper 16 bits.
        remote: addr(family, rip4, rip6, (rport >> 16) as u16),
    }
}

/// Whether the pod asked for the sk_msg local leg.
#[inline(always)]
fn local_leg_enabled(netns_cookie: u64) -> Option<u16> {
    // SAFETY: read-only lookup, value copied.
    let pod = unsafe { POD_CONFIG.get(netns_cookie) }?;
    (pod.flags & POD_FLAG_LOCAL_LEG_SKMSG != 0).then_some(pod.outbound_port_be)
}

/// Puts an established plain loopback socket in LOCAL_LEGS with a fresh sk_msg budget. The
/// budget entry comes first and only at establishment: a leg whose entry could not be made
/// never redirects, and so can never start redirecting after bytes already went by TCP.
///
/// The entry is created only if absent: sockops runs once per attached cgroup on the path
/// (the agent's own cgroup may be an ancestor of a pod's), and a second run must neither reset
/// the budget nor undo the first run's registration.
#[inline(always)]
fn add_local_leg(ctx: &SockOpsContext, key: LegKey) {
    if LEG_BYTES.insert(key, 0, u64::from(BPF_NOEXIST)).is_err() {
        return;
    }
    // SAFETY: `ctx.ops` is the live bpf_sock_ops of an established plain socket.
    if LOCAL_LEGS
        .update(key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = LEG_BYTES.remove(key);
    }
}

/// Whether the pod's app sockets enter the sk_msg leg join.
#[inline(always)]
fn join_enabled(netns_cookie: u64) -> bool {
    // SAFETY: read-only lookup, value copied.
    unsafe { POD_CONFIG.get(netns_cookie) }.is_some_and(|p| p.flags & POD_FLAG_JOIN_SKMSG != 0)
}

/// Puts an app socket that talks to the agent in JOIN_MSG, its byte count first and only at
/// establishment, so the count starts at its first byte (the order check compares it with
/// what the agent relayed). Created only if absent, for the reason [`add_local_leg`] gives.
#[inline(always)]
fn add_join(ctx: &SockOpsContext, key: LegKey) {
    if JOIN_SENT
        .insert(key, JoinSent::default(), u64::from(BPF_NOEXIST))
        .is_err()
    {
        return;
    }
    // SAFETY: `ctx.ops` is the live bpf_sock_ops of an established plain socket.
    if JOIN_MSG
        .update(key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = JOIN_SENT.remove(key);
    }
}

/// The agent's source address toward a pod's apps (inbound and same-node dials).
#[inline(always)]
fn from_agent(remote: &SockAddr) -> bool {
    if remote.family == AF_INET6 {
        remote.addr_be == AGENT_SOURCE6_BE
    } else {
        remote.addr_be[3] == AGENT_SOURCE4_BE
    }
}

pub fn on_event(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: helper valid for sock_ops programs.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            // Sockets of netns outside the mesh are neither counted nor looked at further.
            // SAFETY: read-only lookup, value unused.
            if unsafe { POD_CONFIG.get(netns_cookie) }.is_none() {
                return;
            }
            count(Counter::SockopsActiveEstablished);
            // SAFETY: helper valid for sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: read-only lookup; the value is copied before the insert below.
            let Some(dst) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).map(|o| o.dst) else {
                return;
            };
            let key = flow_key(ctx);
            if ORIG_DST_BY_FLOW.insert(key, dst, 0).is_ok() {
                count(Counter::SockopsRekeyed);
            }
            if local_leg_enabled(key.netns_cookie).is_some() {
                add_local_leg(ctx, leg_key(ctx, key.netns_cookie));
            }
            if join_enabled(key.netns_cookie) {
                add_join(ctx, leg_key(ctx, key.netns_cookie));
            }
            // Ask for state changes so both entries go when the socket closes.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        // The agent's end of a local leg: accepted on its outbound listener (sockops is also
        // attached to the agent's own cgroup when the option is on).
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // SAFETY: helper valid for sock_ops programs.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            // An app's end of a connection the agent dialed into its pod.
            if join_enabled(netns_cookie) {
                let key = leg_key(ctx, netns_cookie);
                if from_agent(&key.remote) {
                    add_join(ctx, key);
                    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
                }
            }
            let Some(port_be) = local_leg_enabled(netns_cookie) else {
                return;
            };
            let key = leg_key(ctx, netns_cookie);
            if key.local.port_be == port_be {
                add_local_leg(ctx, key);
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            // SAFETY: helper valid for sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST_BY_COOKIE.remove(cookie);
            let _ = ORIG_DST_BY_FLOW.remove(flow_key(ctx));
            // SAFETY: helper valid for sock_ops programs.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let key = leg_key(ctx, netns_cookie);
            let _ = LEG_BYTES.remove(key);
            let _ = JOIN_SENT.remove(key);
        }
        _ => {}
    }
}
