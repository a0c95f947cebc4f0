//! Enrollment state end to end, on a real agent: runtime enrollments made in parallel all
//! survive a restart; a conflicting or failing enrollment changes nothing (not the file, not
//! the kernel); a persisted enrollment whose pod is gone does not stop the node; pods whose
//! cgroup paths differ keep their own pins. Steering is checked on the kernel side: a connect
//! from the pod's cgroup reaches the agent (it lists the flow), or is refused while the agent
//! is down.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use interceptor::{
    admin::{Request, Response},
    config::Workload,
};
use interceptor_tests::{
    ConnectedChild,
    agent::{PinCleanup, RunningAgent, TempDir, workload},
    apps::{curl, serve_http},
    connect_from, require_privileged, run,
    scenario::{Cluster, Scenario, serve_blob},
    topology::{Node, Pod},
};

/// One admin request, as `interceptor enroll`/`unenroll` sends it.
fn call(admin: &Path, req: Request) -> Response {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(interceptor::admin::call(admin, &req))
        .expect("admin call")
}

fn enroll(admin: &Path, w: Workload) -> Response {
    call(admin, Request::Enroll { workload: w })
}

fn persisted(state_dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(state_dir.join("enrollments.json")).unwrap_or_default();
    if bytes.is_empty() {
        return Vec::new();
    }
    let list: Vec<Workload> = serde_json::from_slice(&bytes).expect("enrollments.json parses");
    list.into_iter().map(|w| w.name).collect()
}

fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Connects from `cgroup` + `netns` to `dst` and holds the socket.
fn connect_in(cgroup: &Path, netns: &Path, dst: SocketAddr) -> ConnectedChild {
    connect_from(Some(cgroup), netns, dst, b"")
}

/// Whether the agent lists a flow of pod `name` (open or recently closed).
fn agent_saw(agent: &RunningAgent, name: &str) -> bool {
    agent
        .agent
        .flows_with_recent()
        .iter()
        .any(|r| r.pod == name)
}

fn reserved_ports(netns: &Path) -> String {
    interceptor::sys::in_netns(netns, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
    })
    .expect("read the pod's reserved ports")
    .trim()
    .to_owned()
}

/// 64 `interceptor enroll` calls at once: every one is persisted, and after a restart every
/// pod is steered again (a connect from its cgroup reaches the agent). The file used to be
/// read-modify-written without a lock through one shared temporary name, losing some.
#[test]
fn parallel_enrolls_all_survive_a_restart() {
    require_privileged();
    const PODS: u8 = 64;
    let node = Node::new(71);
    let mut server = node.pod("pe-server", 3);
    let _www = serve_blob(&mut server, "wwwpe", 1024);
    let clients: Vec<Pod> = (0..PODS)
        .map(|i| node.pod(&format!("pe{i}"), 10 + i))
        .collect();
    let cluster = Cluster::new("agentpe");
    let config = cluster.config(vec![workload(&server, "pe", "server")], vec![]);
    let (admin, state_dir) = (config.admin_socket.clone(), config.state_dir.clone());
    let agent = RunningAgent::start(config);

    let started = Instant::now();
    let answers: Vec<Response> = std::thread::scope(|s| {
        let calls: Vec<_> = clients
            .iter()
            .map(|c| {
                let w = workload(c, "pe", "client");
                let admin = &admin;
                s.spawn(move || enroll(admin, w))
            })
            .collect();
        calls
            .into_iter()
            .map(|h| h.join().expect("enroll thread"))
            .collect()
    });
    eprintln!("{PODS} parallel enrolls took {:?}", started.elapsed());
    for (c, a) in clients.iter().zip(&answers) {
        assert!(matches!(a, Response::Ok { .. }), "{}: {a:?}", c.name);
    }
    let mut want: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
    want.sort();
    let mut got = persisted(&state_dir);
    got.sort();
    assert_eq!(got, want, "every enrollment must be persisted");

    // Restart on the same pins and state.
    let pins = PinCleanup(agent.kill());
    let mut config = cluster.config(vec![workload(&server, "pe", "server")], vec![]);
    config.bpffs = pins.0.clone();
    let agent = RunningAgent::start(config);
    assert!(agent.agent.stale().is_empty(), "{:?}", agent.agent.stale());
    let dst = SocketAddr::from((server.ip, 80));
    let held: Vec<ConnectedChild> = clients
        .iter()
        .map(|c| connect_in(&c.cgroup.path, &c.netns_path(), dst))
        .collect();
    for (c, h) in clients.iter().zip(&held) {
        assert_eq!(h.peer, Ok(dst), "{}: connect failed", c.name);
    }
    let missing = wait_for("all 64 pods steered", Duration::from_secs(10), || {
        let missing: Vec<&str> = clients
            .iter()
            .filter(|c| !agent_saw(&agent, &c.name))
            .map(|c| c.name.as_str())
            .collect();
        missing.is_empty().then_some(missing)
    });
    assert!(missing.is_empty());
    // Each child inherited the hold pipes of those forked before it: release in reverse.
    let mut held = held;
    while let Some(h) = held.pop() {
        drop(h);
    }
    drop(agent);
    drop(pins);
}

