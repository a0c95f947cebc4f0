//! The new agent's side (`interceptor run --takeover`): ask the running agent for its
//! listeners before binding anything.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    os::{fd::AsFd as _, unix::net::UnixStream},
    path::Path,
};

use anyhow::{Context as _, bail};
use tracing::{info, warn};

use super::{
    FLOWS_VERSION, FlowTransfer, ListenerSpec, MAX_PODS, Message, PodTransfer, Versions,
    channel::Channel,
};
use crate::sys;

/// A listener received from the old agent, with what it is.
pub type GivenListener = (ListenerSpec, TcpListener);

/// A pod whose listeners this agent now holds (as does the old agent, until `release`).
#[derive(Debug)]
pub struct ReceivedPod {
    pub transfer: PodTransfer,
    pub listeners: Vec<GivenListener>,
}

/// What asking the running agent gave.
pub enum Asked {
    /// Nobody listens on the handover socket: start as usual.
    NoPredecessor,
    /// The running agent cannot hand over to us; it closed its listeners, start as usual.
    Fallback { reason: String },
    /// Listeners received: enroll with them, then [`Takeover::finish`].
    Received(Takeover),
}

/// A handover in progress: the pods received, and the connection to the old agent, which
/// keeps accepting until [`Takeover::finish`].
pub struct Takeover {
    channel: Channel,
    pub version: u32,
    pub predecessor: i32,
    pub pods: BTreeMap<String, ReceivedPod>,
    pub flows_kept: u32,
}

/// Connects to the running agent at `socket` and receives its pods.
pub fn ask(socket: &Path) -> anyhow::Result<Asked> {
    let sock = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            info!(socket = %socket.display(), "no running agent to take over from ({e}); starting afresh");
            return Ok(Asked::NoPredecessor);
        }
        Err(e) => return Err(e).with_context(|| format!("connect {}", socket.display())),
    };
    let mut ch = Channel::new(sock)?;
    let predecessor = ch.peer.pid;
    let ours = Versions::ours()?;
    ch.send(
        &Message::Hello {
            versions: ours,
            agent: format!(
                "interceptor {} pid {}",
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            ),
        },
        &[],
    )?;
    let (answer, _) = ch
        .recv()
        .context("waiting for the running agent's answer")?;
    let version = match answer {
        Message::Accept { version } if version >= ours.min && version <= ours.max => version,
        Message::Accept { version } => {
            bail!("the running agent chose handover version {version}, outside ours ({ours})")
        }
        Message::Refuse { reason, versions } => {
            warn!(
                predecessor,
                theirs = %versions,
                ours = %ours,
                "the running agent cannot hand over ({reason}); it closed its listeners, \
                 starting afresh (today's restart: connections made meanwhile are refused)"
            );
            return Ok(Asked::Fallback { reason });
        }
        Message::Abort { reason } => bail!("the running agent gave up: {reason}"),
        other => bail!("expected `accept` or `refuse`, got `{}`", other.kind()),
    };
    info!(predecessor, version, "taking over from the running agent");
    let mut pods = BTreeMap::new();
    let flows_kept = loop {
        let (msg, fds) = ch.recv()?;
        match msg {
            Message::Pod { pod } => {
                if pods.len() >= MAX_PODS as usize {
                    bail!("more than {MAX_PODS} pods");
                }
                let name = pod.workload.name.clone();
                let received = adopt(pod, fds).with_context(|| format!("pod `{name}`"))?;
                if pods.insert(name.clone(), received).is_some() {
                    bail!("pod `{name}` sent twice");
                }
            }
            Message::Sent {
                pods: n,
                flows_kept,
            } => {
                if n as usize != pods.len() {
                    bail!(
                        "the running agent announced {n} pods and sent {}",
                        pods.len()
                    );
                }
                break flows_kept;
            }
            Message::Abort { reason } => bail!("the running agent gave up: {reason}"),
            other => bail!("expected `pod` or `sent`, got `{}`", other.kind()),
        }
    };
    Ok(Asked::Received(Takeover {
        channel: ch,
        version,
        predecessor,
        pods,
        flows_kept,
    }))
}

