//! The running agent's side of Istio security policy: reading `policyDir`, building a policy
//! generation (the pure [`Engine`] plus what the data path needs next to it: per-service
//! round-robin counters, TLS origination configs, the destinations connect4 must steer), and
//! swapping generations while flows run.
//!
//! A generation is immutable and shared (`Arc`); a flow takes the current one when it starts.
//! A new generation replaces the old one whole, when the policy files (or the certificate
//! files they name) change, or when a pod is enrolled or leaves. A set of files that does not
//! load keeps the previous generation, logs why and counts the failure.
//!
//! Decisions come out owned ([`Plan`], [`Refused`]), so nothing borrows the engine across an
//! await.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context as _;
use rustls::{ClientConfig, pki_types::ServerName};
use tracing::{info, warn};

use super::{files, originate};
use crate::{
    config::{self, Config},
    handshake::CryptoPolicy,
    identity::SpiffeId,
    policy::{
        self, ClientTls, Engine, FlowTls, HostPattern, InboundRequest, Mode, OutboundRequest,
        OutboundTls, Pick, PolicySet, Settings, TlsMode,
    },
    refusal::RefusalCode,
};

/// What one poll of the policy sources read: `(path, contents)`, `None` for a file that could
/// not be read.
type Snapshot = Vec<(PathBuf, Option<Vec<u8>>)>;

/// Reads the `*.yaml` and `*.yml` files of `dir`, sorted by name, as `(path, contents)`.
///
/// Names starting with `.` are skipped: editors' swap files, and the `..data` links of a
/// mounted ConfigMap (whose visible `name.yaml` links are read instead).
pub fn read_policy_dir(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    policy_files(dir)?
        .into_iter()
        .map(|path| {
            let text = read_policy_file(dir, &path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            Ok((path.display().to_string(), text))
        })
        .collect()
}

/// The policy files of `dir`, sorted by name (see [`read_policy_dir`]).
fn policy_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("cannot read policy directory {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            continue;
        }
        names.push(path);
    }
    names.sort();
    Ok(names)
}

/// One policy file, read as [`files`] reads what policy controls: inside `dir`, regular,
/// bounded (a FIFO named `x.yaml` must not hang the agent or `policy check`).
fn read_policy_file(dir: &Path, path: &Path) -> Result<String, String> {
    let name = path.strip_prefix(dir).unwrap_or(path);
    let bytes = files::open_beneath(dir, name, files::POLICY_FILE_MAX)?.read()?;
    String::from_utf8(bytes.to_vec()).map_err(|_| "is not UTF-8".to_owned())
}

/// Validates a policy directory offline (`interceptor policy check`): the warnings, or every
/// error naming file, document and field. Origination credentials are loaded too, from inside
/// `cert_dirs` (the node config's `policy.certDirs`), so a rule naming a missing certificate
/// or a file elsewhere fails here as it would in the agent.
pub fn check_dir(dir: &Path, cert_dirs: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let files = read_policy_dir(dir)?;
    let set = policy::load_documents(&files).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cert_files = originate::CertFiles::new(cert_dirs.to_vec());
    originate::Configs::build(&set.destination_rules, Default::default(), &cert_files)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(set.warnings.iter().map(ToString::to_string).collect())
}

/// Why the agent refuses a connection: a stable code for counters and one reason for the log.
#[derive(Clone, Debug)]
pub struct Refused {
    pub code: RefusalCode,
    pub reason: String,
}

/// How to originate an outbound connection, decided by the current generation.
pub struct Plan {
    /// Where to connect (for a service VIP, the endpoint picked round robin).
    pub endpoint: SocketAddr,
    /// The transport.
    pub transport: Transport,
    /// Why (the DestinationRule, or automatic mTLS and the endpoint's mode).
    pub reason: String,
}

pub enum Transport {
    Plaintext,
    /// Mesh mTLS, expecting this server identity (`None`: not known, refused).
    Mesh(Option<SpiffeId>),
    /// TLS origination with a DestinationRule's settings.
    Originate {
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        mode: TlsMode,
        /// The rule's settings, which a later generation must match for the flow to stay.
        settings: ClientTls,
    },
}

impl Transport {
    /// What a flow made with this transport runs; `None` for mesh mTLS to an unknown
    /// identity, which is refused.
    pub fn to_flow(&self) -> Option<FlowTls> {
        Some(match self {
            Self::Plaintext => FlowTls::Plaintext,
            Self::Mesh(server) => FlowTls::Mesh(server.clone()?),
            Self::Originate { settings, .. } => FlowTls::Originate(settings.clone()),
        })
    }
}

/// One immutable policy generation.
pub struct Generation {
    pub engine: Engine,
    pub number: u64,
    picks: Vec<AtomicU64>,
    originate: originate::Configs,
    /// Destinations connect4 steers to the agent for policy's sake: service VIP ports, and
    /// ports of service endpoints outside the mesh that a DestinationRule may originate TLS to.
    /// (Mesh workloads are steered on every port when they are enrolled or configured.)
    pub steer: BTreeSet<SocketAddr>,
}

