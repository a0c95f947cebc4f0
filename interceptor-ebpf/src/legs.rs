//! Kernel-only joins of two plain TCP legs, measured against the splice relay for the
//! same-node fast path (`interceptor-bench legs-probe`; the agent does not attach them).
//!
//! * `on_skb` (sk_skb stream verdict on the agent's two sockets): what one of them receives
//!   is sent out of the other, without waking the agent. The kernel queues the redirected
//!   skb on the destination's psock and a worker sends it; the source's receive window
//!   reopens as soon as the skb leaves its queue, so nothing pushes back on the sender.
//! * `on_msg` (sk_msg on the apps' sockets): what an app sends is pushed straight into the
//!   agent's other leg, inside the app's `sendmsg`; a blocking sender waits for room there.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SkBuffContext, SkMsgContext},
};
use interceptor_common::LegKey;

use crate::{
    connect::read_ip6,
    maps::{JOIN_MSG_PEERS, JOIN_SKB},
    skmsg::{SK_PASS, addr},
};

/// Redirects to the socket stored under this socket's cookie; passes (the bytes stay on
/// this socket, for a reader in userspace) when there is none.
pub fn on_skb(ctx: &SkBuffContext) -> u32 {
    // SAFETY: helper valid for sk_skb programs; the context is the kernel's skb.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // On a miss the helper sets no target, and SK_PASS then means "keep it here".
    let _ = JOIN_SKB.redirect_skb(ctx, &mut cookie, 0);
    SK_PASS
}

/// Redirects to the egress of the socket stored under this socket's own [`LegKey`].
pub fn on_msg(ctx: &SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: `md` is the kernel's sk_msg_md; every field is an aligned u32 read once.
    let (family, rip4, lip4, rip6, lip6, rport, lport) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*md).family),
            core::ptr::read_volatile(&raw const (*md).remote_ip4),
            core::ptr::read_volatile(&raw const (*md).local_ip4),
            read_ip6(&(*md).remote_ip6),
            read_ip6(&(*md).local_ip6),
            core::ptr::read_volatile(&raw const (*md).remote_port),
            core::ptr::read_volatile(&raw const (*md).local_port),
        )
    };
    // SAFETY: helper valid for sk_msg programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut this = LegKey {
        netns_cookie,
        local: addr(family, lip4, lip6, (lport as u16).to_be()),
        remote: addr(family, rip4, rip6, (rport >> 16) as u16),
    };
    let _ = JOIN_MSG_PEERS.redirect_msg(ctx, &mut this, 0);
    SK_PASS
}
