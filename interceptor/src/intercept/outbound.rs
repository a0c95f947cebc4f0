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
    if derived_keys && let Some(offer) = me.derived().offer(server_ip, &expected, out.decided_by) {
        shared.derived(super::DerivedOutcome::Offered);
        let first = offer.first;
        match dial_derived(shared, &out, &offer.keys.header, &offer.keys.accept).await {
            Ok(peer) => {
                shared.derived(super::DerivedOutcome::Used);
                let negotiated = handshake::Negotiated {
                    peer: offer.peer,
                    suite: offer.suite,
                    group: offer.group,
                    retried: false,
                    resumed: true,
                    spare: false,
                    derived: true,
                };
                let est = driver::Established::derived(negotiated, offer.keys.secrets(true), true);
                return established(shared, out, &expected, app, peer, est);
            }
            // Refused (the server agent restarted, its policy changed, it keeps no roots):
            // the root goes and the flow dials with a handshake, which leaves a new one.
            Err(Some(peer)) => {
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
            Err(None) => shared.derived(super::DerivedOutcome::Fallback),
        }
    }
    if let Some(mut s) = spare::take(shared, pod, &expected, out.endpoint, &me, out.decided_by) {
        match handshake::spare::claim(&mut s.sock, &mut s.est).await {
            Ok(()) => {
                shared.counters.spare(super::SpareOutcome::Used);
                return established(shared, out, &expected, app, s.sock, s.est);
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
    let (peer, est) = loop {
        match dial_handshake(shared, &out, Arc::clone(&offer.config), name.clone()).await {
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
    if derived_keys
        && me.derived().wants_client_root(server_ip)
        && let Some((root, binding)) =
            est.derived_root(out.decided_by, shared.tuning.ticket_lifetime())
    {
        me.derived().keep_client(server_ip, root, binding);
        shared.derived(super::DerivedOutcome::Kept);
    }
    established(shared, out, &expected, app, peer, est)
}

/// Dials the peer agent for a connection on derived keys: the header (in the SYN with Fast
/// Open), then the server's acceptance, read exactly so that the server's first records stay
/// on the socket for the kernel. `Err(Some(sock))`: the server refused (reset, end of stream,
/// a wrong acceptance, no answer in time); `Err(None)`: the peer could not be dialed.
async fn dial_derived(
    shared: &Shared,
    out: &Outbound<'_>,
    header: &[u8; derived::HEADER_LEN],
    accept: &[u8; derived::ACCEPT_LEN],
) -> Result<TcpStream, Option<TcpStream>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let MeshDial {
        sock: mut peer,
        deferred,
    } = dial_mesh(out.ctx, out.endpoint, shared.tuning.tcp_fast_open)
        .await
        .map_err(|_| None)?;
    if !deferred {
        prepare_peer(shared, &peer);
    }
    let mut timeout = Duration::from_millis(shared.tuning.handshake_timeout_ms);
    if deferred {
        timeout += CONNECT_TIMEOUT;
    }
    let mut got = [0u8; derived::ACCEPT_LEN];
    let exchange = async {
        peer.write_all(header).await?;
        peer.read_exact(&mut got).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(_)) if derived::constant_eq(&got, accept) => {
            if deferred {
                // Established now (the acceptance came back): the ULP can go on.
                prepare_peer(shared, &peer);
            }
            Ok(peer)
        }
        _ => Err(Some(peer)),
    }
}

/// Whether the session's key exchange was the post-quantum hybrid.
fn hybrid(est: &driver::Established) -> bool {
    est.negotiated
        .group
        .and_then(handshake::MeshGroup::from_rustls)
        .is_some_and(handshake::MeshGroup::post_quantum)
}

/// Dials the peer agent and runs the client handshake with `config`. On failure, why, and the
/// socket to reset if there is one.
async fn dial_handshake(
    shared: &Shared,
    out: &Outbound<'_>,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<(TcpStream, driver::Established), (Refused, Option<TcpStream>)> {
    // The first flight is built before the connect: the server's agent waits only
    // `firstByteWaitMs` for it before treating the connection as plaintext.
    // A session bound for kTLS is driven through rustls' unbuffered API, the form whose
    // remainder keeps the server's resumption tickets after the hand-off.
    let kernel = matches!(shared.offload, Offload::Kernel(_));
    // Derived keys need the handshake's exporter, which rustls' unbuffered client lacks: on
    // a kTLS node that mode takes the buffered client, whose keys go to the kernel as well
    // (the server's ticket, arriving after the hand-off, is then dropped; derived
    // connections need none).
    let unbuffered = kernel && shared.tuning.connection_keys == ConnectionKeysMode::Handshake;
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
/// the node's crypto policy, the flow's row, the relay.
fn established<'a>(
    shared: &'a Shared,
    mut out: Outbound<'_>,
    expected: &SpiffeId,
    app: TcpStream,
    peer: TcpStream,
    est: driver::Established,
) -> Result<Relay<'a>, Stop> {
    if let Some(refused) = crypto_refuses(shared, &est.negotiated) {
        return Err(out
            .refusal(Some(expected), refused)
            .answer_app(app)
            .reset(peer)
            .into());
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
