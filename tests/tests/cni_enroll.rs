//! The agent's side of the CNI plugin, request by request, on plain network namespaces: what
//! `enroll-pod`, `check-pod` and `unenroll-pod` answer for a mesh pod, a pod outside the
//! mesh, a pod the directory does not know, a retried ADD, a DEL of another sandbox, and an
//! agent that enrolls by cgroup. The podman test (`cni_podman.rs`) drives the happy path
//! through a real runtime; these are the answers a runtime rarely provokes.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use interceptor::config::{CniSettings, KtlsMode, StaticPod};
use interceptor_tests::{
    Cgroup, NetNs,
    agent::{RunningAgent, TempDir, config, make_ca},
    require_privileged,
};
use serde_json::{Value, json};

fn ask(socket: &Path, request: &Value) -> Value {
    let mut s = UnixStream::connect(socket).expect("admin socket");
    writeln!(s, "{request}").expect("write");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("read");
    serde_json::from_str(&line).expect("answer")
}

fn ok(answer: &Value) -> &str {
    assert_eq!(answer["result"], "ok", "{answer}");
    answer["message"].as_str().unwrap_or_default()
}

fn refused(answer: &Value) -> &str {
    assert_eq!(answer["result"], "error", "{answer}");
    answer["message"].as_str().unwrap_or_default()
}

fn pod(ns: &str, name: &str) -> Value {
    json!({"namespace": ns, "name": name, "uid": ""})
}

/// Asks what the plugin asks for one pod, written `cmd namespace/name ip sandbox`, in
/// `netns`; returns the answer.
fn ask_pod(socket: &Path, request: &str, netns: &Path) -> Value {
    let [cmd, pod_ref, ip, sandbox] = request.split(' ').collect::<Vec<_>>()[..] else {
        panic!("`{request}`: want `cmd namespace/name ip sandbox`");
    };
    let (ns, name) = pod_ref.split_once('/').expect("namespace/name");
    ask(
        socket,
        &json!({"cmd": cmd, "pod": pod(ns, name), "netns": netns, "ips": [ip], "containerId": sandbox}),
    )
}

fn stat(socket: &Path, key: &str) -> u64 {
    ask(socket, &json!({"cmd": "stats"}))["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no stat {key}"))
}

