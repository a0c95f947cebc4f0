//! The admin API: a Unix socket on the node (mode 0600, in a 0700 directory), never a TCP port,
//! so pods — which have their own mount and network namespaces — cannot reach it. One JSON
//! request per line, one JSON response per line.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::{cluster::PodRef, config::Workload, intercept::table::FlowRow};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Flows {
        /// Include recently closed flows.
        #[serde(default)]
        all: bool,
    },
    Stats,
    Enroll {
        workload: Workload,
    },
    Unenroll {
        name: String,
    },
    /// From the CNI plugin at ADD: enroll the pod the directory names, if it is in the mesh
    /// (a pod outside it is answered `ok` and left alone).
    #[serde(rename = "enroll-pod", rename_all = "camelCase")]
    EnrollPod {
        pod: PodRef,
        netns: PathBuf,
        ips: Vec<IpAddr>,
        #[serde(default)]
        container_id: String,
    },
    /// From the CNI plugin at DEL: idempotent, and a no-op for a sandbox other than the one
    /// enrolled under the pod's name.
    #[serde(rename = "unenroll-pod", rename_all = "camelCase")]
    UnenrollPod {
        pod: PodRef,
        #[serde(default)]
        container_id: String,
    },
    /// From the CNI plugin at CHECK: `ok` when the pod is enrolled as ADD left it (or is
    /// outside the mesh), an error naming what differs otherwise.
    #[serde(rename = "check-pod", rename_all = "camelCase")]
    CheckPod {
        pod: PodRef,
        netns: PathBuf,
        ips: Vec<IpAddr>,
        #[serde(default)]
        container_id: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    Flows {
        flows: Vec<FlowRowWire>,
        /// Persisted enrollments the agent could not restore, and why.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stale: Vec<crate::app::Stale>,
    },
    Stats {
        stats: serde_json::Value,
    },
    Ok {
        message: String,
    },
    Error {
        message: String,
        /// Set when the refusal is temporary and the request should be sent again as it was:
        /// [`HANDING_OVER`]. Absent for every other error.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
}

/// The error code of an enrollment change refused because the agent is handing its pods over
/// to a successor (or already has): the successor answers on the same socket path once it
/// has taken over, so the caller asks again there (the CNI plugin does, with backoff).
pub const HANDING_OVER: &str = "handing_over";

/// `FlowRow` as it travels (the server side serialises, the CLI deserialises).
pub type FlowRowWire = serde_json::Value;

impl Response {
    pub fn flows(rows: &[FlowRow], stale: Vec<crate::app::Stale>) -> Self {
        Response::Flows {
            flows: rows
                .iter()
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect(),
            stale,
        }
    }
}

/// What the admin server needs from the running agent.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> impl std::future::Future<Output = Response> + Send;
}

/// Binds the socket, replacing a stale one from a previous run.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Where a successor binds its admin socket while it takes over: beside the real path, so
/// [`publish`] can move it there with one rename.
pub fn staged_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    std::path::PathBuf::from(name)
}

/// Moves a staged admin socket onto its real path. rename(2) replaces the predecessor's
/// socket file atomically: a client connects to one agent or the other, never to nothing.
pub fn publish(staged: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(staged, path)
}

/// The longest request line the agent reads (an enroll request is well under 4 KiB). A
/// longer one is answered with an error and the connection is closed: a line is buffered
/// whole before it is parsed, so without a bound one client could make the agent allocate
/// without limit.
pub const MAX_REQUEST_LINE: usize = 64 << 10;

pub async fn serve<H: Handler>(listener: tokio::net::UnixListener, handler: std::sync::Arc<H>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = std::sync::Arc::clone(&handler);
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut reader = BufReader::new(rd);
            loop {
                let (resp, last) = match read_line(&mut reader).await {
                    Ok(Line::Eof) | Err(_) => break,
                    Ok(Line::TooLong) => (
                        Response::Error {
                            message: format!(
                                "bad request: line longer than {MAX_REQUEST_LINE} bytes; \
                                 closing the connection"
                            ),
                            code: None,
                        },
                        true,
                    ),
                    Ok(Line::Text(line)) => {
                        let resp = match serde_json::from_slice::<Request>(&line) {
                            Ok(req) => handler.handle(req).await,
                            Err(e) => Response::Error {
                                message: format!("bad request: {e}"),
                                code: None,
                            },
                        };
                        (resp, false)
                    }
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if wr.write_all(&out).await.is_err() || last {
                    break;
                }
            }
        });
    }
}

enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads one `\n`-terminated line of at most [`MAX_REQUEST_LINE`] bytes (a last line without
/// `\n` counts too).
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Line> {
    use tokio::io::AsyncReadExt as _;
    let mut line = Vec::new();
    let limit = MAX_REQUEST_LINE as u64 + 1;
    let n = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REQUEST_LINE {
        return Ok(Line::TooLong);
    }
    Ok(Line::Text(line))
}

/// The CLI side: one request, one response.
pub async fn call(path: &Path, req: &Request) -> anyhow::Result<Response> {
    use anyhow::Context as _;
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| {
            format!(
                "cannot reach the agent at {} (is `interceptor run` up?)",
                path.display()
            )
        })?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    let mut lines = BufReader::new(rd).lines();
    let resp = lines
        .next_line()
        .await?
        .context("the agent closed the admin connection without answering")?;
    Ok(serde_json::from_str(&resp)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    /// The lines `interceptor-cni` sends, byte for byte as it builds them, parse as requests.
    #[test]
    fn the_cni_plugin_requests_parse() {
        let pod = r#"{"namespace":"full","name":"sleep","uid":"u-1"}"#;
        let enroll = format!(
            r#"{{"cmd":"enroll-pod","pod":{pod},"netns":"/run/netns/cni-1","ips":["10.88.0.5","fd00::5"],"containerId":"c0ffee"}}"#
        );
        match serde_json::from_str::<Request>(&enroll).unwrap() {
            Request::EnrollPod {
                pod,
                netns,
                ips,
                container_id,
            } => {
                assert_eq!((pod.namespace.as_str(), pod.uid.as_str()), ("full", "u-1"));
                assert_eq!(netns, PathBuf::from("/run/netns/cni-1"));
                assert_eq!(ips.len(), 2);
                assert_eq!(container_id, "c0ffee");
            }
            other => panic!("{other:?}"),
        }
        let del = format!(r#"{{"cmd":"unenroll-pod","pod":{pod},"containerId":"c0ffee"}}"#);
        assert!(matches!(
            serde_json::from_str::<Request>(&del).unwrap(),
            Request::UnenrollPod { .. }
        ));
        let check = enroll.replace("enroll-pod", "check-pod");
        assert!(matches!(
            serde_json::from_str::<Request>(&check).unwrap(),
            Request::CheckPod { .. }
        ));
    }

    impl Handler for Echo {
        async fn handle(&self, req: Request) -> Response {
            Response::Ok {
                message: format!("{req:?}"),
            }
        }
    }

    fn socket(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir()
            .join(format!("admin-{tag}-{}", std::process::id()))
            .join("admin.sock")
    }

    /// A client that sends an endless line gets a clear error and the connection closed;
    /// the server keeps answering others.
    #[tokio::test]
    async fn an_overlong_line_is_refused_and_the_server_stays_up() {
        let path = socket("long");
        let listener = bind(&path).unwrap();
        tokio::spawn(serve(listener, std::sync::Arc::new(Echo)));

        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (rd, mut wr) = stream.into_split();
        // Keep writing past the bound without a newline: the agent must not buffer it all.
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..64 {
                if wr.write_all(&chunk).await.is_err() {
                    return true;
                }
            }
            false
        });
        let mut lines = BufReader::new(rd).lines();
        let reply = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
            .await
            .expect("no answer to an overlong line within 10 s")
            .unwrap()
            .expect("an answer");
        let resp: Response = serde_json::from_str(&reply).unwrap();
        assert!(
            matches!(&resp, Response::Error { message, .. } if message.contains("longer than")),
            "{resp:?}"
        );
        // Closed: EOF, or a reset because the unread rest of the line was discarded.
        let after = lines.next_line().await;
        assert!(!matches!(after, Ok(Some(_))), "{after:?}");
        assert!(
            writer.await.unwrap(),
            "the agent kept reading 4 MiB of one line"
        );

        // A normal client is still served, also with a request just under the bound.
        let ok = call(&path, &Request::Stats).await.unwrap();
        assert!(matches!(ok, Response::Ok { .. }), "{ok:?}");
        let name = "n".repeat(MAX_REQUEST_LINE - 64);
        let ok = call(&path, &Request::Unenroll { name }).await.unwrap();
        assert!(matches!(ok, Response::Ok { .. }), "{ok:?}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
