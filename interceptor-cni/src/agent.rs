//! Talking to the node agent: one JSON request line on its admin socket, one answer line,
//! with a timeout; and the membership cache the agent leaves on the node for the times it
//! cannot answer.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::plugin::NetConf;

/// How the agent names a pod (the agent's `cluster::PodRef`, field for field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentError {
    /// No answer: the socket is missing, refused, or the answer did not come in time.
    Unreachable(String),
    /// The agent answered with an error.
    Refused(String),
    /// The agent is handing its pods over to a successor (an upgrade) and asked to be asked
    /// again; still so when the retries ran out.
    HandingOver(String),
}

/// The agent's error code for a refusal to be retried as it was (the agent's
/// `admin::HANDING_OVER`).
const HANDING_OVER: &str = "handing_over";
/// First wait before asking again an agent that is handing over; doubled each time up to
/// [`RETRY_MAX_WAIT`]. A handover takes well under a second on a node; the budget is the
/// plugin's `timeoutSeconds`, far inside the runtime's own limit for a sandbox's network
/// set-up (kubelet: 2 min).
const RETRY_FIRST_WAIT: Duration = Duration::from_millis(50);
const RETRY_MAX_WAIT: Duration = Duration::from_secs(1);

/// What the membership cache says about a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Mesh,
    Outside,
    /// No cache, an unreadable one, or a namespace it does not cover.
    Unknown,
}

/// The node agent as the plugin needs it (a trait so the protocol is tested without one).
pub trait Agent {
    fn enroll(
        &self,
        conf: &NetConf,
        pod: &PodRef,
        netns: &str,
        ips: &[IpAddr],
        container_id: &str,
    ) -> Result<String, AgentError>;
    fn unenroll(
        &self,
        conf: &NetConf,
        pod: &PodRef,
        container_id: &str,
    ) -> Result<String, AgentError>;
    fn check(
        &self,
        conf: &NetConf,
        pod: &PodRef,
        netns: &str,
        ips: &[IpAddr],
        container_id: &str,
    ) -> Result<String, AgentError>;
    fn cached_membership(&self, conf: &NetConf, namespace: &str) -> Membership;
}

/// The real agent, over its admin socket.
pub struct SocketAgent;

impl Agent for SocketAgent {
    fn enroll(
        &self,
        conf: &NetConf,
        pod: &PodRef,
        netns: &str,
        ips: &[IpAddr],
        container_id: &str,
    ) -> Result<String, AgentError> {
        ask(
            conf,
            &json!({"cmd": "enroll-pod", "pod": pod, "netns": netns, "ips": ips,
                    "containerId": container_id}),
        )
    }

    fn unenroll(
        &self,
        conf: &NetConf,
        pod: &PodRef,
        container_id: &str,
    ) -> Result<String, AgentError> {
        ask(
            conf,
            &json!({"cmd": "unenroll-pod", "pod": pod, "containerId": container_id}),
        )
    }

    fn check(
        &self,
        conf: &NetConf,
        pod: &PodRef,
        netns: &str,
        ips: &[IpAddr],
        container_id: &str,
    ) -> Result<String, AgentError> {
        ask(
            conf,
            &json!({"cmd": "check-pod", "pod": pod, "netns": netns, "ips": ips,
                    "containerId": container_id}),
        )
    }

    fn cached_membership(&self, conf: &NetConf, namespace: &str) -> Membership {
        match std::fs::read(&conf.membership_file) {
            Ok(bytes) => {
                MembershipCache::parse(&bytes).map_or(Membership::Unknown, |c| c.of(namespace))
            }
            Err(_) => Membership::Unknown,
        }
    }
}

/// One request line, one answer line (`{"result":"ok"|"error","message":...}`).
/// [`call`] with the socket and timeout the plugin's config names, asked again while the
/// agent answers that it is handing over ([`retry_while_handing_over`]).
fn ask(conf: &NetConf, request: &Value) -> Result<String, AgentError> {
    let timeout = Duration::from_secs(conf.timeout_seconds);
    retry_while_handing_over(timeout, std::thread::sleep, || {
        call(&conf.admin_socket, timeout, request)
    })
}

/// Calls `once` again, with exponential backoff, while it answers
/// [`AgentError::HandingOver`] and `budget` is not spent: during an upgrade the old agent
/// refuses enrollment changes until the new one has taken the pods and answers on the same
/// socket path. Any other answer is returned at once.
pub fn retry_while_handing_over(
    budget: Duration,
    mut sleep: impl FnMut(Duration),
    mut once: impl FnMut() -> Result<String, AgentError>,
) -> Result<String, AgentError> {
    let mut waited = Duration::ZERO;
    let mut wait = RETRY_FIRST_WAIT;
    loop {
        match once() {
            Err(AgentError::HandingOver(_)) if waited + wait <= budget => {
                sleep(wait);
                waited += wait;
                wait = (wait * 2).min(RETRY_MAX_WAIT);
            }
            Err(AgentError::HandingOver(m)) => {
                return Err(AgentError::HandingOver(format!(
                    "{m} (asked again for {:.1} s)",
                    waited.as_secs_f64()
                )));
            }
            other => return other,
        }
    }
}