impl Generation {
    fn build(
        set: PolicySet,
        settings: &Settings,
        crypto: CryptoPolicy,
        inventory: policy::Inventory,
        number: u64,
        cert_files: &originate::CertFiles,
    ) -> Result<Self, String> {
        let originate = originate::Configs::build(&set.destination_rules, crypto, cert_files)?;
        let steer = steered(&set, settings, &inventory);
        let engine = Engine::new(set, settings.clone(), inventory);
        let picks = (0..engine.service_count())
            .map(|_| AtomicU64::new(0))
            .collect();
        Ok(Self {
            engine,
            number,
            picks,
            originate,
            steer,
        })
    }

    /// Decides an outbound connection from the workload at `source` to `destination`.
    pub fn outbound(&self, source: IpAddr, destination: SocketAddr) -> Result<Plan, Refused> {
        let pick = self
            .engine
            .service_at(destination)
            .and_then(|s| self.picks.get(s.index()))
            .map_or(0, |c| c.fetch_add(1, Ordering::Relaxed));
        self.plan(&OutboundRequest {
            source,
            destination,
            pick: Pick::Next(pick),
        })
        .map(|(plan, _)| plan)
    }

    /// Decides an open outbound flow again, on the endpoint it is connected to: `Ok` when it
    /// may stay as it is. It is refused when this generation refuses it, or when the decision
    /// needs protection the flow lacks (see [`OutboundTls::met_by`]): plaintext where mesh
    /// mTLS or TLS origination is now required, mesh mTLS to another server identity,
    /// origination with other settings (`transport_changed`). A flow already stronger than
    /// required stays.
    pub fn outbound_still(
        &self,
        source: IpAddr,
        destination: SocketAddr,
        endpoint: SocketAddr,
        held: &FlowTls,
    ) -> Result<(), Refused> {
        let (plan, tls) = self.plan(&OutboundRequest {
            source,
            destination,
            pick: Pick::Endpoint(endpoint),
        })?;
        if matches!(plan.transport, Transport::Mesh(None)) {
            return Err(mesh_identity_unknown());
        }
        if tls.met_by(held) {
            Ok(())
        } else {
            Err(Refused {
                code: RefusalCode::TransportChanged,
                reason: format!("{} requires {tls}, the flow is {held}", plan.reason),
            })
        }
    }

    /// The owned plan, and the engine's transport it came from.
    fn plan(&self, request: &OutboundRequest) -> Result<(Plan, OutboundTls<'_>), Refused> {
        let o = self.engine.outbound(request).map_err(|r| Refused {
            code: r.code(),
            reason: r.to_string(),
        })?;
        let transport = match o.tls {
            OutboundTls::Plaintext => Transport::Plaintext,
            OutboundTls::Mesh { server } => Transport::Mesh(server.cloned()),
            OutboundTls::Originate(tls) => {
                let config = self.originate.get(tls).ok_or_else(|| Refused {
                    code: RefusalCode::CredentialsUnavailable,
                    reason: format!("{}: no client configuration was built", o.reason),
                })?;
                Transport::Originate {
                    config,
                    name: originate::server_name(tls, o.service, o.endpoint),
                    mode: tls.mode,
                    settings: tls.clone(),
                }
            }
        };
        let plan = Plan {
            endpoint: o.endpoint,
            transport,
            reason: o.reason.to_string(),
        };
        Ok((plan, o.tls))
    }

    /// Decides an inbound connection; `Ok` carries the accepting verdict's code.
    pub fn inbound(
        &self,
        source: SocketAddr,
        destination: SocketAddr,
        peer: Option<&SpiffeId>,
    ) -> Result<&'static str, Refused> {
        let verdict = self.engine.inbound(&InboundRequest {
            source,
            destination,
            peer,
        });
        match verdict.refusal() {
            None => Ok(verdict.code()),
            Some(code) => Err(Refused {
                code,
                reason: verdict.to_string(),
            }),
        }
    }

    /// Whether only mesh mTLS can be accepted from `source` at `destination` (STRICT, and not
    /// a probe source): then a silent client cannot be let through as plaintext anyway, so
    /// classification may wait for its first bytes as long as a handshake may take, and a
    /// slow mesh client is never mistaken for a server-speaks-first plaintext one.
    pub fn requires_mtls(&self, source: SocketAddr, destination: SocketAddr) -> bool {
        let strict = self
            .engine
            .effective_peer_auth(destination.ip(), destination.port())
            .is_some_and(|m| m.mode == Mode::Strict);
        strict
            && !self
                .engine
                .settings()
                .probe_sources
                .iter()
                .any(|p| p.to_canonical() == source.ip().to_canonical())
    }

    /// A mesh ClientHello to a DISABLE port is refused before any handshake: the workload
    /// does not terminate mesh TLS there.
    pub fn refuses_mtls(&self, destination: SocketAddr) -> Option<Refused> {
        let mode = self
            .engine
            .effective_peer_auth(destination.ip(), destination.port())?;
        (mode.mode == Mode::Disable).then(|| Refused {
            code: RefusalCode::MtlsRefusedDisable,
            reason: format!("mTLS refused: {mode} does not terminate mesh TLS"),
        })
    }
}

/// Mesh mTLS to an endpoint whose identity the inventory does not know: nothing could verify
/// the server, so the connection is refused.
pub fn mesh_identity_unknown() -> Refused {
    Refused {
        code: RefusalCode::MeshIdentityUnknown,
        reason: "ISTIO_MUTUAL to an endpoint whose mesh identity is not known".to_owned(),
    }
}

