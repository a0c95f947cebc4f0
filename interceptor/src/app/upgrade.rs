//! The agent's part in upgrades (`handover:` in the node config): offering its listeners to a
//! successor, taking them from a predecessor (`run --takeover`), and draining on SIGTERM.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tracing::{info, warn};

use super::{Agent, shutdown_signal, start_from};
use crate::{
    config::{Config, HandoverSettings, Workload},
    handover::{
        CheckTransfer, FlowTransfer, PodTransfer, SessionTransfer,
        serve::{self, Source},
        take::{self, Asked, GivenListener, ReceivedPod},
    },
    identity::SpiffeId,
    intercept::{
        adopt_parked, decide_handed_over,
        enforce::Generation,
        table::{FlowCheck, FlowInfo, InboundCheck, OutboundCheck, Protection, SessionCrypto},
    },
    policy::FlowTls,
    relay::ParkedKtls,
    telemetry::Telemetry,
};

/// Test knob: the new agent waits this many milliseconds between holding the handed-over
/// listeners and telling the old agent to stop, so a test can kill it there.
const STALL_ENV: &str = "INTERCEPTOR_HANDOVER_STALL_MS";

/// An enrollment change refused because the pods are being handed over (or were): temporary,
/// answered with the admin API's retryable code ([`crate::admin::HANDING_OVER`]).
#[derive(Debug)]
pub struct HandingOver {
    /// The successor already holds the pods (this agent only drains); otherwise it is taking
    /// them now.
    retired: bool,
}

impl HandingOver {
    pub(super) const RETIRED: HandingOver = HandingOver { retired: true };
}

impl std::fmt::Display for HandingOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = if self.retired {
            "has handed its pods over to a successor and only drains its open flows"
        } else {
            "is handing its pods over to a successor"
        };
        write!(
            f,
            "this agent {now}; try again: the successor answers on this admin socket once it \
             has taken over"
        )
    }
}

impl std::error::Error for HandingOver {}

