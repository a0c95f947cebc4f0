//! One accepted connection, from set-up to the end of its relay.
//!
//! A set-up ([`outbound`](super::outbound), [`inbound`](super::inbound)) returns the relay to
//! run, or why there is none: refused (a policy, a handshake, a dial) or failed. [`serve`] is
//! the one caller: it runs the relay, or answers the refusal, and counts and logs the outcome.
//! Every refusal is counted and logged by [`refused`], and every open flow a policy change
//! closes by [`closed`].

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use tokio::net::TcpStream;
use tracing::warn;

use super::{
    Shared,
    enforce::Refused,
    handoff::Relay,
    limits::FlowPermit,
    pod::PodCtx,
    table::{self, Direction, FlowCheck},
};
use crate::{
    error,
    handshake::{self, HandshakeError, driver},
    identity::SpiffeId,
    policy::FlowTls,
    refusal::RefusalCode,
    telemetry::RefusalMeta,
};

/// The first phase of a flow: decide, dial, handshake.
type Setup<'a> = Pin<Box<dyn Future<Output = Result<Relay<'a>, Stop>> + Send + 'a>>;

/// Why a set-up ends without a relay.
pub(super) enum Stop {
    /// The agent turns the connection away (`refused.<code>`).
    Refused(Box<Refusal>),
    /// Something failed that is not a decision about the connection (`flows_failed`).
    Failed(anyhow::Error),
    /// A spare session its client's agent let go unclaimed: nothing was decided, nothing is
    /// counted but `spares.unclaimed`.
    Unclaimed,
    /// A derived-key header the server's agent does not take (unknown, expired, replayed...):
    /// reset, and the client's agent dials again with a handshake. Counted only as
    /// `derived.<reason>`: nothing was decided about the connection.
    Declined,
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        Stop::Failed(e)
    }
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Failed(e.into())
    }
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Self {
        Stop::Refused(Box::new(r))
    }
}

/// Serves one accepted connection `conn` (the socket and its peer's address) under its share
/// of the pod's caps (`permit`), counted in [`Shared::live`](super::Shared) while `live` is
/// held.
///
/// A flow's task lives as long as the flow, so its future is kept to a few words: spawn this
/// future itself (a wrapper that awaits it would hold it twice: its captured copy and the
/// awaited one); the connection comes boxed because an argument's slot stays in the future
/// after the set-up took it; and two phases are boxed: the set-up (decision, dial,
/// handshake, configs) is freed before the relay starts, so an idle flow holds only what its
/// relay needs.
pub(super) async fn serve(
    live: super::Live,
    ctx: Arc<PodCtx>,
    direction: Direction,
    conn: Box<(TcpStream, SocketAddr)>,
    mut permit: FlowPermit,
) {
    let shared = &live.0;
    let (stream, peer) = *conn;
    let setup: Setup<'_> = match direction {
        Direction::Outbound => Box::pin(super::outbound::outbound(shared, &ctx, stream, peer)),
        Direction::Inbound => Box::pin(super::inbound::inbound(shared, &ctx, stream, peer)),
    };
    let result = match setup.await {
        Ok(relay) => {
            permit.set_up();
            relay.await
        }
        Err(Stop::Refused(refusal)) => {
            // Boxed: the answer's state (the refusal's ends and identities, a timer) would
            // otherwise size every flow's task.
            Box::pin(refusal.answer(shared)).await;
            Ok(())
        }
        Err(Stop::Failed(e)) => Err(e),
        Err(Stop::Unclaimed | Stop::Declined) => Ok(()),
    };
    drop(permit);
    if let Err(e) = result {
        shared.counters.flow_failed();
        if shared.sample("failed flows", "flow") {
            warn!(pod = %ctx.name, ?direction, %peer, "flow failed: {e:#}");
        }
    }
}

/// A connection the agent turns away: its ends, why, and the sockets to answer on.
pub(super) struct Refusal {
    ends: Ends,
    refused: Refused,
    /// The app's connection (outbound), reset once it sent its request (see
    /// [`refuse_app`]).
    after_request: Option<TcpStream>,
    /// Reset at once, after `after_request`.
    reset: Vec<TcpStream>,
}

impl Refusal {
    pub fn new(ends: Ends, refused: Refused) -> Self {
        Refusal {
            ends,
            refused,
            after_request: None,
            reset: Vec::new(),
        }
    }

    /// Answers the app as Envoy answers 503 (see [`refuse_app`]).
    pub fn answer_app(mut self, app: TcpStream) -> Self {
        self.after_request = Some(app);
        self
    }

    /// Resets `sock` (after the app's answer, in the order given).
    pub fn reset(mut self, sock: TcpStream) -> Self {
        self.reset.push(sock);
        self
    }

