//! sk_lookup: steer inbound TCP connections addressed to an enrolled pod to the agent's
//! inbound listener in that pod's netns.

use aya_ebpf::programs::SkLookupContext;
use interceptor_common::{AF_INET6, Counter, SockAddr, inbound_index};

use crate::{
    connect::{IPPROTO_TCP, read_ip6},
    maps::{INBOUND_LISTENERS, INBOUND_SLOTS, count},
};

/// sk_lookup return values.
pub const SK_PASS: u32 = 1;
pub const SK_DROP: u32 = 0;

/// The agent reaches the app from this address (127.0.0.6, as Istio does); its own
/// connections must never be steered back to itself.
pub const AGENT_SOURCE4_BE: u32 = 0x7f00_0006u32.to_be();
/// IPv6 counterpart: ::1. IPv6 loopback is a single address (no ::6 without reconfiguring the
/// pod), and an app never reaches its own pod address from ::1 unless it binds it explicitly.
pub const AGENT_SOURCE6_BE: [u32; 4] = [0, 0, 0, 1u32.to_be()];

pub fn on_lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid, read-only bpf_sk_lookup.
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let v6 = lk.family == u32::from(AF_INET6);
    let dst = if v6 {
        let remote = read_ip6(&lk.remote_ip6);
        if remote == AGENT_SOURCE6_BE {
            return SK_PASS;
        }
        SockAddr::v6(read_ip6(&lk.local_ip6), 0)
    } else {
        if lk.remote_ip4 == AGENT_SOURCE4_BE {
            return SK_PASS;
        }
        SockAddr::v4(lk.local_ip4, 0)
    };
    // SAFETY: read-only lookup, value copied.
    let Some(slot) = (unsafe { INBOUND_SLOTS.get(dst.without_port()) }).copied() else {
        return SK_PASS;
    };
    match INBOUND_LISTENERS.redirect_sk_lookup(ctx, inbound_index(slot, v6), 0) {
        Ok(()) => {
            count(Counter::LookupSteered);
            SK_PASS
        }
        Err(_) => {
            // Enrolled pod but no agent listener: refuse rather than deliver in clear.
            count(Counter::LookupNoListener);
            SK_DROP
        }
    }
}