/// How often a draining agent looks whether its last flow ended.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Starts the agent; with `takeover`, first asks the running agent for its listeners and,
/// once every pod accepts here, tells it to stop accepting. Returns the predecessor's pid
/// when one handed over.
pub(super) async fn start(
    config: Config,
    takeover: bool,
) -> anyhow::Result<(Arc<Agent>, Option<i32>)> {
    let mut taken = None;
    let mut predecessor_alive = false;
    if takeover {
        let settings = config
            .handover
            .as_ref()
            .context("--takeover needs `handover:` (its socket) in the node config")?;
        let socket = settings.socket.clone();
        match tokio::task::spawn_blocking(move || take::ask(&socket))
            .await
            .context("handover thread")?
            .context("taking over from the running agent (it keeps serving)")?
        {
            Asked::NoPredecessor => {}
            Asked::Fallback { .. } => predecessor_alive = true,
            Asked::Received(t) => taken = Some(t),
        }
    }
    let Some(mut t) = taken else {
        // A predecessor that stepped down still runs its programs until we replace them:
        // sharing its maps (same layout) keeps what it steers visible to us meanwhile.
        let agent = start_from(config, None, predecessor_alive).await?;
        if predecessor_alive {
            // It closed its listeners and dropped its links before answering: what it
            // steered is ours to decide now.
            agent.refresh_adopted_maps();
        }
        return Ok((agent, None));
    };
    let admin_socket = config.admin_socket.clone();
    let staged_admin = crate::admin::staged_path(&admin_socket);
    let agent = match start_from(config, Some(&mut t), true).await {
        Ok(a) => a,
        Err(e) => {
            // The old agent never stopped accepting: it goes on as if we had not come.
            t.abort(&format!("{e:#}"));
            let _ = std::fs::remove_file(&staged_admin);
            return Err(e);
        }
    };
    let pods = u32::try_from(agent.enrolled().len()).unwrap_or(u32::MAX);
    let predecessor = t.predecessor;
    if let Some(ms) = std::env::var(STALL_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        warn!(
            ms,
            "{STALL_ENV}: holding the handed-over listeners without taking over"
        );
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let receiver = Arc::clone(&agent);
    let runtime = tokio::runtime::Handle::current();
    let finished = tokio::task::spawn_blocking(move || {
        t.finish(pods, |flow, fds| receiver.adopt_flow(&runtime, flow, fds))
    })
    .await;
    // The old agent stopped accepting (or is gone, or did not answer): from here this agent
    // accepts; connections that arrived meanwhile waited in the listeners' queues.
    agent.shared.accepting.send_replace(true);
    if let Err(e) = crate::admin::publish(&staged_admin, &admin_socket) {
        warn!(
            staged = %staged_admin.display(),
            admin = %admin_socket.display(),
            "cannot move the admin socket onto its path ({e}); it answers at the staged path"
        );
    }
    match finished {
        Ok(Ok((kept, received, channel))) => {
            // The predecessor released the node: it writes no map entry any more.
            agent.refresh_adopted_maps();
            agent
                .telemetry
                .handover_flows("received", u64::from(received));
            agent
                .predecessor_flows
                .store(u64::from(kept), Ordering::Relaxed);
            take::follow(channel, Arc::clone(&agent.predecessor_flows));
        }
        Ok(Err(e)) => warn!(
            predecessor,
            "the previous agent did not confirm the hand-over ({e:#}); it accepts on the same \
             listeners until it exits"
        ),
        Err(e) => warn!(predecessor, "handover thread: {e}"),
    }
    Ok((agent, Some(predecessor)))
}

/// Takes the listeners handed over for `w` (matched by name and netns).
pub(super) fn listeners_for(
    given: &mut BTreeMap<String, ReceivedPod>,
    w: &Workload,
) -> Option<Vec<GivenListener>> {
    let pod = given.remove(&w.name)?;
    if pod.transfer.workload.netns != w.netns {
        warn!(
            pod = %w.name,
            "handed over for netns {} but enrolled here in {}: binding new listeners",
            pod.transfer.workload.netns.display(),
            w.netns.display()
        );
        return None;
    }
    Some(pod.listeners)
}

/// The slots the maps already give pods ([`crate::datapath::Datapath::slots_in_maps`]), for
/// a pod enrolled with `given` listeners (its netns is theirs) or with new ones.
pub(super) fn slots_in_maps(
    shared: &crate::intercept::Shared,
    given: Option<&[GivenListener]>,
) -> (Option<u32>, Vec<u32>) {
    let netns = given
        .and_then(<[GivenListener]>::first)
        .and_then(|(_, l)| crate::sys::netns_cookie(l.as_fd()).ok());
    shared
        .datapath
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .slots_in_maps(netns)
}

/// The inbound slot for a pod: the one the (adopted) maps already give it, unless a pod
/// enrolled here holds it (`used`); otherwise the first from `next` on that neither a pod
/// here nor any other pod in the maps (`reserved`: a predecessor's stale ones) holds. With
/// maps of its own the agent's pods are all the maps hold, so this is the first free slot.
pub(super) fn choose_slot(
    used: &[u32],
    adopted: Option<u32>,
    reserved: &[u32],
    next: &mut u32,
) -> u32 {
    if let Some(s) = adopted.filter(|s| !used.contains(s)) {
        return s;
    }
    while used.contains(next) || reserved.contains(next) {
        *next += 1;
    }
    *next
}

/// Enrolls the pods the predecessor handed over that neither the node config nor the
/// persisted enrollments name (enrolled at run time there): they are persisted here too, so
/// they survive this agent's restart as they would have the old one's.
pub(super) fn enroll_rest(agent: &Agent, given: BTreeMap<String, ReceivedPod>) {
    for (name, pod) in given {
        let w = pod.transfer.workload;
        let done = agent
            .validate(&w)
            .and_then(|()| agent.enroll_with(&w, Some(pod.listeners)))
            .and_then(|()| {
                agent.persist(|l| {
                    l.retain(|p| p.name != w.name);
                    l.push(w.clone());
                })
            });
        if let Err(e) = done {
            warn!(pod = %name, "handed over but not enrolled here: {e:#}");
            agent.mark_stale(&w, &e, None);
        }
    }
}

/// Serves the handover socket until SIGTERM or a successor, then drains: see
/// `HandoverSettings`. Returns when the process should exit.
pub(super) async fn serve_until_done(
    agent: Arc<Agent>,
    settings: &HandoverSettings,
    predecessor: Option<i32>,
) -> anyhow::Result<()> {
    let listener = serve::bind(&settings.socket)
        .with_context(|| format!("handover socket {}", settings.socket.display()))?;
    if let Some(pid) = predecessor {
        info!(
            predecessor = pid,
            socket = %settings.socket.display(),
            "offering the listeners to the next successor"
        );
    }
    let (done, mut outcome) = tokio::sync::watch::channel(None);
    let source: Arc<dyn Source> = Arc::new(Handing {
        agent: Arc::clone(&agent),
        runtime: tokio::runtime::Handle::current(),
    });
    serve::spawn(listener, source, done).context("handover thread")?;
    let window = settings.drain_window.0;
    let successor = async {
        if outcome.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(successor);
    let deadline = tokio::select! {
        () = shutdown_signal() => {
            info!(
                drain_window = %settings.drain_window,
                "stopping: serving on until a successor takes the listeners or the drain window ends"
            );
            let deadline = tokio::time::Instant::now() + window;
            tokio::select! {
                () = &mut successor => {}
                () = tokio::time::sleep_until(deadline) => {
                    info!(
                        flows = agent.open_connections(),
                        "drain window over without a successor: exiting; pinned programs stay, \
                         so enrolled pods fail closed until an agent is back"
                    );
                    return Ok(());
                }
            }
            deadline
        }
        () = &mut successor => tokio::time::Instant::now() + window,
    };
    loop {
        let open = agent.open_connections();
        if open == 0 {
            info!("the last open flow ended; exiting");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                flows = open,
                "drain window over: exiting, the flows still open are reset"
            );
            return Ok(());
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// The running agent as the handover thread sees it.
struct Handing {
    agent: Arc<Agent>,
    /// Stopping accept loops awaits their tasks, from the handover thread.
    runtime: tokio::runtime::Handle,
}

impl Handing {
    /// Stops every pod's accept loops and closes this process's copies of the listeners;
    /// returns once they are closed. No map entry or pin is touched: the pods stay
    /// enrolled in the kernel, for the successor.
    fn stop_accepting(&self) -> usize {
        self.agent.retired.store(true, Ordering::SeqCst);
        self.agent.readiness.retire();
        let pods = std::mem::take(&mut *self.agent.pods.lock().unwrap_or_else(|p| p.into_inner()));
        let n = pods.len();
        self.runtime.block_on(async move {
            for (_, pod) in pods {
                pod.stop().await;
            }
        });
        n
    }
}

impl Source for Handing {
    fn pods(&self) -> anyhow::Result<Vec<(PodTransfer, Vec<OwnedFd>)>> {
        // From here enrollment changes are refused (retryably) until the successor holds the
        // pods or the attempt fails: one made now would be missing from the list. Taking the
        // `changes` lock waits for one already under way, which then is in the list.
        self.agent.handing_over.store(true, Ordering::SeqCst);
        let _change = self.runtime.block_on(self.agent.changes.lock());
        let pods = self.agent.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.values()
            .map(|pod| {
                let (specs, fds) = pod
                    .listener_copies()
                    .with_context(|| format!("listeners of `{}`", pod.workload.name))?;
                Ok((
                    PodTransfer {
                        workload: pod.workload.clone(),
                        netns_cookie: pod.netns_cookie,
                        listeners: specs,
                    },
                    fds,
                ))
            })
            .collect()
    }

    fn release(&self) -> u32 {
        let pods = self.stop_accepting();
        // The successor pinned its own links over ours: dropping ours detaches them, so
        // only its programs run from here on (on the same maps).
        self.agent
            .shared
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release_links();
        let flows = self.open_flows();
        info!(pods, flows, "stopped accepting; draining the open flows");
        u32::try_from(flows).unwrap_or(u32::MAX)
    }

    fn step_down(&self) -> u32 {
        self.stop_accepting();
        // Still pinned, our links stay attached until the successor pins its own over them;
        // then they detach instead of running beside its programs until we exit.
        self.agent
            .shared
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release_links();
        u32::try_from(self.open_flows()).unwrap_or(u32::MAX)
    }

    fn open_flows(&self) -> usize {
        self.agent.open_connections()
    }

    fn aborted(&self) {
        if !self.agent.is_retired() {
            self.agent.handing_over.store(false, Ordering::SeqCst);
            info!("handover attempt over without a successor: enrollment changes accepted again");
        }
    }

    fn flows_sent(&self, n: u32) {
        self.agent.telemetry.handover_flows("sent", u64::from(n));
    }

    fn park_flows(&self) -> Vec<(FlowTransfer, ParkedKtls)> {
        let shared = &self.agent.shared;
        let generation = shared.policy.current().number;
        let parking = shared.flows.park_ktls();
        let asked = parking.len();
        let mut parked = Vec::with_capacity(asked);
        for p in parking {
            // The relay parks at its next poll, which the request itself wakes. The timer is
            // made inside `block_on`: this is the handover thread, outside the runtime, and a
            // timer made here would panic for want of one (the VM run found it).
            let relay = self
                .runtime
                .block_on(async { tokio::time::timeout(PARK_TIMEOUT, p.relay).await });
            let Ok(Ok(relay)) = relay else {
                // It ended meanwhile (or could not park): nothing to move.
                continue;
            };
            match p
                .check
                .as_ref()
                .and_then(|c| flow_transfer(&p.info, c, generation, &relay))
            {
                Some(t) => parked.push((t, *relay)),
                None => {
                    warn!(pod = %p.info.pod, "a parked flow cannot be described for a successor: kept here");
                    if let Some(check) = p.check {
                        adopt_parked(
                            shared,
                            &crate::runtimes::for_flow(&self.runtime),
                            p.info,
                            check,
                            *relay,
                            false,
                            generation,
                        );
                    }
                }
            }
        }
        info!(
            asked,
            parked = parked.len(),
            "kTLS flows parked for the successor"
        );
        parked
    }

    fn keep_flow(&self, flow: FlowTransfer, relay: ParkedKtls) {
        self.agent.telemetry.handover_flows("kept", 1);
        let parked_under = flow.policy_generation;
        match flow_from_transfer(flow) {
            Ok((info, check)) => {
                adopt_parked(
                    &self.agent.shared,
                    &crate::runtimes::for_flow(&self.runtime),
                    info,
                    check,
                    relay,
                    false,
                    parked_under,
                );
            }
            Err(e) => {
                self.agent.telemetry.handover_flows("refused", 1);
                warn!("a parked flow cannot be resumed here: {e:#}; reset");
                let _ = crate::sys::set_zero_linger(relay.app.as_fd());
                let _ = crate::sys::set_zero_linger(relay.peer.as_fd());
            }
        }
    }
}

/// How long the old agent waits for one flow's relay to park.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// A parked flow as the protocol carries it; `None` for a flow that is not mesh mTLS (never
/// parked: only kTLS flows are).
fn flow_transfer(
    info: &FlowInfo,
    check: &FlowCheck,
    generation: u64,
    relay: &ParkedKtls,
) -> Option<FlowTransfer> {
    let check = match check {
        FlowCheck::Inbound(c) => CheckTransfer::Inbound {
            source: c.source,
            destination: c.destination,
            peer: c.peer.as_ref().map(ToString::to_string),
        },
        FlowCheck::Outbound(c) => {
            let FlowTls::Mesh(server) = &c.tls else {
                return None;
            };
            CheckTransfer::Outbound {
                source: c.source,
                destination: c.destination,
                endpoint: c.endpoint,
                client: c.client.to_string(),
                server: server.to_string(),
            }
        }
        // Same-node flows are two plain legs spliced by this agent, not kTLS: like relay
        // flows, they end in the old agent.
        FlowCheck::Local(_) => return None,
    };
    Some(FlowTransfer {
        pod: info.pod.to_string(),
        direction: info.direction,
        source: info.source,
        destination: info.destination,
        endpoint: info.endpoint,
        peer_id: info.peer_id.as_ref().map(ToString::to_string),
        cipher: info.cipher.as_deref().map(str::to_owned),
        session: info.session.filter(|s| s.mesh).map(|s| SessionTransfer {
            suite: u16::from(s.suite),
            group: s.group.map(u16::from),
            retried: s.retried,
            resumed: s.resumed,
        }),
        reason: info.reason.as_deref().map(str::to_owned),
        check,
        policy_generation: generation,
        relay: relay.state.clone(),
    })
}

/// The flow-table row and admission check of a received flow.
fn flow_from_transfer(t: FlowTransfer) -> anyhow::Result<(FlowInfo, FlowCheck)> {
    let id = |s: &str| -> anyhow::Result<SpiffeId> {
        s.parse().with_context(|| format!("SPIFFE ID `{s}`"))
    };
    let check = match &t.check {
        CheckTransfer::Inbound {
            source,
            destination,
            peer,
        } => FlowCheck::Inbound(InboundCheck {
            source: *source,
            destination: *destination,
            peer: peer.as_deref().map(id).transpose()?,
        }),
        CheckTransfer::Outbound {
            source,
            destination,
            endpoint,
            client,
            server,
        } => FlowCheck::Outbound(OutboundCheck {
            source: *source,
            destination: *destination,
            endpoint: *endpoint,
            client: id(client)?,
            tls: FlowTls::Mesh(id(server)?),
        }),
    };
    let info = FlowInfo {
        pod: t.pod.into(),
        direction: t.direction,
        destination: t.destination,
        source: t.source,
        peer_id: t.peer_id.as_deref().map(id).transpose()?,
        cipher: t.cipher.map(Cow::Owned),
        session: t.session.map(|s| SessionCrypto {
            suite: rustls::CipherSuite::from(s.suite),
            group: s.group.map(rustls::NamedGroup::from),
            retried: s.retried,
            resumed: s.resumed,
            mesh: true,
        }),
        protection: Protection::Ktls,
        endpoint: t.endpoint,
        reason: t.reason.map(Cow::Owned),
    };
    Ok((info, check))
}

impl Agent {
    /// Takes on a kTLS flow the predecessor parked, if [`admit_flow`] lets it in.
    fn adopt_flow(&self, runtime: &tokio::runtime::Handle, flow: FlowTransfer, fds: Vec<OwnedFd>) {
        let cookie = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&flow.pod)
            .map(|p| p.netns_cookie);
        let generation = self.shared.policy.current();
        if let Ok((info, check, parked)) =
            admit_flow(cookie, &generation, &self.telemetry, flow, fds)
        {
            adopt_parked(
                &self.shared,
                &crate::runtimes::for_flow(runtime),
                info,
                check,
                parked,
                true,
                generation.number,
            );
        }
    }
}

/// Decides whether this agent continues a flow its predecessor handed over: the pod it names
/// is enrolled here (`pod_netns`: its netns cookie), the app socket is in that pod's netns,
/// this agent's policy (`generation`) admits the flow as it would an open one after a policy
/// change, and the peer socket carries kernel TLS both ways (a relay onto a plain socket
/// would put the app's bytes on the wire in clear).
///
/// A refused flow is reset here, app and peer socket, and counted as handover `refused`: the
/// received descriptors are the only ones left (the predecessor closed its own), so closing
/// them without a reset would show the app a clean end of stream, as if the peer had
/// finished, and the peer agent the same.
fn admit_flow(
    pod_netns: Option<u64>,
    generation: &Generation,
    telemetry: &Telemetry,
    flow: FlowTransfer,
    fds: Vec<OwnedFd>,
) -> anyhow::Result<(FlowInfo, FlowCheck, ParkedKtls)> {
    let what = format!("{} {} → {}", flow.pod, flow.source, flow.destination);
    // Second descriptors of both sockets, taken first: whichever check fails below, and
    // whatever has closed the others by then, the reset reaches both sockets through these.
    let sockets: Vec<OwnedFd> = fds
        .iter()
        .take(2)
        .filter_map(|f| f.try_clone().ok())
        .collect();
    let admitted = (move || {
        crate::handover::check_flow(&flow)?;
        let cookie = pod_netns.context("no such pod enrolled here")?;
        let app = fds.first().context("no descriptors")?;
        let ns = crate::sys::netns_cookie(app.as_fd()).context("netns of the app socket")?;
        anyhow::ensure!(
            ns == cookie,
            "app socket from netns {ns}, not the pod's ({cookie})"
        );
        let state = flow.relay.clone();
        let (info, check) = flow_from_transfer(flow)?;
        if let Err(r) = decide_handed_over(generation, &check) {
            anyhow::bail!(
                "refused by this agent's policy (generation {}): {} [{}]",
                generation.number,
                r.reason,
                r.code
            );
        }
        let peer = fds.get(1).context("no peer socket")?;
        ktls_both_ways(peer.as_fd()).context("peer socket")?;
        let parked = ParkedKtls::from_parts(fds, state).context("descriptors")?;
        Ok((info, check, parked))
    })();
    if let Err(e) = &admitted {
        for s in &sockets {
            let _ = crate::sys::set_zero_linger(s.as_fd());
        }
        telemetry.handover_flows("refused", 1);
        warn!(flow = %what, "handed-over flow refused, reset: {e:#}");
    }
    admitted
}

/// Whether `sock` has the `tls` ULP with keys installed for sending and receiving.
fn ktls_both_ways(sock: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<()> {
    let ulp = crate::ktls::sys::get_ulp(sock).context("getsockopt(TCP_ULP)")?;
    anyhow::ensure!(
        ulp.as_deref() == Some("tls"),
        "no kernel TLS (ULP {})",
        ulp.as_deref().unwrap_or("none")
    );
    for dir in [crate::ktls::Direction::Tx, crate::ktls::Direction::Rx] {
        crate::ktls::record_seq(sock, dir)
            .with_context(|| format!("no kernel TLS keys for {dir:?}"))?;
    }
    Ok(())
}

impl Agent {
    /// Removes what the predecessor left in the maps this agent adopted and would not write
    /// itself (ARCHITECTURE.md, "Upgrades"), keeping what stale enrollments still need.
    fn refresh_adopted_maps(&self) {
        let keep = crate::datapath::KeepSteering {
            ips: self
                .stale()
                .iter()
                .flat_map(|s| s.workload.ips.clone())
                .collect(),
        };
        let removed = self
            .shared
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refresh_adopted(&keep);
        let removed: Vec<_> = removed.into_iter().filter(|(_, n)| *n > 0).collect();
        if removed.is_empty() {
            info!("adopted maps hold only what this agent steers");
        } else {
            info!(
                ?removed,
                "removed the steering entries of the predecessor this agent does not make"
            );
        }
    }

    /// Connections this process still holds, those in set-up included.
    fn open_connections(&self) -> usize {
        usize::try_from(self.shared.live.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Refuses an enrollment change (retryably, [`HandingOver`]) while a successor is taking
    /// the pods over or has taken them: a pod enrolled here then would not be in what the
    /// successor received, and would stay unserved until enrolled again. Called under the
    /// `changes` lock, which the handover holds while it lists the pods, so a change either
    /// lands before the list or is refused.
    pub(super) fn refuse_while_handing_over(&self) -> Result<(), HandingOver> {
        if self.is_retired() {
            return Err(HandingOver { retired: true });
        }
        if self.handing_over.load(Ordering::SeqCst) {
            return Err(HandingOver { retired: false });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        net::{TcpListener, TcpStream},
        path::{Path, PathBuf},
    };

    use super::*;
    use crate::{
        config::AccessLog,
        handover::CheckTransfer,
        intercept::{enforce::Enforcer, table::Direction},
        relay::KtlsRelayState,
    };

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("upgrade-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The node's policy: `policy` (YAML) in a policy directory, or none.
    fn generation(dir: &Path, policy: Option<&str>) -> Arc<Generation> {
        if let Some(p) = policy {
            std::fs::write(dir.join("policy.yaml"), p).unwrap();
        }
        let yaml = format!(
            "trustDomain: cluster.local
caDir: /nonexistent
policyDir: {}
workloads:
  - name: httpbin
    namespace: full
    serviceAccount: httpbin
    cgroup: /sys/fs/cgroup/a
    netns: /run/netns/a
    ips: [10.88.0.10]
",
            dir.display()
        );
        let config = Config::parse("node.yaml", &yaml).unwrap();
        Enforcer::load(&config).unwrap().current()
    }

    /// Allows nothing into the namespace of httpbin.
    const ALLOW_NOTHING: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nothing, namespace: full}
spec: {}
";

    /// An inbound mesh flow from `sleep` to httpbin, as a predecessor hands it over.
    fn inbound_flow() -> FlowTransfer {
        let source = "10.88.0.31:40000".parse().unwrap();
        let destination = "10.88.0.10:80".parse().unwrap();
        FlowTransfer {
            pod: "httpbin".to_owned(),
            direction: Direction::Inbound,
            source,
            destination,
            endpoint: None,
            peer_id: Some("spiffe://cluster.local/ns/full/sa/sleep".to_owned()),
            cipher: Some("TLS13_AES_128_GCM_SHA256".to_owned()),
            session: None,
            reason: None,
            check: CheckTransfer::Inbound {
                source,
                destination,
                peer: Some("spiffe://cluster.local/ns/full/sa/sleep".to_owned()),
            },
            policy_generation: 1,
            relay: KtlsRelayState {
                up_in_pipe: 0,
                up_cap: 1 << 16,
                down_in_pipe: 0,
                down_cap: 1 << 16,
                app_eof: false,
                close_notify_sent: false,
                peer_write_shut: false,
                peer_fin_first: false,
                peer_closed: false,
                app_write_shut: false,
                to_app: Vec::new(),
                tx_seq_base: 0,
                tx_queued_base: None,
                tx_plaintext: 0,
                tx_since_check: 0,
                tx_limit: None,
                idle_for_ms: 0,
                bytes_app_to_peer: 0,
                bytes_peer_to_app: 0,
            },
        }
    }

    /// A connected TCP pair on loopback: the agent's end, and the far end the test reads.
    fn pair() -> (OwnedFd, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let far = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (near, _) = l.accept().unwrap();
        (near.into(), far)
    }

    /// The six descriptors of a handed-over flow (app, peer, two pipes), and the far ends of
    /// its two sockets.
    fn descriptors() -> (Vec<OwnedFd>, [TcpStream; 2]) {
        let (app, app_far) = pair();
        let (peer, peer_far) = pair();
        let (a, b) = crate::ktls::sys::pipe2(false).unwrap();
        let (c, d) = crate::ktls::sys::pipe2(false).unwrap();
        (vec![app, peer, a, b, c, d], [app_far, peer_far])
    }

    /// The far end of a socket the agent reset: a read fails with ECONNRESET (a close would
    /// read as a clean end of stream, 0 bytes).
    fn assert_reset(mut far: TcpStream, what: &str) {
        far.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        match far.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("{what}: the far end read {other:?}, not a reset"),
        }
    }

    #[test]
    fn a_pod_keeps_the_inbound_slot_the_adopted_maps_give_it_and_takes_no_other() {
        let mut next = 0;
        // Handed over: the slot the predecessor gave it, even if a lower one is free.
        assert_eq!(choose_slot(&[], Some(2), &[0, 1], &mut next), 2);
        // A stale pod of the predecessor holds 0 and 1: a new pod gets neither.
        assert_eq!(choose_slot(&[2], None, &[0, 1], &mut next), 3);
        // Its adopted slot taken here already (cannot happen with one netns per pod): a free one.
        assert_eq!(choose_slot(&[2, 3], Some(3), &[0, 1], &mut next), 4);
        // Maps of its own: the first free slot, as before.
        let mut next = 0;
        assert_eq!(choose_slot(&[0, 1], None, &[0, 1], &mut next), 2);
    }

    #[test]
    fn a_handed_over_flow_this_agent_refuses_is_reset_and_counted() {
        let scratch = Scratch::new("refuse");
        let allow_all = generation(&scratch.0, None);
        let denying = generation(&scratch.0, Some(ALLOW_NOTHING));
        let telemetry = Telemetry::new(&AccessLog::default());
        let own_netns = {
            let (fd, _far) = pair();
            crate::sys::netns_cookie(fd.as_fd()).unwrap()
        };
        let cases: [(&str, Option<u64>, &Generation, &str); 4] = [
            (
                "pod not enrolled",
                None,
                &allow_all,
                "no such pod enrolled here",
            ),
            (
                "app socket from another netns",
                Some(own_netns ^ 1),
                &allow_all,
                "app socket from netns",
            ),
            (
                "policy now denies",
                Some(own_netns),
                &denying,
                "refused by this agent's policy",
            ),
            // The one check a well-formed flow can still fail on this host (no `tls` module,
            // and these are plain sockets): it comes after the policy, so the flow got past it.
            (
                "peer without kTLS",
                Some(own_netns),
                &allow_all,
                "no kernel TLS",
            ),
        ];
        for (n, (what, pod_netns, g, because)) in cases.into_iter().enumerate() {
            let (fds, [app_far, peer_far]) = descriptors();
            let e = admit_flow(pod_netns, g, &telemetry, inbound_flow(), fds)
                .err()
                .unwrap_or_else(|| panic!("{what}: admitted"));
            let e = format!("{e:#}");
            assert!(e.contains(because), "{what}: {e}");
            assert_reset(app_far, what);
            assert_reset(peer_far, what);
            let metrics = telemetry.encode(false).unwrap();
            let line = format!(
                "interceptor_handover_flows_total{{result=\"refused\"}} {}",
                n + 1
            );
            assert!(metrics.contains(&line), "{what}: no `{line}` in\n{metrics}");
        }
        // A malformed flow message is one refused flow, not a failed takeover.
        let (fds, [app_far, peer_far]) = descriptors();
        let mut flow = inbound_flow();
        flow.relay.down_cap = 2 << 20;
        let Err(e) = admit_flow(Some(own_netns), &allow_all, &telemetry, flow, fds) else {
            panic!("a flow with a 2 MiB pipe admitted");
        };
        assert!(format!("{e:#}").contains("1 MiB"), "{e:#}");
        assert_reset(app_far, "malformed flow");
        assert_reset(peer_far, "malformed flow");
        let metrics = telemetry.encode(false).unwrap();
        assert!(metrics.contains("interceptor_handover_flows_total{result=\"refused\"} 5"));
    }
}
