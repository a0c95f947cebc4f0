//! One watcher for the files the agent follows while it runs: the node config, `caDir`, the
//! policy directory (with the credential files its rules name) and the CNI membership cache
//! the agent writes. Every tick stats each path; a source is read and parsed only when a
//! stat of its paths changed, or changed so recently that a second write in the same
//! timestamp tick could hide behind it. An idle node thus costs a few `stat` calls a tick
//! instead of a read of every file (the CA's private key included). Bad input keeps the last
//! good state: each source compares contents and refuses what does not load, as before.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::{error, info, warn};

use super::{Agent, applied, report_ca};
use crate::{
    ca::{self, Ca},
    config::Config,
    intercept::enforce::Reload,
};

/// What `stat` says of one path that changes whenever its contents may have.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// File timestamps come from a coarse clock: two writes within one of its ticks can leave the
/// same stamp. A path modified less than this long ago is read anyway.
const SETTLE: Duration = Duration::from_secs(2);

/// The stamps of a source's paths, `None` where a path cannot be stat'ed (absent).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Stamps(Vec<(PathBuf, Option<Stamp>)>);

impl Stamps {
    pub(super) fn of(paths: impl IntoIterator<Item = PathBuf>) -> Self {
        Self(
            paths
                .into_iter()
                .map(|p| {
                    let stamp = std::fs::metadata(&p).ok().map(|m| Stamp {
                        dev: m.dev(),
                        ino: m.ino(),
                        len: m.len(),
                        mtime: (m.mtime(), m.mtime_nsec()),
                        ctime: (m.ctime(), m.ctime_nsec()),
                    });
                    (p, stamp)
                })
                .collect(),
        )
    }

    /// A directory and each of its entries (not below them): adding, removing or renaming
    /// an entry changes the directory's own stamp, editing one changes the entry's.
    fn of_dir(dir: &Path, extra: impl IntoIterator<Item = PathBuf>) -> Self {
        let mut paths = vec![dir.to_owned()];
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            paths.extend(names);
        }
        paths.extend(extra);
        Self::of(paths)
    }

    /// Whether any path changed so recently that its stamp may not show a second write yet.
    fn settling(&self, now: SystemTime) -> bool {
        self.0.iter().filter_map(|(_, s)| s.as_ref()).any(|s| {
            [s.mtime, s.ctime].into_iter().any(|(secs, nanos)| {
                let at = u64::try_from(secs).ok().map(|secs| {
                    SystemTime::UNIX_EPOCH
                        + Duration::from_secs(secs)
                        + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
                });
                // A stamp in the future (clock stepped back) is not trusted either.
                at.is_none_or(|at| now.duration_since(at).map_or(true, |age| age < SETTLE))
            })
        })
    }
}

/// Decides, tick by tick, whether a source must be read again.
#[derive(Debug, Default)]
pub(super) struct Gate {
    seen: Option<Stamps>,
}

impl Gate {
    /// True the first time, when `now` differs from the last stamps, or while they settle.
    pub(super) fn changed(&mut self, now: Stamps, wall: SystemTime) -> bool {
        let settling = now.settling(wall);
        self.differs(now) || settling
    }

    /// True when `now` differs from the last stamps, however fresh: for a file the agent
    /// writes itself, whose own fresh writes must not count as changes.
    pub(super) fn differs(&mut self, now: Stamps) -> bool {
        let differs = self.seen.as_ref() != Some(&now);
        self.seen = Some(now);
        differs
    }
}

/// What the agent last saw of the CA directory: a hash of each file's contents (or its
/// absence). Hashes, not contents, so no copy of the key stays around.
pub(super) type CaFingerprint = Vec<Option<u64>>;

