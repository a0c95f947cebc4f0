//! Where accepted connections run (`tuning.runtime`).
//!
//! `shared` (the default): every task on one multi-threaded runtime; a flow's readiness may
//! be seen by one worker and its task run by another. Measured during a 64-B round trip, the
//! workers do not wake each other for a flow (futex 0.00–0.01 per round trip): the agent's
//! extra context switches are preemptions by the receiver its own send woke (bench/README.md
//! "Round trip: the agent's threading").
//!
//! `perThread`: one single-threaded runtime per flow thread. The accept loops hand each
//! connection to one of them (round robin) and it stays there for its whole life: its
//! readiness comes from that thread's own `epoll`, its task and every task it spawns run on
//! that thread. `perCpu`: one such runtime per allowed CPU, its thread pinned there, each
//! connection on the runtime of the CPU its packets arrive on. Both trade bulk (one flow's two
//! directions on one thread) or idle-CPU use (a pinned thread cannot move) for locality, and
//! stay opt-in. The control plane (admin, watchers, reloads, accept loops) runs on the
//! runtime of the main thread.

use std::{
    future::Future,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
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
    /// `perCpu`: the CPU each runtime's thread is pinned to, by index.
    cpus: Option<Vec<usize>>,
}

impl FlowRuntimes {
    /// Starts `threads` runtimes on threads named by [`flow_thread_name`]; connections go to
    /// them round robin.
    pub fn start(threads: usize, slice: Option<Duration>) -> anyhow::Result<Self> {
        anyhow::ensure!(threads > 0, "no flow threads");
        Self::start_on((0..threads).map(|_| None).collect(), slice)
    }

    /// Starts one runtime per CPU the agent may run on (`perCpu`), its thread pinned to that
    /// CPU; a connection goes to the runtime of the CPU its packets arrive on
    /// (`SO_INCOMING_CPU`), so the softirq that queued its bytes, the wake-up and the relay
    /// share one core's caches.
    pub fn start_per_cpu(slice: Option<Duration>) -> anyhow::Result<Self> {
        let cpus = crate::sys::allowed_cpus().context("the agent's CPUs")?;
        anyhow::ensure!(!cpus.is_empty(), "no CPU to run flows on");
        let mut runtimes = Self::start_on(cpus.iter().copied().map(Some).collect(), slice)?;
        runtimes.cpus = Some(cpus);
        Ok(runtimes)
    }

