//! Hands an established flow to its relay: lists it in the flow table (after deciding it
//! again if the policy changed during set-up) and starts the relay that fits its transport
//! (kTLS or userspace for mesh mTLS, userspace for originated TLS, plain splice otherwise),
//! cancellable by a later policy change.

use std::{future::Future, os::fd::AsFd as _, pin::Pin, sync::Arc, time::Duration};

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

/// Runs a relay until it ends. A flow its policy check no longer allows (see `revalidate`)
/// is cancelled through its relay, which resets both connections at its next poll and ends
/// (the relay owns the flow's only descriptors of its sockets); an upgrade asking the flow to
/// park is passed to the relay the same way: the kernel relay then ends with its state in
/// `stats`.
async fn cancellable(
    cancel: &Cancel,
    stats: &relay::RelayStats,
    relay: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::pin!(relay);
    loop {
        tokio::select! {
            r = &mut relay => {
                // A cancelled relay reset its sockets, whatever else it ran into; `revalidate`
                // logged and counted the flow.
                return if cancel.is_fired() { Ok(()) } else { r };
            }
            () = cancel.fired() => {
                if cancel.is_fired() {
                    stats.cancel();
                } else if cancel.parking() {
                    stats.request_park();
                }
            }
        }
    }
}

/// The second phase of a flow: its relay, owning the sockets, the session and the flow-table
/// row, and nothing else of the set-up.
pub(super) type Relay<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// A listed flow's relay, cancellable through its row (see [`cancellable`]).
pub(super) fn relaying<'a>(
    mut guard: FlowGuard<'a>,
    relay: impl Future<Output = anyhow::Result<()>> + Send + 'a,
) -> Relay<'a> {
    Box::pin(async move {
        let result = cancellable(&guard.cancel, &guard.stats, relay).await;
        if result.is_ok()
            && let Some(parked) = guard.stats.take_parked()
        {
            match guard.cancel.parked(parked) {
                Ok(()) => guard.ended(Outcome::HandedOver, None),
                Err(parked) => {
                    // Parked for a successor that is gone: its sockets close with `parked`,
                    // reset, never a clean end the app could trust.
                    let _ = crate::sys::set_zero_linger(parked.app.as_fd());
                    let _ = crate::sys::set_zero_linger(parked.peer.as_fd());
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
        result
    })
}

/// The name a failed flow is counted by: the relay's own, `other` for anything else.
fn failure_name(e: &anyhow::Error) -> &'static str {
    e.downcast_ref::<relay::RelayError>()
        .map_or("other", relay::RelayError::reason)
}

pub(super) fn relay_config(shared: &Shared) -> relay::RelayConfig {
    relay::RelayConfig {
        idle_timeout: Duration::from_secs(shared.tuning.idle_timeout_secs),
        app_leg_redirected: shared.tuning.sk_msg_local_leg,
        busy_poll: Duration::from_micros(shared.tuning.relay_busy_poll_us.into()),
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
    // The dialing agent leaves the first FIN, and with it the TIME_WAIT socket, to the peer
    // agent (see the field).
    let peer_fin_first = flow.direction == Direction::Outbound;
    let config = mesh_relay_config(shared, flow.direction, peer_fin_first);
    let guard = shared.flows.insert_checked(flow, Some(check));
    let stats = Arc::clone(&guard.stats);
    // `map_err` rather than an async block, which would hold the boxed relay twice (its
    // capture and the awaited copy) in state that lives as long as the flow.
    let join = (shared.tuning.relay_app_leg == crate::config::RelayAppLeg::SkMsg)
        .then(|| shared.join_maps())
        .flatten();
    let relay = relay::relay_joining(app, peer, est, layer, config, stats, join)
        .map_err(anyhow::Error::from);
    Ok(relaying(guard, relay))
}

/// The relay settings of a mesh flow, new or adopted, so both derive the held reset from the
/// direction alike: only a flow this node dialed holds a failed flow's reset until the app's
/// request (see the field), as its app is the client that would otherwise see a failed
/// connect; on the serving side the app does not speak first.
fn mesh_relay_config(
    shared: &Shared,
    direction: Direction,
    peer_fin_first: bool,
) -> relay::RelayConfig {
    relay::RelayConfig {
        peer_fin_first,
        reset_after_request: (direction == Direction::Outbound).then_some(REFUSE_WAIT),
        ..relay_config(shared)
    }
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
    let config = mesh_relay_config(&shared, info.direction, parked.state.peer_fin_first);
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
        let guard = if handed_over {
            shared.flows.insert_handed_over(info, Some(check))
        } else {
            shared.flows.insert_checked(info, Some(check))
        };
        let stats = Arc::clone(&guard.stats);
        let relay = relay::resume_ktls(parked, config, stats);
        let _ = relaying(guard, async move { Ok(relay.await?) }).await;
        drop(live);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::table::FlowTable;

    fn info() -> FlowInfo {
        FlowInfo {
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
        }
    }

    /// A relay's state lives as long as its flow, idle or not: it holds the row's guard and
    /// the cancellation wait, and no descriptors of its own. (With a failed flow's wait for
    /// the app's request inline this future was 424 bytes in a debug build, 288 without;
    /// the relay does that wait now, boxed.)
    #[test]
    fn a_relays_state_around_the_record_layer_stays_small() {
        let table = FlowTable::default();
        let guard = table.insert(info());
        let relay = relaying(guard, async { Ok(()) });
        let size = std::mem::size_of_val(&*relay);
        assert!(size <= 320, "the relaying future is {size} bytes");
    }

    /// How many of this process's descriptors refer to the socket behind `fd`.
    fn descriptors_of(fd: std::os::fd::BorrowedFd<'_>) -> usize {
        use std::os::fd::AsRawFd as _;
        let target = |fd: &str| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
        let me = target(&fd.as_raw_fd().to_string()).unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| target(&e.file_name().to_string_lossy()).as_ref() == Some(&me))
            .count()
    }

    /// A flow end holds its two sockets and nothing else: a cancelled flow is reset by its
    /// relay, not through second descriptors kept aside, and both far ends see the reset.
    /// (With duplicates each socket had two descriptors: 4 per flow end, 8 per connection
    /// through two agents, and 10 000 idle connections ran out of them.)
    #[tokio::test]
    async fn a_cancelled_flow_is_reset_by_its_relay_holding_one_descriptor_per_socket() {
        use tokio::io::AsyncReadExt as _;
        let (mut app_far, app) = crate::test_tls::tcp_pair().await;
        let (peer, mut peer_far) = crate::test_tls::tcp_pair().await;
        // The flow's task borrows the table, as the agent's do (its table lives as long).
        let table: &'static FlowTable = Box::leak(Box::default());
        let guard = table.insert(info());
        let (cancel, stats) = (Arc::clone(&guard.cancel), Arc::clone(&guard.stats));
        let (app_fd, peer_fd) = (app.as_fd().try_clone_to_owned().unwrap(), peer.as_fd());
        let peer_fd = peer_fd.try_clone_to_owned().unwrap();
        let relay = relay::relay_plain(app, peer, relay::RelayConfig::default(), stats);
        let flow = tokio::spawn(relaying(guard, async move { Ok(relay.await?) }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Our own probes are one descriptor each; the flow holds one per socket.
        assert_eq!(descriptors_of(app_fd.as_fd()), 2, "app socket");
        assert_eq!(descriptors_of(peer_fd.as_fd()), 2, "peer socket");
        drop((app_fd, peer_fd));
        assert!(cancel.fire_because(crate::refusal::RefusalCode::DenyRule));
        tokio::time::timeout(Duration::from_secs(5), flow)
            .await
            .expect("the cancelled relay ends")
            .unwrap()
            .unwrap();
        for far in [&mut app_far, &mut peer_far] {
            let mut byte = [0u8; 1];
            let read = far.read(&mut byte).await;
            assert_eq!(
                read.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionReset),
                "a cancelled flow resets, never ends cleanly"
            );
        }
        let closed = table.rows_with_recent();
        assert!(closed.iter().all(|r| r.closed), "{closed:?}");
    }
}