/// Checks that each descriptor is what the message says: a listening TCP socket bound to
/// the announced address, in the netns the workload names.
fn adopt(pod: PodTransfer, fds: Vec<std::os::fd::OwnedFd>) -> anyhow::Result<ReceivedPod> {
    let expected_ns = sys::netns_cookie_of(&pod.workload.netns)
        .with_context(|| format!("netns {}", pod.workload.netns.display()))?;
    if expected_ns != pod.netns_cookie {
        bail!(
            "netns cookie {} announced, {} names {expected_ns}",
            pod.netns_cookie,
            pod.workload.netns.display()
        );
    }
    let mut listeners = Vec::with_capacity(fds.len());
    for (spec, fd) in pod.listeners.iter().zip(fds) {
        let ns = sys::netns_cookie(fd.as_fd()).context("netns of a received listener")?;
        if ns != expected_ns {
            bail!("a listener from netns {ns}, not the pod's ({expected_ns})");
        }
        if !sys::is_listening(fd.as_fd()).context("SO_ACCEPTCONN")? {
            bail!("a descriptor that is not a listening socket");
        }
        let l = TcpListener::from(fd);
        let at = l.local_addr().context("address of a received listener")?;
        if at != SocketAddr::new(spec.ip, spec.port) {
            bail!(
                "listener bound to {at}, announced {}:{}",
                spec.ip,
                spec.port
            );
        }
        listeners.push((*spec, l));
    }
    Ok(ReceivedPod {
        transfer: pod,
        listeners,
    })
}

impl Takeover {
    /// Every received pod accepts in this agent now: tell the old agent to stop accepting,
    /// and wait for it to confirm. Returns how many flows stay in the old process, and the
    /// channel on which it reports them ([`follow`]).
    pub fn finish(
        mut self,
        pods: u32,
        mut flow: impl FnMut(FlowTransfer, Vec<std::os::fd::OwnedFd>),
    ) -> anyhow::Result<(u32, u32, Channel)> {
        self.channel.send(&Message::Taken { pods }, &[])?;
        let mut flows = 0u32;
        let flows_kept = loop {
            let (msg, fds) = self.channel.recv().context("waiting for `released`")?;
            match msg {
                Message::Flow { flow: f } if self.version >= FLOWS_VERSION => {
                    flows += 1;
                    flow(*f, fds);
                }
                Message::Released { flows_kept } => break flows_kept,
                Message::Abort { reason } => bail!("the handover peer gave up: {reason}"),
                other => bail!("expected `flow` or `released`, got `{}`", other.kind()),
            }
        };
        info!(
            predecessor = self.predecessor,
            pods,
            flows_received = flows,
            flows_kept,
            "took over: the previous agent stopped accepting and keeps only the flows it \
             could not hand over"
        );
        Ok((flows_kept, flows, self.channel))
    }

    /// Gives up before taking over: the old agent keeps serving.
    pub fn abort(mut self, reason: &str) {
        let _ = self.channel.send(
            &Message::Abort {
                reason: reason.to_owned(),
            },
            &[],
        );
    }
}

/// Follows the old agent's reports of the flows it still serves, storing the latest in
/// `flows`, until it has none or exits (then 0). Runs on a thread of its own.
pub fn follow(ch: Channel, flows: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::Ordering;
    let mut ch = ch;
    let _ = ch.set_timeout(super::REPORT_EVERY * 3);
    let _ = std::thread::Builder::new()
        .name("handover-follow".to_owned())
        .spawn(move || {
            while let Ok((Message::Draining { flows: n }, _)) = ch.expect("draining") {
                flows.store(u64::from(n), Ordering::Relaxed);
                if n == 0 {
                    break;
                }
            }
            flows.store(0, Ordering::Relaxed);
        });
}