/// What `workloads:` would reject, `interceptor enroll` rejects too, naming the conflict, and
/// nothing changes: the first owner of the address stays steered and protected, the
/// newcomer's cgroup is not steered, the file is as it was.
#[test]
fn conflicting_enroll_is_refused_and_changes_nothing() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(72, "cfc", "cfs");
    let intruder = node.pod("cfi", 4);
    let www = serve_blob(&mut server, "wwwcf", 4096);
    let cluster = Cluster::new("agentcf");
    let config = cluster.config(vec![workload(&client, "cf", "client")], vec![]);
    let (admin, state_dir) = (config.admin_socket.clone(), config.state_dir.clone());
    let agent = RunningAgent::start(config);
    let ok = enroll(&admin, workload(&server, "cf", "server"));
    assert!(matches!(ok, Response::Ok { .. }), "{ok:?}");
    let file_before = std::fs::read(state_dir.join("enrollments.json")).expect("state file");
    let generation = agent.agent.policy_generation();

    let mut cases: Vec<(Workload, &str)> = Vec::new();
    let mut same_ip = workload(&intruder, "cf", "intruder");
    same_ip.ips = vec![server.ip.into()];
    cases.push((same_ip, "is also used by workload `cfs`"));
    let mut no_ips = workload(&intruder, "cf", "intruder");
    no_ips.ips.clear();
    cases.push((no_ips, "at least one address"));
    let mut same_name = workload(&intruder, "cf", "intruder");
    same_name.name = "cfs".to_owned();
    cases.push((same_name, "`cfs` is already enrolled"));
    let mut config_name = workload(&intruder, "cf", "intruder");
    config_name.name = "cfc".to_owned();
    cases.push((config_name, "`cfc` is already enrolled"));
    for (w, want) in cases {
        let resp = enroll(&admin, w);
        assert!(
            matches!(&resp, Response::Error { message, .. } if message.contains(want)),
            "want an error containing {want:?}, got {resp:?}"
        );
    }
    assert_eq!(
        std::fs::read(state_dir.join("enrollments.json")).expect("state file"),
        file_before,
        "a refused enrollment must not touch the file"
    );
    assert_eq!(agent.agent.policy_generation(), generation);
    assert_eq!(
        reserved_ports(&intruder.netns_path()),
        "",
        "nothing reserved in a refused pod"
    );
    // The intruder's cgroup is not steered: its connect goes straight to the server.
    let dst = SocketAddr::from((server.ip, 80));
    let held = connect_in(&intruder.cgroup.path, &intruder.netns_path(), dst);
    assert_eq!(held.peer, Ok(dst));
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !agent_saw(&agent, "cfi"),
        "a refused pod must not be steered"
    );
    // The owner is still served, with mTLS.
    let f = curl(
        client.command("curl"),
        &format!("http://{}/blob", server.ip),
    );
    assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
    let row = agent
        .agent
        .flows_with_recent()
        .into_iter()
        .find(|r| r.pod == "cfc")
        .expect("client flow");
    assert_eq!(
        row.peer_id.as_deref(),
        Some("spiffe://cluster.local/ns/cf/sa/server")
    );
}

