//! An app's outbound connection: find its original destination, decide it under the current
//! policy generation, dial the endpoint from inside the pod, then one set-up per transport
//! ([`plaintext`], [`mesh`] mTLS handed to kTLS or kept in rustls, [`originate`] TLS).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{ClientConfig, pki_types::ServerName};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    Offload, Shared,
    enforce::{self, Plan, Refused, Transport},
    flow::{Ends, Refusal, Stop, crypto_refuses, handshake_refused, reset},
    handoff::{Relay, mesh_mode, plain, prepare_peer, relay_config, relay_mesh, relaying},
    local, originate,
    pod::{CONNECT_TIMEOUT, MeshDial, PodCtx, dial, dial_mesh, pod_ip},
    revalidate::admitted_now,
    spare,
    table::{Direction, FlowCheck, FlowInfo, OutboundCheck, Protection, SessionCrypto},
};
use crate::{
    ca::renew::HoldsLeaf as _,
    config::ConnectionKeysMode,
    handshake::{self, derived, driver},
    identity::SpiffeId,
    policy::TlsMode,
    refusal::RefusalCode,
    telemetry,
};

/// What every transport's set-up knows of the flow.
pub(super) struct Outbound<'c> {
    pub(super) ctx: &'c PodCtx,
    /// The pod's address and the app's port: the source policy decides on.
    pub(super) source: SocketAddr,
    pub(super) destination: SocketAddr,
    pub(super) endpoint: SocketAddr,
    /// The generation that decided the flow.
    pub(super) decided_by: u64,
    check: FlowCheck,
    pub(super) flow: FlowInfo,
}

impl Outbound<'_> {
    /// A refusal of this flow, expecting `server` at the endpoint.
    pub(super) fn refusal(&self, server: Option<&SpiffeId>, refused: Refused) -> Refusal {
        Refusal::new(
            Ends::outbound(
                self.ctx,
                self.source,
                self.destination,
                Some(self.endpoint),
                server,
            ),
            refused,
        )
    }
}

/// Sets up an outbound flow: decides it, dials, handshakes. Returns the relay to run, or why
/// there is none.
pub(super) async fn outbound<'a>(
    shared: &'a Arc<Shared>,
    ctx: &Arc<PodCtx>,
    app: TcpStream,
    app_addr: SocketAddr,
) -> Result<Relay<'a>, Stop> {
    let Some(dst) = shared
        .datapath()
        .original_destination(ctx.netns_cookie, app_addr)
    else {
        reset(app);
        return Err(anyhow::anyhow!("no original destination recorded for this connection").into());
    };
    let generation = shared.policy.current();
    let source = SocketAddr::new(pod_ip(ctx, dst.is_ipv6()), app_addr.port());
    let plan = match generation.outbound(source.ip(), dst) {
        Ok(plan) => plan,
        Err(refused) => {
            let ends = Ends::outbound(ctx, source, dst, None, None);
            return Err(Refusal::new(ends, refused).answer_app(app).into());
        }
    };
    let decided_by = generation.number;
    // Decided under the same generation as the plan: the server's half of a same-node flow.
    let local = local::candidate(shared, &generation, ctx, source, &plan);
    drop(generation);
    let Plan {
        endpoint,
        transport,
        reason,
    } = plan;
    let Some(tls) = transport.to_flow() else {
        let ends = Ends::outbound(ctx, source, dst, Some(endpoint), None);
        let refusal = Refusal::new(ends, enforce::mesh_identity_unknown());
        return Err(refusal.answer_app(app).into());
    };
    let out = Outbound {
        ctx,
        source,
        destination: dst,
        endpoint,
        decided_by,
        check: FlowCheck::Outbound(OutboundCheck {
            source,
            destination: dst,
            endpoint,
            client: ctx.id.clone(),
            tls,
        }),
        flow: FlowInfo {
            pod: Arc::clone(&ctx.name),
            direction: Direction::Outbound,
            destination: dst,
            source: app_addr,
            peer_id: None,
            cipher: None,
            session: None,
            protection: Protection::Plaintext,
            endpoint: Some(endpoint),
            reason: Some(reason.into()),
        },
    };
    // Only ever a mesh flow to a pod of this agent (see `local::candidate`).
    if let Some(local) = local {
        return local::relay(shared, out, local, app).await;
    }
    match transport {
        Transport::Plaintext => {
            let (app, peer) = dial_endpoint(&out, None, app).await?;
            plaintext(shared, out, app, peer)
        }
        Transport::Mesh(None) => unreachable!("refused above"),
        Transport::Mesh(Some(expected)) => mesh(shared, ctx, out, expected, app).await,
        Transport::Originate {
            config, name, mode, ..
        } => {
            let (app, peer) = dial_endpoint(&out, None, app).await?;
            originate(shared, out, (config, name, mode), app, peer).await
        }
    }
}

