//! The eBPF programs load and act per cgroup: a connection made from inside an enrolled cgroup
//! is steered to the agent's listener with its original destination recorded, one made from
//! outside the cgroup (same netns, same destination) is not.

use std::{
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use interceptor::datapath::{Counter, Destination, PodSettings};
use interceptor::{datapath::Datapath, sys};
use interceptor_tests::{Cgroup, NetNs, accept_within, connect_from, require_privileged};

const POD_IP: &str = "10.77.0.2";
const SERVER: &str = "10.77.0.1:8080";
const AGENT_PORT: u16 = 15001;

struct Pod {
    ns: NetNs,
    server: TcpListener,
    agent: TcpListener,
    netns_cookie: u64,
}

/// A netns holding the "server" (the original destination) and the "agent" listener on
/// loopback, as the agent sets one up per pod.
fn pod() -> Pod {
    let ns = NetNs::new("icg");
    ns.ip(&["addr", "add", "10.77.0.1/32", "dev", "lo"]);
    ns.ip(&["addr", "add", &format!("{POD_IP}/32"), "dev", "lo"]);
    let server = ns.run(|| TcpListener::bind(SERVER));
    let agent = ns.run(|| TcpListener::bind(("127.0.0.1", AGENT_PORT)));
    let netns_cookie = sys::netns_cookie(std::os::fd::AsFd::as_fd(&agent)).expect("netns cookie");
    Pod {
        ns,
        server,
        agent,
        netns_cookie,
    }
}

fn enrolled_datapath(pod: &Pod, cgroup: &Cgroup) -> Datapath {
    let mut dp = Datapath::load(Default::default()).expect("load eBPF");
    dp.enroll_pod_netns(
        pod.netns_cookie,
        PodSettings {
            outbound_port: AGENT_PORT,
            ..Default::default()
        },
        &[POD_IP.parse().unwrap()],
    )
    .expect("pod config");
    dp.set_destination("10.77.0.1".parse().unwrap(), None, Destination::Steer)
        .expect("destination");
    dp.enroll_cgroup(&cgroup.path).expect("attach to cgroup");
    dp
}

#[test]
fn connect_inside_enrolled_cgroup_is_steered_outside_is_not() {
    require_privileged();
    let pod = pod();
    let cgroup = Cgroup::new("icg");
    let dp = enrolled_datapath(&pod, &cgroup);
    let dst: SocketAddr = SERVER.parse().unwrap();
    let before = dp.counters();

    // Inside: lands on the agent, the app still believes it talks to the server.
    let child = connect_from(Some(&cgroup.path), &pod.ns.path(), dst, b"hello");
    assert_eq!(
        child.peer,
        Ok(dst),
        "getpeername must show the original destination"
    );
    let (_conn, app_addr) =
        accept_within(&pod.agent, Duration::from_secs(5)).expect("agent listener got nothing");
    assert!(
        accept_within(&pod.server, Duration::from_millis(100)).is_none(),
        "steered connection reached the original destination"
    );
    assert_eq!(
        dp.original_destination(pod.netns_cookie, app_addr),
        Some(dst),
        "sockops did not record the original destination for {app_addr}"
    );
    drop(child);

    // Outside: same netns, same destination, not in the cgroup → untouched.
    let child = connect_from(None, &pod.ns.path(), dst, b"hello");
    assert_eq!(child.peer, Ok(dst));
    let (_conn, plain_addr) = accept_within(&pod.server, Duration::from_secs(5))
        .expect("unsteered connection did not reach the server");
    assert!(
        accept_within(&pod.agent, Duration::from_millis(100)).is_none(),
        "a process outside the cgroup was steered"
    );
    assert_eq!(dp.original_destination(pod.netns_cookie, plain_addr), None);
    drop(child);

    let after = dp.counters();
    assert_eq!(
        after.get(Counter::ConnectSteered) - before.get(Counter::ConnectSteered),
        1
    );
    assert_eq!(
        after.get(Counter::SockopsActiveEstablished)
            - before.get(Counter::SockopsActiveEstablished),
        1,
        "sockops must see exactly the enrolled connection"
    );
    assert_eq!(
        after.get(Counter::GetpeernameRewritten) - before.get(Counter::GetpeernameRewritten),
        1
    );
}

#[test]
fn loopback_and_own_pod_addresses_are_never_steered() {
    require_privileged();
    let pod = pod();
    let cgroup = Cgroup::new("icg");
    let mut dp = enrolled_datapath(&pod, &cgroup);
    // Even if the pod's own address were marked as a mesh destination, it is not steered.
    dp.set_destination(POD_IP.parse().unwrap(), None, Destination::Steer)
        .unwrap();
    let own = pod.ns.run(|| TcpListener::bind((POD_IP, 9090)));
    let child = connect_from(
        Some(&cgroup.path),
        &pod.ns.path(),
        format!("{POD_IP}:9090").parse().unwrap(),
        b"",
    );
    assert!(child.peer.is_ok(), "{:?}", child.peer);
    assert!(accept_within(&own, Duration::from_secs(5)).is_some());
    assert!(accept_within(&pod.agent, Duration::from_millis(100)).is_none());
    drop(child);

    let lo = pod.ns.run(|| TcpListener::bind("127.0.0.1:9091"));
    let child = connect_from(
        Some(&cgroup.path),
        &pod.ns.path(),
        "127.0.0.1:9091".parse().unwrap(),
        b"",
    );
    assert!(child.peer.is_ok());
    assert!(accept_within(&lo, Duration::from_secs(5)).is_some());
    assert!(accept_within(&pod.agent, Duration::from_millis(100)).is_none());
}

/// Polls the original-destination entries held for the pod until they are `want`.
fn held_becomes(dp: &Datapath, pod: &Pod, want: (usize, usize)) -> (usize, usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let held = dp.original_destinations_held(pod.netns_cookie);
        if held == want || std::time::Instant::now() > deadline {
            return held;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A steered connect that never establishes (nothing listens where it is steered) recorded
/// its original destination; the entry must go with the socket, not stay until the map fills.
#[test]
fn a_connect_that_never_establishes_frees_its_original_destination() {
    require_privileged();
    let pod = pod();
    let cgroup = Cgroup::new("icg");
    let mut dp = enrolled_datapath(&pod, &cgroup);
    // Steer to a port nothing listens on: every connect is refused.
    dp.enroll_pod_netns(
        pod.netns_cookie,
        PodSettings {
            outbound_port: 15099,
            ..Default::default()
        },
        &[POD_IP.parse().unwrap()],
    )
    .unwrap();
    let before = dp.counters();
    for _ in 0..20 {
        let child = connect_from(
            Some(&cgroup.path),
            &pod.ns.path(),
            SERVER.parse().unwrap(),
            b"",
        );
        assert_eq!(
            child.peer,
            Err(libc::ECONNREFUSED),
            "steered to a closed port"
        );
    }
    let steered = dp.counters().get(Counter::ConnectSteered) - before.get(Counter::ConnectSteered);
    assert_eq!(steered, 20, "every connect was steered (and so recorded)");
    assert_eq!(
        held_becomes(&dp, &pod, (0, 0)),
        (0, 0),
        "original destinations of released, never-established sockets are still held"
    );
}

/// Full map: the connect is refused (EPERM) and counted; it neither goes out unsteered nor
/// pushes out the entry of another open socket.
#[test]
fn a_full_original_destination_map_refuses_the_connect_and_keeps_live_entries() {
    require_privileged();
    let pod = pod();
    let cgroup = Cgroup::new("icg");
    let mut dp = enrolled_datapath(&pod, &cgroup);
    let dst: SocketAddr = SERVER.parse().unwrap();
    // One live, established, steered connection.
    let live = connect_from(Some(&cgroup.path), &pod.ns.path(), dst, b"");
    assert_eq!(live.peer, Ok(dst));
    let (_conn, live_addr) = accept_within(&pod.agent, Duration::from_secs(5)).expect("agent");
    // Then the map fills up, as a flood of open sockets would fill it.
    let filled = dp.occupy_original_destinations(
        pod.netns_cookie,
        interceptor_common::maps::MAX_PENDING_FLOWS as usize,
    );
    assert!(filled > 0 && filled < interceptor_common::maps::MAX_PENDING_FLOWS as usize);
    let before = dp.counters();
    let refused = connect_from(Some(&cgroup.path), &pod.ns.path(), dst, b"");
    assert_eq!(
        refused.peer,
        Err(libc::EPERM),
        "full map: the connect must fail"
    );
    assert!(
        accept_within(&pod.server, Duration::from_millis(200)).is_none(),
        "a connect that could not be recorded went out unsteered"
    );
    assert!(accept_within(&pod.agent, Duration::from_millis(100)).is_none());
    assert_eq!(
        dp.counters().get(Counter::ConnectRecordFailed) - before.get(Counter::ConnectRecordFailed),
        1
    );
    // The live connection keeps its destination, for the agent and for getpeername.
    assert_eq!(
        dp.original_destination(pod.netns_cookie, live_addr),
        Some(dst)
    );
    drop(refused);
    drop(live);
}

/// Unenrolling a pod frees the entries of its sockets that are still open: without its
/// programs attached, their release no longer runs anything.
#[test]
fn unenroll_frees_the_original_destinations_of_open_sockets() {
    require_privileged();
    let pod = pod();
    let cgroup = Cgroup::new("icg");
    let mut dp = enrolled_datapath(&pod, &cgroup);
    let dst: SocketAddr = SERVER.parse().unwrap();
    let held = connect_from(Some(&cgroup.path), &pod.ns.path(), dst, b"");
    assert_eq!(held.peer, Ok(dst));
    let _conn = accept_within(&pod.agent, Duration::from_secs(5)).expect("agent");
    assert_eq!(held_becomes(&dp, &pod, (1, 1)), (1, 1));
    dp.unenroll_cgroup(&cgroup.path);
    dp.unenroll_pod_netns(pod.netns_cookie, &[POD_IP.parse().unwrap()]);
    assert_eq!(dp.original_destinations_held(pod.netns_cookie), (0, 0));
    drop(held);
}
