//! A connection to an enrolled pod's address, delivered by sk_lookup: classify its first
//! bytes, then terminate mesh mTLS ([`mesh`]) or pass plaintext ([`plaintext`]) as policy
//! decides, and hand it to the app through a connection from the agent's own source address.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::TcpStream,
};
use tracing::debug;

use super::{
    Shared,
    enforce::{Generation, Refused},
    flow::{Ends, Refusal, Stop, crypto_refuses, handshake_refused},
    handoff::{Relay, mesh_mode, plain, prepare_peer, relay_mesh, relaying},
    peek::{self, FirstBytes},
    pod::{PodCtx, agent_source, dial},
    revalidate::admitted_now,
    table::{Direction, FlowCheck, FlowInfo, InboundCheck, Protection, SessionCrypto},
};
use crate::{
    ca::renew::HoldsLeaf as _,
    config::ConnectionKeysMode,
    handshake::{Negotiated, derived, driver, spare},
    identity::SpiffeId,
    sys, telemetry,
};

/// What both set-ups know of the flow.
struct Inbound<'c> {
    ctx: &'c PodCtx,
    /// The client.
    source: SocketAddr,
    /// What the client dialed: a pod address and port.
    destination: SocketAddr,
    /// The agent's address toward the app (sk_lookup never steers it).
    app_source: IpAddr,
    flow: FlowInfo,
}

impl Inbound<'_> {
    /// Refuses the client's connection (reset).
    fn refuse(&self, client: TcpStream, refused: Refused) -> Stop {
        self.refuse_from(None, client, refused)
    }

    /// Refuses the client's connection (reset), naming its verified identity.
    fn refuse_from(&self, peer: Option<&SpiffeId>, client: TcpStream, refused: Refused) -> Stop {
        let ends = Ends::inbound(self.ctx, self.source, self.destination, peer);
        Refusal::new(ends, refused).reset(client).into()
    }
}

/// Sets up an inbound flow: classifies it, handshakes or not per policy, dials the app.
/// Returns the relay to run, or why there is none.
pub(super) async fn inbound<'a>(
    shared: &'a Shared,
    ctx: &PodCtx,
    client: TcpStream,
    source: SocketAddr,
) -> Result<Relay<'a>, Stop> {
    // sk_lookup delivered the connection unchanged: our local address is what the client dialed.
    let dst = client.local_addr()?;
    let generation = shared.policy.current();
    let tls_wait = Duration::from_millis(shared.tuning.handshake_timeout_ms);
    let wait = if generation.requires_mtls(source, dst) {
        tls_wait
    } else {
        Duration::from_millis(shared.tuning.first_byte_wait_ms)
    };
    let kind = classify(&client, wait, tls_wait).await?;
    let inbound = Inbound {
        ctx,
        source,
        destination: dst,
        app_source: agent_source(dst.is_ipv6()),
        flow: FlowInfo {
            pod: Arc::clone(&ctx.name),
            direction: Direction::Inbound,
            destination: dst,
            source,
            peer_id: None,
            cipher: None,
            session: None,
            protection: Protection::Plaintext,
            endpoint: None,
            reason: None,
        },
    };
    match kind {
        FirstBytes::Mesh => mesh(shared, inbound, generation, client).await,
        FirstBytes::Derived => derived(shared, inbound, generation, client).await,
        FirstBytes::Other | FirstBytes::NeedMore => {
            plaintext(shared, inbound, generation, client).await
        }
    }
}