/// Dials the flow's endpoint from inside the pod; refuses the app's connection
/// (`connect_failed`) if that fails. Returns the app's connection and the peer.
async fn dial_endpoint(
    out: &Outbound<'_>,
    server: Option<&SpiffeId>,
    app: TcpStream,
) -> Result<(TcpStream, TcpStream), Stop> {
    match dial(out.ctx, out.endpoint, None).await {
        Ok(peer) => Ok((app, peer)),
        Err(e) => {
            let refused = Refused {
                code: RefusalCode::ConnectFailed,
                reason: format!("{e:#}"),
            };
            Err(out.refusal(server, refused).answer_app(app).into())
        }
    }
}

/// Plaintext to a destination outside the mesh (or where policy allows plaintext).
fn plaintext<'a>(
    shared: &'a Shared,
    out: Outbound<'_>,
    app: TcpStream,
    peer: TcpStream,
) -> Result<Relay<'a>, Stop> {
    if let Err(refused) = admitted_now(shared, out.decided_by, &out.check) {
        let ends = Ends::of(&out.check, &out.ctx.name);
        return Err(Refusal::new(ends, refused)
            .answer_app(app)
            .reset(peer)
            .into());
    }
    let guard = shared.flows.insert_checked(out.flow, Some(out.check));
    let relay = plain(shared, app, peer, &guard);
    Ok(relaying(guard, relay))
}

