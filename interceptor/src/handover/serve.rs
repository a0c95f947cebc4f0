//! The running agent's side: listen on the handover socket and give a successor the
//! listeners of every enrolled pod.
//!
//! Nothing the old agent does before the successor says `taken` changes its own state: it
//! sends duplicates of its listener descriptors and keeps accepting. So a successor that
//! dies, lies or stalls half-way leaves the old agent serving exactly as before. Only after
//! `taken` does it stop accepting; the kernel's accept queues stay open throughout because
//! the successor holds the same listening sockets.

use std::{
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::{fs::PermissionsExt as _, net::UnixListener},
    },
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tracing::{error, info, warn};

use super::{FLOWS_VERSION, FlowTransfer, Message, PodTransfer, Versions, channel::Channel};
use crate::relay::ParkedKtls;

/// How long the successor may take between receiving the pods and holding them all (it
/// loads its programs and opens every pod's accept loop meanwhile). Generous: this agent
/// serves all the while, a successor that dies is seen at once (its socket closes), so only
/// a live but slow one waits here; 60 s was too short for a start under TCG on a loaded host.
const TAKE_TIMEOUT: Duration = Duration::from_secs(180);

/// What the handover needs from the running agent.
pub trait Source: Send + Sync + 'static {
    /// Every enrolled pod, with duplicates of its listeners in the order of
    /// `PodTransfer::listeners`.
    fn pods(&self) -> anyhow::Result<Vec<(PodTransfer, Vec<OwnedFd>)>>;
    /// The successor accepts on every listener: stop accepting, keep the open flows.
    /// Returns how many flows stay in this process.
    fn release(&self) -> u32;
    /// No handover is possible (incompatible successor): close the listeners so the successor
    /// can bind its own, as a restart would; the open flows stay. Returns the flows kept.
    fn step_down(&self) -> u32;
    /// Flows still open in this process.
    fn open_flows(&self) -> usize;
    /// Parks every open kTLS flow for the successor (after `release`): each comes back with
    /// its descriptors in [`FlowTransfer`] order. Flows that end or fail meanwhile are not
    /// in the list.
    fn park_flows(&self) -> Vec<(FlowTransfer, ParkedKtls)>;
    /// A parked flow that could not be sent: continue it here.
    fn keep_flow(&self, flow: FlowTransfer, relay: ParkedKtls);
    /// `n` parked flows reached the successor (counted once sent, not when parked: a flow
    /// whose send failed is kept instead).
    fn flows_sent(&self, _n: u32) {}
    /// A successor went away or failed before it took the pods: this agent serves on as
    /// before, enrollment changes included.
    fn aborted(&self) {}
}

/// Where a handover left the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A successor holds the listeners (pid); this process keeps only its open flows.
    HandedOver { successor: i32 },
    /// The successor could not take over; this process closed its listeners for it.
    SteppedDown { successor: i32 },
}

/// Binds the handover socket: its directory 0700, the socket 0600 (both root's), replacing a
/// stale socket file of an agent that is gone.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove stale {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// Serves successors one at a time on a thread of its own until one of them took over (or
/// made this agent step down), then reports it on `done` and stops.
pub fn spawn(
    listener: UnixListener,
    source: Arc<dyn Source>,
    done: tokio::sync::watch::Sender<Option<Outcome>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("handover".to_owned())
        .spawn(move || {
            for conn in listener.incoming() {
                let sock = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("handover socket: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match serve_one(sock, source.as_ref()) {
                    Ok(Some((outcome, ch))) => {
                        let _ = done.send(Some(outcome));
                        if let Some(ch) = ch {
                            report(ch, source.as_ref());
                        }
                        return;
                    }
                    Ok(None) => source.aborted(),
                    Err(e) => {
                        error!("handover aborted, still serving: {e:#}");
                        source.aborted();
                    }
                }
            }
        })
        .map(|_| ())
}