/// Terminates mesh mTLS (the client's agent must present a certificate of this trust
/// domain), decides the verified client identity under policy, and dials the app.
async fn mesh<'a>(
    shared: &'a Shared,
    mut inbound: Inbound<'_>,
    mut generation: Arc<Generation>,
    mut client: TcpStream,
) -> Result<Relay<'a>, Stop> {
    let (ctx, source, dst) = (inbound.ctx, inbound.source, inbound.destination);
    if let Some(refused) = generation.refuses_mtls(dst) {
        return Err(inbound.refuse(client, refused));
    }
    let me = shared.credentials(&ctx.id)?;
    prepare_peer(shared, &client);
    // Registered before this agent answers, so before the client's agent can hold the root
    // this handshake may leave: a header naming it that overtakes this task waits for it
    // (`derived::Store::expect_root`). Settled when dropped, on every path out of here.
    let mut root_expected = (shared.tuning.connection_keys == ConnectionKeysMode::Derived)
        .then(|| me.derived().expect_root());
    let started = Instant::now();
    let mut est = match driver::server_handshake_with(
        &mut client,
        Arc::clone(me.server()),
        Duration::from_millis(shared.tuning.handshake_timeout_ms),
        shared.handshake_reads(),
    )
    .await
    {
        Ok(est) => {
            shared.telemetry.handshake_done(
                telemetry::Direction::Inbound,
                mesh_mode(shared),
                &ctx.name,
                started.elapsed(),
            );
            est
        }
        Err(e) => return Err(inbound.refuse(client, handshake_refused(shared, &e))),
    };
    let peer = est.peer().clone();
    if let Some(refused) = crypto_refuses(shared, &est.negotiated) {
        return Err(inbound.refuse_from(Some(&peer), client, refused));
    }
    if est.negotiated.spare {
        // The client's agent keeps no root from a spare (`outbound::mesh`), so neither does
        // this one: it would only fill the store.
        root_expected = None;
        // Opened ahead by the client's agent: nothing is decided until it is claimed, and
        // then under the policy of that moment.
        let wait =
            Duration::from_millis(shared.tuning.spare_idle_ms + shared.tuning.handshake_timeout_ms);
        drop(generation);
        if spare::await_claim(&mut client, &mut est, wait)
            .await
            .is_err()
        {
            shared.counters.spare(super::SpareOutcome::Unclaimed);
            return Err(Stop::Unclaimed);
        }
        shared.counters.spare(super::SpareOutcome::Claimed);
        generation = shared.policy.current();
        if let Some(refused) = generation.refuses_mtls(dst) {
            return Err(inbound.refuse_from(Some(&peer), client, refused));
        }
    }
    match generation.inbound(source, dst, Some(&peer)) {
        Ok(code) => inbound.flow.reason = Some(code.into()),
        Err(refused) => return Err(inbound.refuse_from(Some(&peer), client, refused)),
    }
    let decided_by = generation.number;
    drop(generation);
    if let Some(expected) = root_expected
        && let Some((root, binding)) = est.derived_root(
            decided_by,
            shared.tuning.derived_root_lifetime(),
            shared.tuning.derived_root_max_connections,
            me.leaf().not_after(),
        )
    {
        expected.keep(root, binding);
        shared.derived(super::DerivedOutcome::Kept);
    }
    relay_decided(shared, inbound, peer, est, decided_by, client, None).await
}

/// What both mesh set-ups do once the peer's identity is decided: list the flow's session,
/// dial the app, write the access line, start the relay. `established_within`: how long a
/// derived connection's server may wait for its Fast Open connection to be established
/// before a kernel hand-off (see [`established`]); a handshake has waited for it already.
async fn relay_decided<'a>(
    shared: &'a Shared,
    mut inbound: Inbound<'_>,
    peer: SpiffeId,
    est: driver::Established,
    decided_by: u64,
    client: TcpStream,
    established_within: Option<Duration>,
) -> Result<Relay<'a>, Stop> {
    let (ctx, source, dst) = (inbound.ctx, inbound.source, inbound.destination);
    inbound.flow.peer_id = Some(peer.clone());
    inbound.flow.cipher = Some(super::table::suite_name(est.negotiated.suite.suite()));
    let session = SessionCrypto::mesh(&est.negotiated);
    inbound.flow.session = Some(session);
    let app = dial(ctx, dst, Some(inbound.app_source)).await?;
    if let Some(limit) = established_within
        && matches!(shared.offload, super::Offload::Kernel(_))
    {
        established(&client, limit).await;
    }
    debug!(
        target: "interceptor::access",
        pod = %ctx.name, %source, %peer, cipher = ?session.suite,
        group = session.group_label().as_deref().unwrap_or("-"),
        resumed = session.resumed, derived = est.negotiated.derived,
        "inbound mTLS"
    );
    let check = FlowCheck::Inbound(InboundCheck {
        source,
        destination: dst,
        peer: Some(peer),
    });
    relay_mesh(shared, inbound.flow, check, decided_by, app, client, est)
}