/// Mesh mTLS to the agent of the server pod, which must present `expected`; the session
/// then goes to kTLS, or stays in rustls (see [`relay_mesh`]).
async fn mesh<'a>(
    shared: &'a Arc<Shared>,
    pod: &Arc<PodCtx>,
    out: Outbound<'_>,
    expected: SpiffeId,
    app: TcpStream,
) -> Result<Relay<'a>, Stop> {
    let me = shared.credentials(&out.ctx.id)?;
    let derived_keys = shared.tuning.connection_keys == ConnectionKeysMode::Derived;
    let server_ip = out.endpoint.ip();
    let mut tickets_stale = false;
    // The app's first bytes, taken to ride behind a derived header (0-RTT) and kept until
    // the server accepts it; after a refusal they open the handshake's session instead.
    let mut early = Vec::new();
    if derived_keys && let Some(offer) = me.derived().offer(server_ip, &expected, out.decided_by) {
        shared.derived(super::DerivedOutcome::Offered);
        let first = offer.first;
        let negotiated = handshake::Negotiated {
            peer: offer.peer,
            suite: offer.suite,
            group: offer.group,
            retried: false,
            resumed: true,
            spare: false,
            derived: true,
        };
        // Nothing of the app's leaves on keys this node's crypto policy refuses (the flow is
        // refused in `established` as before).
        let app_first = crypto_refuses(shared, &negotiated)
            .is_none()
            .then_some(&app);
        match dial_derived(shared, &out, &offer.keys, app_first, &mut early).await {
            Ok((peer, sent)) => {
                shared.derived(super::DerivedOutcome::Used);
                // Once per root, not per connection (a lock on the hot path): the record is
                // dropped only by a refused first use, after which the next acceptance is
                // again a first use.
                if first {
                    me.derived().accepted(server_ip);
                }
                if sent > 0 {
                    shared.derived(super::DerivedOutcome::Early);
                }
                drop(early);
                let secrets = offer.keys.secrets_after(true, sent);
                let est = driver::Established::derived(negotiated, secrets, true);
                return established(shared, out, &expected, app, peer, est, &[]).await;
            }
            // Refused (the server agent restarted, its policy changed, it keeps no roots):
            // the root goes and the flow dials with a handshake, which leaves a new one.
            Err(Declined::Refused(peer)) => {
                debug!(pod = %out.ctx.name, peer = %out.endpoint, "derived keys declined; handshake");
                shared.derived(super::DerivedOutcome::Fallback);
                reset(peer);
                me.derived()
                    .refused(server_ip, first, shared.tuning.ticket_lifetime());
                // What retired a used root (a restart, a policy reload, its age) retired the
                // tickets from the same time too: a resumed offer would be declined and cost
                // one more connection.
                tickets_stale = !first;
            }
            // Not reached at all: the handshake's dial reports it.
            Err(Declined::Unreached) => shared.derived(super::DerivedOutcome::Fallback),
            // The app's bytes went out and no answer came: the server's agent may have
            // accepted and delivered them, so they are never sent again; the app's
            // connection fails instead (see ARCHITECTURE.md "Early data").
            Err(Declined::Silent(peer)) => {
                shared.derived(super::DerivedOutcome::EarlyUnknown);
                reset(peer);
                reset(app);
                return Err(anyhow::anyhow!(
                    "no answer from {} to a derived header within the handshake timeout, with \
                     the app's first {} bytes behind it: reset rather than risk a second delivery",
                    out.endpoint,
                    early.len()
                )
                .into());
            }
        }
    }
    if let Some(mut s) = spare::take(shared, pod, &expected, out.endpoint, &me, out.decided_by) {
        match handshake::spare::claim(&mut s.sock, &mut s.est).await {
            Ok(()) => {
                shared.counters.spare(super::SpareOutcome::Used);
                return established(shared, out, &expected, app, s.sock, s.est, &early).await;
            }
            // Gone between the check and the claim: the app still gets a fresh dial.
            Err(_) => {
                shared.counters.spare(super::SpareOutcome::Dead);
                reset(s.sock);
            }
        }
    }
    let client = me.mesh_client(&expected).map_err(anyhow::Error::from)?;
    let name = rustls_pki_types::ServerName::IpAddress(out.endpoint.ip().into());
    let mut offer = if tickets_stale {
        client.declined(&name)
    } else {
        client.offer(&name)
    };
    // A root needs the handshake's exporter (the buffered client); a server known to keep
    // none gets the client that keeps its tickets on a kTLS node (see `dial_handshake`).
    let wants_root = derived_keys && me.derived().wants_client_root(server_ip);
    let (peer, est) = loop {
        let config = Arc::clone(&offer.config);
        match dial_handshake(shared, &out, config, name.clone(), wants_root).await {
            // The server declined the ticket (restarted, or its policy changed since): the
            // session is a full handshake on the resumed offer's x25519. Full handshakes stay
            // hybrid, so it carries nothing and the flow dials again with the full offer.
            Ok((peer, est)) if offer.resuming && !est.negotiated.resumed && !hybrid(&est) => {
                debug!(pod = %out.ctx.name, peer = %out.endpoint, "ticket declined; full handshake");
                shared.ticket_declined();
                reset(peer);
                offer = client.declined(&name);
            }
            Ok(done) => break done,
            Err((refused, peer)) => {
                let mut refusal = out.refusal(Some(&expected), refused).answer_app(app);
                if let Some(peer) = peer {
                    refusal = refusal.reset(peer);
                }
                return Err(refusal.into());
            }
        }
    };
    if wants_root
        && let Some((root, binding)) = est.derived_root(
            out.decided_by,
            shared.tuning.derived_root_lifetime(),
            shared.tuning.derived_root_max_connections,
            me.leaf().not_after(),
        )
    {
        me.derived().keep_client(server_ip, root, binding);
        shared.derived(super::DerivedOutcome::Kept);
    }
    established(shared, out, &expected, app, peer, est, &early).await
}

/// Bytes of the app's first read for a derived dial (see [`dial_derived`]).
const FIRST_READ: usize = 4096;

/// Why a derived dial did not give a connection.
enum Declined {
    /// The server's agent turned the header down (a reset or end of stream before its
    /// acceptance), or the peer is not an agent that keeps roots (another answer): nothing
    /// behind the header reached an app, so the app's bytes may go again.
    Refused(TcpStream),
    /// The peer could not be dialed at all.
    Unreached,
    /// No answer in time with the app's bytes behind the header: whether they were
    /// delivered is unknown.
    Silent(TcpStream),
}

