//! Wiring and lifecycle of `interceptor run`: probe, load the CA and the datapath, enroll the
//! configured and persisted pods, serve the admin API, and on SIGTERM exit leaving the pinned
//! programs in place so enrolled pods stay fail-closed until the agent is back.

#[cfg(feature = "kubernetes")]
mod kubernetes;
#[cfg(not(feature = "kubernetes"))]
#[path = "app/without_kubernetes.rs"]
mod kubernetes;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tracing::{error, info, warn};

mod upgrade;
mod watch;

use crate::{
    admin::{self, Request, Response},
    ca::renew::{RenewPolicy, SystemClock},
    ca::{Ca, CertificateAuthority as _},
    cluster::{Membership, MembershipFile, PodDirectory, PodRef, StaticDirectory},
    config::{self, CniSettings, Config, KtlsMode, Peer, Service, Workload},
    datapath::{Datapath, DatapathOptions},
    handshake::{CryptoPolicy, MeshSuite},
    health::Readiness,
    intercept::{
        self, Identity, NodeParts, Offload, PodHandle, Shared,
        enforce::{Enforcer, Generation},
    },
    ktls, sys,
    telemetry::{self, Telemetry, WorkloadLabels},
};

/// The running agent as the admin API sees it.
pub struct Agent {
    shared: Arc<Shared>,
    pods: Mutex<BTreeMap<String, PodHandle>>,
    /// Persisted enrollments that could not be restored (netns or cgroup gone, a conflict):
    /// reported, retried, and dropped once their cgroup is gone.
    stale: Mutex<BTreeMap<String, Stale>>,
    /// Runtime enrollments (`interceptor enroll`), persisted so they survive restarts.
    runtime_file: PathBuf,
    next_slot: Mutex<u32>,
    /// Serializes enrollment changes: each one validates against, changes and persists the
    /// whole set, so two at once would lose one.
    changes: tokio::sync::Mutex<()>,
    /// What runtime enrollments are validated against besides the enrolled pods.
    peers: Vec<Peer>,
    services: Vec<Service>,
    /// Netns-keyed enrollment (`cni:`): the settings and who the pods are.
    cni: Option<CniSettings>,
    directory: Option<Arc<dyn PodDirectory>>,
    /// Pod name → the CNI sandbox (container ID) that enrolled it, so a DEL of an older
    /// sandbox of the same pod name leaves the current one alone. Persisted in
    /// `sandbox_file` (next to the enrollments) so that holds across restarts and upgrades:
    /// a late DEL of an old sandbox must not unenroll the running pod, which would let its
    /// traffic out unprotected.
    sandboxes: Mutex<BTreeMap<String, String>>,
    sandbox_file: PathBuf,
    /// What was last written to `cni.membershipFile`.
    membership_written: Mutex<Option<MembershipFile>>,
    /// Metrics and the access log.
    telemetry: Arc<Telemetry>,
    /// What `/readyz` answers from.
    readiness: Arc<Readiness>,
    /// Where `/metrics` is served (`observability.listen`, with the port a 0 picked).
    observability: Option<SocketAddr>,
    /// The config the agent started with, for `/debug/config`.
    config: Config,
    /// A successor holds the listeners (or this agent stepped down for one): no enrollment
    /// changes any more, only the open flows are served until they end.
    retired: std::sync::atomic::AtomicBool,
    /// A successor is taking the pods over (from the moment their listeners are sent until
    /// it holds them, or the attempt fails): enrollment changes are refused as retryable,
    /// because a pod enrolled here now would not reach the successor.
    handing_over: std::sync::atomic::AtomicBool,
    /// The node config file and the config read from it, until the file watcher takes them.
    watched_config: Mutex<Option<watch::NodeSource>>,
    /// Flows the agent this one took over from still serves (its reports; 0 once it exits).
    predecessor_flows: Arc<std::sync::atomic::AtomicU64>,
}

/// A persisted enrollment the agent could not restore.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Stale {
    pub workload: Workload,
    /// Why it is not enrolled (the last attempt's error).
    pub reason: String,
}

/// Decides the data path from the probe and the configured `ktls` mode.
pub fn offload(mode: KtlsMode) -> anyhow::Result<Offload> {
    if mode == KtlsMode::Off {
        return Ok(Offload::Userspace);
    }
    let support = ktls::probe();
    let mut suites = Vec::new();
    for (cipher, suite) in [
        (ktls::Cipher::Aes128Gcm, MeshSuite::Aes128Gcm),
        (ktls::Cipher::Aes256Gcm, MeshSuite::Aes256Gcm),
        (ktls::Cipher::Chacha20Poly1305, MeshSuite::Chacha20Poly1305),
    ] {
        if support.supports(cipher) {
            suites.push(suite);
        }
    }
    if suites.is_empty() {
        if mode == KtlsMode::Required {
            bail!("ktls: required, but {}", support.summary());
        }
        warn!(
            "{}; relaying mTLS through rustls in userspace",
            support.summary()
        );
        return Ok(Offload::Userspace);
    }
    info!("{}", support.summary());
    Ok(Offload::Kernel(suites))
}

/// `interceptor run`: start (with `takeover`, from the running agent's listeners), serve
/// until SIGTERM/SIGINT or until a successor took over, drain, then exit leaving the pins.
/// `file`, where `config` was read from, is watched for crypto policy changes.
pub async fn run(config: Config, file: PathBuf, takeover: bool) -> anyhow::Result<()> {
    let (agent, takeover) = upgrade::start(config.clone(), takeover).await?;
    tokio::spawn(watch_config(Arc::clone(&agent), file, config.clone()));
    let Some(settings) = &config.handover else {
        shutdown_signal().await;
        info!(
            "stopping; pinned programs stay attached, so enrolled pods fail closed until restart"
        );
        return Ok(());
    };
    upgrade::serve_until_done(agent, settings, takeover).await
}

