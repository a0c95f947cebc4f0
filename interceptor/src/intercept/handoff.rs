//! Hands an established flow to its relay: lists it in the flow table (after deciding it
//! again if the policy changed during set-up) and starts the relay that fits its transport
//! (kTLS or userspace for mesh mTLS, userspace for originated TLS, plain splice otherwise),
//! cancellable by a later policy change.

use std::{
    future::Future,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::TryFutureExt as _;
use tokio::net::TcpStream;

use super::{
    Offload, Shared,
    flow::{Ends, REFUSE_WAIT, Refusal, Stop},
    revalidate::admitted_now,
    table::{Cancel, Direction, FlowCheck, FlowGuard, FlowInfo, Protection},
};
use crate::{
    handshake::driver,
    relay,
    telemetry::{Mode, Outcome},
};

/// SO_LINGER 0 on a duplicate of a socket: the socket is reset when its last descriptor
/// closes.
fn zero_linger(fd: &OwnedFd) {
    let _ = crate::sys::set_zero_linger(fd.as_fd());
}

/// Runs a relay until it ends or the flow's policy check fails (see `revalidate`); then
/// both connections are reset, and the relay is dropped. `socks` are duplicates of the relay's
/// two sockets, taken before they moved into it. An upgrade asking the flow to park is passed
/// to the relay, which is polled on: the kernel relay then ends with its state in `stats`.
async fn cancellable(
    cancel: &Cancel,
    stats: &relay::RelayStats,
    socks: &[OwnedFd],
    relay: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::pin!(relay);
    loop {
        tokio::select! {
            r = &mut relay => return r,
            () = cancel.fired() => {
                if cancel.is_fired() {
                    for fd in socks {
                        zero_linger(fd);
                    }
                    // `revalidate` logged and counted it.
                    return Ok(());
                }
                if cancel.parking() {
                    stats.request_park();
                }
            }
        }
    }
}

/// The second phase of a flow: its relay, owning the sockets, the session and the flow-table
/// row, and nothing else of the set-up.
pub(super) type Relay<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// A listed flow's relay, cancellable through its row (see [`cancellable`]). `socks` are
/// duplicates of its two sockets, app side first; they keep both open until the relay's
/// future is done, so the reset a failed relay asked for goes out when they drop.
///
/// With `hold_reset` (outbound TLS flows, which count the app's bytes), a flow that fails
/// before the app sent a byte (the server side refused it right after the handshake) holds
/// that reset until the app's request arrives, as a refused outbound connection is answered
/// (`flow::refuse_app`): an app still finishing its own connect would otherwise see a failed
/// connect (curl exit 7) instead of a refused request (exit 56), depending on scheduling.
pub(super) fn relaying<'a>(
    mut guard: FlowGuard<'a>,
    socks: Vec<OwnedFd>,
    hold_reset: bool,
    relay: impl Future<Output = anyhow::Result<()>> + Send + 'a,
) -> Relay<'a> {
    Box::pin(async move {
        let result = cancellable(&guard.cancel, &guard.stats, &socks, relay).await;
        if result.is_ok()
            && let Some(parked) = guard.stats.take_parked()
        {
            match guard.cancel.parked(parked) {
                Ok(()) => guard.ended(Outcome::HandedOver, None),
                Err(_parked) => {
                    // Parked for a successor that is gone: its sockets close with `socks`
                    // and `_parked`, reset, never a clean end the app could trust.
                    for fd in &socks {
                        zero_linger(fd);
                    }
                    guard.ended(
                        Outcome::Failed,
                        Some("parked for a successor agent that went away".to_owned()),
                    );
                }
            }
            return result;
        }
        match &result {
            Ok(()) if guard.cancel.is_fired() => {
                let code = guard.cancel.code().map(|c| c.to_string());
                guard.ended(Outcome::PolicyClosed, code);
            }
            Ok(()) => guard.ended(Outcome::Closed, None),
            Err(e) => guard.failed(failure_name(e), format!("{e:#}")),
        }
        if result.is_err()
            && hold_reset
            && guard.stats.bytes_app_to_peer() == 0
            && let Some(app) = socks.first()
        {
            // Boxed: its timer and readiness future would otherwise size every flow's relay
            // state, idle or not, for a wait only failed flows make.
            Box::pin(await_request(app.as_fd())).await;
        }
        result
    })
}

