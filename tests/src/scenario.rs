//! What the end-to-end tests set up around their pods again and again: the cluster's scratch
//! directory and CA, from which every agent config of a test is made; the kTLS mode and the
//! protection this environment runs mesh flows with; and the random files the pods' httpd
//! serves, with the hashes that prove they arrived intact.

use std::path::{Path, PathBuf};

use crate::{
    agent::{RunningAgent, TempDir, config, make_ca, workload},
    apps::{random_payload, serve_http, sha256_hex},
    in_vm,
    mesh::PolicyDir,
    topology::{Node, Pod},
};
use interceptor::{
    config::{Config, KtlsMode, Peer, Workload},
    intercept::table::Protection,
};

/// The kTLS mode agents run with here: required in the VM (which has the `tls` module), auto
/// on the host.
pub fn ktls_mode() -> KtlsMode {
    if in_vm() {
        KtlsMode::Required
    } else {
        KtlsMode::Auto
    }
}

/// The protection mesh flows must get here: kTLS in the VM, the userspace relay on the host.
pub fn expected_protection() -> Protection {
    if in_vm() {
        Protection::Ktls
    } else {
        Protection::Userspace
    }
}

/// One node with a client pod (10.88.<node>.2) and a server pod (.3): where most end-to-end
/// tests start. The node index and pod names must be unique among the tests that run in
/// parallel. Fields drop in order, so the pods go before their node (also when destructured
/// in this order).
pub struct Scenario {
    pub client: Pod,
    pub server: Pod,
    pub node: Node,
}

impl Scenario {
    pub fn new(node: u8, client: &str, server: &str) -> Self {
        let node = Node::new(node);
        let client = node.pod(client, 2);
        let server = node.pod(server, 3);
        Self {
            client,
            server,
            node,
        }
    }
}

/// Serves a fresh [`Www`] (`prefix` names it) with a `blob` of `size` random bytes from the
/// pod's httpd on port 80.
pub fn serve_blob(pod: &mut Pod, prefix: &str, size: usize) -> Www {
    let www = Www::with_blob(prefix, size);
    serve_http(pod, www.path());
    www
}

/// A test cluster: a scratch directory holding the CA (trust domain `cluster.local`) that its
/// agents share, and their state.
pub struct Cluster {
    pub scratch: TempDir,
    pub ca: PathBuf,
}

impl Cluster {
    /// A fresh scratch directory (`prefix` names it) with a new CA in `ca/`.
    pub fn new(prefix: &str) -> Self {
        let scratch = TempDir::new(prefix);
        let ca = scratch.0.join("ca");
        make_ca(&ca, "cluster.local");
        Self { scratch, ca }
    }

    /// The config of the cluster's one agent (state and admin socket in the scratch root),
    /// in [`ktls_mode`].
    pub fn config(&self, workloads: Vec<Workload>, peers: Vec<Peer>) -> Config {
        config(&self.ca, &self.scratch.0, ktls_mode(), workloads, peers)
    }

    /// The config of the agent of node `node` when there are several (state and admin socket
    /// in their own directory `node/`).
    pub fn node_config(&self, node: &str, workloads: Vec<Workload>, peers: Vec<Peer>) -> Config {
        let state = self.scratch.0.join(node);
        std::fs::create_dir_all(&state).expect("node state dir");
        config(&self.ca, &state, ktls_mode(), workloads, peers)
    }

    /// [`Cluster::config`] for pods of one namespace, each given with its service account,
    /// with policy read from `policy`: the set-up of most policy-driven tests.
    pub fn config_in(&self, namespace: &str, pods: &[(&Pod, &str)], policy: &PolicyDir) -> Config {
        let workloads = pods
            .iter()
            .map(|(pod, account)| workload(pod, namespace, account))
            .collect();
        let mut config = self.config(workloads, vec![]);
        config.policy_dir = Some(policy.path());
        config
    }

    /// Starts the agent of [`Cluster::config`].
    pub fn start(&self, workloads: Vec<Workload>, peers: Vec<Peer>) -> RunningAgent {
        RunningAgent::start(self.config(workloads, peers))
    }
}

/// A document root for httpd holding `blob`, a random payload.
pub struct Www {
    pub dir: TempDir,
    pub payload: Vec<u8>,
    /// The hex SHA-256 of `payload`, as [`crate::apps::Fetch::sha256`] gives it.
    pub want: String,
}

impl Www {
    /// A fresh directory (`prefix` names it) with a `blob` of `size` random bytes.
    pub fn with_blob(prefix: &str, size: usize) -> Self {
        let dir = TempDir::new(prefix);
        let payload = random_payload(size);
        let want = Self::put(&dir.0, "blob", &payload);
        Self { dir, payload, want }
    }

    /// Adds file `name` of `size` random bytes (not kept in memory); returns its hex SHA-256.
    pub fn add(&self, name: &str, size: usize) -> String {
        Self::put(&self.dir.0, name, &random_payload(size))
    }

    pub fn path(&self) -> &Path {
        &self.dir.0
    }

    fn put(dir: &Path, name: &str, bytes: &[u8]) -> String {
        std::fs::write(dir.join(name), bytes).unwrap();
        sha256_hex(bytes)
    }
}
