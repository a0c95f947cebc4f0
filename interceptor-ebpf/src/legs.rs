//! Kernel-only joins of two plain TCP legs for the same-node fast path. `on_msg` is the
//! agent's `sameNodeJoin: skMsg`; `on_skb` is only measured (`interceptor-bench
//! legs-probe`), never attached by the agent.
//!
//! * `on_skb` (sk_skb stream verdict on the agent's two sockets): what one of them receives
//!   is sent out of the other, without waking the agent. The kernel queues the redirected
//!   skb on the destination's psock and a worker sends it; the source's receive window
//!   reopens as soon as the skb leaves its queue, so nothing pushes back on the sender.
//! * `on_msg` (sk_msg on the apps' sockets): what an app sends is pushed straight into the
//!   agent's other leg, inside the app's `sendmsg`; a blocking sender waits for room there.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_INGRESS,
    helpers::bpf_get_socket_cookie,
    programs::{SkBuffContext, SkMsgContext},
};
use interceptor_common::{Counter, JOIN_INGRESS, JoinGrant, JoinSent, LegKey};

use crate::{
    maps::{JOIN_GRANT, JOIN_MSG_PEERS, JOIN_SENT, JOIN_SKB, count},
    skmsg::{SK_PASS, msg_key},
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

/// The sk_msg leg join (`tuning.sameNodeJoin: skMsg`; also what `legs-probe` measures):
/// what an app sends leaves by the agent's other leg, inside the app's `sendmsg`, once the
/// agent allows it ([`interceptor_common::JoinGrant`]); otherwise it takes TCP to the agent, which relays it.
///
/// Messages of one socket are judged one at a time under its socket lock, and a redirected
/// message is in the outgoing leg's send queue before the next one is judged (the kernel
/// sends it before `sendmsg` moves on), so the counts below need no atomics and
/// `passed == relayed` at judgement means nothing that took TCP can still come after it.
pub fn on_msg(ctx: &SkMsgContext) -> u32 {
    let (mut this, size) = msg_key(ctx);
    // No entry: not a socket sockops registered (or its map was full): TCP, uncounted.
    let Some(sent) = JOIN_SENT.get_ptr_mut(this) else {
        return SK_PASS;
    };
    // SAFETY: read-only lookup, value copied; the agent replaces grants whole.
    let grant = unsafe { JOIN_GRANT.get(this) }.copied();
    // SAFETY: `sent` points at this socket's live entry, written only here (see above).
    let (passed, redirected) = unsafe { ((*sent).passed, (*sent).redirected) };
    let size = u64::from(size);
    if let Some(grant) = grant
        && grant.kind == JOIN_INGRESS
    {
        // SAFETY: as above.
        return unsafe { into_agent(ctx, &mut this, &mut *sent, &grant, size) };
    }
    if let Some(grant) = grant {
        if passed == grant.relayed
            && redirected + size <= grant.granted
            && JOIN_MSG_PEERS.redirect_msg(ctx, &mut this, 0) == i64::from(SK_PASS)
        {
            // SAFETY: as above.
            unsafe { (*sent).redirected = redirected + size };
            count(Counter::JoinRedirected);
            return SK_PASS;
        }
        count(Counter::JoinFellBack);
    }
    // SAFETY: as above.
    unsafe { (*sent).passed = passed + size };
    SK_PASS
}

/// [`JOIN_INGRESS`] (`tuning.relayAppLeg: skMsg`): the message goes straight into the receive
/// queue of the agent's own end of this connection, skipping the loopback TCP stack, when
/// [`JoinGrant`]'s rule allows; otherwise it takes TCP. `sent` is this socket's entry, written
/// only under its socket lock (see [`on_msg`]).
#[inline(always)]
fn into_agent(
    ctx: &SkMsgContext,
    this: &mut LegKey,
    sent: &mut JoinSent,
    grant: &JoinGrant,
    size: u64,
) -> u32 {
    let total = sent.passed + sent.redirected;
    // Order: nothing that took TCP may be unread behind a redirected message (the agent's
    // reader drains its redirected queue first).
    let ordered = sent.redirecting != 0 || total <= grant.relayed;
    if ordered
        && total + size <= grant.granted
        && JOIN_MSG_PEERS.redirect_msg(ctx, this, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS)
    {
        sent.redirected += size;
        sent.redirecting = 1;
        count(Counter::JoinRedirected);
        return SK_PASS;
    }
    sent.passed += size;
    sent.redirecting = 0;
    count(Counter::JoinFellBack);
    SK_PASS
}