/// A connection on keys derived from an earlier mesh session (`handshake::derived`): its
/// header names the session's root and a fresh counter; a header this agent does not take
/// (unknown root, expired, replayed, a policy reload since, a bad MAC) is reset and the
/// client's agent dials again with a handshake. Policy decides the identity the root's
/// handshake verified, as for a resumed session. The acceptance goes out before the app is
/// dialed, so the client's first bytes travel while this agent dials. The client's agent may
/// have sent the app's first records behind the header already (0-RTT): only the header is
/// read here, so a refused header is reset with them unread and no app ever sees them (the
/// client sends them again on a handshake), and an accepted one leaves them on the socket as
/// the connection's records from 0 for the relay or the kernel.
async fn derived<'a>(
    shared: &'a Shared,
    mut inbound: Inbound<'_>,
    generation: Arc<Generation>,
    mut client: TcpStream,
) -> Result<Relay<'a>, Stop> {
    let (ctx, source, dst) = (inbound.ctx, inbound.source, inbound.destination);
    if let Some(refused) = generation.refuses_mtls(dst) {
        return Err(inbound.refuse(client, refused));
    }
    let me = shared.credentials(&ctx.id)?;
    prepare_peer(shared, &client);
    let mut header = [0u8; derived::HEADER_LEN];
    let wait = Duration::from_millis(shared.tuning.handshake_timeout_ms);
    let accepted = match tokio::time::timeout(wait, client.read_exact(&mut header)).await {
        // An unknown root may be one a handshake under way here is about to keep: its
        // client's agent kept it first (`derived::Store::expect_root`).
        Ok(Ok(_)) => {
            let (accepted, waited) = me
                .derived()
                .accept_after_handshakes(&header, generation.number, wait)
                .await;
            if waited && accepted.is_ok() {
                shared.derived(super::DerivedOutcome::Awaited);
            }
            accepted
        }
        _ => Err(derived::Refused::Malformed),
    };
    let accepted = match accepted {
        Ok(accepted) => accepted,
        Err(refused) => {
            shared.derived(refused.into());
            debug!(pod = %ctx.name, %source, reason = %refused, "derived connection declined");
            super::flow::reset(client);
            return Err(Stop::Declined);
        }
    };
    let peer = accepted.peer;
    let negotiated = Negotiated {
        peer: peer.clone(),
        suite: accepted.suite,
        group: accepted.group,
        retried: false,
        resumed: true,
        spare: false,
        derived: true,
    };
    if let Some(refused) = crypto_refuses(shared, &negotiated) {
        return Err(inbound.refuse_from(Some(&peer), client, refused));
    }
    match generation.inbound(source, dst, Some(&peer)) {
        Ok(code) => inbound.flow.reason = Some(code.into()),
        Err(refused) => return Err(inbound.refuse_from(Some(&peer), client, refused)),
    }
    let decided_by = generation.number;
    drop(generation);
    client.write_all(&accepted.keys.accept).await?;
    shared.derived(super::DerivedOutcome::Accepted);
    let est = driver::Established::derived(negotiated, accepted.keys.secrets(false), false);
    relay_decided(shared, inbound, peer, est, decided_by, client, Some(wait)).await
}

/// Waits (at most `limit`) until a Fast Open connection accepted with its header in the SYN
/// is established. A handshake's server waits for the client's Finished, a round trip after
/// its SYN-ACK; a derived connection's server has nothing to wait for, and may reach the
/// kernel hand-off before the client's ACK of the SYN-ACK, while the kernel still refuses
/// the `tls` ULP (the flow would stay in userspace). No readiness event marks that ACK:
/// `tcp_poll` already reports a Fast Open child writable in SYN_RECV, the client may not send
/// data before its app does (so no EPOLLIN either), and sockops' state callback would need a
/// notification from the kernel for every connection. So the state is read once, after the app
/// is dialed (a loopback connect, about as long as the ACK needs on the agents' link), and
/// only while it is still SYN_RECV again every millisecond, at most `limit`.
async fn established(client: &TcpStream, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while sys::syn_received(client.as_fd()).unwrap_or(false)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Plaintext (or bytes that are not a mesh ClientHello, or silence), let through only where
/// policy allows it.
async fn plaintext<'a>(
    shared: &'a Shared,
    mut inbound: Inbound<'_>,
    generation: Arc<Generation>,
    client: TcpStream,
) -> Result<Relay<'a>, Stop> {
    let (ctx, source, dst) = (inbound.ctx, inbound.source, inbound.destination);
    match generation.inbound(source, dst, None) {
        Ok(code) => inbound.flow.reason = Some(code.into()),
        Err(refused) => return Err(inbound.refuse(client, refused)),
    }
    let decided_by = generation.number;
    drop(generation);
    let app = dial(ctx, dst, Some(inbound.app_source)).await?;
    let check = FlowCheck::Inbound(InboundCheck {
        source,
        destination: dst,
        peer: None,
    });
    if let Err(refused) = admitted_now(shared, decided_by, &check) {
        let ends = Ends::of(&check, &ctx.name);
        return Err(Refusal::new(ends, refused).reset(client).reset(app).into());
    }
    let guard = shared.flows.insert_checked(inbound.flow, Some(check));
    let relay = plain(shared, client, app, &guard);
    Ok(relaying(guard, relay))
}