/// An enrollment that fails half-way (the cgroup does not exist) leaves the kernel as it was:
/// no reserved ports added in the pod, its inbound connections not blackholed by a dangling
/// sk_lookup slot, and the same pod enrolls fine afterwards.
#[test]
fn failed_enroll_rolls_back_its_kernel_state() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(73, "rbc", "rbs");
    let legacy = node.pod("rbl", 4);
    let www = TempDir::new("wwwrb");
    std::fs::write(www.0.join("blob"), b"rollback").expect("blob");
    serve_http(&mut server, &www.0);
    let cluster = Cluster::new("agentrb");
    let config = cluster.config(vec![workload(&client, "rb", "client")], vec![]);
    let (admin, state_dir) = (config.admin_socket.clone(), config.state_dir.clone());
    let agent = RunningAgent::start(config);
    let url = format!("http://{}/blob", server.ip);
    assert_eq!(curl(legacy.command_unenrolled("curl"), &url).code, "200");

    let mut broken = workload(&server, "rb", "server");
    broken.cgroup = PathBuf::from("/sys/fs/cgroup").join(interceptor_tests::unique_name("nocg"));
    let resp = enroll(&admin, broken);
    assert!(
        matches!(&resp, Response::Error { message, .. } if message.contains("cgroup")),
        "{resp:?}"
    );
    assert_eq!(
        reserved_ports(&server.netns_path()),
        "",
        "the failed attempt must release the ports it reserved"
    );
    assert!(persisted(&state_dir).is_empty());
    assert_eq!(agent.agent.enrolled(), ["rbc"]);
    // Inbound to the pod is not steered to a listener that no longer exists.
    let f = curl(legacy.command_unenrolled("curl"), &url);
    assert_eq!(
        (f.code.as_str(), f.body.as_slice()),
        ("200", b"rollback".as_slice()),
        "a failed enrollment must not blackhole the pod's inbound traffic"
    );
    // Nothing is left that would stop the pod enrolling properly.
    let resp = enroll(&admin, workload(&server, "rb", "server"));
    assert!(matches!(resp, Response::Ok { .. }), "{resp:?}");
    assert_eq!(reserved_ports(&server.netns_path()), "15001,15006");
    let f = curl(client.command("curl"), &url);
    assert_eq!(f.code, "200");
    assert!(
        agent_saw(&agent, "rbs"),
        "the enrolled server sees the flow"
    );
}

/// A persisted enrollment whose netns is gone while the agent was down: the agent starts and
/// serves the other pods, reports the stale one (API and admin `flows`), keeps its pins (its
/// cgroup stays fail-closed), and drops it once its cgroup is gone too.
#[test]
fn stale_persisted_enrollment_does_not_stop_the_node() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(74, "stc", "sts");
    let gone = node.pod("stg", 4);
    let www = serve_blob(&mut server, "wwwst", 4096);
    let cluster = Cluster::new("agentst");
    let config = cluster.config(vec![workload(&server, "st", "server")], vec![]);
    let (admin, state_dir) = (config.admin_socket.clone(), config.state_dir.clone());
    let agent = RunningAgent::start(config);
    for pod in [&client, &gone] {
        let resp = enroll(&admin, workload(pod, "st", "client"));
        assert!(matches!(resp, Response::Ok { .. }), "{resp:?}");
    }
    let pins = PinCleanup(agent.kill());
    // The pod's sandbox is torn down while the agent is away; its cgroup lingers.
    run("ip", &["netns", "delete", &gone.ns.name]);

    let mut config = cluster.config(vec![workload(&server, "st", "server")], vec![]);
    config.bpffs = pins.0.clone();
    let agent = RunningAgent::start(config);
    let stale = agent.agent.stale();
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert_eq!(stale[0].workload.name, "stg");
    assert!(stale[0].reason.contains("netns"), "{}", stale[0].reason);
    let mut enrolled = agent.agent.enrolled();
    enrolled.sort();
    assert_eq!(enrolled, ["stc", "sts"]);
    let flows = call(&admin, Request::Flows { all: true });
    assert!(
        matches!(&flows, Response::Flows { stale, .. } if stale.len() == 1 && stale[0].workload.name == "stg"),
        "{flows:?}"
    );
    // The rest of the node works.
    let f = curl(
        client.command("curl"),
        &format!("http://{}/blob", server.ip),
    );
    assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
    assert!(agent_saw(&agent, "stc"));
    // The stale pod's cgroup keeps the previous agent's pinned programs (fail-closed for
    // whatever is left in it) until the cgroup goes.
    let links = pins.0.join("links");
    let pin_dir = links.join(interceptor::datapath::cgroup_pin_name(&gone.cgroup.path));
    for program in interceptor::datapath::CGROUP_PROGRAMS {
        assert!(
            pin_dir.join(program).exists(),
            "stale pod's pin {program} pruned"
        );
    }
    assert!(persisted(&state_dir).contains(&"stg".to_owned()));

    // Its cgroup goes: the enrollment and its pins are dropped.
    std::fs::remove_dir(&gone.cgroup.path).expect("rmdir the stale pod's cgroup");
    wait_for("stale enrollment dropped", Duration::from_secs(10), || {
        agent.agent.stale().is_empty().then_some(())
    });
    assert!(!pin_dir.exists(), "pins of a gone cgroup must be removed");
    let mut left = persisted(&state_dir);
    left.sort();
    assert_eq!(left, ["stc"]);
    drop(agent);
    drop(pins);
}

