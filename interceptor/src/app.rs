//! Wiring and lifecycle of `interceptor run`: probe, load the CA and the datapath, enroll the
//! configured and persisted pods, serve the admin API, and on SIGTERM exit leaving the pinned
//! programs in place so enrolled pods stay fail-closed until the agent is back.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tracing::{error, info, warn};

use crate::{
    admin::{self, Request, Response},
    ca::renew::{RenewPolicy, SystemClock},
    ca::{self, Ca, CertificateAuthority as _},
    config::{Config, KtlsMode, Workload},
    datapath::{Datapath, DatapathOptions},
    handshake::MeshSuite,
    intercept::{
        self, Identity, Offload, PodHandle, Shared,
        enforce::{Enforcer, Generation, Reload},
    },
    ktls, sys,
};

/// The running agent as the admin API sees it.
pub struct Agent {
    shared: Arc<Shared>,
    pods: Mutex<BTreeMap<String, PodHandle>>,
    /// Runtime enrollments (`interceptor enroll`), persisted so they survive restarts.
    runtime_file: PathBuf,
    next_slot: Mutex<u32>,
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

/// `interceptor run`: start, serve until SIGTERM/SIGINT, then exit leaving the pins.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let _agent = start(config).await?;
    shutdown_signal().await;
    info!("stopping; pinned programs stay attached, so enrolled pods fail closed until restart");
    Ok(())
}

/// Starts the agent on the current tokio runtime and returns once every configured pod is
/// enrolled and the admin socket answers. Dropping the runtime stops it (as a kill would).
pub async fn start(config: Config) -> anyhow::Result<Arc<Agent>> {
    if let Err(e) = sys::raise_nofile_rlimit() {
        warn!(error = %e, "could not raise RLIMIT_NOFILE; large flow counts may fail");
    }
    // A policy that does not load refuses the start before anything is attached.
    let policy = Enforcer::load(&config)?;
    let offload = offload(config.ktls)?;
    let ca_seen = ca_fingerprint(&config.ca_dir);
    let ca = Ca::load_for(
        &config.ca_dir,
        Some(&config.trust_domain),
        std::time::SystemTime::now(),
    )
    .with_context(|| format!("CA in {}", config.ca_dir.display()))?;
    report_ca(&ca, "loaded");
    if let Some(parent) = config.bpffs.parent() {
        sys::ensure_bpffs(parent)
            .with_context(|| format!("mount bpffs at {}", parent.display()))?;
    }
    let datapath = Datapath::load(DatapathOptions {
        pin_dir: Some(config.bpffs.clone()),
    })?;
    let mut datapath = datapath;
    if config.tuning.sk_msg_local_leg {
        let cg = sys::own_cgroup().context("the agent's own cgroup")?;
        datapath.enable_local_leg(&cg).context("sk_msg local leg")?;
    }
    let agent = start_with(config.clone(), offload, ca, datapath, policy).await?;
    tokio::spawn(watch_ca(
        Arc::clone(&agent.shared),
        config.ca_dir.clone(),
        Duration::from_millis(config.identity.ca_poll_ms),
        ca_seen,
    ));
    Ok(agent)
}

