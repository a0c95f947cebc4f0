//! sockops: re-key a steered flow from the app socket's cookie to the 4-tuple the agent sees
//! after accept(), and forget it when the socket closes.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use interceptor_common::{AF_INET6, Counter, FlowKey, SockAddr};

use crate::{
    connect::read_ip6,
    maps::{ORIG_DST_BY_COOKIE, ORIG_DST_BY_FLOW, count},
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

pub fn on_event(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            count(Counter::SockopsActiveEstablished);
            // SAFETY: helper valid for sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: read-only lookup; the value is copied before the insert below.
            let Some(dst) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }).copied() else {
                return;
            };
            if ORIG_DST_BY_FLOW.insert(&flow_key(ctx), &dst, 0).is_ok() {
                count(Counter::SockopsRekeyed);
            }
            // Ask for state changes so both entries go when the socket closes.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            // SAFETY: helper valid for sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
            let _ = ORIG_DST_BY_FLOW.remove(&flow_key(ctx));
        }
        _ => {}
    }
}