    /// Counts and logs the refusal, then closes its sockets.
    async fn answer(self, shared: &Shared) {
        let Refusal {
            ends,
            refused,
            after_request,
            reset: socks,
        } = self;
        refused_with(shared, &ends, &refused);
        if let Some(app) = after_request {
            refuse_app(shared, app).await;
        }
        for sock in socks {
            reset(sock);
        }
    }
}

/// Counts a refusal (`refused.<code>`, `interceptor_connections_refused_total`), logs it as
/// a sample (see [`Shared::sample`]: whoever can open connections can cause refusals) and
/// writes its access line (sampled and rate limited on their own). `reason` is only built
/// when a line is written. Every refused connection passes here.
pub(super) fn refused<'a>(
    shared: &Shared,
    code: RefusalCode,
    ends: &Ends,
    reason: impl FnOnce() -> std::borrow::Cow<'a, str>,
) {
    shared.counters.refused.add(code);
    let mut reason = Some(reason);
    let mut text: Option<std::borrow::Cow<'a, str>> = None;
    let mut why = || -> std::borrow::Cow<'a, str> {
        if let Some(make) = reason.take() {
            text = Some(make());
        }
        text.clone().unwrap_or_default()
    };
    if shared.sample("refused", code.as_str()) {
        warn!(
            target: "interceptor::policy",
            "refused {}: {} [{code}]",
            ends.describe(),
            why()
        );
    }
    let id = |i: &Option<SpiffeId>| i.as_ref().map(ToString::to_string);
    shared
        .telemetry
        .refused(table::direction(ends.direction), code.as_str(), || {
            RefusalMeta {
                direction: table::direction(ends.direction),
                pod: &ends.pod,
                source: ends.source,
                destination: ends.destination,
                endpoint: ends.endpoint.filter(|e| *e != ends.destination),
                client: id(&ends.client),
                server: id(&ends.server),
                code: code.as_str(),
                reason: why(),
            }
        });
}

/// [`refused`] for a connection with known ends.
fn refused_with(shared: &Shared, ends: &Ends, refused: &Refused) {
    self::refused(shared, refused.code, ends, || {
        refused.reason.as_str().into()
    });
}

/// Counts (`closed.<code>`) and logs as a sample an open flow `by` no longer allows (a
/// policy generation, a crypto policy); the caller resets it.
pub(super) fn closed(shared: &Shared, ends: &Ends, by: &str, refused: &Refused) {
    shared.counters.closed.add(refused.code);
    shared
        .telemetry
        .policy_closed(table::direction(ends.direction), refused.code.as_str());
    if shared.sample("closed", refused.code.as_str()) {
        warn!(
            target: "interceptor::policy",
            "closing {}: no longer allowed by {by}: {} [{}]",
            ends.describe(),
            refused.reason,
            refused.code,
        );
    }
}

/// A refused or closed connection's two ends and both identities, for its log line.
pub(super) struct Ends {
    direction: Direction,
    pod: String,
    source: SocketAddr,
    destination: SocketAddr,
    /// Outbound: the endpoint the agent picked, when it differs from the destination.
    endpoint: Option<SocketAddr>,
    client: Option<SpiffeId>,
    server: Option<SpiffeId>,
}

impl Ends {
    /// An outbound connection of the pod `ctx` (the client).
    pub fn outbound(
        ctx: &PodCtx,
        source: SocketAddr,
        destination: SocketAddr,
        endpoint: Option<SocketAddr>,
        server: Option<&SpiffeId>,
    ) -> Self {
        Ends {
            direction: Direction::Outbound,
            pod: ctx.name.to_string(),
            source,
            destination,
            endpoint,
            client: Some(ctx.id.clone()),
            server: server.cloned(),
        }
    }

    /// An inbound connection to the pod `ctx` (the server).
    pub fn inbound(
        ctx: &PodCtx,
        source: SocketAddr,
        destination: SocketAddr,
        client: Option<&SpiffeId>,
    ) -> Self {
        Ends {
            direction: Direction::Inbound,
            pod: ctx.name.to_string(),
            source,
            destination,
            endpoint: None,
            client: client.cloned(),
            server: Some(ctx.id.clone()),
        }
    }