/// `/x/a/b` and `/x/a_b` used to share one pin directory, so unenrolling one removed the
/// other's pins and left it unsteered once the agent stopped. Each keeps its own now.
#[test]
fn cgroups_whose_old_pin_names_collided_keep_their_own_pins() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(75, "pnc", "pns");
    let other = node.pod("pno", 4);
    let _www = serve_blob(&mut server, "wwwpn", 1024);
    let parent = interceptor_tests::Cgroup::new("pinx");
    let nested = parent.path.join("a").join("b");
    let flat = parent.path.join("a_b");
    std::fs::create_dir_all(&nested).expect("mkdir a/b");
    std::fs::create_dir(&flat).expect("mkdir a_b");
    let cleanup = CgroupDirs(vec![nested.clone(), parent.path.join("a"), flat.clone()]);
    let cluster = Cluster::new("agentpn");
    let config = cluster.config(vec![workload(&server, "pn", "server")], vec![]);
    let admin = config.admin_socket.clone();
    let agent = RunningAgent::start(config);
    let mut a = workload(&client, "pn", "a");
    a.cgroup = nested.clone();
    let mut b = workload(&other, "pn", "b");
    b.cgroup = flat.clone();
    for w in [a, b] {
        let resp = enroll(&admin, w);
        assert!(matches!(resp, Response::Ok { .. }), "{resp:?}");
    }
    let resp = call(
        &admin,
        Request::Unenroll {
            name: "pnc".to_owned(),
        },
    );
    assert!(matches!(resp, Response::Ok { .. }), "{resp:?}");
    // Kernel state that outlives the agent: the remaining pod's pinned links.
    let pinned = agent
        .pin_dir
        .join("links")
        .join(interceptor::datapath::cgroup_pin_name(&flat));
    for program in interceptor::datapath::CGROUP_PROGRAMS {
        assert!(
            pinned.join(program).exists(),
            "unenrolling {} removed the pins of {}",
            nested.display(),
            flat.display()
        );
    }
    let pins = PinCleanup(agent.kill());
    // The killed runtime closes its listeners in the background; wait until it has.
    let netns = other.netns_path();
    wait_for(
        "the agent's listener closed",
        Duration::from_secs(5),
        || {
            let gone = interceptor::sys::in_netns(&netns, || {
                Ok(std::net::TcpStream::connect(("127.0.0.1", 15001)).is_err())
            })
            .unwrap_or(false);
            gone.then_some(())
        },
    );
    // Agent down: the still-enrolled pod's connects to the mesh are refused, not in clear.
    let held = connect_in(
        &flat,
        &other.netns_path(),
        SocketAddr::from((server.ip, 80)),
    );
    assert_eq!(
        held.peer,
        Err(libc::ECONNREFUSED),
        "the pod in {} lost its pins",
        flat.display()
    );
    drop(held);
    drop(pins);
    drop(cleanup);
}