/// Dials the peer agent for a connection on derived keys and waits for the server's
/// acceptance, read exactly so that the server's first records stay on the socket for the
/// kernel. With `app` (0-RTT), the app's bytes do not wait for it: what is queued at the dial
/// is sealed as record 0 right behind the header, in one write (in the SYN with Fast Open, as
/// far as it fits); what the app writes while the acceptance is on its way follows as the
/// next records; all of it, up to [`derived::EARLY_MAX`], is kept in `copy` until the
/// acceptance. Returns the connection and how many records went.
async fn dial_derived(
    shared: &Shared,
    out: &Outbound<'_>,
    keys: &derived::ConnectionKeys,
    app: Option<&TcpStream>,
    copy: &mut Vec<u8>,
) -> Result<(TcpStream, u64), Declined> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = Vec::new();
    let mut flight = Vec::with_capacity(derived::HEADER_LEN + 64);
    flight.extend_from_slice(&keys.header);
    let mut sent = 0u64;
    if let Some(app) = app {
        // A first request is usually small: the full record's worth only if more follows.
        buf.resize(FIRST_READ, 0);
        // An app that speaks first has usually written its request by now; one that waits
        // for the server has sent nothing and loses nothing. (`recv_now`: the runtime may not
        // have seen the socket readable yet.)
        if let Ok(n) = crate::sys::recv_now(std::os::fd::AsFd::as_fd(app), &mut buf)
            && n > 0
        {
            // Kept before anything can fail: taken from the app, these bytes now exist
            // only here until the server has them.
            copy.extend_from_slice(&buf[..n]);
            if keys.seal_early(0, &buf[..n], &mut flight).is_none() {
                return Err(Declined::Unreached);
            }
            sent = 1;
        }
    }
    let MeshDial {
        sock: mut peer,
        deferred,
    } = dial_mesh(out.ctx, out.endpoint, shared.tuning.tcp_fast_open)
        .await
        .map_err(|_| Declined::Unreached)?;
    if !deferred {
        prepare_peer(shared, &peer);
    }
    let mut timeout = Duration::from_millis(shared.tuning.handshake_timeout_ms);
    if deferred {
        timeout += CONNECT_TIMEOUT;
    }
    let mut got = [0u8; derived::ACCEPT_LEN];
    let exchange = async {
        peer.write_all(&flight).await?;
        let mut have = 0;
        // The app's end of stream (or an error, which the relay meets again): read no more.
        let mut app_done = app.is_none();
        let mut record = Vec::new();
        while have < derived::ACCEPT_LEN {
            let room = derived::EARLY_MAX - copy.len();
            tokio::select! {
                biased;
                n = peer.read(&mut got[have..]) => match n? {
                    0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    n => have += n,
                },
                ready = async { app?.readable().await.ok() }, if !app_done && room > 0 => {
                    let Some(app) = app.filter(|_| ready.is_some()) else {
                        app_done = true;
                        continue;
                    };
                    if buf.len() < room {
                        buf.resize(room, 0);
                    }
                    match app.try_read(&mut buf[..room]) {
                        Ok(0) => app_done = true,
                        Ok(n) => {
                            // Kept first: a write the server's reset cuts short must not
                            // lose them (they go again on the handshake).
                            copy.extend_from_slice(&buf[..n]);
                            record.clear();
                            if keys.seal_early(sent, &buf[..n], &mut record).is_none() {
                                return Err(std::io::Error::other("sealing the app's bytes"));
                            }
                            sent += 1;
                            peer.write_all(&record).await?;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => app_done = true,
                    }
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) if derived::constant_eq(&got, &keys.accept) => {
            if deferred {
                // Established now (the acceptance came back): the ULP can go on.
                prepare_peer(shared, &peer);
            }
            Ok((peer, sent))
        }
        // The server's agent answers a header it takes with the acceptance before it dials
        // the app, and resets one it refuses unread: an answer that ended without it is a
        // refusal, and nothing behind the header was delivered.
        Ok(_) => Err(Declined::Refused(peer)),
        Err(_) if copy.is_empty() => Err(Declined::Refused(peer)),
        Err(_) => Err(Declined::Silent(peer)),
    }
}

/// Whether the session's key exchange was the post-quantum hybrid.
fn hybrid(est: &driver::Established) -> bool {
    est.negotiated
        .group
        .and_then(handshake::MeshGroup::from_rustls)
        .is_some_and(handshake::MeshGroup::post_quantum)
}

/// Dials the peer agent and runs the client handshake with `config`; `wants_root`: the
/// session must leave a derived-keys root (see below). On failure, why, and the socket to
/// reset if there is one.
async fn dial_handshake(
    shared: &Shared,
    out: &Outbound<'_>,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    wants_root: bool,
) -> Result<(TcpStream, driver::Established), (Refused, Option<TcpStream>)> {
    // The first flight is built before the connect: the server's agent waits only
    // `firstByteWaitMs` for it before treating the connection as plaintext.
    // A session bound for kTLS is driven through rustls' unbuffered API, the form whose
    // remainder keeps the server's resumption tickets after the hand-off.
    let kernel = matches!(shared.offload, Offload::Kernel(_));
    // Derived keys need the handshake's exporter, which rustls' unbuffered client lacks: on
    // a kTLS node a handshake that should leave a root takes the buffered client, whose keys
    // go to the kernel as well (the server's ticket, arriving after the hand-off, is then
    // dropped: it would be refused exactly when the root is, see ARCHITECTURE.md). To a
    // server known to keep no roots the unbuffered client keeps its tickets, as in
    // `handshake` mode.
    let unbuffered = kernel && !wants_root;
    let prepared = if unbuffered {
        driver::kernel_client_connection(Arc::clone(&config), name.clone()).map(Prepared::Kernel)
    } else {
        driver::client_connection(Arc::clone(&config), name.clone()).map(Prepared::Buffered)
    };
    let prepared = prepared.map_err(|e| {
        let e = driver::DriveError::from(e);
        (handshake_refused(shared, &e), None)
    })?;
    let MeshDial {
        sock: mut peer,
        deferred,
    } = dial_mesh(out.ctx, out.endpoint, shared.tuning.tcp_fast_open)
        .await
        .map_err(|e| {
            let refused = Refused {
                code: RefusalCode::ConnectFailed,
                reason: format!("{e:#}"),
            };
            (refused, None)
        })?;
    let mut timeout = Duration::from_millis(shared.tuning.handshake_timeout_ms);
    if deferred {
        // The TCP handshake runs inside this one (see `MeshDial::deferred`).
        timeout += CONNECT_TIMEOUT;
    }
    let prepared = match prepared {
        // A connect deferred to the ClientHello (Fast Open): the ULP is attached once the
        // server's first bytes show the socket established (see `client_handshake_kernel`).
        Prepared::Kernel(conn) if deferred => Prepared::KernelDeferred(conn),
        // The kernel refused the ULP on this socket: the flow stays in rustls, which needs
        // the buffered form (built now, off the usual path).
        Prepared::Kernel(_) if !prepare_peer(shared, &peer) => {
            match driver::client_connection(config, name) {
                Ok(conn) => Prepared::Buffered(conn),
                Err(e) => {
                    let e = driver::DriveError::from(e);
                    return Err((handshake_refused(shared, &e), Some(peer)));
                }
            }
        }
        Prepared::Buffered(conn) => {
            if kernel && !deferred {
                prepare_peer(shared, &peer);
            }
            Prepared::Buffered(conn)
        }
        other => other,
    };
    let started = Instant::now();
    let handshake = match prepared {
        Prepared::Buffered(conn) => {
            driver::client_handshake_prepared(&mut peer, conn, timeout, shared.handshake_reads())
                .await
        }
        Prepared::Kernel(conn) => {
            driver::client_handshake_kernel(&mut peer, conn, timeout, false).await
        }
        Prepared::KernelDeferred(conn) => {
            driver::client_handshake_kernel(&mut peer, conn, timeout, true).await
        }
    };
    match handshake {
        Ok(est) => {
            shared.telemetry.handshake_done(
                telemetry::Direction::Outbound,
                mesh_mode(shared),
                &out.ctx.name,
                started.elapsed(),
            );
            Ok((peer, est))
        }
        Err(e) => {
            let refused = match deferred.then(|| unreachable_peer(&e, &peer)).flatten() {
                Some(reason) => Refused {
                    code: RefusalCode::ConnectFailed,
                    reason: format!("connect to {}: {reason}", out.endpoint),
                },
                None => handshake_refused(shared, &e),
            };
            Err((refused, Some(peer)))
        }
    }
}

/// The rest of a mesh flow once its session is established (fresh, or a claimed spare):
/// the node's crypto policy, the app's bytes a refused derived header carried (`resend`,
/// sent first), the flow's row, the relay.
async fn established<'a>(
    shared: &'a Shared,
    mut out: Outbound<'_>,
    expected: &SpiffeId,
    app: TcpStream,
    mut peer: TcpStream,
    mut est: driver::Established,
    resend: &[u8],
) -> Result<Relay<'a>, Stop> {
    if let Some(refused) = crypto_refuses(shared, &est.negotiated) {
        return Err(out
            .refusal(Some(expected), refused)
            .answer_app(app)
            .reset(peer)
            .into());
    }
    if !resend.is_empty() {
        if let Err(e) = est.send_first(&mut peer, resend).await {
            reset(peer);
            reset(app);
            return Err(anyhow::Error::new(e)
                .context("sending the app's first bytes again after a refused derived header")
                .into());
        }
        shared.derived(super::DerivedOutcome::Resent);
    }
    out.flow.peer_id = Some(est.peer().clone());
    out.flow.cipher = Some(super::table::suite_name(est.negotiated.suite.suite()));
    let session = SessionCrypto::mesh(&est.negotiated);
    out.flow.session = Some(session);
    debug!(
        target: "interceptor::access",
        pod = %out.ctx.name, dst = %out.destination, peer = %est.peer(), cipher = ?session.suite,
        group = session.group_label().as_deref().unwrap_or("-"),
        resumed = session.resumed,
        "outbound mTLS"
    );
    relay_mesh(shared, out.flow, out.check, out.decided_by, app, peer, est)
}

