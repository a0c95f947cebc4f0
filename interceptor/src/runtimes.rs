//! Where accepted connections run (`tuning.runtime`).
//!
//! `shared`: every task on one multi-threaded runtime. A flow's socket readiness is seen by
//! whichever worker holds the I/O driver, its task may sit in another worker's queue or be
//! stolen, and a worker that queues work wakes an idle one to look for it: for a round trip
//! through the agent that is thread hand-offs (futex wake-ups, context switches) on top of the
//! wake-up the bytes themselves need.
//!
//! `perThread`: one single-threaded runtime per flow thread. The accept loops hand each
//! connection to one of them (round robin) and it stays there for its whole life: its
//! readiness comes from that thread's own `epoll`, its task and every task it spawns run on
//! that thread, so a hop through the agent is one wake-up of one thread. The control plane
//! (admin, watchers, reloads, accept loops) runs on the runtime of the main thread.

use std::{
    future::Future,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context as _;
use tokio::{net::TcpStream, runtime::Handle};
use tracing::warn;

/// The flow runtimes of this process; unset: flows run where they are accepted.
static FLOWS: OnceLock<FlowRuntimes> = OnceLock::new();

/// Single-threaded runtimes, each driven by a thread of its own that lives as long as the
/// process.
pub struct FlowRuntimes {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl FlowRuntimes {
    /// Starts `threads` runtimes on threads named by [`flow_thread_name`].
    pub fn start(threads: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(threads > 0, "no flow threads");
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("flow runtime")?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(flow_thread_name(i))
                .spawn(move || rt.block_on(std::future::pending::<()>()))
                .context("flow thread")?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// The next runtime, round robin.
    fn next_handle(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Runs `serve(stream)` as a task of its own on the next runtime (round robin), the
    /// stream moved to that runtime's I/O driver first.
    ///
    /// `serve`'s future is spawned itself, never awaited inside a wrapper, so a long-lived
    /// flow's task holds one copy of it (see `intercept::flow::serve`).
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Deregistered from the accepting runtime's driver; still non-blocking.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                // Dropping `serve` releases what it holds (the flow's permit and count); the
                // connection closes with `stream`.
                warn!(error = %e, "cannot move an accepted connection to a flow thread");
                return;
            }
        };
        self.next_handle().spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    tokio::spawn(serve(stream));
                }
                Err(e) => {
                    warn!(error = %e, "cannot register an accepted connection on a flow thread");
                }
            }
        });
    }
}

/// The name of flow thread `i` (`/proc/<pid>/task/*/comm`).
pub fn flow_thread_name(i: usize) -> String {
    format!("flows-{i}")
}

/// Makes `runtimes` where every connection [`spawn_accepted`] is given from now on runs.
/// Once per process (the agent's `run`), before any pod is enrolled.
pub fn install(runtimes: FlowRuntimes) -> anyhow::Result<()> {
    FLOWS
        .set(runtimes)
        .map_err(|_| anyhow::anyhow!("flow runtimes installed twice"))
}

/// Where a flow that arrives without an accept (one a predecessor agent handed over, or one
/// parked here for a successor that could not take it) runs: the next installed flow runtime,
/// or `fallback` when none are.
pub fn for_flow(fallback: &Handle) -> Handle {
    FLOWS
        .get()
        .map_or_else(|| fallback.clone(), |f| f.next_handle().clone())
}

/// Runs `serve(stream)` as a task of its own: on one of the installed flow runtimes, or on
/// the current runtime when none are ([`FlowRuntimes::spawn`]).
pub fn spawn_accepted<F, Fut>(stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    match FLOWS.get() {
        Some(flows) => flows.spawn(stream, serve),
        None => {
            tokio::spawn(serve(stream));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Without flow runtimes a connection is served on the runtime that accepted it, and
    /// its bytes arrive whole.
    #[tokio::test]
    async fn without_flow_runtimes_the_accepting_runtime_serves() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"ping").await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            back
        });
        let (stream, _) = listener.accept().await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        spawn_accepted(stream, move |mut s| async move {
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let served_on = rx.await.unwrap();
        assert_eq!(client.await.unwrap(), b"ping");
        assert!(
            !served_on.is_some_and(|n| n.starts_with("flows-")),
            "served on a flow thread without flow runtimes"
        );
    }

    /// Connections handed to flow runtimes are spread over all of them, each served whole on
    /// one flow thread (its bytes echoed and hashed), and what a flow spawns runs there too.
    #[tokio::test]
    async fn flows_are_spread_over_every_flow_thread_and_stay_on_theirs() {
        use sha2::{Digest as _, Sha256};
        const THREADS: usize = 3;
        const FLOWS: usize = 9;
        let runtimes = FlowRuntimes::start(THREADS).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for flow in 0..FLOWS {
            clients.push(tokio::spawn(async move {
                let mut c = TcpStream::connect(addr).await.unwrap();
                let sent: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 + flow) as u8).collect();
                let (mut r, mut w) = c.split();
                let (_, back) = tokio::join!(
                    async {
                        w.write_all(&sent).await.unwrap();
                        w.shutdown().await.unwrap();
                    },
                    async {
                        let mut back = Vec::new();
                        r.read_to_end(&mut back).await.unwrap();
                        back
                    }
                );
                (Sha256::digest(&sent), Sha256::digest(&back))
            }));
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            runtimes.spawn(stream, move |mut s| async move {
                let first = std::thread::current().name().map(str::to_owned);
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
                // A task the flow spawns runs on the flow's thread too.
                let spawned =
                    tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                        .await
                        .unwrap();
                let last = std::thread::current().name().map(str::to_owned);
                let _ = tx.send((first, spawned, last));
            });
        }
        drop(tx);
        for c in clients {
            let (sent, back) = c.await.unwrap();
            assert_eq!(sent, back, "a flow's bytes came back changed");
        }
        let mut per_thread = std::collections::BTreeMap::new();
        while let Some((first, spawned, last)) = rx.recv().await {
            let first = first.expect("a named thread");
            assert!(first.starts_with("flows-"), "served on {first}");
            assert_eq!(Some(&first), spawned.as_ref(), "a spawned task moved");
            assert_eq!(Some(&first), last.as_ref(), "a flow moved threads");
            *per_thread.entry(first).or_insert(0) += 1;
        }
        let expected: std::collections::BTreeMap<String, i32> = (0..THREADS)
            .map(|i| (flow_thread_name(i), (FLOWS / THREADS) as i32))
            .collect();
        assert_eq!(per_thread, expected);
    }
}