/// VIP ports of every service, and the endpoint ports of non-mesh endpoints whose service a
/// DestinationRule with TLS (SIMPLE, MUTUAL, ISTIO_MUTUAL) matches in any namespace: whether a
/// given client sees the rule is decided per connection, steering only brings the connection
/// to the agent.
fn steered(
    set: &PolicySet,
    settings: &Settings,
    inventory: &policy::Inventory,
) -> BTreeSet<SocketAddr> {
    let mesh: BTreeSet<IpAddr> = inventory
        .workloads
        .iter()
        .filter(|w| w.mesh)
        .flat_map(|w| w.ips.iter().map(|ip| ip.to_canonical()))
        .collect();
    let tls_rules: Vec<HostPattern> = set
        .destination_rules
        .iter()
        .filter(|r| {
            r.tls
                .iter()
                .chain(r.port_level.iter().filter_map(|(_, t)| t.as_ref()))
                .any(|t| t.mode != TlsMode::Disable)
        })
        .map(|r| HostPattern::resolve(&r.host, &r.resource.namespace, &settings.cluster_domain))
        .collect();
    let mut out = BTreeSet::new();
    for s in &inventory.services {
        if let Some(vip) = s.vip {
            out.extend(s.ports.iter().map(|p| SocketAddr::new(vip, p.port)));
        }
        let host = format!("{}.{}.svc.{}", s.name, s.namespace, settings.cluster_domain)
            .to_ascii_lowercase();
        if !tls_rules.iter().any(|h| h.specificity(&host).is_some()) {
            continue;
        }
        for ip in s
            .endpoints
            .iter()
            .filter(|ip| !mesh.contains(&ip.to_canonical()))
        {
            out.extend(s.ports.iter().map(|p| SocketAddr::new(*ip, p.target())));
        }
    }
    out
}

/// The inputs of the current generation.
struct Inputs {
    /// What the last poll read (a failed load is not retried until something changes).
    snapshot: Snapshot,
    /// The certificate files the last loaded rules name.
    credential_files: Vec<PathBuf>,
    /// The last policy set that loaded.
    good: PolicySet,
    /// The policy files as last read, loaded together with the cluster's objects.
    files: Vec<(String, String)>,
    workloads: Vec<config::Workload>,
    peers: Vec<config::Peer>,
    services: Vec<config::Service>,
    /// What the API server says (Kubernetes mode), next to the node config's.
    cluster: ClusterInputs,
    /// The node's crypto policy, which TLS origination follows.
    crypto: CryptoPolicy,
}

/// The API server's contribution to policy: Istio objects as documents, mesh pods of other
/// nodes and services.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterInputs {
    pub documents: Vec<(String, String)>,
    pub peers: Vec<config::Peer>,
    pub services: Vec<config::Service>,
}

impl Inputs {
    /// Policy files and cluster objects, loaded as one set.
    fn documents(&self) -> Vec<(String, String)> {
        self.files
            .iter()
            .chain(&self.cluster.documents)
            .cloned()
            .collect()
    }

    fn inventory(&self) -> policy::Inventory {
        let peers: Vec<config::Peer> = self
            .peers
            .iter()
            .chain(&self.cluster.peers)
            .cloned()
            .collect();
        let services: Vec<config::Service> = self
            .services
            .iter()
            .chain(&self.cluster.services)
            .cloned()
            .collect();
        config::policy_inventory(&self.workloads, &peers, &services)
    }
}

/// The outcome of [`Enforcer::set_cluster`]: the peers and services always take effect;
/// objects that do not load are `rejected` and the last good policy stays.
pub struct ClusterReload {
    pub generation: Option<(Arc<Generation>, Arc<Generation>)>,
    pub rejected: Option<String>,
}

/// The outcome of [`Enforcer::poll`].
pub enum Reload {
    Unchanged,
    /// A new generation is current; the previous one is returned for steering diffs.
    Applied {
        old: Arc<Generation>,
        new: Arc<Generation>,
    },
    /// The sources changed but do not load; the previous generation stays.
    Rejected(String),
}

/// Owns the current generation and how to make the next one.
pub struct Enforcer {
    settings: Settings,
    dir: Option<PathBuf>,
    /// Origination credentials: where they may be read from, and what was built from them.
    cert_files: originate::CertFiles,
    current: RwLock<Arc<Generation>>,
    /// The current generation's number, shared with whatever must not outlive a generation
    /// (session resumption tickets).
    number: Arc<AtomicU64>,
    inputs: Mutex<Inputs>,
    reload_failures: AtomicU64,
    /// Warnings already logged, so each generation logs only what is new.
    logged: Mutex<BTreeSet<String>>,
}