/// TLS origination with a DestinationRule's settings (SIMPLE or MUTUAL) to a server outside
/// the mesh; the session stays in rustls.
async fn originate<'a>(
    shared: &'a Shared,
    mut out: Outbound<'_>,
    (config, name, mode): (Arc<ClientConfig>, ServerName<'static>, TlsMode),
    app: TcpStream,
    mut peer: TcpStream,
) -> Result<Relay<'a>, Stop> {
    let timeout = Duration::from_millis(shared.tuning.handshake_timeout_ms);
    let started = Instant::now();
    let (conn, leftover) =
        match originate::handshake(&mut peer, config, name.clone(), timeout).await {
            Ok(session) => {
                shared.telemetry.handshake_done(
                    telemetry::Direction::Outbound,
                    telemetry::Mode::Tls,
                    &out.ctx.name,
                    started.elapsed(),
                );
                session
            }
            Err(e) => {
                let refused = Refused {
                    code: RefusalCode::OriginationFailed,
                    reason: format!(
                        "{mode} TLS origination to {}: {}",
                        name.to_str(),
                        crate::error::chain(&e)
                    ),
                };
                return Err(out
                    .refusal(None, refused)
                    .answer_app(app)
                    .reset(peer)
                    .into());
            }
        };
    out.flow.protection = Protection::Tls;
    out.flow.cipher = conn
        .negotiated_cipher_suite()
        .map(|s| super::table::suite_name(s.suite()));
    out.flow.session = SessionCrypto::originated(&conn);
    if let Err(refused) = admitted_now(shared, out.decided_by, &out.check) {
        let ends = Ends::of(&out.check, &out.ctx.name);
        return Err(Refusal::new(ends, refused).reset(app).reset(peer).into());
    }
    let guard = shared.flows.insert_checked(out.flow, Some(out.check));
    let config = crate::relay::RelayConfig {
        reset_after_request: Some(super::flow::REFUSE_WAIT),
        ..relay_config(shared)
    };
    let stats = Arc::clone(&guard.stats);
    // Boxed before the future captures it: see `relay::relay_userspace`.
    let conn = Box::new(conn);
    let relay = crate::relay::relay_userspace(app, peer, conn, leftover, config, stats);
    Ok(relaying(guard, async move { Ok(relay.await?) }))
}