/// Removes cgroup directories made by a test (children first), after the pods left them.
struct CgroupDirs(Vec<PathBuf>);

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// An agent from before the injective pin names left its pins under the old name (`/` → `_`):
/// while no agent runs they keep the pod fail-closed; the new agent attaches its own links,
/// pins them under the new name and only then removes the old directory, and the pod is
/// served.
#[test]
fn pins_under_the_old_names_are_adopted_on_upgrade() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node: _node,
    } = Scenario::new(76, "upc", "ups");
    let _www = serve_blob(&mut server, "wwwup", 1024);
    let cluster = Cluster::new("agentup");
    let workloads = || {
        vec![
            workload(&client, "up", "client"),
            workload(&server, "up", "server"),
        ]
    };
    let agent = RunningAgent::start(cluster.config(workloads(), vec![]));
    let pins = PinCleanup(agent.kill());
    let links = pins.0.join("links");
    let new = links.join(interceptor::datapath::cgroup_pin_name(&client.cgroup.path));
    let old = links.join(interceptor::datapath::legacy_cgroup_pin_name(
        &client.cgroup.path,
    ));
    assert_ne!(new, old);
    // What the previous version left: the same links, under its name.
    std::fs::rename(&new, &old).expect("rename the pin directory to the old name");
    let dst = SocketAddr::from((server.ip, 80));
    let netns = client.netns_path();
    wait_for(
        "the agent's listener closed",
        Duration::from_secs(5),
        || {
            let gone = interceptor::sys::in_netns(&netns, || {
                Ok(std::net::TcpStream::connect(("127.0.0.1", 15001)).is_err())
            })
            .unwrap_or(false);
            gone.then_some(())
        },
    );
    let held = connect_in(&client.cgroup.path, &netns, dst);
    assert_eq!(
        held.peer,
        Err(libc::ECONNREFUSED),
        "old-name pins must keep the pod fail-closed"
    );
    drop(held);

    let mut config = cluster.config(workloads(), vec![]);
    config.bpffs = pins.0.clone();
    let agent = RunningAgent::start(config);
    assert!(
        !old.exists(),
        "the old-name pins must be removed after adoption"
    );
    for program in interceptor::datapath::CGROUP_PROGRAMS {
        assert!(
            new.join(program).exists(),
            "{program} not pinned under the new name"
        );
    }
    let held = connect_in(&client.cgroup.path, &netns, dst);
    assert_eq!(held.peer, Ok(dst));
    wait_for(
        "the upgraded agent serves the pod",
        Duration::from_secs(5),
        || agent_saw(&agent, "upc").then_some(()),
    );
    drop(held);
    drop(agent);
    drop(pins);
}

/// A stale enrollment is retried: once its network namespace is back (here: a new one at the
/// same path), the pod is enrolled again without a restart.
#[test]
fn stale_enrollment_is_restored_when_its_netns_returns() {
    require_privileged();
    let Scenario {
        client: _client,
        server,
        node,
    } = Scenario::new(77, "rsc", "rss");
    let back = node.pod("rsb", 4);
    let cluster = Cluster::new("agentrs");
    let config = cluster.config(vec![workload(&server, "rs", "server")], vec![]);
    let admin = config.admin_socket.clone();
    let agent = RunningAgent::start(config);
    let resp = enroll(&admin, workload(&back, "rs", "client"));
    assert!(matches!(resp, Response::Ok { .. }), "{resp:?}");
    let pins = PinCleanup(agent.kill());
    run("ip", &["netns", "delete", &back.ns.name]);
    let mut config = cluster.config(vec![workload(&server, "rs", "server")], vec![]);
    config.bpffs = pins.0.clone();
    let agent = RunningAgent::start(config);
    assert_eq!(agent.agent.stale().len(), 1);
    run("ip", &["netns", "add", &back.ns.name]);
    back.ns.ip(&["link", "set", "lo", "up"]);
    wait_for("stale enrollment restored", Duration::from_secs(10), || {
        agent.agent.stale().is_empty().then_some(())
    });
    assert!(agent.agent.enrolled().contains(&"rsb".to_owned()));
    assert_eq!(reserved_ports(&back.netns_path()), "15001,15006");
    drop(agent);
    drop(pins);
}
