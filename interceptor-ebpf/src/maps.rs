//! Every map the programs share, named from `interceptor_common::maps` so the loader finds them.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, SockHash, SockMap},
};
use interceptor_common::{
    Counter, DestAction, FlowKey, JoinGrant, JoinSent, LegKey, OrigDst, PodAddrKey, PodConfig,
    SockAddr,
    maps::{COUNTER_SLOTS, MAX_DESTS, MAX_PENDING_FLOWS, MAX_POD_ADDRS, MAX_PODS},
};

/// Plain hash, not LRU: an LRU evicts the entry of another live socket when full (or earlier:
/// its free lists are per CPU), and that socket then reaches the agent with no destination or
/// answers getpeername wrongly. Full, this map makes connect4/6 refuse the new connect
/// instead. Entries go when their socket is released (sock_release), so only open sockets
/// hold one.
#[map(name = "ORIG_DST_BY_COOKIE")]
pub static ORIG_DST_BY_COOKIE: HashMap<u64, OrigDst> =
    HashMap::with_max_entries(MAX_PENDING_FLOWS, 0);

/// Plain hash for the same reason; entries go at TCP_CLOSE (sockops asks for state callbacks
/// when it creates one).
#[map(name = "ORIG_DST_BY_FLOW")]
pub static ORIG_DST_BY_FLOW: HashMap<FlowKey, SockAddr> =
    HashMap::with_max_entries(MAX_PENDING_FLOWS, 0);

#[map(name = "POD_CONFIG")]
pub static POD_CONFIG: HashMap<u64, PodConfig> = HashMap::with_max_entries(MAX_PODS, 0);

#[map(name = "POD_ADDRS")]
pub static POD_ADDRS: HashMap<PodAddrKey, u32> = HashMap::with_max_entries(MAX_POD_ADDRS, 0);

#[map(name = "DEST_POLICY")]
pub static DEST_POLICY: HashMap<SockAddr, DestAction> = HashMap::with_max_entries(MAX_DESTS, 0);

/// Inbound: pod address → slot of the agent's listener in [`INBOUND_LISTENERS`].
#[map(name = "INBOUND_SLOTS")]
pub static INBOUND_SLOTS: HashMap<SockAddr, u32> = HashMap::with_max_entries(MAX_POD_ADDRS, 0);

#[map(name = "INBOUND_LISTENERS")]
pub static INBOUND_LISTENERS: SockMap = SockMap::with_max_entries(2 * MAX_PODS, 0);

#[map(name = "LOCAL_LEGS")]
pub static LOCAL_LEGS: SockHash<LegKey> = SockHash::with_max_entries(MAX_PENDING_FLOWS, 0);

/// Plain hash, not LRU: an evicted entry would let a leg that already fell back to TCP start
/// redirecting again, and the reader would then see the new bytes before older TCP ones.
/// Entries come and go with their LOCAL_LEGS entry (sockops).
#[map(name = "LEG_BYTES")]
pub static LEG_BYTES: HashMap<LegKey, u64> = HashMap::with_max_entries(MAX_PENDING_FLOWS, 0);

/// Kernel-only leg joins (`legs.rs`): `cookie of one leg → the other leg`; the stream
/// verdict is attached here, so every socket in it is judged.
#[map(name = "JOIN_SKB")]
pub static JOIN_SKB: SockHash<u64> = SockHash::with_max_entries(MAX_PENDING_FLOWS, 0);

/// `LegKey of an app's socket → that socket`: the sk_msg join program is attached here.
#[map(name = "JOIN_MSG")]
pub static JOIN_MSG: SockHash<LegKey> = SockHash::with_max_entries(MAX_PENDING_FLOWS, 0);

/// `LegKey of an app's socket → the agent's leg its bytes go out of`; no program attached.
#[map(name = "JOIN_MSG_PEERS")]
pub static JOIN_MSG_PEERS: SockHash<LegKey> = SockHash::with_max_entries(MAX_PENDING_FLOWS, 0);

/// Written by the join program only, under the sending socket's lock; plain hash, not LRU
/// (an evicted entry would restart the count at zero and break the order check). Entries
/// come with the socket's JOIN_MSG entry and go at TCP_CLOSE (sockops).
#[map(name = "JOIN_SENT")]
pub static JOIN_SENT: HashMap<LegKey, JoinSent> = HashMap::with_max_entries(MAX_PENDING_FLOWS, 0);

/// Written whole by the agent. Not preallocated: an update then swaps in a fresh element and
/// frees the old one after an RCU grace period, so the program never reads half of one
/// grant and half of the next.
#[map(name = "JOIN_GRANT")]
pub static JOIN_GRANT: HashMap<LegKey, JoinGrant> =
    HashMap::with_max_entries(MAX_PENDING_FLOWS, BPF_F_NO_PREALLOC);

/// `BPF_F_NO_PREALLOC` from the kernel's uapi.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, the program is not preempted on this CPU while it runs.
        unsafe { *slot += 1 };
    }
}
