//! The same-node fast path (`tuning.sameNodeFastPath`): a mesh flow whose endpoint is a pod
//! this agent enrolled itself.
//!
//! Both identities are the kernel's word: the client is the pod whose netns holds the
//! listener that accepted the app's connection, the server the pod enrolled with the
//! endpoint's address, whose netns the agent dials into. A certificate would prove nothing
//! more, since the same process would present and verify it. So the agent takes both halves
//! of the decision itself, under one policy generation: the client's (DestinationRule,
//! automatic mTLS: only a flow planned as mesh mTLS comes here) and the server's
//! (PeerAuthentication with its port levels: DISABLE refuses, as it refuses a mesh
//! ClientHello; AuthorizationPolicy with the client's principal). Then it dials the app
//! from inside the server pod, from the address the inbound path uses, and splices between
//! the two loopback legs (`relay::relay_spliced`): two TCP connections instead of three, no TLS, and no byte on
//! either pod's link. With `tuning.sameNodeJoin: skMsg` the apps' bytes mostly skip the agent
//! too (`relay::relay_joined`).

use std::{net::SocketAddr, os::fd::AsFd as _, sync::Arc};

use tokio::net::TcpStream;
use tracing::debug;

use super::{
    Shared,
    enforce::{Generation, Plan, Refused, Transport},
    flow::{Ends, Refusal, Stop},
    handoff::{Relay, relay_config, relaying},
    outbound::Outbound,
    pod::{PodCtx, agent_source, dial},
    revalidate::admitted_now,
    table::{FlowCheck, InboundCheck, LocalCheck, OutboundCheck, Protection},
};
use crate::{identity::SpiffeId, policy::FlowTls, refusal::RefusalCode};

/// A flow the fast path takes: the server pod, and the server's half of the decision.
pub(super) struct Local {
    server: Arc<PodCtx>,
    decided: Result<&'static str, Refused>,
}

/// Whether `plan` (decided under `generation` for `client` at `source`) goes the fast path:
/// mesh mTLS to a pod this agent enrolled, with the identity policy expects there. A pod
/// enrolled under another identity than the inventory's is left to the mesh path, whose
/// handshake refuses it as it would on another node.
pub(super) fn candidate(
    shared: &Shared,
    generation: &Generation,
    client: &PodCtx,
    source: SocketAddr,
    plan: &Plan,
) -> Option<Local> {
    if !shared.tuning.same_node_fast_path {
        return None;
    }
    let Transport::Mesh(Some(expected)) = &plan.transport else {
        return None;
    };
    let server = shared.local_pod(plan.endpoint.ip())?;
    if server.id != *expected {
        return None;
    }
    let decided = server_decides(generation, source, plan.endpoint, &client.id);
    Some(Local { server, decided })
}

/// The server pod's half: what its agent decides for a verified mesh client.
fn server_decides(
    generation: &Generation,
    source: SocketAddr,
    endpoint: SocketAddr,
    client: &SpiffeId,
) -> Result<&'static str, Refused> {
    if let Some(refused) = generation.refuses_mtls(endpoint) {
        return Err(refused);
    }
    generation.inbound(source, endpoint, Some(client))
}

/// Decides an open same-node flow again: both halves must still allow it.
pub(super) fn recheck(generation: &Generation, check: &LocalCheck) -> Result<(), Refused> {
    let o = &check.outbound;
    generation.outbound_still(o.source.ip(), o.destination, o.endpoint, &o.tls)?;
    let i = &check.inbound;
    let client = i.peer.as_ref().unwrap_or(&o.client);
    server_decides(generation, i.source, i.destination, client).map(|_| ())
}

/// The two app sockets at the far ends of the agent's legs, as the sk_msg join program keys
/// them (each from its own end): the client app's socket talks to `app`, the server app's
/// to `peer`. `None` if a socket cannot say where it is (it is then left to splice alone).
fn join_keys(
    app: &TcpStream,
    peer: &TcpStream,
) -> Option<(interceptor_common::LegKey, interceptor_common::LegKey)> {
    let key = |s: &TcpStream| {
        let netns = crate::sys::netns_cookie(s.as_fd()).ok()?;
        Some(crate::datapath::leg_key(
            netns,
            s.peer_addr().ok()?,
            s.local_addr().ok()?,
        ))
    };
    Some((key(app)?, key(peer)?))
}

/// Sets up a same-node flow: refuses it as the server's agent would, or dials the app inside
/// the server pod and returns the plain relay between the two legs.
pub(super) async fn relay<'a>(
    shared: &'a Shared,
    mut out: Outbound<'_>,
    local: Local,
    app: TcpStream,
) -> Result<Relay<'a>, Stop> {
    let Local { server, decided } = local;
    let code = match decided {
        Ok(code) => code,
        Err(refused) => {
            return Err(out
                .refusal(Some(&server.id), refused)
                .answer_app(app)
                .into());
        }
    };
    // The server pod's caps hold for its local clients too (per source address, as inbound).
    let mut permit = match server.inbound_limits.admit(Some(out.source.ip())) {
        Ok(permit) => permit,
        Err(cap) => {
            let refused = Refused {
                code: cap.code(),
                reason: format!(
                    "flows of this source held by {} reached its cap (same node)",
                    server.name
                ),
            };
            return Err(out
                .refusal(Some(&server.id), refused)
                .answer_app(app)
                .into());
        }
    };
    let to_app = agent_source(out.endpoint.is_ipv6());
    let peer = match dial(&server, out.endpoint, Some(to_app)).await {
        Ok(peer) => peer,
        Err(e) => {
            let refused = Refused {
                code: RefusalCode::ConnectFailed,
                reason: format!("{e:#}"),
            };
            return Err(out
                .refusal(Some(&server.id), refused)
                .answer_app(app)
                .into());
        }
    };
    permit.set_up();
    let check = FlowCheck::Local(Box::new(LocalCheck {
        outbound: OutboundCheck {
            source: out.source,
            destination: out.destination,
            endpoint: out.endpoint,
            client: out.ctx.id.clone(),
            tls: FlowTls::Mesh(server.id.clone()),
        },
        inbound: InboundCheck {
            source: out.source,
            destination: out.endpoint,
            peer: Some(out.ctx.id.clone()),
        },
    }));
    if let Err(refused) = admitted_now(shared, out.decided_by, &check) {
        let ends = Ends::of(&check, &out.ctx.name);
        return Err(Refusal::new(ends, refused)
            .answer_app(app)
            .reset(peer)
            .into());
    }
    debug!(
        target: "interceptor::access",
        pod = %out.ctx.name, dst = %out.destination, server_pod = %server.name,
        peer = %server.id, "outbound same-node"
    );
    out.flow.protection = Protection::Local;
    out.flow.peer_id = Some(server.id.clone());
    out.flow.reason = Some(match out.flow.reason.take() {
        Some(client_side) => format!("{client_side}; {} {code}", server.name).into(),
        None => format!("{} {code}", server.name).into(),
    });
    let guard = shared.flows.insert_checked(out.flow, Some(check));
    let config = relay_config(shared);
    let stats = Arc::clone(&guard.stats);
    let joined = shared
        .join_maps()
        .and_then(|maps| Some((maps, join_keys(&app, &peer)?)));
    let relay = async move {
        match joined {
            Some((maps, (client, server))) => {
                crate::relay::relay_joined(app, peer, config, stats, maps, client, server).await
            }
            None => crate::relay::relay_spliced(app, peer, config, stats).await,
        }
    };
    Ok(relaying(guard, async move {
        let ended = relay.await;
        drop(permit);
        Ok(ended?)
    }))
}