    fn start_on(pins: Vec<Option<usize>>, slice: Option<Duration>) -> anyhow::Result<Self> {
        let mut handles = Vec::with_capacity(pins.len());
        for (i, pin) in pins.into_iter().enumerate() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("flow runtime")?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(flow_thread_name(i))
                .spawn(move || {
                    if let Some(cpu) = pin
                        && let Err(e) = crate::sys::pin_current_thread(cpu)
                    {
                        // Still a runtime of its own; only the cache locality is lost.
                        warn!(cpu, error = %e, "cannot pin a flow thread");
                    }
                    flow_thread_started(slice);
                    rt.block_on(std::future::pending::<()>());
                })
                .context("flow thread")?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            cpus: None,
        })
    }

    /// The runtime for a connection: that of the CPU its packets arrive on (`perCpu`, once
    /// one has arrived), else the next one round robin.
    fn handle_for(&self, stream: &TcpStream) -> &Handle {
        use std::os::fd::AsFd as _;
        let by_cpu = self.cpus.as_ref().and_then(|cpus| {
            let cpu = crate::sys::incoming_cpu(stream.as_fd()).ok().flatten()?;
            cpus.iter().position(|&c| c == cpu)
        });
        match by_cpu {
            Some(i) => &self.handles[i],
            None => self.next_handle(),
        }
    }

    /// The next runtime, round robin.
    fn next_handle(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Runs `serve(stream)` as a task of its own on the runtime [`Self::handle_for`] picks,
    /// the stream moved to that runtime's I/O driver first.
    ///
    /// `serve`'s future is spawned itself, never awaited inside a wrapper, so a long-lived
    /// flow's task holds one copy of it (see `intercept::flow::serve`).
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = self.handle_for(&stream).clone();
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
        handle.spawn(async move {
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

/// What every thread that runs flows does first: takes `tuning.schedSliceUs` as its fair
/// scheduler slice, if set. A kernel that refuses it leaves the thread at its default slice
/// (only the latency experiment is lost), said once.
pub fn flow_thread_started(slice: Option<Duration>) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Some(slice) = slice
        && let Err(e) = crate::sys::set_current_thread_slice(slice)
    {
        WARNED.call_once(|| warn!(?slice, error = %e, "cannot set the flow threads' slice"));
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

    /// The CPU the calling thread runs on (`processor`, field 39 of its stat).
    fn current_cpu() -> usize {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_comm = stat.rsplit_once(')').unwrap().1;
        after_comm
            .split_whitespace()
            .nth(36)
            .unwrap()
            .parse()
            .unwrap()
    }

    /// `perCpu`: a connection runs on the runtime pinned to the CPU its packets arrived on,
    /// and its bytes come back whole.
    #[tokio::test]
    async fn per_cpu_runtimes_serve_a_connection_on_the_cpu_its_packets_arrive_on() {
        use std::os::fd::AsFd as _;
        let runtimes = FlowRuntimes::start_per_cpu(None).unwrap();
        let cpus = crate::sys::allowed_cpus().unwrap();
        assert_eq!(runtimes.handles.len(), cpus.len());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for round in 0..8u8 {
            let client = tokio::spawn(async move {
                let mut c = TcpStream::connect(addr).await.unwrap();
                c.write_all(&[round; 1000]).await.unwrap();
                c.shutdown().await.unwrap();
                let mut back = Vec::new();
                c.read_to_end(&mut back).await.unwrap();
                back
            });
            let (stream, _) = listener.accept().await.unwrap();
            // Wait for the bytes, so the socket has an incoming CPU.
            stream.readable().await.unwrap();
            let arrived_on = crate::sys::incoming_cpu(stream.as_fd()).unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            runtimes.spawn(stream, move |mut s| async move {
                let ran_on = current_cpu();
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
                let _ = tx.send(ran_on);
            });
            assert_eq!(client.await.unwrap(), vec![round; 1000]);
            let ran_on = rx.await.unwrap();
            if let Some(cpu) = arrived_on.filter(|c| cpus.contains(c)) {
                assert_eq!(
                    ran_on, cpu,
                    "packets arrived on CPU {cpu}, served on {ran_on}"
                );
            }
        }
    }

    /// The fair-scheduler slice a thread runs with (`se.slice`, ns, in its
    /// `/proc/thread-self/sched`), where the kernel shows it.
    fn current_slice_ns() -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        sched
            .lines()
            .find_map(|l| l.strip_prefix("se.slice"))?
            .trim_start_matches([' ', ':'])
            .trim()
            .parse()
            .ok()
    }

    /// Whether this kernel takes a fair task's `sched_runtime` as its slice (Linux ≥ 6.12).
    fn kernel_takes_custom_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (6, 12)
    }

    /// `tuning.schedSliceUs`: every flow thread runs with the slice asked for (the kernel's
    /// own state, read back), and one without it keeps the kernel's.
    #[tokio::test]
    async fn flow_threads_take_the_configured_scheduler_slice() {
        let default = current_slice_ns();
        for (slice, want) in [
            (Some(Duration::from_micros(300)), Some(300_000)),
            (None, default),
        ] {
            let runtimes = FlowRuntimes::start(2, slice).unwrap();
            for handle in &runtimes.handles {
                let seen = handle.spawn(async { current_slice_ns() }).await.unwrap();
                if seen.is_some() && kernel_takes_custom_slices() {
                    assert_eq!(seen, want, "slice {slice:?}");
                }
            }
        }
    }

    /// Connections handed to flow runtimes are spread over all of them, each served whole on
    /// one flow thread (its bytes echoed and hashed), and what a flow spawns runs there too.
    #[tokio::test]
    async fn flows_are_spread_over_every_flow_thread_and_stay_on_theirs() {
        use sha2::{Digest as _, Sha256};
        const THREADS: usize = 3;
        const FLOWS: usize = 9;
        let runtimes = FlowRuntimes::start(THREADS, None).unwrap();
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
