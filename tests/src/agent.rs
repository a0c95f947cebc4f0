//! Runs the real agent (`interceptor::app::start`) in-process on its own runtime, the way
//! `interceptor run` does, with a throwaway CA, state dir and bpffs pin directory. Stopping it
//! drops the runtime: every agent socket closes at once, as when the process is killed, while
//! the pinned programs stay (that is what fail-closed tests need).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread::JoinHandle,
};

use interceptor::{
    app::Agent,
    ca::{Ca, OnExisting},
    config::{Config, KtlsMode, Peer, Tuning, Workload},
};

use crate::{topology::Pod, unique_name};

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates a CA in `dir` (shared by every agent of a test "cluster").
pub fn make_ca(dir: &Path, trust_domain: &str) {
    Ca::init(
        &trust_domain.parse().expect("trust domain"),
        dir,
        OnExisting::Refuse,
    )
    .expect("ca init");
}

/// The workload entry for a topology pod.
pub fn workload(pod: &Pod, namespace: &str, service_account: &str) -> Workload {
    Workload {
        name: pod.name.clone(),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        labels: [("app".to_owned(), pod.name.clone())].into_iter().collect(),
        cgroup: pod.cgroup.path.clone(),
        netns: pod.netns_path(),
        ips: vec![pod.ip.into(), pod.ip6.into()],
    }
}

/// The peer entry (a pod on another node) for a topology pod.
pub fn peer(pod: &Pod, namespace: &str, service_account: &str) -> Peer {
    Peer {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        labels: Default::default(),
        ips: vec![pod.ip.into(), pod.ip6.into()],
    }
}

/// A node config for tests.
pub fn config(
    ca_dir: &Path,
    state: &Path,
    ktls: KtlsMode,
    workloads: Vec<Workload>,
    peers: Vec<Peer>,
) -> Config {
    Config {
        trust_domain: "cluster.local".parse().expect("td"),
        trust_domain_aliases: Vec::new(),
        ca_dir: ca_dir.to_owned(),
        state_dir: state.join("state"),
        admin_socket: state.join("admin.sock"),
        handover: None,
        ktls,
        crypto: Default::default(),
        bpffs: crate::pin_dir("itest"),
        workloads,
        peers,
        services: Vec::new(),
        root_namespace: "istio-system".to_owned(),
        policy_dir: None,
        policy: Default::default(),
        probe_sources: Vec::new(),
        cluster_domain: "cluster.local".to_owned(),
        // One simulated node holds every pod of most suites, which test the mesh mTLS path:
        // those keep it; the same-node suite (`samenode_e2e`) turns the fast path on.
        tuning: Tuning {
            same_node_fast_path: false,
            ..Tuning::default()
        },
        identity: Default::default(),
        cni: None,
        kubernetes: None,
        // A free port each: tests run many agents at once in the host's netns.
        observability: interceptor::config::Observability {
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            ..Default::default()
        },
    }
}

/// A running in-process agent.
pub struct RunningAgent {
    pub agent: Arc<Agent>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    pub pin_dir: PathBuf,
}

impl RunningAgent {
    pub fn start(config: Config) -> Self {
        Self::spawn(config, None)
    }

    /// Starts the agent from `config` written to `file`, which it then watches the way
    /// `interceptor run --config FILE` does (crypto policy changes apply while it runs).
    pub fn start_watching(config: Config, file: &Path) -> Self {
        let yaml = yaml_serde::to_string(&config).expect("config to yaml");
        std::fs::write(file, yaml).expect("write node config");
        Self::spawn(config, Some(file.to_owned()))
    }

    fn spawn(config: Config, watch: Option<PathBuf>) -> Self {
        // The agent's warnings (refused flows and why) belong in the test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("INTERCEPTOR_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let pin_dir = config.bpffs.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let loaded = config.clone();
            let started = rt.block_on(interceptor::app::start(config));
            if let (Ok(agent), Some(file)) = (&started, watch) {
                rt.spawn(interceptor::app::watch_config(
                    Arc::clone(agent),
                    file,
                    loaded,
                ));
            }
            let ok = started.is_ok();
            let _ = ready_tx.send(started.map_err(|e| format!("{e:#}")));
            if ok {
                let _ = stop_rx.recv();
            }
            // Wait for the workers, so every task (and with them the agent's links, maps and
            // listeners) is gone when `kill` returns, as after a real process exit; a leaked
            // task would keep the old programs attached and race the next agent's.
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        });
        let agent = ready_rx
            .recv()
            .expect("agent thread died")
            .unwrap_or_else(|e| panic!("agent failed to start: {e}"));
        Self {
            agent,
            stop: Some(stop_tx),
            thread: Some(thread),
            pin_dir,
        }
    }

    /// Stops the agent as a kill would: its sockets close, its pins stay.
    pub fn kill(mut self) -> PathBuf {
        self.halt();
        std::mem::take(&mut self.pin_dir)
    }

    fn halt(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.halt();
        if !self.pin_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

/// Removes a pin directory left by a killed agent (the test's final cleanup).
pub struct PinCleanup(pub PathBuf);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
