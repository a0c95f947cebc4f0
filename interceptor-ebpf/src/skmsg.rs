//! sk_msg local-leg option (Merbridge-style): a message sent on one end of a plain loopback
//! app↔agent connection is put straight into the other end's receive queue, skipping the
//! loopback TCP stack. Only plain sockets ever enter LOCAL_LEGS; kTLS sockets never do.
//!
//! Each sending socket may redirect [`SKMSG_LEG_BUDGET`] bytes, then takes the TCP path for
//! good (why: see the constant).

use aya_ebpf::{
    EbpfContext as _, bindings::BPF_F_INGRESS, helpers::bpf_get_netns_cookie,
    programs::SkMsgContext,
};
use interceptor_common::{AF_INET6, Counter, LegKey, SKMSG_LEG_BUDGET, SockAddr};

use crate::{
    connect::read_ip6,
    maps::{LEG_BYTES, LOCAL_LEGS, count},
};

pub const SK_PASS: u32 = 1;

/// Builds an address from context words; IPv4-mapped IPv6 normalises to IPv4 so both ends of a
/// dual-stack connection agree on the key.
#[inline(always)]
pub fn addr(family: u32, ip4: u32, ip6: [u32; 4], port_be: u16) -> SockAddr {
    if family == u32::from(AF_INET6) {
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == SockAddr::V4_MAPPED_WORD {
            SockAddr::v4(ip6[3], port_be)
        } else {
            SockAddr::v6(ip6, port_be)
        }
    } else {
        SockAddr::v4(ip4, port_be)
    }
}

/// The sending socket's own [`LegKey`] and the message's size: the shape every sk_msg
/// program here starts with.
#[inline(always)]
pub fn msg_key(ctx: &SkMsgContext) -> (LegKey, u32) {
    let md = ctx.msg;
    // SAFETY: `md` is the kernel's sk_msg_md; every field is an aligned u32 read once.
    let (family, rip4, lip4, rip6, lip6, rport, lport, size) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*md).family),
            core::ptr::read_volatile(&raw const (*md).remote_ip4),
            core::ptr::read_volatile(&raw const (*md).local_ip4),
            read_ip6(&(*md).remote_ip6),
            read_ip6(&(*md).local_ip6),
            core::ptr::read_volatile(&raw const (*md).remote_port),
            core::ptr::read_volatile(&raw const (*md).local_port),
            core::ptr::read_volatile(&raw const (*md).size),
        )
    };
    // SAFETY: helper valid for sk_msg programs.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = LegKey {
        netns_cookie,
        // local_port is host order; remote_port carries the network-order port in its upper
        // 16 bits.
        local: addr(family, lip4, lip6, (lport as u16).to_be()),
        remote: addr(family, rip4, rip6, (rport >> 16) as u16),
    };
    (key, size)
}

pub fn on_msg(ctx: &SkMsgContext) -> u32 {
    let (this, size) = msg_key(ctx);
    let (local, remote) = (this.local, this.remote);
    // Messages on one socket are judged under its socket lock, one at a time, so the
    // read-modify-write below needs no atomics. No entry: the leg was never given a budget.
    let Some(sent) = LEG_BYTES.get_ptr_mut(this) else {
        count(Counter::SkMsgBudgetSpent);
        return SK_PASS;
    };
    // SAFETY: `sent` points at this leg's live map value (see above for exclusivity).
    unsafe {
        if *sent >= SKMSG_LEG_BUDGET {
            count(Counter::SkMsgBudgetSpent);
            return SK_PASS;
        }
        *sent += u64::from(size);
    }
    // The peer socket, seen from its own end.
    let mut peer = LegKey {
        netns_cookie: this.netns_cookie,
        local: remote,
        remote: local,
    };
    if LOCAL_LEGS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(Counter::SkMsgRedirected);
    }
    SK_PASS
}
