//! Agent upgrades that no connection notices: a new agent (`interceptor run --takeover`)
//! takes the running agent's listeners over a unix socket instead of binding its own, so the
//! kernel's accept queues are never closed and no new connection is refused.
//!
//! This file is the protocol, and it is pure: messages, version negotiation, framing. The
//! I/O lives in [`channel`] (frames plus `SCM_RIGHTS` over a blocking unix socket), the old
//! agent's side in [`serve`], the new agent's in [`take`]. ARCHITECTURE.md, "Upgrades",
//! describes the sequence and what each side holds at every step.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON, at most
//! [`MAX_FRAME`]. A message that carries descriptors says how many ([`Message::fds`]); the
//! receiver checks the count it got against it. Anything malformed ends the handover with an
//! error naming what was wrong: the old agent then keeps serving as before.

pub mod channel;
pub mod serve;
pub mod take;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{config::Workload, intercept::table::Direction, relay::KtlsRelayState};

/// The protocol version this build speaks at most. 2 moves open kTLS flows (`flow`).
pub const VERSION: u32 = 2;
/// The first version whose old agent sends its open kTLS flows.
pub const FLOWS_VERSION: u32 = 2;
/// The oldest version this build still speaks.
pub const MIN_VERSION: u32 = 1;

/// Bound on one frame's JSON: a pod's enrollment is well under a kilobyte.
pub const MAX_FRAME: usize = 1 << 20;
/// Bound on the pods one handover may carry (a node runs a few hundred at most).
pub const MAX_PODS: u32 = 4096;
/// How often a draining old agent reports its open flows to its successor.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Bound on how long either side waits for the other's next message.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Overrides the versions this agent speaks (`MIN-MAX` or `N`). Tests use it to run version
/// N against N+1 with one binary; operators never need it.
pub const VERSION_ENV: &str = "INTERCEPTOR_HANDOVER_VERSIONS";

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Versions {
    pub min: u32,
    pub max: u32,
}

impl Versions {
    pub const BUILT_IN: Versions = Versions {
        min: MIN_VERSION,
        max: VERSION,
    };

    /// What this process speaks: [`Versions::BUILT_IN`] unless [`VERSION_ENV`] says otherwise.
    pub fn ours() -> Result<Versions, ProtocolError> {
        match std::env::var(VERSION_ENV) {
            Ok(s) => Versions::parse(&s),
            Err(_) => Ok(Versions::BUILT_IN),
        }
    }

    pub fn parse(s: &str) -> Result<Versions, ProtocolError> {
        let bad = || ProtocolError::Invalid(format!("{VERSION_ENV}: `{s}` is not N or MIN-MAX"));
        let (min, max) = match s.trim().split_once('-') {
            Some((a, b)) => (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            ),
            None => {
                let n = s.trim().parse().map_err(|_| bad())?;
                (n, n)
            }
        };
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(Versions { min, max })
    }

    /// The version both sides speak: the highest one in both ranges.
    pub fn negotiate(self, theirs: Versions) -> Option<u32> {
        let v = self.max.min(theirs.max);
        (v >= self.min && v >= theirs.min).then_some(v)
    }
}

impl fmt::Display for Versions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// Which of a pod's listeners a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ListenerRole {
    Outbound,
    Inbound,
}

/// One listener of a pod: its role and the address it is bound to (in the pod's netns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerSpec {
    pub role: ListenerRole,
    pub ip: IpAddr,
    pub port: u16,
}

/// An enrolled pod as the old agent hands it over: the enrollment and its listeners, whose
/// descriptors travel with the message in the order of `listeners`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodTransfer {
    pub workload: Workload,
    pub netns_cookie: u64,
    pub listeners: Vec<ListenerSpec>,
}

/// The TLS session of a handed-over flow, as the flow table shows it (IANA code points).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionTransfer {
    pub suite: u16,
    pub group: Option<u16>,
    pub retried: bool,
    pub resumed: bool,
}