    /// A connection just accepted on a pod's listener, before anything about it is known
    /// (the per-pod caps refuse here): the client's address and the address it reached.
    pub fn accepted(
        ctx: &PodCtx,
        direction: Direction,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Self {
        let (client, server) = match direction {
            Direction::Outbound => (Some(ctx.id.clone()), None),
            Direction::Inbound => (None, Some(ctx.id.clone())),
        };
        Ends {
            direction,
            pod: ctx.name.to_string(),
            source,
            destination,
            endpoint: None,
            client,
            server,
        }
    }

    /// An open flow's ends and identities, as its check recorded them.
    pub fn of(check: &FlowCheck, pod: &str) -> Self {
        match check {
            FlowCheck::Inbound(c) => Ends {
                direction: Direction::Inbound,
                pod: pod.to_owned(),
                source: c.source,
                destination: c.destination,
                endpoint: None,
                client: c.peer.clone(),
                server: None,
            },
            FlowCheck::Local(c) => Ends {
                direction: Direction::Outbound,
                pod: pod.to_owned(),
                source: c.outbound.source,
                destination: c.outbound.destination,
                endpoint: Some(c.outbound.endpoint),
                client: Some(c.outbound.client.clone()),
                server: match &c.outbound.tls {
                    FlowTls::Mesh(server) => Some(server.clone()),
                    FlowTls::Plaintext | FlowTls::Originate(_) => None,
                },
            },
            FlowCheck::Outbound(c) => Ends {
                direction: Direction::Outbound,
                pod: pod.to_owned(),
                source: c.source,
                destination: c.destination,
                endpoint: Some(c.endpoint),
                client: Some(c.client.clone()),
                server: match &c.tls {
                    FlowTls::Mesh(server) => Some(server.clone()),
                    FlowTls::Plaintext | FlowTls::Originate(_) => None,
                },
            },
        }
    }

    /// `DIRECTION SRC -> DST [via ENDPOINT] pod=… client=… server=…`
    fn describe(&self) -> String {
        let id = |i: Option<&SpiffeId>| i.map_or_else(|| "-".to_owned(), ToString::to_string);
        let via = match self.endpoint {
            Some(e) if e != self.destination => format!(" via {e}"),
            _ => String::new(),
        };
        format!(
            "{} {} -> {}{via} pod={} client={} server={}",
            match self.direction {
                Direction::Outbound => "outbound",
                Direction::Inbound => "inbound",
            },
            self.source,
            self.destination,
            self.pod,
            id(self.client.as_ref()),
            id(self.server.as_ref()),
        )
    }
}

/// Why a mesh handshake failed, for the refusal log: a crypto mismatch this side detected is
/// `crypto_mismatch` and names what this node offers; an abort by the peer names it too,
/// since the peer's policy may be what refused it.
pub(super) fn handshake_refused(shared: &Shared, e: &driver::DriveError) -> Refused {
    let crypto = shared.crypto();
    match e {
        driver::DriveError::Handshake(HandshakeError::NoCommonCrypto(_)) => Refused {
            code: RefusalCode::CryptoMismatch,
            reason: format!(
                "mTLS handshake failed: {e}; this node's {} offers {}",
                crypto.policy(),
                crypto.offer()
            ),
        },
        driver::DriveError::Handshake(HandshakeError::RefusedByPeer(
            rustls::AlertDescription::HandshakeFailure,
        )) => Refused {
            code: RefusalCode::HandshakeFailed,
            reason: format!(
                "mTLS handshake failed: {e} (this node's {} offers {}; the peer's crypto policy \
                 may not accept it)",
                crypto.policy(),
                crypto.offer()
            ),
        },
        _ => Refused {
            code: RefusalCode::HandshakeFailed,
            reason: format!("mTLS handshake failed: {}", error::chain(e)),
        },
    }
}

/// A session negotiated under a crypto policy that changed during the handshake.
pub(super) fn crypto_refuses(
    shared: &Shared,
    negotiated: &handshake::Negotiated,
) -> Option<Refused> {
    let reason = shared
        .crypto()
        .refuses(negotiated.suite.suite(), negotiated.group)?;
    Some(Refused {
        code: RefusalCode::CryptoPolicy,
        reason,
    })
}

/// Makes the close that follows send RST (curl: `000`, exit 56 or 52), then closes.
pub(super) fn reset(sock: TcpStream) {
    let _ = sock.set_zero_linger();
    drop(sock);
}

/// Refuses an app's outbound connection the way Envoy answers 503: once the app has sent its
/// request (or after a wait, for an app that waits for the server to speak), reset. An
/// app then sees the reset while waiting for the response (curl: `000`, exit 56) rather than
/// as a failed connect, which is what an immediate reset can look like.
async fn refuse_app(shared: &Shared, app: TcpStream) {
    let wait = Duration::from_millis(shared.tuning.first_byte_wait_ms).max(REFUSE_WAIT);
    let mut byte = [0u8; 1];
    let _ = tokio::time::timeout(wait, app.peek(&mut byte)).await;
    reset(app);
}

/// The least [`refuse_app`] waits for an app's request.
pub(super) const REFUSE_WAIT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn output_size<A, B, C, D, E, R>(_: fn(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A flow's task lives as long as the flow, so whatever its future holds inline is paid
    /// by every idle connection; the set-up, the relay and the refusal's answer are boxed
    /// and freed when done. (With the answer inline it was 1.5 KB, and twice that in the
    /// task, whose wrapper held it twice; 232 bytes in a debug build now. tokio rounds a
    /// task up to 128 bytes, so every 128 saved counts per flow end.)
    #[test]
    fn a_flows_task_holds_a_few_words_besides_its_relay() {
        let size = output_size(serve);
        assert!(size <= 256, "flow::serve's future is {size} bytes");
    }
}