/// Tells the successor how many flows this process still serves, until it has none or the
/// successor stops listening (the process exits at the end of its drain anyway).
fn report(mut ch: Channel, source: &dyn Source) {
    loop {
        let flows = u32::try_from(source.open_flows()).unwrap_or(u32::MAX);
        if ch.send(&Message::Draining { flows }, &[]).is_err() || flows == 0 {
            return;
        }
        std::thread::sleep(super::REPORT_EVERY);
    }
}

/// One successor's conversation. `Ok(None)`: it went away before asking for anything. A
/// successor that took over comes back with the channel, for [`report`].
fn serve_one(
    sock: std::os::unix::net::UnixStream,
    source: &dyn Source,
) -> anyhow::Result<Option<(Outcome, Option<Channel>)>> {
    let mut ch = Channel::new(sock)?;
    let successor = ch.peer.pid;
    let ours = Versions::ours()?;
    let (hello, _) = ch.expect("hello")?;
    let Message::Hello { versions, agent } = hello else {
        return Ok(None);
    };
    info!(successor, %agent, theirs = %versions, ours = %ours, "handover requested");
    let Some(version) = ours.negotiate(versions) else {
        let kept = source.step_down();
        let reason = format!(
            "no common handover protocol version (successor speaks {versions}, this agent {ours})"
        );
        warn!(
            successor,
            flows_kept = kept,
            "{reason}: falling back to a restart; listeners closed so the successor can bind its \
             own, open flows stay here until they end or the drain window expires"
        );
        let _ = ch.send(
            &Message::Refuse {
                reason,
                versions: ours,
            },
            &[],
        );
        return Ok(Some((Outcome::SteppedDown { successor }, None)));
    };
    ch.send(&Message::Accept { version }, &[])?;
    let pods = source.pods()?;
    for (pod, fds) in &pods {
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        ch.send(&Message::Pod { pod: pod.clone() }, &borrowed)
            .with_context(|| format!("pod `{}`", pod.workload.name))?;
    }
    let count = u32::try_from(pods.len()).unwrap_or(u32::MAX);
    ch.send(
        &Message::Sent {
            pods: count,
            flows_kept: u32::try_from(source.open_flows()).unwrap_or(u32::MAX),
        },
        &[],
    )?;
    drop(pods);
    ch.set_timeout(TAKE_TIMEOUT)?;
    let (taken, _) = ch.expect("taken")?;
    if let Message::Taken { pods } = taken
        && pods != count
    {
        warn!(
            successor,
            sent = count,
            taken = pods,
            "the successor took fewer pods than sent"
        );
    }
    let mut kept = source.release();
    if version >= FLOWS_VERSION {
        let (sent, stayed) = send_flows(&mut ch, source);
        kept = kept.saturating_sub(sent).max(stayed);
        info!(
            successor,
            flows_sent = sent,
            flows_kept = stayed,
            "open kTLS flows handed over; kernel TLS state stays in their sockets"
        );
    }
    info!(
        successor,
        version,
        pods = count,
        flows_kept = kept,
        "handed over: the successor holds the listeners; this agent stopped accepting"
    );
    let _ = ch.send(&Message::Released { flows_kept: kept }, &[]);
    Ok(Some((Outcome::HandedOver { successor }, Some(ch))))
}

/// Parks the open kTLS flows and sends each with its descriptors. A flow that cannot be sent
/// (the successor went away) and every flow after it stays here, resumed where it stopped.
/// Returns (sent, kept here).
fn send_flows(ch: &mut Channel, source: &dyn Source) -> (u32, u32) {
    let parked = source.park_flows();
    let (mut sent, mut kept) = (0u32, 0u32);
    let mut broken = false;
    for (flow, relay) in parked {
        if !broken {
            let fds = relay.fds();
            match ch.send(
                &Message::Flow {
                    flow: Box::new(flow.clone()),
                },
                &fds,
            ) {
                Ok(()) => {
                    sent += 1;
                    // Our copies close here; the successor holds the flow.
                    continue;
                }
                Err(e) => {
                    error!("handing a flow over failed, keeping the rest here: {e:#}");
                    broken = true;
                }
            }
        }
        source.keep_flow(flow, relay);
        kept += 1;
    }
    source.flows_sent(sent);
    (sent, kept)
}