impl Enforcer {
    /// Loads `policyDir` (if any) for the configured workloads; an invalid file is an error
    /// naming file, document and field, so the agent refuses to start.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let settings = config.policy_settings();
        let dir = config.policy_dir.clone();
        let cert_files = originate::CertFiles::new(config.policy.cert_dirs.clone());
        let (set, snapshot, credential_files, files) = match &dir {
            Some(dir) => {
                let files = read_policy_dir(dir)?;
                let set = policy::load_documents(&files)
                    .map_err(|e| anyhow::anyhow!("invalid policy in {}:\n{e}", dir.display()))?;
                let creds = originate::credential_files(&set.destination_rules);
                let snapshot = snapshot(dir, &creds, &cert_files);
                (set, snapshot, creds, files)
            }
            None => (PolicySet::default(), Vec::new(), Vec::new(), Vec::new()),
        };
        let inventory =
            config::policy_inventory(&config.workloads, &config.peers, &config.services);
        let generation = Generation::build(
            set.clone(),
            &settings,
            config.crypto,
            inventory,
            1,
            &cert_files,
        )
        .map_err(|e| anyhow::anyhow!("invalid policy: {e}"))?;
        let logged = log_loaded(&generation, dir.as_deref(), &BTreeSet::new());
        Ok(Self {
            settings,
            dir,
            cert_files,
            current: RwLock::new(Arc::new(generation)),
            number: Arc::new(AtomicU64::new(1)),
            inputs: Mutex::new(Inputs {
                snapshot,
                credential_files,
                good: set,
                files,
                workloads: config.workloads.clone(),
                peers: config.peers.clone(),
                services: config.services.clone(),
                cluster: ClusterInputs::default(),
                crypto: config.crypto,
            }),
            reload_failures: AtomicU64::new(0),
            logged: Mutex::new(logged),
        })
    }

    /// The current generation's number as a shared counter, for state that must not outlive
    /// the generation it was made under (resumption tickets carry it and stop counting when
    /// it moves).
    pub fn generation_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.number)
    }

    /// The current generation.
    pub fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The directory being watched.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The files outside the policy directory that the current rules name (DestinationRule
    /// credentials): a change to them is a policy change too.
    pub fn credential_files(&self) -> Vec<PathBuf> {
        self.inputs().credential_files.clone()
    }

    /// Looks at the policy sources and, if they changed, loads them into a new generation.
    pub fn poll(&self) -> Reload {
        let Some(dir) = &self.dir else {
            return Reload::Unchanged;
        };
        let mut inputs = self.inputs();
        let now = snapshot(dir, &inputs.credential_files, &self.cert_files);
        if now == inputs.snapshot {
            return Reload::Unchanged;
        }
        inputs.snapshot = now;
        let loaded = read_policy_dir(dir)
            .map_err(|e| format!("{e:#}"))
            .and_then(|files| {
                inputs.files = files;
                policy::load_documents(&inputs.documents()).map_err(|e| e.to_string())
            });
        let set = match loaded {
            Ok(set) => set,
            Err(e) => return self.rejected(e),
        };
        let creds = originate::credential_files(&set.destination_rules);
        if creds != inputs.credential_files {
            inputs.credential_files = creds;
            inputs.snapshot = snapshot(dir, &inputs.credential_files, &self.cert_files);
        }
        match self.rebuild(&mut inputs, set) {
            Ok((old, new)) => Reload::Applied { old, new },
            Err(e) => self.rejected(e),
        }
    }

    /// Replaces the enrolled workloads (enroll, unenroll) and rebuilds with the last good
    /// policy.
    pub fn set_workloads(
        &self,
        workloads: Vec<config::Workload>,
    ) -> Result<(Arc<Generation>, Arc<Generation>), String> {
        let mut inputs = self.inputs();
        inputs.workloads = workloads;
        let set = inputs.good.clone();
        self.rebuild(&mut inputs, set)
    }

    /// Replaces what the API server says and rebuilds. Peers and services take effect in any
    /// case; objects that do not load (together with the policy files) are reported in
    /// `rejected`, naming each bad object, and the last good policy stays.
    pub fn set_cluster(&self, cluster: ClusterInputs) -> ClusterReload {
        let mut inputs = self.inputs();
        let documents_changed = inputs.cluster.documents != cluster.documents;
        inputs.cluster = cluster;
        let good = inputs.good.clone();
        let mut rejected = None;
        let mut attempt = None;
        if documents_changed {
            match policy::load_documents(&inputs.documents()) {
                Ok(set) => attempt = Some(set),
                Err(e) => rejected = Some(e.to_string()),
            }
        }
        let mut generation = None;
        if let Some(set) = attempt {
            match self.rebuild(&mut inputs, set) {
                Ok(applied) => generation = Some(applied),
                Err(e) => rejected = Some(e),
            }
        }
        if generation.is_none() {
            match self.rebuild(&mut inputs, good) {
                Ok(applied) => generation = Some(applied),
                Err(e) => rejected = Some(e),
            }
        }
        if let Some(e) = &rejected {
            self.rejected(e.clone());
        }
        ClusterReload {
            generation,
            rejected,
        }
    }

    /// Replaces the node's crypto policy and rebuilds, so TLS origination follows it.
    pub fn set_crypto(
        &self,
        crypto: CryptoPolicy,
    ) -> Result<(Arc<Generation>, Arc<Generation>), String> {
        let mut inputs = self.inputs();
        inputs.crypto = crypto;
        let set = inputs.good.clone();
        self.rebuild(&mut inputs, set)
    }

    fn rebuild(
        &self,
        inputs: &mut Inputs,
        set: PolicySet,
    ) -> Result<(Arc<Generation>, Arc<Generation>), String> {
        let inventory = inputs.inventory();
        let number = self.current().number + 1;
        let generation = Arc::new(Generation::build(
            set.clone(),
            &self.settings,
            inputs.crypto,
            inventory,
            number,
            &self.cert_files,
        )?);
        inputs.good = set;
        {
            let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
            *logged = log_loaded(&generation, self.dir.as_deref(), &logged);
        }
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            Arc::clone(&generation),
        );
        self.number.store(number, Ordering::SeqCst);
        Ok((old, generation))
    }

    fn rejected(&self, error: String) -> Reload {
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
        warn!(
            generation = self.current().number,
            "policy not applied, keeping the last good policy: {error}"
        );
        Reload::Rejected(error)
    }

    fn inputs(&self) -> std::sync::MutexGuard<'_, Inputs> {
        self.inputs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Policy counters for `flows --stats`: rejected reloads and the current generation
    /// (the connection path's counters are [`Shared::counters`](super::Shared::counters)).
    pub fn stats(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        out.insert(
            "policy.reload_failures".to_owned(),
            self.reload_failures.load(Ordering::Relaxed),
        );
        out.insert("policy.generation".to_owned(), self.current().number);
        out
    }
}