/// Starts the agent on the current tokio runtime and returns once every configured pod is
/// enrolled and the admin socket answers. Dropping the runtime stops it (as a kill would).
pub async fn start(config: Config) -> anyhow::Result<Arc<Agent>> {
    start_from(config, None, false).await
}

/// [`start`], enrolling the pods a running agent handed over with the listeners received.
async fn start_from(
    config: Config,
    takeover: Option<&mut crate::handover::take::Takeover>,
    adopt_maps: bool,
) -> anyhow::Result<Arc<Agent>> {
    if let Err(e) = sys::raise_nofile_rlimit() {
        warn!(error = %e, "could not raise RLIMIT_NOFILE; large flow counts may fail");
    }
    // The listener first, so the probes see the start-up steps as they complete.
    let observed = Observability::start(&config).await?;
    // A policy that does not load refuses the start before anything is attached.
    let policy = Enforcer::load(&config)?;
    observed
        .readiness
        .policy_loaded
        .store(true, Ordering::Release);
    let offload = offload(config.ktls)?;
    let ca_seen = watch::ca_fingerprint(&config.ca_dir);
    let ca = Ca::load_for(
        &config.ca_dir,
        Some(&config.trust_domain),
        std::time::SystemTime::now(),
    )
    .with_context(|| format!("CA in {}", config.ca_dir.display()))?;
    report_ca(&ca, "loaded");
    observed.readiness.ca_loaded.store(true, Ordering::Release);
    if let Some(parent) = config.bpffs.parent() {
        sys::ensure_bpffs(parent)
            .with_context(|| format!("mount bpffs at {}", parent.display()))?;
    }
    let datapath = Datapath::load(DatapathOptions {
        pin_dir: Some(config.bpffs.clone()),
        adopt_maps,
    })?;
    let mut datapath = datapath;
    if config.tuning.sk_msg_local_leg {
        let cg = sys::own_cgroup().context("the agent's own cgroup")?;
        datapath.enable_local_leg(&cg).context("sk_msg local leg")?;
    }
    if config.tuning.joins_app_sockets() {
        datapath
            .enable_join()
            .context("tuning.sameNodeJoin / relayAppLeg: skMsg (the sk_msg leg join)")?;
    }
    if let Some(cni) = &config.cni {
        // Once, before any pod: every pod cgroup the runtime creates below it later runs the
        // programs from its first process on.
        let parent = match &cni.parent_cgroup {
            Some(p) => p.clone(),
            None => sys::cgroup2_mount().context("cgroup2 mount (for cni.parentCgroup)")?,
        };
        datapath
            .enroll_cgroup(&parent)
            .with_context(|| format!("attach to cni.parentCgroup {}", parent.display()))?;
        info!(parent = %parent.display(), "pods are enrolled by network namespace");
    }
    // Kubernetes mode: the watchers start first, and pods are enrolled once the cluster was
    // listed (or after SYNC_WAIT, not ready until it is), so the first decisions already
    // see the cluster's policy and peers.
    let directory = match &config.kubernetes {
        Some(settings) => {
            let directory = kubernetes::connect(settings).await?;
            if !kubernetes::wait_synced(&directory, kubernetes::SYNC_WAIT).await {
                warn!(
                    "the API server has not been listed within {:?}; serving, not ready",
                    kubernetes::SYNC_WAIT
                );
            }
            Some(directory)
        }
        None => None,
    };
    let parts = StartParts {
        offload,
        ca,
        datapath,
        policy,
        cluster: directory.clone(),
        observed,
    };
    let agent = start_with(config.clone(), parts, takeover).await?;
    let ready = &agent.readiness;
    for flag in [
        &ready.programs_attached,
        &ready.ca_loaded,
        &ready.policy_loaded,
    ] {
        flag.store(true, std::sync::atomic::Ordering::Release);
    }
    match directory {
        Some(directory) => {
            kubernetes::start_following(Arc::clone(&agent), directory).await;
        }
        None => ready
            .cluster_synced
            .store(true, std::sync::atomic::Ordering::Release),
    }
    tokio::spawn(watch::Watcher::new(Arc::clone(&agent), ca_seen).run());
    Ok(agent)
}

/// The metrics/health listener and what it serves, before the agent exists.
struct Observability {
    telemetry: Arc<Telemetry>,
    readiness: Arc<Readiness>,
    addr: Option<SocketAddr>,
}

impl Observability {
    async fn start(config: &Config) -> anyhow::Result<Self> {
        let telemetry = Arc::new(Telemetry::new(&config.observability.access_log));
        let readiness = Arc::new(Readiness::default());
        let addr = match config.observability.listen {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    let bound = listener.local_addr()?;
                    tokio::spawn(telemetry::server::serve(
                        listener,
                        Arc::clone(&telemetry),
                        Arc::clone(&readiness),
                    ));
                    info!(%bound, "metrics, health and debug on http://{bound}");
                    Some(bound)
                }
                // The agent this one replaces (a rolling update starts the new pod first)
                // holds the port until it exits: serve once it is free.
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    warn!(%addr, "observability.listen is in use (the previous agent?); serving there once it is free");
                    tokio::spawn(telemetry::server::serve_when_free(
                        addr,
                        Arc::clone(&telemetry),
                        Arc::clone(&readiness),
                    ));
                    Some(addr)
                }
                Err(e) => anyhow::bail!("observability.listen {addr}: {e}"),
            },
            None => None,
        };
        Ok(Self {
            telemetry,
            readiness,
            addr,
        })
    }
}

/// What the start-up steps before [`start_with`] built, each on its own.
struct StartParts {
    offload: Offload,
    ca: Ca,
    datapath: Datapath,
    policy: Enforcer,
    cluster: Option<kubernetes::KubeDirectory>,
    observed: Observability,
}

