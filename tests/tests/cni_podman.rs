//! The CNI plugin under a real container runtime: podman (CNI network backend, bridge +
//! host-local IPAM) runs our plugin chained after the bridge plugin, as a Kubernetes node's
//! runtime would. The agent and the CNI installer run as containers of the image
//! `cargo xtask image --profile dev` builds, started the way `deploy/base/daemonset.yaml`
//! says (host network, its capabilities, security options and host mounts; only the node's
//! CNI, state and socket directories are the test's own). The agent is netns-keyed, with its
//! programs attached once at the containers' parent cgroup (and its own container inside it,
//! as a DaemonSet pod sits in `kubepods`). Checked on the bridge with the wire oracle and in
//! the agent's state:
//!
//! * a mesh pod whose entrypoint connects at once gets mTLS with the right SPIFFE IDs on its
//!   very first connection (steering was in place before the container's first instruction);
//! * a pod of a namespace outside the mesh talks plaintext, untouched;
//! * with the agent down, a mesh pod does not start (CNI error) and an outside pod does;
//! * the installer chains the plugin again after the main plugin rewrites its config;
//! * the agent container killed and started again (same mounts) comes back on its state;
//! * once the containers are gone, no flow, enrollment, map entry or netns pin is left;
//! * stopping the installer leaves the chain (`--keep-on-exit`, for rolling updates), and
//!   `interceptor-cni uninstall` from the image takes it out.
//!
//! Needs podman, runc, containernetworking-plugins and busybox-static (`cargo xtask setup`
//! installs them), and root.

