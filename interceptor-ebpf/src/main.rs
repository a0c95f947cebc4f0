//! Entry points only. Each converts its hook's result to the kernel's return convention in one
//! place; the logic lives in the per-hook modules.
#![no_std]
#![no_main]

mod connect;
mod legs;
mod lookup;
mod maps;
mod skmsg;
mod sockops;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, sk_lookup, sk_msg, sock_ops, stream_verdict},
    programs::{
        SkBuffContext, SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext,
    },
};

#[cgroup_sock_addr(connect4)]
pub fn intercept_connect4(ctx: SockAddrContext) -> i32 {
    connect::connect4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn intercept_connect6(ctx: SockAddrContext) -> i32 {
    connect::connect6(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn intercept_getpeername4(ctx: SockAddrContext) -> i32 {
    connect::getpeername4(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn intercept_getpeername6(ctx: SockAddrContext) -> i32 {
    connect::getpeername6(&ctx)
}

/// Frees the released socket's original destination. 1: sock_release programs must allow.
#[cgroup_sock(sock_release)]
pub fn intercept_sock_release(ctx: SockContext) -> i32 {
    connect::release(&ctx);
    1
}

/// sock_ops programs' return value is only read for a few ops that ask for a reply; 1 is
/// "carry on" for all the others.
#[sock_ops]
pub fn intercept_sockops(ctx: SockOpsContext) -> u32 {
    sockops::on_event(&ctx);
    1
}

#[sk_lookup]
pub fn intercept_sk_lookup(ctx: SkLookupContext) -> u32 {
    lookup::on_lookup(&ctx)
}

/// Attached to LOCAL_LEGS; redirects or passes, never drops.
#[sk_msg]
pub fn intercept_sk_msg(ctx: SkMsgContext) -> u32 {
    skmsg::on_msg(&ctx)
}

/// Attached to JOIN_SKB by the leg-join measurement only; redirects or passes, never drops.
#[stream_verdict]
pub fn join_legs_skb(ctx: SkBuffContext) -> u32 {
    legs::on_skb(&ctx)
}

/// Attached to JOIN_MSG by the leg-join measurement only; redirects or passes, never drops.
#[sk_msg]
pub fn join_legs_msg(ctx: SkMsgContext) -> u32 {
    legs::on_msg(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