async fn start_with(
    config: Config,
    parts: StartParts,
    takeover: Option<&mut crate::handover::take::Takeover>,
) -> anyhow::Result<Arc<Agent>> {
    let StartParts {
        offload,
        ca,
        datapath,
        policy,
        cluster,
        observed,
    } = parts;
    let identity = Identity {
        renew: RenewPolicy {
            ttl: config.identity.leaf_ttl.0,
            fraction: f64::from(config.identity.renew_percent) / 100.0,
        },
        clock: Arc::new(SystemClock),
    };
    let shared = Arc::new(Shared::new(NodeParts {
        trust_domain: config.trust_domain.clone(),
        ca: Arc::new(ca),
        identity,
        offload,
        tuning: config.tuning.clone(),
        datapath,
        policy,
        crypto: config.crypto,
        telemetry: Arc::clone(&observed.telemetry),
    })?);
    // A successor answers on the admin socket's path only once the hand-over is done: until
    // then the running agent is the one operators (and `interceptor flows`) must reach, and
    // it still is if this process dies half-way.
    let admin_path = if takeover.is_some() {
        admin::staged_path(&config.admin_socket)
    } else {
        config.admin_socket.clone()
    };
    if takeover.is_some() {
        // The old agent accepts on the handed-over listeners until it confirms it stopped.
        shared.accepting.send_replace(false);
    }
    {
        let mut dp = shared.datapath.lock().unwrap_or_else(|p| p.into_inner());
        for peer in &config.peers {
            crate::identity::SpiffeId::new(
                config.trust_domain.clone(),
                &peer.namespace,
                &peer.service_account,
            )?;
            for ip in &peer.ips {
                dp.set_destination(*ip, None, crate::datapath::Destination::Steer)?;
            }
        }
    }
    intercept::apply_steering(&shared, &BTreeSet::new(), &shared.policy.current().steer)
        .context("steer service addresses")?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state dir {}", config.state_dir.display()))?;
    let agent = Arc::new(Agent {
        shared: Arc::clone(&shared),
        pods: Mutex::new(BTreeMap::new()),
        stale: Mutex::new(BTreeMap::new()),
        runtime_file: config.state_dir.join("enrollments.json"),
        next_slot: Mutex::new(0),
        changes: tokio::sync::Mutex::new(()),
        peers: config.peers.clone(),
        services: config.services.clone(),
        directory: pod_directory(&config, cluster),
        cni: config.cni.clone(),
        sandboxes: Mutex::new(load_sandboxes(&config.state_dir.join(SANDBOX_FILE))),
        sandbox_file: config.state_dir.join(SANDBOX_FILE),
        membership_written: Mutex::new(None),
        telemetry: Arc::clone(&observed.telemetry),
        readiness: Arc::clone(&observed.readiness),
        observability: observed.addr,
        config: config.clone(),
        retired: std::sync::atomic::AtomicBool::new(false),
        handing_over: std::sync::atomic::AtomicBool::new(false),
        predecessor_flows: Arc::default(),
        watched_config: Mutex::new(None),
    });
    let weak: std::sync::Weak<dyn telemetry::Observed> = Arc::downgrade(&agent) as _;
    agent.telemetry.observe(weak);
    for peer in &config.peers {
        agent.telemetry.add_workload(
            "",
            &peer.ips,
            WorkloadLabels::of("", &peer.namespace, &peer.labels),
        );
    }
    agent.write_membership();
    // Listeners handed over by the running agent, taken by name as each pod is enrolled.
    let mut given = takeover
        .map(|t| std::mem::take(&mut t.pods))
        .unwrap_or_default();
    // The node config is the operator's: a workload there that cannot be enrolled refuses
    // the start, naming it.
    for w in &config.workloads {
        let listeners = upgrade::listeners_for(&mut given, w);
        agent
            .validate(w)
            .and_then(|()| agent.enroll_with(w, listeners))
            .with_context(|| format!("enroll {}", w.name))?;
    }
    // Persisted runtime enrollments belong to pods that may have gone while the agent was
    // down: one that cannot be restored is reported and kept fail-closed, never fatal.
    let persisted = agent.persisted()?;
    for w in &persisted {
        let listeners = upgrade::listeners_for(&mut given, w);
        if let Err(e) = agent
            .validate(w)
            .and_then(|()| agent.enroll_with(w, listeners))
        {
            agent.mark_stale(w, &e, None);
        }
    }
    upgrade::enroll_rest(&agent, given);
    agent
        .sync_policy()
        .context("policy for the enrolled pods")?;
    tokio::spawn(renew_leaves(Arc::clone(&shared)));
    let (keep_cgroups, keep_netns) = agent.stale_pins();
    let pruned = shared
        .datapath
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .prune_stale_pins(&keep_cgroups, &keep_netns);
    if !pruned.is_empty() {
        info!(
            ?pruned,
            "removed programs pinned for pods no longer enrolled"
        );
    }
    agent.check_stale().await;
    tokio::spawn(watch_stale(Arc::clone(&agent)));
    let listener = admin::bind(&admin_path)
        .with_context(|| format!("admin socket {}", admin_path.display()))?;
    tokio::spawn(admin::serve(listener, Arc::clone(&agent)));
    // Every configured pod has its programs attached (a failure refused the start above).
    agent
        .readiness
        .programs_attached
        .store(true, Ordering::Release);
    info!(admin = %config.admin_socket.display(), "ready");
    Ok(agent)
}

/// Renews workload certificates that are due without waiting for a handshake to need them.
/// The period is a monotonic timer, but what is due is decided on the wall clock, so after a
/// clock jump the next sweep (and any handshake before it) catches up.
async fn renew_leaves(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(RENEW_SWEEP).await;
        let swept = Arc::clone(&shared);
        // A little ahead, so the handshakes between two sweeps rarely find a leaf due.
        let _ = tokio::task::spawn_blocking(move || swept.renew_due(RENEW_SWEEP * 2)).await;
    }
}