/// The name a failed flow is counted by: the relay's own, `other` for anything else.
fn failure_name(e: &anyhow::Error) -> &'static str {
    e.downcast_ref::<relay::RelayError>()
        .map_or("other", relay::RelayError::reason)
}

/// Waits (at most [`REFUSE_WAIT`]) until the app has sent something or closed.
async fn await_request(app: BorrowedFd<'_>) {
    let Ok(dup) = app.try_clone_to_owned() else {
        return;
    };
    let Ok(sock) = TcpStream::from_std(std::net::TcpStream::from(dup)) else {
        return;
    };
    let _ = tokio::time::timeout(REFUSE_WAIT, sock.readable()).await;
}

pub(super) fn dups(socks: [&TcpStream; 2]) -> Vec<OwnedFd> {
    socks
        .iter()
        .filter_map(|s| s.as_fd().try_clone_to_owned().ok())
        .collect()
}

pub(super) fn relay_config(shared: &Shared) -> relay::RelayConfig {
    relay::RelayConfig {
        idle_timeout: Duration::from_secs(shared.tuning.idle_timeout_secs),
        app_leg_redirected: shared.tuning.sk_msg_local_leg,
        ..Default::default()
    }
}

/// Hands an established mesh session to kTLS (or keeps it in rustls) and relays.
/// Attaches the `tls` ULP to the peer socket before the handshake when kTLS is in use: the
/// kernel refuses the ULP once the peer's FIN has arrived, and a peer that half-closes right
/// behind its Finished would otherwise push the flow to userspace. Failure is not fatal: the
/// relay then keeps the flow in rustls. Returns whether kTLS can take the session over.
pub(super) fn prepare_peer(shared: &Shared, peer: &TcpStream) -> bool {
    match shared.offload {
        Offload::Kernel(_) => relay::prepare_socket(
            peer,
            relay::RecordLayer::Kernel {
                expect_no_pad: true,
            },
        )
        .is_ok(),
        Offload::Userspace => false,
    }
}

/// The metrics mode of this node's mesh flows.
pub(super) fn mesh_mode(shared: &Shared) -> Mode {
    match shared.offload {
        Offload::Kernel(_) => Mode::Ktls,
        Offload::Userspace => Mode::Userspace,
    }
}

/// The relay of an established mesh flow, listed with `check` (decided under generation
/// `decided_by`) so that policy changes decide it again; refused (both sockets reset) if a
/// policy change in the meantime refuses it.
pub(super) fn relay_mesh(
    shared: &Shared,
    mut flow: FlowInfo,
    check: FlowCheck,
    decided_by: u64,
    app: TcpStream,
    peer: TcpStream,
    est: driver::Established,
) -> Result<Relay<'_>, Stop> {
    let layer = match &shared.offload {
        Offload::Kernel(_) => {
            flow.protection = Protection::Ktls;
            // The peer is another agent, which never pads records.
            relay::RecordLayer::Kernel {
                expect_no_pad: true,
            }
        }
        Offload::Userspace => {
            flow.protection = Protection::Userspace;
            relay::RecordLayer::Userspace
        }
    };
    if let Err(refused) = admitted_now(shared, decided_by, &check) {
        let ends = Ends::of(&check, &flow.pod);
        return Err(Refusal::new(ends, refused).reset(app).reset(peer).into());
    }
    let hold_reset = flow.direction == Direction::Outbound;
    let guard = shared.flows.insert_checked(flow, Some(check));
    let config = relay::RelayConfig {
        // The dialing agent leaves the first FIN, and with it the TIME_WAIT socket, to the
        // peer agent (see the field).
        peer_fin_first: hold_reset,
        ..relay_config(shared)
    };
    let socks = dups([&app, &peer]);
    let stats = Arc::clone(&guard.stats);
    // `map_err` rather than an async block, which would hold the boxed relay twice (its
    // capture and the awaited copy) in state that lives as long as the flow.
    let relay = relay::relay(app, peer, est, layer, config, stats).map_err(anyhow::Error::from);
    Ok(relaying(guard, socks, hold_reset, relay))
}