#[test]
fn the_agent_answers_the_plugin_for_every_kind_of_pod() {
    require_privileged();
    let parent = Cgroup::new("icne");
    let dir = TempDir::new("icne");
    let ca = dir.0.join("ca");
    make_ca(&ca, "cluster.local");
    let mesh_ns = NetNs::new("icnm");
    mesh_ns.ip(&["addr", "add", "10.79.0.2/32", "dev", "lo"]);
    let other_ns = NetNs::new("icno");
    other_ns.ip(&["addr", "add", "10.79.0.3/32", "dev", "lo"]);

    let mut cfg = config(&ca, &dir.0, KtlsMode::Off, vec![], vec![]);
    cfg.cni = Some(CniSettings {
        parent_cgroup: Some(parent.path.clone()),
        membership_file: dir.0.join("membership.json"),
        lookup_timeout_ms: 300,
        namespaces: [(
            "full".to_owned(),
            [("interceptor.io/mtls".to_owned(), "enabled".to_owned())]
                .into_iter()
                .collect(),
        )]
        .into_iter()
        .collect(),
        pods: vec![StaticPod {
            namespace: "full".into(),
            name: "sleep".into(),
            uid: String::new(),
            service_account: "sleep".into(),
            labels: Default::default(),
        }],
    });
    let socket = cfg.admin_socket.clone();
    let agent = RunningAgent::start(cfg.clone());
    let netns = mesh_ns.path();
    // The membership cache the plugin reads while the agent is away: written at start, and
    // written again by the agent's file watcher when someone removes it.
    let membership = dir.0.join("membership.json");
    let written = std::fs::read(&membership).expect("membership cache written at start");
    assert!(String::from_utf8_lossy(&written).contains("\"full\""));
    std::fs::remove_file(&membership).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::fs::read(&membership).ok().as_ref() != Some(&written) {
        assert!(Instant::now() < deadline, "membership cache not rewritten");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A mesh pod: enrolled under its namespace/name, with the directory's service account.
    let m = ok(&ask_pod(
        &socket,
        "enroll-pod full/sleep 10.79.0.2 sb1",
        &netns,
    ))
    .to_owned();
    assert!(m.contains("spiffe://cluster.local/ns/full/sa/sleep"), "{m}");
    assert_eq!(agent.agent.enrolled(), ["full/sleep"]);
    assert_eq!(stat(&socket, "map.POD_CONFIG"), 1);
    // ADD retried for the same sandbox: nothing changes.
    ok(&ask_pod(
        &socket,
        "enroll-pod full/sleep 10.79.0.2 sb1",
        &netns,
    ));
    assert_eq!(stat(&socket, "enrollments.active"), 1);
    // CHECK: as ADD left it, and each difference named.
    ok(&ask_pod(
        &socket,
        "check-pod full/sleep 10.79.0.2 sb1",
        &netns,
    ));
    let e = refused(&ask_pod(
        &socket,
        "check-pod full/sleep 10.79.0.9 sb1",
        &netns,
    ))
    .to_owned();
    assert!(e.contains("addresses"), "{e}");
    let e = refused(&ask_pod(
        &socket,
        "check-pod full/sleep 10.79.0.2 sb1",
        &other_ns.path(),
    ))
    .to_owned();
    assert!(e.contains("netns"), "{e}");
    // DEL of another sandbox of the same pod name leaves the enrolled one alone.
    let m = ok(&ask(
        &socket,
        &json!({"cmd": "unenroll-pod", "pod": pod("full", "sleep"), "containerId": "old"}),
    ))
    .to_owned();
    assert!(m.contains("left alone"), "{m}");
    assert_eq!(agent.agent.enrolled(), ["full/sleep"]);

    // A pod of a namespace outside the mesh: ok, not enrolled; CHECK ok too.
    let m = ok(&ask_pod(
        &socket,
        "enroll-pod legacy/web 10.79.0.3 sb2",
        &other_ns.path(),
    ))
    .to_owned();
    assert!(m.contains("outside the mesh"), "{m}");
    ok(&ask_pod(
        &socket,
        "check-pod legacy/web 10.79.0.3 sb2",
        &other_ns.path(),
    ));
    assert_eq!(agent.agent.enrolled(), ["full/sleep"]);

    // A pod of a mesh namespace that the directory does not know: refused, never guessed.
    let e = refused(&ask_pod(
        &socket,
        "enroll-pod full/stranger 10.79.0.3 sb3",
        &other_ns.path(),
    ))
    .to_owned();
    assert!(
        e.contains("full/stranger") && e.contains("not known"),
        "{e}"
    );
    // DEL: unenrolls, then is idempotent; the pod's entries are gone.
    ok(&ask(
        &socket,
        &json!({"cmd": "unenroll-pod", "pod": pod("full", "sleep"), "containerId": "sb1"}),
    ));
    let m = ok(&ask(
        &socket,
        &json!({"cmd": "unenroll-pod", "pod": pod("full", "sleep"), "containerId": "sb1"}),
    ))
    .to_owned();
    assert!(m.contains("not enrolled"), "{m}");
    assert!(agent.agent.enrolled().is_empty());
    for key in [
        "map.POD_CONFIG",
        "map.POD_ADDRS",
        "map.DEST_POLICY",
        "links.netns",
    ] {
        assert_eq!(stat(&socket, key), 0, "{key}");
    }
    // CHECK of a mesh pod that is not enrolled fails.
    let e = refused(&ask_pod(
        &socket,
        "check-pod full/sleep 10.79.0.2 sb1",
        &netns,
    ))
    .to_owned();
    assert!(e.contains("not enrolled"), "{e}");
    drop(agent);

    // An agent that enrolls by cgroup says so instead of enrolling half a pod.
    let mut per_cgroup = cfg;
    per_cgroup.cni = None;
    per_cgroup.bpffs = per_cgroup
        .bpffs
        .with_file_name(interceptor_tests::unique_name("itest"));
    let agent = RunningAgent::start(per_cgroup);
    let e = refused(&ask_pod(
        &socket,
        "enroll-pod full/sleep 10.79.0.2 sb1",
        &netns,
    ))
    .to_owned();
    assert!(e.contains("configure `cni:`"), "{e}");
    drop(agent);
}