use std::{
    collections::BTreeMap,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use interceptor::config::{CniSettings, HandoverSettings, KtlsMode, StaticPod};
use interceptor_tests::{
    agent::{PinCleanup, TempDir, config, make_ca},
    apps::random_payload,
    demo::agent_binary,
    podman::{DaemonSet, PodContainer, Volumes},
    process::{admin_flows, admin_stats},
    require_privileged, unique_name,
    wire::{self, Capture},
};
use sha2::{Digest as _, Sha256};

const MESH_NS: &str = "mesh";
const PLAIN_NS: &str = "plain";
const PORT: u16 = 8080;
/// Every podman call is bounded; a container run takes about a second here.
const PODMAN_TIMEOUT: &str = "60";

fn require_tools() {
    for (path, package) in [
        ("/usr/bin/podman", "podman"),
        ("/usr/sbin/runc", "runc"),
        ("/usr/lib/cni/bridge", "containernetworking-plugins"),
        ("/usr/lib/cni/host-local", "containernetworking-plugins"),
        ("/bin/busybox", "busybox-static"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: install the Debian package `{package}` (`cargo xtask setup` does)"
        );
    }
}

/// Everything this test creates outside its temporary directory, removed on drop even when
/// an assertion failed: containers, the network's host-local leases and bridge, the parent
/// cgroup in every hierarchy podman used, the installer and the agent.
struct Node {
    dir: TempDir,
    tag: String,
    network: String,
    bridge: String,
    subnet: String,
    /// The cgroup the containers are created under (`--cgroup-parent`), cgroup2 path.
    parent: PathBuf,
    containers_conf: PathBuf,
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    rootfs: PathBuf,
    containers: Vec<String>,
}

impl Node {
    fn new() -> Self {
        let dir = TempDir::new("icni");
        let tag = unique_name("icni");
        let pid = std::process::id();
        let subnet = format!("172.{}.{}", 20 + pid % 10, (pid / 10) % 250);
        let parent = interceptor::sys::cgroup2_mount()
            .expect("cgroup2 mount")
            .join(&tag);
        std::fs::create_dir(&parent).expect("parent cgroup");
        let conf_dir = dir.0.join("net.d");
        let bin_dir = dir.0.join("bin");
        let rootfs = dir.0.join("rootfs");
        for d in [
            &conf_dir,
            &bin_dir,
            &rootfs.join("bin"),
            &rootfs.join("www"),
        ] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            symlink(Path::new("/usr/lib/cni").join(plugin), bin_dir.join(plugin))
                .expect("plugin link");
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
        for applet in [
            "sh",
            "httpd",
            "wget",
            "sha256sum",
            "sleep",
            "cat",
            "echo",
            "ip",
        ] {
            symlink("busybox", rootfs.join("bin").join(applet)).expect("applet");
        }
        let network = format!("{tag}-net");
        let bridge = tag.clone();
        // The main plugin's config, as a node's network plugin would have written it.
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("{subnet}.0/24"), "gateway": format!("{subnet}.1")}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            }]
        });
        std::fs::write(
            conf_dir.join("10-main.conflist"),
            serde_json::to_vec_pretty(&conflist).expect("json"),
        )
        .expect("conflist");
        let containers_conf = dir.0.join("containers.conf");
        // runc, not crun: crun refuses cgroup v1 + v2 hybrid hosts with v2 controllers.
        std::fs::write(
            &containers_conf,
            format!(
                "[network]\nnetwork_backend=\"cni\"\ncni_plugin_dirs=[\"{}\"]\n\
                 network_config_dir=\"{}\"\n[engine]\nruntime=\"runc\"\n\
                 cgroup_manager=\"cgroupfs\"\nevents_logger=\"file\"\n",
                bin_dir.display(),
                conf_dir.display()
            ),
        )
        .expect("containers.conf");
        Node {
            dir,
            tag,
            network,
            bridge,
            subnet,
            parent,
            containers_conf,
            conf_dir,
            bin_dir,
            rootfs,
            containers: Vec::new(),
        }
    }

    fn podman(&self, args: &[&str], cni_args: &str) -> Output {
        Command::new("timeout")
            .arg(PODMAN_TIMEOUT)
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", &self.containers_conf)
            .env("CNI_ARGS", cni_args)
            .output()
            .expect("run podman")
    }

    /// `podman run -d` of a pod named `name` in `namespace` running `script`; the output.
    fn run(&mut self, name: &str, namespace: &str, script: &str) -> Output {
        let full = format!("{}-{name}", self.tag);
        self.containers.push(full.clone());
        let parent = format!("/{}", self.tag);
        let rootfs = self.rootfs.to_string_lossy().into_owned();
        self.podman(
            &[
                "run",
                "-d",
                "--name",
                &full,
                "--network",
                &self.network,
                "--cgroup-parent",
                &parent,
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
                "--rootfs",
                &rootfs,
                "/bin/sh",
                "-c",
                script,
            ],
            &format!("K8S_POD_NAMESPACE={namespace};K8S_POD_UID=uid-{full}"),
        )
    }

    fn run_ok(&mut self, name: &str, namespace: &str, script: &str) {
        let out = self.run(name, namespace, script);
        assert!(
            out.status.success(),
            "podman run {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pod_name(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    fn ip(&self, name: &str) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let out = self.podman(&["inspect", "--format", &format, &self.pod_name(name)], "");
        let ip = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            ip.starts_with(&self.subnet),
            "address of {name}: `{ip}` {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ip
    }

    /// Waits for the container to exit and returns its output.
    fn logs_after_exit(&self, name: &str) -> String {
        let full = self.pod_name(name);
        let out = self.podman(&["wait", &full], "");
        assert!(out.status.success(), "podman wait {name}");
        let out = self.podman(&["logs", &full], "");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    fn remove_containers(&mut self) {
        if self.containers.is_empty() {
            return;
        }
        let mut args = vec!["rm", "-f", "-t", "0"];
        let names = std::mem::take(&mut self.containers);
        args.extend(names.iter().map(String::as_str));
        let _ = self.podman(&args, "");
    }

    /// The host end of the one veth attached to the bridge.
    fn only_bridge_port(&self) -> String {
        let out = Command::new("ip")
            .args(["-o", "link", "show", "master", &self.bridge])
            .output()
            .expect("ip link");
        let text = String::from_utf8_lossy(&out.stdout);
        let ports: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
            .collect();
        assert_eq!(ports.len(), 1, "bridge ports: {text}");
        ports[0].to_owned()
    }

    fn chained(&self) -> bool {
        std::fs::read_to_string(self.conf_dir.join("10-main.conflist"))
            .is_ok_and(|s| s.contains("\"interceptor-cni\""))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.remove_containers();
        let _ = std::fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(&self.network));
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        // podman (cgroupfs) made the parent in every mounted hierarchy; children first.
        let mut dirs = vec![self.parent.clone()];
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            dirs.extend(entries.flatten().map(|e| e.path().join(&self.tag)));
        }
        for d in dirs {
            if let Ok(children) = std::fs::read_dir(&d) {
                for c in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = std::fs::remove_dir(c.path());
                }
            }
            let _ = std::fs::remove_dir(&d);
        }
    }
}