/// Plaintext passthrough (non-mesh destination, or plaintext a policy allows), under the idle
/// timeout like every other flow; `a` is the side whose bytes count as app → peer.
pub(super) fn plain(
    shared: &Shared,
    a: TcpStream,
    b: TcpStream,
    guard: &FlowGuard<'_>,
) -> impl Future<Output = anyhow::Result<()>> + Send + 'static {
    let relay = relay::relay_plain(a, b, relay_config(shared), Arc::clone(&guard.stats));
    async move { Ok(relay.await?) }
}

/// Continues a kTLS flow parked by a predecessor agent (`handed_over`) or parked here for a
/// successor that could not take it: listed again, its relay resumed in a task of its own.
/// The caller decided the flow under policy generation `decided_by`; a generation applied
/// since then revalidated the table without this flow, so it is decided again here, and a
/// refused flow is reset (both sockets), counted `closed.<code>` and handover `refused`.
pub fn adopt_parked(
    shared: &Arc<Shared>,
    runtime: &tokio::runtime::Handle,
    info: FlowInfo,
    check: FlowCheck,
    parked: relay::ParkedKtls,
    handed_over: bool,
    decided_by: u64,
) {
    let live = super::Live::count(shared);
    let shared = Arc::clone(shared);
    let hold_reset = info.direction == Direction::Outbound;
    let config = relay::RelayConfig {
        peer_fin_first: parked.state.peer_fin_first,
        ..relay_config(&shared)
    };
    runtime.spawn(async move {
        if let Err(refused) = admitted_now(&shared, decided_by, &check) {
            let by = format!("policy generation {}", shared.policy.current().number);
            super::flow::closed(&shared, &Ends::of(&check, &info.pod), &by, &refused);
            shared.telemetry.handover_flows("refused", 1);
            let _ = crate::sys::set_zero_linger(parked.app.as_fd());
            let _ = crate::sys::set_zero_linger(parked.peer.as_fd());
            drop(live);
            return;
        }
        let socks: Vec<OwnedFd> = [parked.app.as_fd(), parked.peer.as_fd()]
            .iter()
            .filter_map(|s| s.try_clone_to_owned().ok())
            .collect();
        let guard = if handed_over {
            shared.flows.insert_handed_over(info, Some(check))
        } else {
            shared.flows.insert_checked(info, Some(check))
        };
        let stats = Arc::clone(&guard.stats);
        let relay = relay::resume_ktls(parked, config, stats);
        let _ = relaying(guard, socks, hold_reset, async move { Ok(relay.await?) }).await;
        drop(live);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::table::FlowTable;

    /// A relay's state lives as long as its flow, idle or not: the wait only a failed flow
    /// makes ([`await_request`], a timer and a readiness future) is boxed, so the state holds
    /// the row's guard, the descriptors and the cancellation wait. (With the wait inline
    /// this future was 424 bytes in a debug build, 288 without.)
    #[test]
    fn a_relays_state_around_the_record_layer_stays_small() {
        let table = FlowTable::default();
        let guard = table.insert(FlowInfo {
            pod: "web".into(),
            direction: Direction::Outbound,
            destination: "10.88.0.3:80".parse().unwrap(),
            source: "10.88.0.2:40000".parse().unwrap(),
            peer_id: None,
            cipher: None,
            session: None,
            protection: Protection::Userspace,
            endpoint: None,
            reason: None,
        });
        let relay = relaying(guard, Vec::new(), true, async { Ok(()) });
        let size = std::mem::size_of_val(&*relay);
        assert!(size <= 320, "the relaying future is {size} bytes");
    }
}