/// How often [`renew_leaves`] looks; a leaf lives at least `MIN_LEAF_TTL` (minutes).
const RENEW_SWEEP: Duration = Duration::from_secs(5);

/// Logs what the agent signs with and trusts, and warns about what expires soon.
fn report_ca(ca: &Ca, what: &str) {
    let now = std::time::SystemTime::now();
    info!(
        signer = %ca.signer().subject,
        signer_expires_in_days = ca
            .not_after()
            .duration_since(now)
            .unwrap_or_default()
            .as_secs()
            / 86_400,
        roots = ca.roots().len(),
        trust_domain = %ca.trust_domain(),
        "CA material {what}"
    );
    for w in ca.expiry_warnings(now) {
        warn!("{w}");
    }
}

/// How often stale enrollments are looked at again (dropped when their cgroup is gone,
/// retried when their netns and cgroup are back).
const STALE_CHECK: Duration = Duration::from_secs(2);

async fn watch_stale(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(STALE_CHECK).await;
        agent.check_stale().await;
    }
}

/// Hands the node configuration file to the agent's file watcher (see [`watch`]), which
/// applies a changed `crypto` section while the agent runs; returns at once. A file that does
/// not parse, or a policy this node cannot carry, is logged and counted
/// (`config.reload_failures`) and the running policy stays. Other fields need a restart,
/// which the log says.
pub async fn watch_config(agent: Arc<Agent>, file: PathBuf, loaded: Config) {
    // Read now, not at the watcher's next tick: a change made in between is a change.
    let seen = std::fs::read(&file).ok();
    *agent
        .watched_config
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(watch::NodeSource::new(file, seen, loaded));
}