/// What `cargo xtask demo --containers` prints (this test with `INTERCEPTOR_DEMO` set).
#[derive(Default)]
struct Report {
    rows: Vec<[String; 4]>,
}

impl Report {
    fn row(&mut self, from: &str, to: &str, what: &str, ids: &str) {
        self.rows.push([
            from.to_owned(),
            to.to_owned(),
            what.to_owned(),
            ids.to_owned(),
        ]);
    }

    fn render(&self, took: Duration) -> String {
        let mut out = String::from(
            "\npodman pods (CNI backend: bridge + host-local, interceptor-cni chained), the \
             agent keyed by network namespace:\n\n",
        );
        for [from, to, what, ids] in &self.rows {
            out += &format!("  {from:<16} -> {to:<14} {what}\n");
            if ids != "-" {
                out += &format!("  {:<34}{ids}\n", "");
            }
        }
        out += &format!("\n(wire checked on the server's bridge port; {took:.1?})\n");
        out
    }
}

/// The address in `ip -4 -o addr` output (`... inet 172.20.1.3/24 ...`).
fn printed_ip(out: &str) -> String {
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_else(|| panic!("no address printed: {out}"))
        .to_owned()
}

/// The agent's container, and the node-side end of its admin socket (what the CNI plugin and
/// an operator's `interceptor flows` use).
struct ContainerAgent {
    pod: PodContainer,
    cli: PathBuf,
    admin: PathBuf,
}

impl ContainerAgent {
    fn wait_ready(&self) {
        self.pod
            .wait_until(Duration::from_secs(30), "serving its admin socket", || {
                admin_stats(&self.cli, &self.admin).is_some()
            });
    }

    fn flows(&self) -> Vec<interceptor::intercept::table::FlowRow> {
        admin_flows(&self.cli, &self.admin)
    }

    fn stats(&self) -> BTreeMap<String, u64> {
        admin_stats(&self.cli, &self.admin).expect("interceptor flows --stats")
    }
}