/// A client connection built before the connect, in the form its record layer needs.
enum Prepared {
    Buffered(rustls::ClientConnection),
    Kernel(rustls::client::UnbufferedClientConnection),
    /// [`Prepared::Kernel`] on a socket whose connect waits for the ClientHello (Fast Open).
    KernelDeferred(rustls::client::UnbufferedClientConnection),
}

/// Why a handshake on a Fast Open socket failed before the peer was ever reached, if it did:
/// the SYN went out with the ClientHello, so what `connect()` reports otherwise (refused,
/// unreachable, no answer) comes from the handshake's I/O, and is counted as a failed connect,
/// as it would be without Fast Open.
fn unreachable_peer(e: &driver::DriveError, peer: &TcpStream) -> Option<String> {
    match e {
        // Set only while SYN_SENT: a reset of an established connection is ECONNRESET.
        driver::DriveError::Io(io)
            if matches!(
                io.raw_os_error(),
                Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::ETIMEDOUT)
            ) =>
        {
            Some(io.to_string())
        }
        driver::DriveError::Timeout(t)
            if crate::sys::syn_sent(std::os::fd::AsFd::as_fd(peer)).unwrap_or(false) =>
        {
            Some(format!("no answer to the SYN within {t:?}"))
        }
        _ => None,
    }
}