async fn start_with(
    config: Config,
    offload: Offload,
    ca: Ca,
    datapath: Datapath,
    policy: Enforcer,
) -> anyhow::Result<Arc<Agent>> {
    let identity = Identity {
        renew: RenewPolicy {
            ttl: config.identity.leaf_ttl.0,
            fraction: f64::from(config.identity.renew_percent) / 100.0,
        },
        clock: Arc::new(SystemClock),
    };
    let shared = Arc::new(Shared::new(
        config.trust_domain.clone(),
        Arc::new(ca),
        identity,
        offload,
        config.tuning.clone(),
        datapath,
        policy,
    )?);
    {
        let mut dp = shared.datapath.lock().unwrap_or_else(|p| p.into_inner());
        for peer in &config.peers {
            crate::identity::SpiffeId::new(
                config.trust_domain.clone(),
                &peer.namespace,
                &peer.service_account,
            )?;
            for ip in &peer.ips {
                dp.set_destination(*ip, None, interceptor_common::ACTION_STEER)?;
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
        runtime_file: config.state_dir.join("enrollments.json"),
        next_slot: Mutex::new(0),
    });
    for w in config.workloads.iter().chain(agent.persisted()?.iter()) {
        agent
            .enroll(w)
            .with_context(|| format!("enroll {}", w.name))?;
    }
    agent
        .sync_policy()
        .context("policy for the enrolled pods")?;
    tokio::spawn(watch_policy(Arc::clone(&shared)));
    tokio::spawn(renew_leaves(Arc::clone(&shared)));
    let pruned = shared
        .datapath
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .prune_stale_pins();
    if !pruned.is_empty() {
        info!(
            ?pruned,
            "removed programs pinned for pods no longer enrolled"
        );
    }
    let listener = admin::bind(&config.admin_socket)
        .with_context(|| format!("admin socket {}", config.admin_socket.display()))?;
    tokio::spawn(admin::serve(listener, Arc::clone(&agent)));
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

/// What the agent last saw of the CA directory: a hash of each file's contents (or its
/// absence). Hashes, not contents, so no copy of the key stays around.
type CaFingerprint = Vec<Option<u64>>;

fn ca_fingerprint(dir: &Path) -> CaFingerprint {
    use std::hash::{Hash as _, Hasher as _};
    ca::CA_FILES
        .iter()
        .map(|name| {
            let bytes = zeroize::Zeroizing::new(std::fs::read(dir.join(name)).ok()?);
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            Some(h.finish())
        })
        .collect()
}

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

/// Watches the CA directory and puts changed material into effect without a restart: new
/// handshakes use leaves of the new signer and trust exactly the new bundle, open flows are
/// untouched. Material that does not load (a half-copied set of files, an expired signer, a
/// chain the bundle does not trust) is refused with the reason, and the previous material
/// stays in effect; it is tried again on every poll until it loads or changes back. Expiry
/// warnings are repeated hourly.
async fn watch_ca(shared: Arc<Shared>, dir: PathBuf, every: Duration, mut seen: CaFingerprint) {
    let mut failed: Option<String> = None;
    let mut warned = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let d = dir.clone();
        let td = shared.trust_domain.clone();
        let prev = seen.clone();
        let retry = failed.is_some();
        let Ok(polled) = tokio::task::spawn_blocking(move || {
            let now = ca_fingerprint(&d);
            if now == prev && !retry {
                return (now, None);
            }
            let loaded = Ca::load_for(&d, Some(&td), std::time::SystemTime::now());
            (now, Some(loaded))
        })
        .await
        else {
            continue;
        };
        match polled {
            (_, None) => {
                if warned.elapsed() >= Duration::from_secs(3600) {
                    warned = tokio::time::Instant::now();
                    let m = shared.material();
                    for w in m.ca.expiry_warnings(std::time::SystemTime::now()) {
                        warn!("{w}");
                    }
                }
            }
            (now, Some(Ok(ca))) => {
                report_ca(&ca, "reloaded");
                let s = Arc::clone(&shared);
                let Ok(replaced) =
                    tokio::task::spawn_blocking(move || s.replace_ca(Arc::new(ca))).await
                else {
                    continue;
                };
                match replaced {
                    Ok(generation) => {
                        seen = now;
                        failed = None;
                        info!(generation, "new CA material in effect for new handshakes");
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        if failed.as_ref() != Some(&msg) {
                            error!(dir = %dir.display(), "CA reload refused, keeping the previous material: {msg}");
                        }
                        failed = Some(msg);
                    }
                }
            }
            (_, Some(Err(e))) => {
                let msg = e.to_string();
                if failed.as_ref() != Some(&msg) {
                    error!(dir = %dir.display(), "CA reload refused, keeping the previous material: {msg}");
                }
                failed = Some(msg);
            }
        }
    }
}

/// Polls the policy sources; a new generation is steered and every open inbound flow is
/// decided again under it.
async fn watch_policy(shared: Arc<Shared>) {
    if shared.policy.dir().is_none() {
        return;
    }
    let every = Duration::from_millis(shared.tuning.policy_poll_ms);
    loop {
        tokio::time::sleep(every).await;
        let polled = Arc::clone(&shared);
        let Ok(reload) = tokio::task::spawn_blocking(move || polled.policy.poll()).await else {
            continue;
        };
        if let Reload::Applied { old, new } = reload {
            applied(&shared, &old.steer, &new);
        }
    }
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

    /// How mesh flows are protected on this node.
    pub fn offload(&self) -> &Offload {
        &self.shared.offload
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
        self.shared.policy.stats()
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

    fn persisted(&self) -> anyhow::Result<Vec<Workload>> {
        match std::fs::read(&self.runtime_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is corrupt", self.runtime_file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("read {}", self.runtime_file.display())),
        }
    }

    fn persist(&self, update: impl FnOnce(&mut Vec<Workload>)) -> anyhow::Result<()> {
        let mut list = self.persisted()?;
        update(&mut list);
        write_atomic(&self.runtime_file, &serde_json::to_vec_pretty(&list)?)
    }

    fn enroll(&self, w: &Workload) -> anyhow::Result<()> {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        if pods.contains_key(&w.name) {
            bail!("workload `{}` is already enrolled", w.name);
        }
        let slot = {
            let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
            let used: Vec<u32> = pods.values().map(|p| p.slot()).collect();
            while used.contains(&*next) {
                *next += 1;
            }
            *next
        };
        let handle = intercept::enroll(&self.shared, w, slot)?;
        pods.insert(w.name.clone(), handle);
        Ok(())
    }

    /// Enrolls at runtime (admin API): the pod joins the policy inventory at once.
    fn enroll_now(&self, w: &Workload) -> anyhow::Result<()> {
        self.enroll(w)?;
        self.sync_policy()
    }

    fn unenroll(&self, name: &str) -> anyhow::Result<()> {
        let pod = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .with_context(|| format!("no enrolled workload named `{name}`"))?;
        intercept::unenroll(&self.shared, pod);
        self.sync_policy()
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
                return Response::flows(&rows);
            }
            Request::Stats => {
                let c = self
                    .shared
                    .datapath
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .counters();
                let stats = interceptor_common::Counter::ALL
                    .iter()
                    .map(|k| (format!("{k:?}"), serde_json::Value::from(c.get(*k))))
                    .chain(
                        self.policy_stats()
                            .into_iter()
                            .map(|(k, v)| (k, serde_json::Value::from(v))),
                    )
                    .collect();
                return Response::Stats {
                    stats: serde_json::Value::Object(stats),
                };
            }
            Request::Enroll { workload } => self.enroll_now(&workload).and_then(|()| {
                self.persist(|l| {
                    l.retain(|w| w.name != workload.name);
                    l.push(workload.clone());
                })
                .map(|()| format!("enrolled {}", workload.name))
            }),
            Request::Unenroll { name } => self.unenroll(&name).and_then(|()| {
                self.persist(|l| l.retain(|w| w.name != name))
                    .map(|()| format!("unenrolled {name}"))
            }),
        };
        match result {
            Ok(message) => Response::Ok { message },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}