/// What a handed-over flow was admitted on, so the new agent decides it again under its own
/// policy (and on every later policy change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "direction", rename_all = "camelCase", deny_unknown_fields)]
pub enum CheckTransfer {
    #[serde(rename_all = "camelCase")]
    Inbound {
        source: SocketAddr,
        destination: SocketAddr,
        peer: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Outbound {
        source: SocketAddr,
        destination: SocketAddr,
        endpoint: SocketAddr,
        client: String,
        /// The server identity mesh mTLS verified.
        server: String,
    },
}

/// One open kTLS flow: who it is between, how it was admitted, and its relay's state. Its
/// descriptors travel with it: app socket, peer socket (kTLS installed), then both pipes
/// (read and write end, app → peer first), [`FLOW_FDS`] in all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowTransfer {
    pub pod: String,
    pub direction: Direction,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub endpoint: Option<SocketAddr>,
    pub peer_id: Option<String>,
    pub cipher: Option<String>,
    pub session: Option<SessionTransfer>,
    pub reason: Option<String>,
    pub check: CheckTransfer,
    /// The old agent's policy generation when it handed the flow over (for the log: the
    /// new agent decides the flow under its own).
    pub policy_generation: u64,
    pub relay: KtlsRelayState,
}

/// Descriptors per [`FlowTransfer`].
pub const FLOW_FDS: usize = 6;

/// Everything either side sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Message {
    /// New → old, first: who is asking and which versions it speaks.
    #[serde(rename_all = "camelCase")]
    Hello { versions: Versions, agent: String },
    /// Old → new: the version both use from here on.
    #[serde(rename_all = "camelCase")]
    Accept { version: u32 },
    /// Old → new: no common version (or the old agent cannot hand over now). The old agent
    /// has already closed its listeners when this is sent, so the new one can bind its own:
    /// today's restart, never half a handover.
    #[serde(rename_all = "camelCase")]
    Refuse { reason: String, versions: Versions },
    /// Old → new: one enrolled pod, with its listeners' descriptors attached.
    #[serde(rename_all = "camelCase")]
    Pod { pod: PodTransfer },
    /// Old → new, version 2 on, between `taken` and `released`: one open kTLS flow, parked
    /// in the old agent, with its descriptors; the new agent continues its relay.
    #[serde(rename_all = "camelCase")]
    Flow { flow: Box<FlowTransfer> },
    /// Old → new: all pods sent.
    #[serde(rename_all = "camelCase")]
    Sent { pods: u32, flows_kept: u32 },
    /// New → old: the new agent accepts on every listener it received; the old one stops
    /// accepting and keeps only its open flows.
    #[serde(rename_all = "camelCase")]
    Taken { pods: u32 },
    /// Old → new, last: the old agent stopped accepting; its open flows end at their own pace
    /// (or at the drain deadline) in the old process.
    #[serde(rename_all = "camelCase")]
    Released { flows_kept: u32 },
    /// Old → new, every [`REPORT_EVERY`] after `released` until the old agent exits: how many
    /// flows it still serves (the new agent reports them in `flows --stats`).
    #[serde(rename_all = "camelCase")]
    Draining { flows: u32 },
    /// Either way: the sender gives up; the connection closes after it.
    #[serde(rename_all = "camelCase")]
    Abort { reason: String },
}

