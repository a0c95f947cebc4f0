//! The admin API: a Unix socket on the node (mode 0600, in a 0700 directory), never a TCP port,
//! so pods — which have their own mount and network namespaces — cannot reach it. One JSON
//! request per line, one JSON response per line.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::{config::Workload, intercept::table::FlowRow};

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    Flows { flows: Vec<FlowRowWire> },
    Stats { stats: serde_json::Value },
    Ok { message: String },
    Error { message: String },
}

/// `FlowRow` as it travels (the server side serialises, the CLI deserialises).
pub type FlowRowWire = serde_json::Value;

impl Response {
    pub fn flows(rows: &[FlowRow]) -> Self {
        Response::Flows {
            flows: rows
                .iter()
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect(),
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

pub async fn serve<H: Handler>(listener: tokio::net::UnixListener, handler: std::sync::Arc<H>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = std::sync::Arc::clone(&handler);
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => handler.handle(req).await,
                    Err(e) => Response::Error {
                        message: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if wr.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
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