/// What the policy sources look like now: the policy files' contents (bounded, see
/// [`read_policy_file`]) and the credential files' fingerprints, which are read only when a
/// file changed recently (see [`files::Opened::fingerprint`]).
fn snapshot(
    dir: &Path,
    credential_files: &[PathBuf],
    cert_files: &originate::CertFiles,
) -> Snapshot {
    let mut out: Snapshot = match policy_files(dir) {
        Ok(paths) => paths
            .into_iter()
            .map(|p| {
                let bytes = read_policy_file(dir, &p).ok().map(String::into_bytes);
                (p, bytes)
            })
            .collect(),
        // A missing directory differs from an empty one: the load reports it.
        Err(_) => vec![(dir.to_owned(), None)],
    };
    out.extend(
        credential_files
            .iter()
            .map(|p| (p.clone(), cert_files.fingerprint(p))),
    );
    out
}

/// Logs the generation and those of its warnings not in `already`; returns its warnings.
fn log_loaded(
    generation: &Generation,
    dir: Option<&Path>,
    already: &BTreeSet<String>,
) -> BTreeSet<String> {
    let warnings: BTreeSet<String> = generation
        .engine
        .warnings()
        .iter()
        .map(ToString::to_string)
        .collect();
    for w in warnings.difference(already) {
        warn!("policy: {w}");
    }
    info!(
        generation = generation.number,
        dir = %dir.map_or_else(|| "-".to_owned(), |d| d.display().to_string()),
        steered = generation.steer.len(),
        "policy loaded"
    );
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("enforce-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(dir: &Path) -> Config {
        let yaml = format!(
            "trustDomain: cluster.local
caDir: /nonexistent
policyDir: {}
probeSources: [10.88.0.1]
workloads:
  - name: httpbin-full
    namespace: full
    serviceAccount: httpbin
    labels: {{app: httpbin}}
    cgroup: /sys/fs/cgroup/a
    netns: /run/netns/a
    ips: [10.88.0.10]
  - name: sleep-full
    namespace: full
    serviceAccount: sleep
    cgroup: /sys/fs/cgroup/b
    netns: /run/netns/b
    ips: [10.88.0.11]
services:
  - name: httpbin
    namespace: full
    vip: 10.96.0.10
    ports: [{{name: http, port: 8000, targetPort: 80}}]
    endpoints: [10.88.0.10]
  - name: mongo
    namespace: mongo
    ports: [{{port: 27017}}]
    endpoints: [10.88.5.10]
",
            dir.display()
        );
        Config::parse("node.yaml", &yaml).unwrap()
    }

    const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: full}
spec:
  mtls: {mode: STRICT}
";

    /// [`STRICT`], then a second document with a misspelt mode.
    fn bad_mode() -> String {
        format!(
            "{STRICT}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: bad, namespace: full}}
spec:
  mtls: {{mode: STRIKT}}
"
        )
    }

    /// `SIMPLE` origination to the mongo service, which has no agent.
    const MONGO_SIMPLE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: full}
spec:
  host: mongo.mongo.svc.cluster.local
  trafficPolicy:
    tls: {mode: SIMPLE}