impl Message {
    /// How many descriptors travel with this message.
    pub fn fds(&self) -> usize {
        match self {
            Message::Pod { pod } => pod.listeners.len(),
            Message::Flow { .. } => FLOW_FDS,
            _ => 0,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Accept { .. } => "accept",
            Message::Refuse { .. } => "refuse",
            Message::Pod { .. } => "pod",
            Message::Flow { .. } => "flow",
            Message::Sent { .. } => "sent",
            Message::Taken { .. } => "taken",
            Message::Released { .. } => "released",
            Message::Draining { .. } => "draining",
            Message::Abort { .. } => "abort",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes (at most {MAX_FRAME})")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{got} descriptors with a `{kind}` message that carries {want}")]
    Descriptors {
        kind: &'static str,
        want: usize,
        got: usize,
    },
    #[error("expected {want}, got a `{got}` message")]
    Unexpected {
        want: &'static str,
        got: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The frame for `msg`: length prefix and JSON.
pub fn encode(msg: &Message) -> Result<Vec<u8>, ProtocolError> {
    let body = serde_json::to_vec(msg).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| ProtocolError::TooLarge(body.len()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The body length a frame header announces, refused above [`MAX_FRAME`] before anything
/// is allocated for it.
pub fn body_len(header: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    if len == 0 {
        return Err(ProtocolError::Malformed("empty frame".to_owned()));
    }
    Ok(len)
}

/// Parses a frame body and checks the descriptors that came with it.
pub fn decode(body: &[u8], fds: usize) -> Result<Message, ProtocolError> {
    let msg: Message =
        serde_json::from_slice(body).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if msg.fds() != fds {
        return Err(ProtocolError::Descriptors {
            kind: msg.kind(),
            want: msg.fds(),
            got: fds,
        });
    }
    if let Message::Pod { pod } = &msg {
        check_pod(pod)?;
    }
    Ok(msg)
}

/// Bound on the plaintext a parked relay may carry outside its pipes (a few records).
pub const MAX_FLOW_PLAINTEXT: usize = 80 << 10;
/// Bound on a parked relay's pipe size (the relay never asks for more).
pub const MAX_FLOW_PIPE: usize = 1 << 20;

/// What a received flow must look like before the new agent takes its descriptors on. Checked
/// when the flow is admitted, not when its frame is decoded: one bad flow is reset on its own
/// and the takeover goes on with the others.
pub fn check_flow(flow: &FlowTransfer) -> Result<(), ProtocolError> {
    let r = &flow.relay;
    let bad = |what: &str| {
        ProtocolError::Invalid(format!(
            "flow of pod `{}` {} → {}: {what}",
            flow.pod, flow.source, flow.destination
        ))
    };
    if flow.pod.is_empty() {
        return Err(bad("no pod"));
    }
    if r.up_cap > MAX_FLOW_PIPE || r.down_cap > MAX_FLOW_PIPE {
        return Err(bad("pipe over 1 MiB"));
    }
    if r.to_app.len() > MAX_FLOW_PLAINTEXT {
        return Err(bad("too much buffered plaintext"));
    }
    let check_dir = match flow.check {
        CheckTransfer::Inbound { .. } => Direction::Inbound,
        CheckTransfer::Outbound { .. } => Direction::Outbound,
    };
    if check_dir != flow.direction {
        return Err(bad("admission check of the other direction"));
    }
    Ok(())
}

/// What a received pod must look like before the new agent acts on it.
fn check_pod(pod: &PodTransfer) -> Result<(), ProtocolError> {
    if pod.listeners.is_empty() || pod.listeners.len() > crate::sys::MAX_PASSED_FDS {
        return Err(ProtocolError::Invalid(format!(
            "pod `{}` with {} listeners",
            pod.workload.name,
            pod.listeners.len()
        )));
    }
    for role in [ListenerRole::Outbound, ListenerRole::Inbound] {
        if !pod.listeners.iter().any(|l| l.role == role) {
            return Err(ProtocolError::Invalid(format!(
                "pod `{}` without an {role:?} listener",
                pod.workload.name
            )));
        }
    }
    // A pod enrolled by netns (CNI) has no cgroup of its own: its path is empty.
    let cgroup = &pod.workload.cgroup;
    if !pod.workload.netns.is_absolute() || !(cgroup.is_absolute() || cgroup.as_os_str().is_empty())
    {
        return Err(ProtocolError::Invalid(format!(
            "pod `{}`: netns (and cgroup, if any) must be absolute paths",
            pod.workload.name
        )));
    }
    Ok(())
}

/// Where the handover socket lives, and how long an agent told to stop keeps serving while
/// it waits for a successor (and then for its open flows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub socket: PathBuf,
    pub drain_window: Duration,
}

#[cfg(test)]
mod tests;