pub fn call(socket: &Path, timeout: Duration, request: &Value) -> Result<String, AgentError> {
    let unreachable = |what: &str, e: std::io::Error| {
        AgentError::Unreachable(format!("{what} {}: {e}", socket.display()))
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| unreachable("connect", e))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| unreachable("configure", e))?;
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| unreachable("write to", e))?;
    // Bounded like the agent's own request lines.
    let mut answer = String::new();
    BufReader::new((&stream).take(1 << 20))
        .read_line(&mut answer)
        .map_err(|e| unreachable("read from", e))?;
    if answer.trim().is_empty() {
        return Err(AgentError::Unreachable(format!(
            "{} closed without answering",
            socket.display()
        )));
    }
    let value: Value = serde_json::from_str(&answer)
        .map_err(|e| AgentError::Refused(format!("unreadable answer `{}`: {e}", answer.trim())))?;
    let message = value
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    match value.get("result").and_then(Value::as_str) {
        Some("ok") => Ok(message),
        _ if value.get("code").and_then(Value::as_str) == Some(HANDING_OVER) => {
            Err(AgentError::HandingOver(message))
        }
        _ => Err(AgentError::Refused(message)),
    }
}

/// The file the agent writes on the node (`cni.membershipFile`) whenever what it knows of the
/// namespaces changes: which are in the mesh, and whether the list covers every namespace
/// (a directory that has not synced yet knows only some).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembershipCache {
    pub version: u32,
    /// Namespace → in the mesh.
    pub namespaces: BTreeMap<String, bool>,
    /// True when a namespace not listed is known to be outside the mesh.
    pub complete: bool,
}

impl MembershipCache {
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Self>(bytes)
            .ok()
            .filter(|c| c.version == 1)
    }

    pub fn of(&self, namespace: &str) -> Membership {
        match self.namespaces.get(namespace) {
            Some(true) => Membership::Mesh,
            Some(false) => Membership::Outside,
            None if self.complete => Membership::Outside,
            None => Membership::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_fails_closed_on_anything_it_does_not_know() {
        let c = MembershipCache::parse(
            br#"{"version":1,"namespaces":{"full":true,"legacy":false},"complete":false}"#,
        )
        .unwrap();
        assert_eq!(c.of("full"), Membership::Mesh);
        assert_eq!(c.of("legacy"), Membership::Outside);
        assert_eq!(c.of("new"), Membership::Unknown);
        let complete = MembershipCache {
            complete: true,
            ..c
        };
        assert_eq!(complete.of("new"), Membership::Outside);
        assert_eq!(MembershipCache::parse(br#"{"version":2}"#), None);
        assert_eq!(MembershipCache::parse(b"garbage"), None);
    }

    #[test]
    fn a_missing_socket_is_unreachable_and_a_silent_agent_times_out() {
        let dir = std::env::temp_dir().join(format!("icni-agent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        let r = call(&path, Duration::from_secs(1), &json!({"cmd": "stats"}));
        assert!(matches!(r, Err(AgentError::Unreachable(_))), "{r:?}");

        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let started = std::time::Instant::now();
        let r = call(&path, Duration::from_millis(300), &json!({"cmd": "stats"}));
        assert!(matches!(r, Err(AgentError::Unreachable(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));

        let server = std::thread::spawn(move || {
            // The first connection is the one that timed out above.
            loop {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                if line.contains("check-pod") {
                    (&s).write_all(b"{\"result\":\"error\",\"message\":\"no\"}\n")
                        .unwrap();
                    return line;
                }
            }
        });
        let r = call(&path, Duration::from_secs(5), &json!({"cmd": "check-pod"}));
        assert_eq!(r, Err(AgentError::Refused("no".to_owned())));
        assert!(server.join().unwrap().contains("check-pod"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_handing_over_agent_is_asked_again_with_backoff_until_it_answers_or_the_budget_ends() {
        // The code is what makes a refusal retryable; the same message without it is final.
        let dir = std::env::temp_dir().join(format!("icni-retry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                r#"{"result":"error","message":"handing over","code":"handing_over"}"#,
                r#"{"result":"error","message":"handing over"}"#,
            ] {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                (&s).write_all(format!("{answer}\n").as_bytes()).unwrap();
            }
        });
        let ask = || call(&path, Duration::from_secs(5), &json!({"cmd": "enroll-pod"}));
        assert_eq!(
            ask(),
            Err(AgentError::HandingOver("handing over".to_owned()))
        );
        assert_eq!(ask(), Err(AgentError::Refused("handing over".to_owned())));
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        // Three refusals, then the successor answers: 50 + 100 + 200 ms of backoff.
        let mut waits = Vec::new();
        let mut answers = vec![
            Ok("enrolled".to_owned()),
            Err(AgentError::HandingOver("h".to_owned())),
            Err(AgentError::HandingOver("h".to_owned())),
            Err(AgentError::HandingOver("h".to_owned())),
        ];
        let r = retry_while_handing_over(
            Duration::from_secs(20),
            |d| waits.push(d),
            || answers.pop().unwrap(),
        );
        assert_eq!(r, Ok("enrolled".to_owned()));
        assert_eq!(waits, [50, 100, 200].map(Duration::from_millis));

        // Any other error ends it at once.
        let mut calls = 0;
        let r = retry_while_handing_over(
            Duration::from_secs(20),
            |_| {},
            || {
                calls += 1;
                Err(AgentError::Unreachable("gone".to_owned()))
            },
        );
        assert_eq!(
            (r, calls),
            (Err(AgentError::Unreachable("gone".to_owned())), 1)
        );

        // Refused for good: bounded by the budget, waits capped at 1 s, and the error says
        // how long it asked.
        let mut waits = Vec::new();
        let r = retry_while_handing_over(
            Duration::from_secs(5),
            |d| waits.push(d),
            || Err(AgentError::HandingOver("h".to_owned())),
        );
        let total: Duration = waits.iter().sum();
        assert!(total <= Duration::from_secs(5), "{waits:?}");
        assert!(total >= Duration::from_secs(4), "{waits:?}");
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(1)),
            "{waits:?}"
        );
        assert!(
            matches!(&r, Err(AgentError::HandingOver(m)) if m.starts_with("h (asked again for 4.")),
            "{r:?}"
        );
    }
}