";

    /// A plaintext connection from `source` to httpbin's pod port.
    fn plaintext_to_httpbin_from(e: &Enforcer, source: &str) -> Result<&'static str, Refused> {
        e.current().inbound(
            source.parse().unwrap(),
            "10.88.0.10:80".parse().unwrap(),
            None,
        )
    }

    fn plaintext_to_httpbin(e: &Enforcer) -> Result<&'static str, Refused> {
        plaintext_to_httpbin_from(e, "10.88.0.31:40000")
    }

    #[test]
    fn a_bad_file_at_start_is_an_error_naming_file_document_and_field() {
        let dir = Scratch::new("bad");
        dir.write("10-strict.yaml", &bad_mode());
        let e = Enforcer::load(&config(&dir.0)).err().unwrap();
        let e = format!("{e:#}");
        assert!(e.contains("10-strict.yaml: document 2"), "{e}");
        assert!(e.contains("spec.mtls.mode"), "{e}");
        assert!(e.contains("STRIKT"), "{e}");
    }

    #[test]
    fn runtime_changes_apply_and_bad_files_keep_the_last_good_policy() {
        let dir = Scratch::new("reload");
        let e = Enforcer::load(&config(&dir.0)).unwrap();
        assert_eq!(e.current().number, 1);
        assert_eq!(plaintext_to_httpbin(&e).unwrap(), "plaintext");
        assert!(matches!(e.poll(), Reload::Unchanged));

        dir.write("10-strict.yaml", STRICT);
        let Reload::Applied { old, new } = e.poll() else {
            panic!("not applied")
        };
        assert_eq!((old.number, new.number), (1, 2));
        assert_eq!(
            plaintext_to_httpbin(&e).unwrap_err().code,
            "plaintext_refused_strict"
        );
        // A silent client may be waited for: it cannot pass as plaintext anyway.
        let g = e.current();
        let httpbin: SocketAddr = "10.88.0.10:80".parse().unwrap();
        assert!(g.requires_mtls("10.88.0.31:40000".parse().unwrap(), httpbin));
        assert!(!g.requires_mtls("10.88.0.1:40000".parse().unwrap(), httpbin));
        // Not a workload of this node: no mode, the normal wait.
        assert!(!g.requires_mtls(
            "10.88.0.31:40000".parse().unwrap(),
            "10.88.0.99:80".parse().unwrap()
        ));
        // Probe sources pass STRICT.
        let probe = plaintext_to_httpbin_from(&e, "10.88.0.1:40000");
        assert_eq!(probe.unwrap(), "probe");

        dir.write("10-strict.yaml", &bad_mode());
        let Reload::Rejected(why) = e.poll() else {
            panic!("accepted a bad file")
        };
        assert!(
            why.contains("document 2") && why.contains("spec.mtls.mode"),
            "{why}"
        );
        assert_eq!(e.current().number, 2, "the last good policy stays");
        assert_eq!(e.stats()["policy.reload_failures"], 1);
        // The same bad content is not retried (or counted) on every poll.
        assert!(matches!(e.poll(), Reload::Unchanged));
        assert_eq!(e.stats()["policy.reload_failures"], 1);

        std::fs::remove_file(dir.0.join("10-strict.yaml")).unwrap();
        assert!(matches!(e.poll(), Reload::Applied { .. }));
        assert_eq!(plaintext_to_httpbin(&e).unwrap(), "plaintext");
    }

    #[test]
    fn unknown_kinds_warn_and_other_files_are_ignored() {
        let dir = Scratch::new("kinds");
        dir.write(
            "a.yaml",
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: full}
spec: {}
",
        );
        dir.write("notes.txt", "not: [yaml");
        dir.write(".hidden.yaml", "not: [yaml");
        let warnings = check_dir(&dir.0, &[]).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("VirtualService"), "{warnings:?}");
        Enforcer::load(&config(&dir.0)).unwrap();
    }

    #[test]
    fn steering_covers_vips_and_non_mesh_endpoints_a_tls_rule_targets() {
        let dir = Scratch::new("steer");
        let e = Enforcer::load(&config(&dir.0)).unwrap();
        let vip: SocketAddr = "10.96.0.10:8000".parse().unwrap();
        let mongo: SocketAddr = "10.88.5.10:27017".parse().unwrap();
        assert_eq!(e.current().steer, BTreeSet::from([vip]));
        dir.write("dr.yaml", MONGO_SIMPLE);
        assert!(matches!(e.poll(), Reload::Applied { .. }));
        assert_eq!(e.current().steer, BTreeSet::from([vip, mongo]));
        // Mesh endpoints are steered on every port already; a rule adds nothing for them.
        let plan = e
            .current()
            .outbound("10.88.0.11".parse().unwrap(), mongo)
            .unwrap_or_else(|r| panic!("{r:?}"));
        assert!(matches!(
            plan.transport,
            Transport::Originate {
                mode: TlsMode::Simple,
                ..
            }
        ));
        assert_eq!(plan.endpoint, mongo);
    }

    #[test]
    fn origination_credentials_are_read_at_load_and_named_when_missing() {
        let dir = Scratch::new("creds");
        dir.write(
            "dr.yaml",
            "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: db-mtls, namespace: full}
spec:
  host: mongo.mongo.svc.cluster.local
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: /nonexistent/client.pem
      privateKey: /nonexistent/client.key
      caCertificates: /nonexistent/ca.pem
",
        );
        let e = format!("{:#}", Enforcer::load(&config(&dir.0)).err().unwrap());
        assert!(e.contains("dr.yaml: document 1"), "{e}");
        assert!(
            e.contains("spec.trafficPolicy.tls.caCertificates")
                && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let e = check_dir(&dir.0, &[]).unwrap_err().to_string();
        assert!(e.contains("caCertificates"), "{e}");
    }

    /// A rule naming a file outside `policy.certDirs` (none by default) is rejected with a
    /// reason, at start and at runtime, where the previous policy stays; inside them, only
    /// regular files are read (a FIFO neither hangs the agent nor `policy check`).
    #[test]
    fn origination_files_are_read_only_from_cert_dirs_and_only_if_regular() {
        let dir = Scratch::new("certdirs");
        let certs = Scratch::new("certdirs-pem");
        let rule = |ca: &Path| {
            format!(
                "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: full}}
spec:
  host: mongo.mongo.svc.cluster.local
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {}}}
",
                ca.display()
            )
        };
        dir.write("dr.yaml", &rule(Path::new("/dev/zero")));
        let e = format!("{:#}", Enforcer::load(&config(&dir.0)).err().unwrap());
        assert!(
            e.contains("dr.yaml: document 1")
                && e.contains("caCertificates")
                && e.contains("`/dev/zero` is not inside policy.certDirs (none configured)"),
            "{e}"
        );
        let e = check_dir(&dir.0, &[]).unwrap_err().to_string();
        assert!(e.contains("not inside policy.certDirs"), "{e}");

        // At runtime: the previous policy stays and the failure is counted.
        std::fs::remove_file(dir.0.join("dr.yaml")).unwrap();
        let mut c = config(&dir.0);
        c.policy.cert_dirs = vec![certs.0.clone()];
        let e = Enforcer::load(&c).unwrap();
        let generation = e.current().number;
        dir.write("dr.yaml", &rule(Path::new("/dev/zero")));
        let Reload::Rejected(why) = e.poll() else {
            panic!("accepted /dev/zero")
        };
        assert!(
            why.contains("/dev/zero") && why.contains("not inside"),
            "{why}"
        );
        assert_eq!(e.current().number, generation);

        // Inside the directory: a FIFO is refused without blocking (this test would hang).
        let fifo = certs.0.join("ca.pem");
        crate::sys::mkfifo(&fifo, 0o600).unwrap();
        dir.write("dr.yaml", &rule(&fifo));
        let Reload::Rejected(why) = e.poll() else {
            panic!("accepted a FIFO")
        };
        assert!(why.contains("is a FIFO"), "{why}");
        let e2 = check_dir(&dir.0, std::slice::from_ref(&certs.0))
            .unwrap_err()
            .to_string();
        assert!(e2.contains("is a FIFO"), "{e2}");
        // A symlink out of the directory is refused too.
        std::fs::remove_file(&fifo).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &fifo).unwrap();
        let e2 = check_dir(&dir.0, std::slice::from_ref(&certs.0))
            .unwrap_err()
            .to_string();
        assert!(e2.contains("leaves"), "{e2}");
        assert_eq!(
            e.current().number,
            generation,
            "every bad version was refused"
        );
        // A FIFO among the policy files is refused the same way.
        let yaml_fifo = dir.0.join("z.yaml");
        crate::sys::mkfifo(&yaml_fifo, 0o600).unwrap();
        let e2 = check_dir(&dir.0, &[]).unwrap_err().to_string();
        assert!(e2.contains("z.yaml") && e2.contains("is a FIFO"), "{e2}");
        assert!(matches!(e.poll(), Reload::Rejected(_)));
    }

    /// Credential files are read again only when they change: a rebuild for another reason
    /// (an enrollment) reuses the config built from unchanged files; a rotation is picked up.
    #[test]
    fn origination_credentials_are_reread_only_when_changed() {
        let dir = Scratch::new("reread");
        let certs = Scratch::new("reread-pem");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.example".to_owned()]).unwrap();
        let ca_path = certs.0.join("ca.pem");
        std::fs::write(&ca_path, ca.cert.pem()).unwrap();
        dir.write(
            "dr.yaml",
            &format!(
                "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: full}}
spec:
  host: mongo.mongo.svc.cluster.local
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {}}}
",
                ca_path.display()
            ),
        );
        let mut c = config(&dir.0);
        c.policy.cert_dirs = vec![certs.0.clone()];
        let config_of = |e: &Enforcer| {
            let plan = e
                .current()
                .outbound(
                    "10.88.0.11".parse().unwrap(),
                    "10.88.5.10:27017".parse().unwrap(),
                )
                .unwrap_or_else(|r| panic!("{r:?}"));
            let Transport::Originate { config, .. } = plan.transport else {
                panic!("not originated")
            };
            config
        };
        // Files written just now are not trusted by their stamps yet (same-tick rewrites).
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let e = Enforcer::load(&c).unwrap();
        let first = config_of(&e);
        let workloads = c.workloads.clone();
        e.set_workloads(workloads.clone()).unwrap();
        assert!(
            Arc::ptr_eq(&first, &config_of(&e)),
            "unchanged files were read again"
        );
        assert!(matches!(e.poll(), Reload::Unchanged));
        // Rotated in place: a new config.
        let ca2 = rcgen::generate_simple_self_signed(vec!["ca2.example".to_owned()]).unwrap();
        std::fs::write(&ca_path, ca2.cert.pem()).unwrap();
        assert!(matches!(e.poll(), Reload::Applied { .. }));
        assert!(!Arc::ptr_eq(&first, &config_of(&e)));
    }

    #[test]
    fn open_outbound_flows_are_decided_again_on_their_endpoint() {
        let dir = Scratch::new("still");
        let e = Enforcer::load(&config(&dir.0)).unwrap();
        let sleep: IpAddr = "10.88.0.11".parse().unwrap();
        let vip: SocketAddr = "10.96.0.10:8000".parse().unwrap();
        let httpbin: SocketAddr = "10.88.0.10:80".parse().unwrap();
        let mongo: SocketAddr = "10.88.5.10:27017".parse().unwrap();
        let mesh = FlowTls::Mesh(
            "spiffe://cluster.local/ns/full/sa/httpbin"
                .parse::<SpiffeId>()
                .unwrap(),
        );
        let g = e.current();
        g.outbound_still(sleep, vip, httpbin, &mesh).unwrap();
        g.outbound_still(sleep, mongo, mongo, &FlowTls::Plaintext)
            .unwrap();
        // A plaintext flow the generation would make mesh mTLS (the pinned endpoint decides).
        let refused = g
            .outbound_still(sleep, vip, httpbin, &FlowTls::Plaintext)
            .unwrap_err();
        assert_eq!(refused.code, "transport_changed");

        let yaml = format!(
            "{MONGO_SIMPLE}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin, namespace: full}}
spec:
  host: httpbin.full.svc.cluster.local
  trafficPolicy:
    tls: {{mode: DISABLE}}
"
        );
        dir.write("dr.yaml", &yaml);
        assert!(matches!(e.poll(), Reload::Applied { .. }));
        let g = e.current();
        let refused = g
            .outbound_still(sleep, mongo, mongo, &FlowTls::Plaintext)
            .unwrap_err();
        assert_eq!(refused.code, "transport_changed");
        assert_eq!(
            refused.reason,
            "DestinationRule full/db requires SIMPLE TLS origination, the flow is plaintext"
        );
        // The mesh flow is stronger than DISABLE needs: it stays.
        g.outbound_still(sleep, vip, httpbin, &mesh).unwrap();
        // Refusals of the generation close flows too: the client is no longer known.
        let refused = g
            .outbound_still("10.88.9.9".parse().unwrap(), vip, httpbin, &mesh)
            .unwrap_err();
        assert_eq!(refused.code, "unknown_client");
    }

    #[test]
    fn round_robin_is_per_service() {
        let dir = Scratch::new("rr");
        let mut c = config(&dir.0);
        c.services[0].endpoints.push("10.88.0.12".parse().unwrap());
        let e = Enforcer::load(&c).unwrap();
        let g = e.current();
        let picks: Vec<SocketAddr> = (0..4)
            .map(|_| {
                g.outbound(
                    "10.88.0.11".parse().unwrap(),
                    "10.96.0.10:8000".parse().unwrap(),
                )
                .unwrap_or_else(|r| panic!("{r:?}"))
                .endpoint
            })
            .collect();
        let a: SocketAddr = "10.88.0.10:80".parse().unwrap();
        let b: SocketAddr = "10.88.0.12:80".parse().unwrap();
        assert_eq!(picks, [a, b, a, b]);
    }

    /// Istio objects from the API server join the policy files' set; a bad object is named,
    /// counted and keeps the last good policy, while the cluster's peers still take effect.
    #[test]
    fn cluster_objects_join_policy_and_a_bad_one_keeps_the_last_good() {
        let dir = Scratch::new("cluster");
        let e = Enforcer::load(&config(&dir.0)).unwrap();
        let client: SocketAddr = "10.88.0.11:40000".parse().unwrap();
        let server: SocketAddr = "10.88.0.10:80".parse().unwrap();
        assert!(!e.current().requires_mtls(client, server));
        let object = |name: &str, mode: &str| {
            (
                format!(
                    "PeerAuthentication full/{name} (security.istio.io/v1 from the API server)"
                ),
                format!(
                    r#"{{"apiVersion":"security.istio.io/v1","kind":"PeerAuthentication",
                    "metadata":{{"name":"{name}","namespace":"full","uid":"u"}},
                    "spec":{{"mtls":{{"mode":"{mode}"}}}}}}"#
                ),
            )
        };
        let r = e.set_cluster(ClusterInputs {
            documents: vec![object("strict", "STRICT")],
            ..Default::default()
        });
        assert!(r.rejected.is_none() && r.generation.is_some());
        assert!(e.current().requires_mtls(client, server));
        let peer = config::Peer {
            namespace: "bar".into(),
            service_account: "remote".into(),
            labels: Default::default(),
            ips: vec!["10.88.9.9".parse().unwrap()],
        };
        let r = e.set_cluster(ClusterInputs {
            documents: vec![object("strict", "STRICT"), object("typo", "STRICTLY")],
            peers: vec![peer],
            services: Vec::new(),
        });
        let why = r.rejected.unwrap();
        assert!(why.contains("PeerAuthentication full/typo"), "{why}");
        assert_eq!(e.stats()["policy.reload_failures"], 1);
        let now = e.current();
        assert!(
            now.requires_mtls(client, server),
            "the last good policy stays"
        );
        let plan = now
            .outbound(client.ip(), "10.88.9.9:8080".parse().unwrap())
            .ok()
            .unwrap();
        assert!(
            matches!(&plan.transport, Transport::Mesh(Some(id)) if id.to_string().ends_with("/ns/bar/sa/remote")),
            "the cluster's peer is a mesh workload: {}",
            plan.reason
        );
        // Removing the object lifts STRICT.
        let r = e.set_cluster(ClusterInputs::default());
        assert!(r.rejected.is_none());
        assert!(!e.current().requires_mtls(client, server));
    }
}