/// Puts a new generation into effect for the data path and for open flows.
fn applied(shared: &Shared, old_steer: &BTreeSet<SocketAddr>, new: &Generation) {
    if let Err(e) = intercept::apply_steering(shared, old_steer, &new.steer) {
        warn!("policy generation {}: {e:#}", new.number);
    }
    let closed = intercept::revalidate(shared, new);
    if closed > 0 {
        info!(
            generation = new.number,
            closed, "open flows closed by the new policy"
        );
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

impl Agent {
    /// Where `/metrics`, `/healthz`, `/readyz` and `/debug/*` are served, if anywhere.
    pub fn observability_addr(&self) -> Option<SocketAddr> {
        self.observability
    }

    /// The agent's metrics and access log.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Open flows, as `interceptor flows` shows them.
    pub fn flows(&self) -> Vec<crate::intercept::table::FlowRow> {
        self.shared.flows.rows()
    }

    /// Recently closed and open flows (`interceptor flows --all`).
    pub fn flows_with_recent(&self) -> Vec<crate::intercept::table::FlowRow> {
        self.shared.flows.rows_with_recent()
    }

    /// eBPF counters.
    pub fn counters(&self) -> crate::datapath::Counters {
        self.shared
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters()
    }

    /// Entries of the sk_msg join's maps (grants, peer sockets, sent counts), when the join
    /// is on: see `datapath::JoinMaps::entries`.
    pub fn join_entries(&self) -> Option<(usize, usize, usize)> {
        let maps = self.shared.join_maps()?;
        let maps = maps.lock().unwrap_or_else(|p| p.into_inner());
        Some(maps.entries())
    }

    /// How mesh flows are protected on this node.
    pub fn offload(&self) -> &Offload {
        &self.shared.offload
    }

    /// Start-up steps that hold, for `/readyz`.
    pub fn readiness(&self) -> Arc<Readiness> {
        Arc::clone(&self.readiness)
    }

    /// The workloads enrolled now.
    #[cfg(feature = "kubernetes")]
    fn enrolled_workloads(&self) -> Vec<Workload> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|p| p.workload.clone())
            .collect()
    }

    /// The crypto policy in force.
    pub fn crypto_policy(&self) -> CryptoPolicy {
        self.shared.crypto().policy()
    }

    /// Puts a crypto policy into effect (what a changed node config does): mesh handshakes
    /// and TLS origination use it from now on, and open flows whose session it does not allow
    /// are closed. Returns how many were; a policy this node cannot carry changes nothing.
    pub fn set_crypto(&self, policy: CryptoPolicy) -> anyhow::Result<usize> {
        let crypto = self.shared.resolve_crypto(policy)?;
        let (old, new) = self
            .shared
            .policy
            .set_crypto(policy)
            .map_err(|e| anyhow::anyhow!("TLS origination under {policy}: {e}"))?;
        let closed = self.shared.set_crypto(crypto);
        applied(&self.shared, &old.steer, &new);
        info!(closed, "crypto policy applied: {policy}");
        Ok(closed)
    }

    /// The generation of the CA material in force: 0 as loaded at start, one more with every
    /// reload of `caDir` that was put into effect.
    pub fn ca_generation(&self) -> u64 {
        self.shared.material().generation
    }

    /// The number of the policy generation in force; it grows by one with every applied change
    /// (policy files, enrollments).
    pub fn policy_generation(&self) -> u64 {
        self.shared.policy.current().number
    }

    /// Refusals per reason (`refused.<code>`), flows closed by a policy change
    /// (`closed.<code>`), rejected policy reloads and the generation.
    pub fn policy_stats(&self) -> BTreeMap<String, u64> {
        let mut stats = self.shared.counters.stats();
        stats.extend(self.shared.policy.stats());
        stats
    }

    /// Rebuilds the policy for the pods enrolled now.
    fn sync_policy(&self) -> anyhow::Result<()> {
        let workloads: Vec<Workload> = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|p| p.workload.clone())
            .collect();
        let (old, new) = self
            .shared
            .policy
            .set_workloads(workloads)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        applied(&self.shared, &old.steer, &new);
        Ok(())
    }

    /// Persisted enrollments that could not be restored, and why.
    pub fn stale(&self) -> Vec<Stale> {
        self.stale
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The names of the enrolled pods.
    pub fn enrolled(&self) -> Vec<String> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn persisted(&self) -> anyhow::Result<Vec<Workload>> {
        match std::fs::read(&self.runtime_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is corrupt", self.runtime_file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("read {}", self.runtime_file.display())),
        }
    }

    /// Read-modify-write of the enrollment file; callers hold `changes`.
    fn persist(&self, update: impl FnOnce(&mut Vec<Workload>)) -> anyhow::Result<()> {
        let mut list = self.persisted()?;
        update(&mut list);
        write_atomic(&self.runtime_file, &serde_json::to_vec_pretty(&list)?)
    }

    /// The one validation of [`config::check_workloads`], for `w` joining the pods enrolled
    /// now and the stale ones (which keep their name and addresses until they are dropped).
    fn validate(&self, w: &Workload) -> anyhow::Result<()> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let stale = self.stale.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<(String, &Workload)> = pods
            .values()
            .map(|p| (format!("workload `{}`", p.workload.name), &p.workload))
            .chain(stale.values().map(|s| {
                (
                    format!("stale enrollment `{}`", s.workload.name),
                    &s.workload,
                )
            }))
            .collect();
        all.push((format!("workload `{}`", w.name), w));
        config::check_cgroup_mode(&format!("workload `{}`", w.name), w, self.cni.is_some())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        config::check_workloads(&self.shared.trust_domain, &all, &self.peers, &self.services)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn enroll(&self, w: &Workload) -> anyhow::Result<()> {
        self.enroll_with(w, None)
    }

    /// [`Agent::enroll`] with listeners a previous agent handed over instead of new ones.
    fn enroll_with(
        &self,
        w: &Workload,
        listeners: Option<Vec<crate::handover::take::GivenListener>>,
    ) -> anyhow::Result<()> {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        if pods.contains_key(&w.name) {
            bail!("workload `{}` is already enrolled", w.name);
        }
        let slot = {
            let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
            let used: Vec<u32> = pods.values().map(|p| p.slot()).collect();
            let (adopted, reserved) = upgrade::slots_in_maps(&self.shared, listeners.as_deref());
            upgrade::choose_slot(&used, adopted, &reserved, &mut next)
        };
        let handle = intercept::enroll(&self.shared, w, slot, listeners)?;
        pods.insert(w.name.clone(), handle);
        let id = crate::identity::SpiffeId::new(
            self.shared.trust_domain.clone(),
            &w.namespace,
            &w.service_account,
        )
        .map(|id| id.to_string())
        .unwrap_or_default();
        self.telemetry.add_workload(
            &w.name,
            &w.ips,
            WorkloadLabels::of(&w.name, &w.namespace, &w.labels).with_principal(id),
        );
        Ok(())
    }

    /// Removes a pod enrolled by [`Agent::enroll`] from the kernel and the pod table.
    fn unenroll_pod(&self, name: &str) -> Option<Workload> {
        let pod = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)?;
        let workload = pod.workload.clone();
        intercept::unenroll(&self.shared, pod);
        self.telemetry
            .remove_workload(&workload.name, &workload.ips);
        Some(workload)
    }

    /// `interceptor enroll`: validated like the config's `workloads:`, enrolled, put in the
    /// policy inventory and persisted, all or nothing.
    async fn enroll_now(&self, w: &Workload) -> anyhow::Result<()> {
        let _change = self.changes.lock().await;
        self.refuse_while_handing_over()?;
        self.validate(w)?;
        self.enroll(w)?;
        let done = self.sync_policy().and_then(|()| {
            self.persist(|l| {
                l.retain(|p| p.name != w.name);
                l.push(w.clone());
            })
        });
        if let Err(e) = done {
            self.unenroll_pod(&w.name);
            let _ = self.sync_policy();
            return Err(e);
        }
        Ok(())
    }

    /// `interceptor unenroll`: the file first, so an error leaves the pod as it was.
    async fn unenroll_now(&self, name: &str) -> anyhow::Result<()> {
        let _change = self.changes.lock().await;
        self.refuse_while_handing_over()?;
        let enrolled = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name);
        let stale = self
            .stale
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|s| s.workload.clone());
        if !enrolled && stale.is_none() {
            bail!("no enrolled workload named `{name}`");
        }
        self.persist(|l| l.retain(|w| w.name != name))?;
        // Gone with the enrollment, whichever way it went (DEL, netns gone, replaced).
        if let Err(e) = self.set_sandbox(name, None) {
            warn!(pod = name, "{e:#}");
        }
        if let Some(w) = stale {
            self.stale
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            self.shared
                .datapath
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unenroll_cgroup(&w.cgroup);
            info!(pod = name, "stale enrollment removed");
            return Ok(());
        }
        self.unenroll_pod(name);
        self.sync_policy()
    }

    /// Records `w` as stale; logs unless `error` is what it already failed with.
    fn mark_stale(&self, w: &Workload, error: &anyhow::Error, before: Option<&str>) {
        let reason = format!("{error:#}");
        let mut stale = self.stale.lock().unwrap_or_else(|p| p.into_inner());
        if before != Some(reason.as_str()) {
            error!(
                pod = %w.name,
                cgroup = %w.cgroup.display(),
                netns = %w.netns.display(),
                "persisted enrollment not restored (kept fail-closed until its cgroup is \
                 gone): {reason}"
            );
        }
        stale.insert(
            w.name.clone(),
            Stale {
                workload: w.clone(),
                reason,
            },
        );
    }

    /// The cgroups and network namespaces of stale enrollments whose pins must survive the
    /// start-up prune: a previous agent's links keep those pods fail-closed.
    fn stale_pins(&self) -> (Vec<PathBuf>, Vec<u64>) {
        let stale = self.stale();
        let cgroups = stale
            .iter()
            .filter_map(|s| s.workload.own_cgroup().map(Path::to_owned))
            .collect();
        let netns = stale
            .iter()
            .filter_map(|s| sys::netns_cookie_of(&s.workload.netns).ok())
            .collect();
        (cgroups, netns)
    }

    /// Drops stale enrollments whose cgroup is gone (nothing is left to protect) and retries
    /// the others.
    async fn check_stale(&self) {
        if self.refuse_while_handing_over().is_err()
            || self
                .stale
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        {
            return;
        }
        let _change = self.changes.lock().await;
        let mut changed = false;
        for s in self.stale() {
            let w = &s.workload;
            // What is left to protect: the pod's cgroup, or for a pod enrolled by netns its
            // netns (gone with the sandbox).
            let gone = match w.own_cgroup() {
                Some(cgroup) => !cgroup.exists(),
                None => !w.netns.exists(),
            };
            if gone {
                if let Err(e) = self.persist(|l| l.retain(|p| p.name != w.name)) {
                    warn!(pod = %w.name, "cannot drop the stale enrollment: {e:#}");
                    continue;
                }
                self.stale
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&w.name);
                self.shared
                    .datapath
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .forget_cgroup(&w.cgroup);
                info!(pod = %w.name, cgroup = %w.cgroup.display(), netns = %w.netns.display(), "stale enrollment dropped: its cgroup or netns is gone");
                continue;
            }
            if !w.netns.exists() {
                continue;
            }
            self.stale
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&w.name);
            match self.validate(w).and_then(|()| self.enroll(w)) {
                Ok(()) => {
                    info!(pod = %w.name, "stale enrollment restored");
                    changed = true;
                }
                Err(e) => self.mark_stale(w, &e, Some(&s.reason)),
            }
        }
        if changed && let Err(e) = self.sync_policy() {
            warn!("policy for the restored pods: {e:#}");
        }
    }
}