/// Waits for the client's first bytes (at most `wait` for a silent, server-speaks-first
/// client) and classifies them without consuming anything. A client that has started a TLS
/// handshake record is not server-speaks-first: the rest of that record is awaited until
/// `tls_wait` (the handshake timeout) after the start. That matters to mesh clients: a
/// ClientHello with a post-quantum key share is larger than a SYN can carry, so a Fast Open
/// SYN brings its first part and the rest follows the handshake; only the first part is sure
/// to be queued when the connection is accepted.
///
/// Readiness-driven: the socket is peeked when the kernel reports new bytes, never on a
/// clock, so a stalled client costs nothing until its deadline. (A peek that finds only the
/// bytes already seen reports `WouldBlock` to tokio, which then waits for the next readiness
/// event: new data, FIN or RST.)
async fn classify(
    client: &TcpStream,
    wait: Duration,
    tls_wait: Duration,
) -> anyhow::Result<FirstBytes> {
    let mut buf = vec![0u8; peek::MAX_PEEK];
    let started = tokio::time::Instant::now();
    let mut deadline = started + wait;
    loop {
        let ready = match tokio::time::timeout_at(deadline, client.ready(Interest::READABLE)).await
        {
            Ok(r) => r?,
            // Silence, or a ClientHello that never completes: plaintext (a policy that
            // requires mTLS refuses it).
            Err(_) => return Ok(FirstBytes::Other),
        };
        let mut tls_started = false;
        let peeked = client.try_io(Interest::READABLE, || {
            let n = sys::peek(client.as_fd(), &mut buf)?;
            if n == 0 {
                return Ok(FirstBytes::Other);
            }
            match peek::classify(&buf[..n]) {
                FirstBytes::NeedMore if n < buf.len() => {
                    tls_started = true;
                    Err(std::io::ErrorKind::WouldBlock.into())
                }
                FirstBytes::NeedMore => Ok(FirstBytes::Other),
                decided => Ok(decided),
            }
        });
        if tls_started {
            deadline = deadline.max(started + tls_wait);
        }
        match peeked {
            Ok(kind) => return Ok(kind),
            // The client half-closed inside a ClientHello: no more bytes will come.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                return Ok(FirstBytes::Other);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;
    use crate::{intercept::peek::tests::mesh_client_hello, test_tls::tcp_pair};

    /// A ClientHello whose first part is queued at once and whose rest comes later (a Fast
    /// Open SYN carries only the first ~1 400 bytes) is mesh even with no first-byte wait;
    /// silence and plaintext are still decided by that wait.
    #[tokio::test]
    async fn a_started_client_hello_is_awaited_past_the_first_byte_wait() {
        let hello = mesh_client_hello();
        let (mut c, s) = tcp_pair().await;
        c.write_all(&hello[..hello.len() / 2]).await.unwrap();
        let rest = hello[hello.len() / 2..].to_vec();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.write_all(&rest).await.unwrap();
            c
        });
        let kind = classify(&s, Duration::ZERO, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(kind, FirstBytes::Mesh);
        drop(late.await.unwrap());

        let (_silent, s) = tcp_pair().await;
        let started = std::time::Instant::now();
        let kind = classify(&s, Duration::from_millis(50), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(kind, FirstBytes::Other);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "silence waited for the TLS bound"
        );

        let (mut c, s) = tcp_pair().await;
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let kind = classify(&s, Duration::ZERO, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(kind, FirstBytes::Other);
    }
}