#[test]
fn podman_pods_are_enrolled_before_they_run() {
    require_privileged();
    require_tools();
    let started = Instant::now();
    let mut node = Node::new();
    let payload = random_payload(64 << 10);
    std::fs::write(node.rootfs.join("www/data"), &payload).expect("payload");
    let want = format!("{:x}", Sha256::digest(&payload));

    // The agent, netns-keyed, its programs once at the containers' parent cgroup. Its config
    // names the paths inside its container (the DaemonSet's mount points).
    let ca = node.dir.0.join("ca");
    make_ca(&ca, "cluster.local");
    let mut cfg = config(
        Path::new("/etc/interceptor/ca"),
        Path::new("/unused"),
        KtlsMode::Auto,
        vec![],
        vec![],
    );
    cfg.state_dir = "/var/lib/interceptor".into();
    cfg.admin_socket = "/run/interceptor/admin.sock".into();
    // `run --takeover` (the DaemonSet's arguments) needs the handover socket.
    cfg.handover = Some(HandoverSettings {
        socket: "/var/run/interceptor/handover.sock".into(),
        ..Default::default()
    });
    cfg.cni = Some(CniSettings {
        parent_cgroup: Some(node.parent.clone()),
        membership_file: "/run/interceptor/cni-membership.json".into(),
        lookup_timeout_ms: 2_000,
        namespaces: [
            (
                MESH_NS.to_owned(),
                [("interceptor.io/mtls".to_owned(), "enabled".to_owned())]
                    .into_iter()
                    .collect(),
            ),
            (PLAIN_NS.to_owned(), Default::default()),
        ]
        .into_iter()
        .collect(),
        pods: [("server", "httpd"), ("client", "sleep"), ("late", "sleep")]
            .into_iter()
            .map(|(name, sa)| StaticPod {
                namespace: MESH_NS.to_owned(),
                name: node.pod_name(name),
                uid: String::new(),
                service_account: sa.to_owned(),
                labels: Default::default(),
            })
            .collect(),
    });
    let _pins = PinCleanup(cfg.bpffs.clone());
    let config_dir = node.dir.0.join("config");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    std::fs::write(
        config_dir.join("node.yaml"),
        yaml_serde::to_string(&cfg).expect("config to yaml"),
    )
    .expect("node.yaml");
    // The node's directories the DaemonSet mounts, as this test's own.
    let run_dir = node.dir.0.join("run");
    let volumes = Volumes {
        containers_conf: node.containers_conf.clone(),
        host_paths: [
            ("/var/lib/interceptor", node.dir.0.join("state")),
            ("/run/interceptor", run_dir.clone()),
            ("/opt/cni/bin", node.bin_dir.clone()),
            ("/etc/cni/net.d", node.conf_dir.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        sources: [("config", config_dir), ("cacerts", ca)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        node_name: "node-a".to_owned(),
    };
    let daemonset = DaemonSet::load();
    let cli = agent_binary();
    let image = daemonset.dev_image("agent", &cli);
    let parent = format!("/{}", node.tag);
    let agent = ContainerAgent {
        // Inside the parent cgroup, as a DaemonSet pod is inside kubepods: its own dials in
        // the pods' netns must not be steered back to it.
        pod: PodContainer::run(
            &daemonset,
            "agent",
            &image,
            &format!("{}-agent", node.tag),
            &volumes,
            &[
                "--cgroup-parent",
                &parent,
                "--ulimit",
                "nofile=16384:16384",
                "--ulimit",
                "nproc=4096:4096",
            ],
            &[],
        ),
        cli,
        admin: run_dir.join("admin.sock"),
    };
    agent.wait_ready();
    let membership = run_dir.join("cni-membership.json");
    assert!(
        std::fs::read_to_string(&membership).is_ok_and(|m| m.contains("\"plain\":false")),
        "the agent wrote no membership cache"
    );

    // The installer, from the same image, chains the plugin into the main config. The plugin
    // runs on the node: it names the node's paths of the socket and the membership file.
    let plugin_config = serde_json::json!({
        "adminSocket": agent.admin,
        "membershipFile": membership,
        "timeoutSeconds": 10,
    })
    .to_string();
    let installer = PodContainer::run(
        &daemonset,
        "install-cni",
        &image,
        &format!("{}-install-cni", node.tag),
        &volumes,
        &[
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ],
        &["--plugin-config", &plugin_config, "--poll-ms", "100"],
    );
    installer.wait_until(Duration::from_secs(10), "chained", || {
        node.chained() && node.bin_dir.join("interceptor-cni").exists()
    });

    // The main plugin rewrites its config (as Calico or Cilium do on restart): chained again.
    let main_conf = node.conf_dir.join("10-main.conflist");
    let ours = std::fs::read_to_string(&main_conf).expect("conflist");
    let mut rewritten: serde_json::Value = serde_json::from_str(&ours).expect("json");
    rewritten["plugins"]
        .as_array_mut()
        .expect("plugins")
        .retain(|p| p["type"] != "interceptor-cni");
    std::fs::write(&main_conf, rewritten.to_string()).expect("rewrite");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.chained() {
        assert!(
            Instant::now() < deadline,
            "not chained again after a rewrite"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The server, then a client whose first instruction is the connection.
    node.run_ok(
        "server",
        MESH_NS,
        &format!("exec httpd -f -p {PORT} -h /www"),
    );
    let server_ip = node.ip("server");
    // Frames between two bridge ports never cross the bridge device itself: capture on the
    // server's port (the only one so far), which sees everything to and from the server.
    let port = node.only_bridge_port();
    let capture = Capture::start(&port);
    // The fetch comes first; the address is printed after it, for the wire checks.
    let fetch = format!(
        "wget -q -O - http://{server_ip}:{PORT}/data | sha256sum; \
         ip -4 -o addr show eth0"
    );
    node.run_ok("client", MESH_NS, &fetch);
    node.run_ok("outsider", PLAIN_NS, &fetch);
    let client_out = node.logs_after_exit("client");
    let outsider_out = node.logs_after_exit("outsider");
    let client_ip = printed_ip(&client_out);
    let outsider_ip = printed_ip(&outsider_out);
    assert!(
        client_out.contains(&want),
        "client got the wrong body: {client_out}"
    );
    assert!(
        outsider_out.contains(&want),
        "outsider got the wrong body: {outsider_out}"
    );
    // Give the last segments (FIN, ACK) a moment to reach the capture.
    std::thread::sleep(Duration::from_millis(200));
    let frames = capture.stop();
    let streams = wire::Streams::from_frames(frames);
    let server = format!("{server_ip}:{PORT}").parse().expect("server addr");

    // The mesh client: every stream to the server, the very first included, is TLS records
    // only, and the body never appears in clear.
    let from_client: Vec<&wire::Stream> = streams
        .streams
        .iter()
        .filter(|s| s.src.ip().to_string() == client_ip && s.dst == server)
        .collect();
    assert!(
        !from_client.is_empty(),
        "no client stream on {}",
        node.bridge
    );
    assert!(
        from_client[0].syn,
        "the first client connection was not captured from its SYN"
    );
    for s in &from_client {
        s.assert_complete();
        wire::assert_tls_records(&s.bytes);
        wire::parse_client_hello(&s.bytes).expect("a mesh ClientHello");
    }
    for s in streams
        .streams
        .iter()
        .filter(|s| s.src.ip().to_string() == client_ip || s.dst.ip().to_string() == client_ip)
    {
        wire::assert_no_plaintext(&s.bytes, &payload);
        assert!(
            !s.bytes.windows(9).any(|w| w == b"GET /data"),
            "a request of the mesh client went out in clear"
        );
    }
    // The outsider: plaintext, the request and the body in clear.
    let plain: Vec<&wire::Stream> = streams
        .streams
        .iter()
        .filter(|s| s.src.ip().to_string() == outsider_ip && s.dst == server)
        .collect();
    assert!(
        plain
            .iter()
            .any(|s| s.bytes.windows(9).any(|w| w == b"GET /data")),
        "the outsider's request is not in clear on the wire"
    );
    assert!(
        wire::find_plaintext(
            &streams
                .streams
                .iter()
                .filter(|s| s.src == server && s.dst.ip().to_string() == outsider_ip)
                .map(|s| s.bytes.clone())
                .collect::<Vec<_>>(),
            &payload
        )
        .is_some(),
        "the body sent to the outsider is not in clear"
    );

    // SPIFFE IDs, as each agent side verified them.
    let flows = agent.flows();
    let client_pod = format!("{MESH_NS}/{}", node.pod_name("client"));
    let server_pod = format!("{MESH_NS}/{}", node.pod_name("server"));
    let out = flows
        .iter()
        .find(|f| f.pod == client_pod)
        .unwrap_or_else(|| panic!("no flow of {client_pod}: {flows:?}"));
    assert_eq!(
        out.peer_id.as_deref(),
        Some("spiffe://cluster.local/ns/mesh/sa/httpd"),
        "{out:?}"
    );
    let inbound: Vec<_> = flows.iter().filter(|f| f.pod == server_pod).collect();
    assert!(
        inbound.iter().any(|f| f.peer_id.as_deref()
            == Some("spiffe://cluster.local/ns/mesh/sa/sleep")
            && f.source.ip().to_string() == client_ip),
        "{inbound:?}"
    );
    assert!(
        inbound
            .iter()
            .any(|f| f.peer_id.is_none() && f.source.ip().to_string() == outsider_ip),
        "the outsider's plaintext flow is not listed: {inbound:?}"
    );
    assert!(
        flows.iter().all(|f| !f.pod.contains("outsider")),
        "the outsider was enrolled"
    );

    let mut report = Report::default();
    report.row(
        &format!("{MESH_NS}/client"),
        &format!("{MESH_NS}/server"),
        &format!(
            "mTLS from the first SYN ({} connection(s), TLS records only, body never in clear)",
            from_client.len()
        ),
        &format!(
            "server verified {}; client verified {}",
            "spiffe://cluster.local/ns/mesh/sa/sleep", "spiffe://cluster.local/ns/mesh/sa/httpd"
        ),
    );
    report.row(
        &format!("{PLAIN_NS}/outsider"),
        &format!("{MESH_NS}/server"),
        "plaintext (namespace not in the mesh: not enrolled, request and body in clear)",
        "-",
    );

    // Agent down: a mesh pod must not start; a pod outside the mesh still does.
    // The server at least (the exited client may already be gone through its DEL).
    let stats = agent.stats();
    assert!(
        stats.get("enrollments.active").is_some_and(|n| *n >= 1),
        "{stats:?}"
    );
    assert_eq!(agent.pod.stop_with("KILL"), 137, "the agent's exit code");
    let late = node.run("late", MESH_NS, "echo started");
    let err = String::from_utf8_lossy(&late.stderr);
    assert!(
        !late.status.success() && err.contains("must be in the mesh"),
        "a mesh pod started while the agent was down: {err}"
    );
    node.run_ok("plain2", PLAIN_NS, "echo started");
    assert!(node.logs_after_exit("plain2").contains("started"));
    report.row(
        &format!("{MESH_NS}/late"),
        "(agent down)",
        "not started: CNI ADD failed (error 11, the runtime retries)",
        err.lines()
            .find(|l| l.contains("must be in the mesh"))
            .unwrap_or("")
            .trim(),
    );
    report.row(
        &format!("{PLAIN_NS}/plain2"),
        "(agent down)",
        "started: the membership file puts its namespace outside the mesh",
        "-",
    );

    // Started again in its container (as a kubelet restarts it): back on the same state, the
    // persisted enrollments return; then the containers go and take every trace with them.
    let _ = std::fs::remove_file(&agent.admin);
    agent.pod.restart();
    agent.wait_ready();
    node.remove_containers();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = agent.stats();
        let clean = [
            "enrollments.active",
            "enrollments.stale",
            "map.POD_CONFIG",
            "map.POD_ADDRS",
            "map.INBOUND_SLOTS",
            "map.ORIG_DST_BY_COOKIE",
            "map.ORIG_DST_BY_FLOW",
            "map.DEST_POLICY",
            "links.netns",
        ]
        .iter()
        .all(|k| s.get(*k) == Some(&0));
        if clean && agent.flows().iter().all(|f| f.closed) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "state left after the containers were removed: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let links: Vec<String> = std::fs::read_dir(cfg.bpffs.join("links"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        links.iter().all(|l| !l.starts_with("netns-")),
        "netns pins left: {links:?}"
    );
    assert_eq!(
        links.len(),
        1,
        "only the parent cgroup's pins stay: {links:?}"
    );

    report.row(
        "(all removed)",
        "-",
        "no flow, enrollment, map entry or netns pin left",
        "-",
    );

    // The installer stopped (SIGTERM) leaves the chain: during a rolling update the next one
    // takes over, and mesh pods never start unsteered meanwhile.
    assert_eq!(installer.stop_with("TERM"), 0, "{}", installer.logs());
    assert!(node.chained(), "the installer unchained the plugin on exit");
    // `interceptor-cni uninstall` from the image, with the installer's mounts, takes it out.
    let out = PodContainer::run_to_end(
        &daemonset,
        "install-cni",
        &image,
        &volumes,
        &["uninstall", "--cni-conf-dir", "/host/etc/cni/net.d"],
    );
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !node.chained(),
        "the plugin is still chained after uninstall"
    );
    report.row(
        "(installer)",
        "-",
        "SIGTERM keeps the chain (rolling update); `uninstall` from the image removes it",
        "-",
    );
    drop(agent);
    if std::env::var_os("INTERCEPTOR_DEMO").is_some() {
        interceptor_tests::demo::say(&report.render(started.elapsed()));
    }
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
}