/// Who the pods the CNI plugin names are: only needed with `cni:`. The static table of
/// `cni.namespaces`/`cni.pods` here; an API-server-backed directory takes its place where the
/// node has one.
fn pod_directory(
    config: &Config,
    cluster: Option<kubernetes::KubeDirectory>,
) -> Option<Arc<dyn PodDirectory>> {
    if let Some(cluster) = cluster {
        return Some(Arc::new(cluster));
    }
    let cni = config.cni.as_ref()?;
    Some(Arc::new(StaticDirectory::new(cni)))
}

impl telemetry::Observed for Agent {
    fn snapshot(&self) -> telemetry::Snapshot {
        let mut open_flows = BTreeMap::new();
        for row in self.shared.flows.rows() {
            let Some(mode) = row.mode else { continue };
            *open_flows
                .entry((intercept::table::direction(row.direction), mode))
                .or_insert(0) += 1;
        }
        let now = std::time::SystemTime::now();
        let secs_until = |t: std::time::SystemTime| match t.duration_since(now) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        let material = self.shared.material();
        let (maps, counters) = {
            let dp = self
                .shared
                .datapath
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            (dp.map_fill(), dp.counters())
        };
        telemetry::Snapshot {
            open_flows,
            enrolled_pods: self.enrolled().len() as u64,
            stale_enrollments: self.stale().len() as u64,
            policy_generation: self.policy_generation(),
            ca_generation: material.generation,
            certificates: self
                .shared
                .certificate_expiries()
                .into_iter()
                .map(|(id, t)| (id.to_string(), secs_until(t)))
                .collect(),
            signer_expiry: material.ca.signer_not_after().map(secs_until),
            maps,
            datapath: interceptor_common::Counter::ALL
                .iter()
                .map(|c| (telemetry::snake_case(&format!("{c:?}")), counters.get(*c)))
                .collect(),
        }
    }

    fn flows(&self, all: bool) -> serde_json::Value {
        let rows = if all {
            self.flows_with_recent()
        } else {
            self.flows()
        };
        serde_json::to_value(rows).unwrap_or_default()
    }

    fn config(&self) -> serde_json::Value {
        let config = serde_json::to_value(&self.config).unwrap_or_default();
        telemetry::redact(serde_json::json!({
            "config": config,
            "inForce": {
                "crypto": self.crypto_policy().to_string(),
                "offload": format!("{:?}", self.offload()),
                "policyGeneration": self.policy_generation(),
                "caGeneration": self.ca_generation(),
                "enrolled": self.enrolled(),
                "observability": self.observability.map(|a| a.to_string()),
            },
        }))
    }
}

/// The enrollment name of a pod the CNI plugin names: unique on the node, as in Kubernetes.
pub fn cni_pod_name(pod: &PodRef) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

/// How long a directory that has synced gets to catch up with a pod it has not seen yet (a
/// watch event can trail the sandbox by a moment).
const LOOKUP_GRACE: Duration = Duration::from_secs(2);

impl Agent {
    fn cni_mode(&self) -> anyhow::Result<(&CniSettings, &Arc<dyn PodDirectory>)> {
        match (&self.cni, &self.directory) {
            (Some(cni), Some(directory)) => Ok((cni, directory)),
            _ => bail!(
                "this agent enrolls pods by cgroup (`interceptor enroll`); configure `cni:` \
                 to enroll pods from the CNI plugin"
            ),
        }
    }