pub(super) fn ca_fingerprint(dir: &Path) -> CaFingerprint {
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

/// Everything the watcher remembers between ticks.
pub(super) struct Watcher {
    agent: Arc<Agent>,
    ca: CaSource,
    policy: Gate,
    node: Option<NodeSource>,
    membership: Gate,
}

impl Watcher {
    pub(super) fn new(agent: Arc<Agent>, ca_seen: CaFingerprint) -> Self {
        let ca = CaSource {
            dir: agent.config.ca_dir.clone(),
            every: Duration::from_millis(agent.config.identity.ca_poll_ms),
            gate: Gate::default(),
            seen: ca_seen,
            failed: None,
            tried: std::time::Instant::now(),
            warned: std::time::Instant::now(),
        };
        // The agent wrote the membership cache during start-up: that is not a change.
        let mut membership = Gate::default();
        if let Some(cni) = &agent.cni {
            membership.differs(Stamps::of([cni.membership_file.clone()]));
        }
        Self {
            agent,
            ca,
            policy: Gate::default(),
            node: None,
            membership,
        }
    }

    /// The tick: the shortest of the sources' configured periods, so none reacts later than
    /// it did with a poller of its own.
    pub(super) fn every(&self) -> Duration {
        Duration::from_millis(self.agent.shared.tuning.policy_poll_ms).min(self.ca.every)
    }

    /// Runs until the runtime stops.
    pub(super) async fn run(mut self) {
        let every = self.every();
        loop {
            tokio::time::sleep(every).await;
            // Stat, read and parse off the runtime's workers: files may sit on slow storage.
            match tokio::task::spawn_blocking(move || {
                self.tick();
                self
            })
            .await
            {
                Ok(watcher) => self = watcher,
                Err(e) => {
                    error!("file watcher stopped: {e}");
                    return;
                }
            }
        }
    }

    /// Looks at every source once.
    pub(super) fn tick(&mut self) {
        let wall = SystemTime::now();
        if self.node.is_none() {
            self.node = self
                .agent
                .watched_config
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
        if let Some(node) = &mut self.node {
            node.tick(&self.agent, wall);
        }
        self.ca.tick(&self.agent, wall);
        self.policy_tick(wall);
        self.membership_tick();
    }

    /// A new policy generation is steered and every open inbound flow is decided again.
    fn policy_tick(&mut self, wall: SystemTime) {
        let policy = &self.agent.shared.policy;
        let Some(dir) = policy.dir() else {
            return;
        };
        if !self
            .policy
            .changed(Stamps::of_dir(dir, policy.credential_files()), wall)
        {
            return;
        }
        match policy.poll() {
            Reload::Applied { old, new } => {
                self.agent.telemetry.policy_reload(true);
                applied(&self.agent.shared, &old.steer, &new);
            }
            Reload::Rejected(_) => self.agent.telemetry.policy_reload(false),
            Reload::Unchanged => {}
        }
    }

    /// The membership cache is rewritten when what the cluster says changed (also on every
    /// cluster view) and when someone else changed or removed the file on disk.
    fn membership_tick(&mut self) {
        let Some(cni) = &self.agent.cni else {
            return;
        };
        if self
            .membership
            .differs(Stamps::of([cni.membership_file.clone()]))
        {
            self.agent.forget_membership_written();
        }
        self.agent.write_membership();
        // Our own write is not someone else's change.
        self.membership
            .differs(Stamps::of([cni.membership_file.clone()]));
    }
}

/// `caDir`: changed material goes into effect without a restart: new handshakes use leaves
/// of the new signer and trust exactly the new bundle, open flows are untouched. Material
/// that does not load (a half-copied set of files, an expired signer, a chain the bundle does
/// not trust) is refused with the reason and the previous material stays in effect; it is
/// tried again every `identity.caPollMs` until it loads or changes back. Expiry warnings are
/// repeated hourly.
struct CaSource {
    dir: PathBuf,
    every: Duration,
    gate: Gate,
    seen: CaFingerprint,
    failed: Option<String>,
    tried: std::time::Instant,
    warned: std::time::Instant,
}

impl CaSource {
    fn tick(&mut self, agent: &Agent, wall: SystemTime) {
        let paths = ca::CA_FILES.iter().map(|name| self.dir.join(name));
        let changed = self.gate.changed(Stamps::of(paths), wall);
        let retry = self.failed.is_some() && self.tried.elapsed() >= self.every;
        if changed || retry {
            self.check(agent);
        } else if self.warned.elapsed() >= Duration::from_secs(3600) {
            self.warned = std::time::Instant::now();
            let m = agent.shared.material();
            for w in m.ca.expiry_warnings(SystemTime::now()) {
                warn!("{w}");
            }
        }
    }

    fn check(&mut self, agent: &Agent) {
        let now = ca_fingerprint(&self.dir);
        if now == self.seen && self.failed.is_none() {
            return;
        }
        self.tried = std::time::Instant::now();
        let loaded = Ca::load_for(
            &self.dir,
            Some(&agent.shared.trust_domain),
            SystemTime::now(),
        );
        let replaced = loaded.map_err(|e| e.to_string()).and_then(|ca| {
            report_ca(&ca, "reloaded");
            agent
                .shared
                .replace_ca(Arc::new(ca))
                .map_err(|e| format!("{e:#}"))
        });
        match replaced {
            Ok(generation) => {
                agent.telemetry.ca_reload(true);
                self.seen = now;
                self.failed = None;
                info!(generation, "new CA material in effect for new handshakes");
            }
            Err(msg) => {
                if self.failed.as_ref() != Some(&msg) {
                    agent.telemetry.ca_reload(false);
                    error!(dir = %self.dir.display(), "CA reload refused, keeping the previous material: {msg}");
                }
                self.failed = Some(msg);
            }
        }
    }
}

/// The node configuration file: a changed `crypto` section is applied while the agent runs.
/// A file that does not parse, or a policy this node cannot carry, is logged and counted
/// (`config.reload_failures`) and the running policy stays. Other fields need a restart,
/// which the log says.
pub(super) struct NodeSource {
    file: PathBuf,
    gate: Gate,
    seen: Option<Vec<u8>>,
    running: Config,
}

impl NodeSource {
    /// `seen`: the file's contents when `running` was read from it.
    pub(super) fn new(file: PathBuf, seen: Option<Vec<u8>>, running: Config) -> Self {
        Self {
            file,
            gate: Gate::default(),
            seen,
            running,
        }
    }

    fn tick(&mut self, agent: &Agent, wall: SystemTime) {
        if !self.gate.changed(Stamps::of([self.file.clone()]), wall) {
            return;
        }
        let now = std::fs::read(&self.file).ok();
        if now == self.seen {
            return;
        }
        self.seen = now;
        let file = &self.file;
        let Some(bytes) = &self.seen else {
            warn!(file = %file.display(), "node config unreadable; the running one stays");
            return;
        };
        let parsed = std::str::from_utf8(bytes)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                Config::parse(&file.display().to_string(), text).map_err(|e| e.to_string())
            });
        let next = match parsed {
            Ok(next) => next,
            Err(e) => {
                agent.shared.counters.config_reload_failed();
                agent.telemetry.config_reload(false);
                warn!("node config not applied, keeping the running one: {e}");
                return;
            }
        };
        let mut rest = next.clone();
        rest.crypto = self.running.crypto;
        if rest != self.running {
            warn!(
                file = %file.display(),
                "node config changed outside `crypto`; those changes take effect at the next restart"
            );
        }
        if next.crypto != self.running.crypto {
            match agent.set_crypto(next.crypto) {
                Ok(_) => {
                    agent.telemetry.config_reload(true);
                    self.running.crypto = next.crypto;
                }
                Err(e) => {
                    agent.shared.counters.config_reload_failed();
                    agent.telemetry.config_reload(false);
                    warn!(
                        "crypto policy not applied, keeping {}: {e:#}",
                        self.running.crypto
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled(path: &Path) {
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }

    /// A file left alone is not read again once its stamp settled; a rewrite of the same
    /// size, an added entry and a removal are each seen.
    #[test]
    fn gate_sees_every_change_and_skips_idle_files() {
        let dir = std::env::temp_dir().join(format!("interceptor-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.yaml");
        std::fs::write(&a, "one").unwrap();
        let mut gate = Gate::default();
        let stamps = || Stamps::of_dir(&dir, []);
        // Far enough ahead that the ctime of the writes below no longer settles.
        let later = SystemTime::now() + Duration::from_secs(10);
        assert!(gate.changed(stamps(), later), "first look reads");
        assert!(!gate.changed(stamps(), later), "unchanged and settled");
        // Same size, within the same second: only the fresh stamp says so.
        std::fs::write(&a, "two").unwrap();
        assert!(gate.changed(stamps(), SystemTime::now()), "rewrite seen");
        settled(&a);
        assert!(gate.changed(stamps(), later), "mtime moved back: changed");
        assert!(!gate.changed(stamps(), later));
        std::fs::write(dir.join("b.yaml"), "x").unwrap();
        assert!(gate.changed(stamps(), later), "new entry seen");
        std::fs::remove_file(&a).unwrap();
        assert!(gate.changed(stamps(), later), "removal seen");
        assert!(!gate.changed(stamps(), later));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(gate.changed(stamps(), later), "directory gone");
    }

    /// Right after a write, the stamp cannot tell a second write of the same size in the
    /// same timestamp tick, so the file is read on every tick until it settles.
    #[test]
    fn fresh_stamps_are_read_until_they_settle() {
        let file =
            std::env::temp_dir().join(format!("interceptor-watch-fresh-{}", std::process::id()));
        std::fs::write(&file, "x").unwrap();
        let mut gate = Gate::default();
        let now = SystemTime::now();
        assert!(gate.changed(Stamps::of([file.clone()]), now));
        assert!(
            gate.changed(Stamps::of([file.clone()]), now),
            "still settling"
        );
        assert!(!gate.changed(Stamps::of([file.clone()]), now + SETTLE + SETTLE));
        std::fs::remove_file(&file).unwrap();
    }
}