    /// Asks the directory, retrying while it has not synced (up to `cni.lookupTimeoutMs`)
    /// and for a short grace once it has; then refuses, naming the pod.
    async fn lookup_pod(&self, pod: &PodRef) -> anyhow::Result<crate::cluster::PodInfo> {
        let (cni, directory) = self.cni_mode()?;
        let start = tokio::time::Instant::now();
        let timeout = Duration::from_millis(cni.lookup_timeout_ms);
        loop {
            if let Some(info) = directory.lookup(pod) {
                return Ok(info);
            }
            let synced = directory.synced();
            let limit = if synced {
                timeout.min(LOOKUP_GRACE)
            } else {
                timeout
            };
            if start.elapsed() >= limit {
                bail!(
                    "pod {} (uid `{}`) is not known to the pod directory{}",
                    cni_pod_name(pod),
                    pod.uid,
                    if synced {
                        ""
                    } else {
                        " (it has not finished its first sync)"
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// CNI ADD: enrolls the pod by its netns if the directory puts it in the mesh.
    async fn enroll_pod(
        &self,
        pod: &PodRef,
        netns: &Path,
        ips: &[std::net::IpAddr],
        container_id: &str,
    ) -> anyhow::Result<String> {
        let info = self.lookup_pod(pod).await?;
        let name = cni_pod_name(pod);
        if info.membership == Membership::Outside {
            return Ok(format!("{name} is outside the mesh; not enrolled"));
        }
        let current = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .map(|p| p.workload.netns.clone());
        let stale = self
            .stale
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&name);
        match current {
            // ADD retried for the same sandbox.
            Some(n) if n == netns => {
                self.set_sandbox(&name, Some(container_id))?;
                return Ok(format!("{name} is already enrolled"));
            }
            // An older sandbox of this pod whose DEL never reached us.
            Some(_) => self.unenroll_now(&name).await?,
            None if stale => self.unenroll_now(&name).await?,
            None => {}
        }
        let w = Workload {
            name: name.clone(),
            namespace: pod.namespace.clone(),
            service_account: info.service_account.clone(),
            labels: info.labels.clone(),
            cgroup: PathBuf::new(),
            netns: netns.to_owned(),
            ips: ips.to_vec(),
        };
        self.enroll_now(&w).await?;
        self.set_sandbox(&name, Some(container_id))?;
        info!(pod = %name, netns = %netns.display(), sandbox = container_id, "enrolled by the CNI plugin");
        Ok(format!(
            "enrolled {name} as spiffe://{}/ns/{}/sa/{}",
            self.shared.trust_domain, pod.namespace, info.service_account
        ))
    }

    /// Records (or with `None` forgets) the sandbox that enrolled `name`, on disk before it
    /// returns: ADD fails (and the runtime retries) rather than leave a record a restart
    /// would lose.
    fn set_sandbox(&self, name: &str, container_id: Option<&str>) -> anyhow::Result<()> {
        let mut map = self.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match container_id {
            Some("") => false,
            Some(id) => map.insert(name.to_owned(), id.to_owned()).as_deref() != Some(id),
            None => map.remove(name).is_some(),
        };
        if changed {
            // Under the lock: the last write holds the latest map.
            write_atomic(&self.sandbox_file, &serde_json::to_vec_pretty(&*map)?)?;
        }
        Ok(())
    }

    /// The CNI sandbox (container ID) that enrolled `name`, if this agent saw it.
    fn sandbox_of(&self, name: &str) -> Option<String> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// CNI DEL: idempotent; a sandbox other than the enrolled one changes nothing.
    async fn unenroll_pod_by_ref(
        &self,
        pod: &PodRef,
        container_id: &str,
    ) -> anyhow::Result<String> {
        self.cni_mode()?;
        let name = cni_pod_name(pod);
        let recorded = self.sandbox_of(&name);
        if let Some(recorded) = recorded
            && !container_id.is_empty()
            && recorded != container_id
        {
            return Ok(format!(
                "{name} is enrolled for sandbox {recorded}, not {container_id}; left alone"
            ));
        }
        let known = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&name)
            || self
                .stale
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&name);
        if !known {
            return Ok(format!("{name} is not enrolled"));
        }
        self.unenroll_now(&name).await?;
        info!(pod = %name, sandbox = container_id, "unenrolled by the CNI plugin");
        Ok(format!("unenrolled {name}"))
    }

    /// CNI CHECK: the pod is enrolled as ADD left it (same netns, which is still the one
    /// steered, same addresses, same sandbox), or it is outside the mesh.
    async fn check_pod(
        &self,
        pod: &PodRef,
        netns: &Path,
        ips: &[std::net::IpAddr],
        container_id: &str,
    ) -> anyhow::Result<String> {
        self.cni_mode()?;
        let name = cni_pod_name(pod);
        let current = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .map(|p| (p.workload.clone(), p.netns_cookie));
        let Some((w, cookie)) = current else {
            let info = self.lookup_pod(pod).await?;
            if info.membership == Membership::Outside {
                return Ok(format!("{name} is outside the mesh"));
            }
            bail!("{name} is in the mesh but not enrolled");
        };
        if w.netns != netns {
            bail!(
                "{name} is enrolled with netns {}, not {}",
                w.netns.display(),
                netns.display()
            );
        }
        let canon = |v: &[std::net::IpAddr]| -> BTreeSet<std::net::IpAddr> {
            v.iter().map(|ip| ip.to_canonical()).collect()
        };
        if canon(&w.ips) != canon(ips) {
            bail!("{name} is enrolled with addresses {:?}, not {ips:?}", w.ips);
        }
        let recorded = self.sandbox_of(&name);
        if let Some(recorded) = recorded
            && !container_id.is_empty()
            && recorded != container_id
        {
            bail!("{name} is enrolled for sandbox {recorded}, not {container_id}");
        }
        let now = sys::netns_cookie_of(netns)
            .with_context(|| format!("netns {} of {name}", netns.display()))?;
        if now != cookie {
            bail!(
                "{name}: {} is not the netns that was enrolled",
                netns.display()
            );
        }
        if !self
            .shared
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .has_pod(cookie)
        {
            bail!("{name}: its netns is not steered (no pod config in the kernel)");
        }
        Ok(format!("{name} is enrolled"))
    }

    /// Makes the next [`Agent::write_membership`] write even if nothing changed (the file on
    /// disk did).
    fn forget_membership_written(&self) {
        *self
            .membership_written
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Writes `cni.membershipFile` when what the directory says about namespaces changed, so
    /// the CNI plugin can tell, while this agent is unreachable, which pods may start without
    /// it. Kept when the agent stops: that is when the plugin needs it.
    fn write_membership(&self) {
        let (Some(cni), Some(directory)) = (&self.cni, &self.directory) else {
            return;
        };
        let file = MembershipFile::of(directory.as_ref());
        let mut last = self
            .membership_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&file) {
            return;
        }
        let path = &cni.membership_file;
        let written = (|| -> anyhow::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            write_atomic(path, &serde_json::to_vec(&file)?)
        })();
        match written {
            Ok(()) => *last = Some(file),
            Err(e) => warn!(file = %path.display(), "cannot write the CNI membership cache: {e:#}"),
        }
    }

    /// Entries in the per-pod maps and netns links: after every pod is gone, only what
    /// node-wide steering (peers, services) put there is left.
    fn map_occupancy(&self) -> Vec<(String, serde_json::Value)> {
        let dp = self
            .shared
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        dp.occupancy()
            .into_iter()
            .map(|(name, n)| (format!("map.{name}"), serde_json::Value::from(n)))
            .chain([(
                "links.netns".to_owned(),
                serde_json::Value::from(dp.netns_links().len()),
            )])
            .collect()
    }
}

impl admin::Handler for Agent {
    async fn handle(&self, req: Request) -> Response {
        let result = match req {
            Request::Flows { all } => {
                let rows = if all {
                    self.shared.flows.rows_with_recent()
                } else {
                    self.shared.flows.rows()
                };
                return Response::flows(&rows, self.stale());
            }
            Request::Stats => {
                let c = self
                    .shared
                    .datapath
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .counters();
                let stats = crate::datapath::Counter::ALL
                    .iter()
                    .map(|k| (format!("{k:?}"), serde_json::Value::from(c.get(*k))))
                    .chain(
                        self.policy_stats()
                            .into_iter()
                            .map(|(k, v)| (k, serde_json::Value::from(v))),
                    )
                    .chain(self.map_occupancy())
                    .chain({
                        let (server, client) = self.shared.derived_roots_held();
                        [
                            ("derived.roots_server".to_owned(), server.into()),
                            ("derived.roots_client".to_owned(), client.into()),
                        ]
                    })
                    .chain([
                        (
                            "enrollments.active".to_owned(),
                            serde_json::Value::from(self.enrolled().len()),
                        ),
                        (
                            "enrollments.stale".to_owned(),
                            serde_json::Value::from(self.stale().len()),
                        ),
                        (
                            "handover.predecessor_flows".to_owned(),
                            serde_json::Value::from(
                                self.predecessor_flows
                                    .load(std::sync::atomic::Ordering::Relaxed),
                            ),
                        ),
                    ])
                    .chain(["sent", "received", "kept", "refused"].map(|result| {
                        (
                            format!("handover.flows_{result}"),
                            serde_json::Value::from(self.telemetry.handover_flows_counted(result)),
                        )
                    }))
                    .collect();
                return Response::Stats {
                    stats: serde_json::Value::Object(stats),
                };
            }
            Request::Enroll { .. }
            | Request::Unenroll { .. }
            | Request::EnrollPod { .. }
            | Request::UnenrollPod { .. }
                if self.is_retired() =>
            {
                Err(upgrade::HandingOver::RETIRED.into())
            }
            Request::Enroll { workload } => self
                .enroll_now(&workload)
                .await
                .map(|()| format!("enrolled {}", workload.name)),
            Request::Unenroll { name } => self
                .unenroll_now(&name)
                .await
                .map(|()| format!("unenrolled {name}")),
            Request::EnrollPod {
                pod,
                netns,
                ips,
                container_id,
            } => self.enroll_pod(&pod, &netns, &ips, &container_id).await,
            Request::UnenrollPod { pod, container_id } => {
                self.unenroll_pod_by_ref(&pod, &container_id).await
            }
            Request::CheckPod {
                pod,
                netns,
                ips,
                container_id,
            } => self.check_pod(&pod, &netns, &ips, &container_id).await,
        };
        match result {
            Ok(message) => Response::Ok { message },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
                code: e
                    .chain()
                    .any(|c| c.is::<upgrade::HandingOver>())
                    .then(|| admin::HANDING_OVER.to_owned()),
            },
        }
    }
}

/// The CNI sandbox of each pod enrolled by the plugin, in the state directory.
const SANDBOX_FILE: &str = "cni-sandboxes.json";

/// The persisted sandbox map; empty when there is none. A file that does not parse is named
/// and ignored: DELs then match by pod name alone, as before any record.
fn load_sandboxes(path: &Path) -> BTreeMap<String, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(
                "{} is corrupt ({e}): CNI sandboxes forgotten",
                path.display()
            );
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            warn!("read {}: {e}: CNI sandboxes forgotten", path.display());
            BTreeMap::new()
        }
    }
}

/// Replaces `path` with `bytes` so that a crash at any point leaves the old or the new
/// contents, never a mix, and the new contents survive a power cut once this returns: a
/// temporary file of its own (unique per call, so no other writer can interleave), synced,
/// renamed over `path`, then the directory synced so the rename itself is durable.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::{
        io::Write as _,
        sync::atomic::{AtomicU64, Ordering},
    };
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("write {}", path.display()))
}
