//! Netns-keyed enrollment (the CNI mode): the outbound programs are attached once, at a parent
//! cgroup, and act only on sockets of a netns that has a `PodConfig`. A process under that
//! parent in an enrolled netns is steered; the same process in a netns that is not enrolled
//! sees no change at all (destination, getpeername, maps, counters); and the agent's own
//! marked socket in an enrolled netns is never steered back to the agent.

use std::{
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use interceptor::{
    datapath::{Datapath, Destination, PodSettings},
    sys,
};
use interceptor_common::{AGENT_SOCKET_MARK, Counter, maps};
use interceptor_tests::{
    Cgroup, NetNs, accept_within, connect_from, connect_from_marked, require_privileged,
};

const SERVER: &str = "10.78.0.1:8080";
const POD_IP: &str = "10.78.0.2";
const AGENT_PORT: u16 = 15001;

struct Ns {
    ns: NetNs,
    server: TcpListener,
    agent: TcpListener,
    cookie: u64,
}

fn netns(tag: &str) -> Ns {
    let ns = NetNs::new(tag);
    ns.ip(&["addr", "add", "10.78.0.1/32", "dev", "lo"]);
    ns.ip(&["addr", "add", &format!("{POD_IP}/32"), "dev", "lo"]);
    let server = ns.run(|| TcpListener::bind(SERVER));
    let agent = ns.run(|| TcpListener::bind(("127.0.0.1", AGENT_PORT)));
    let cookie = sys::netns_cookie(std::os::fd::AsFd::as_fd(&agent)).expect("netns cookie");
    Ns {
        ns,
        server,
        agent,
        cookie,
    }
}

fn occupancy(dp: &Datapath, name: &str) -> usize {
    dp.occupancy()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| c)
        .expect("map")
}

#[test]
fn programs_at_a_parent_cgroup_act_only_on_enrolled_netns() {
    require_privileged();
    let parent = Cgroup::new("icn");
    let child_path = parent.path.join("pod");
    std::fs::create_dir(&child_path).expect("child cgroup");
    // Dropped before `parent` (reverse declaration order), so the parent can be removed.
    let child = Cgroup { path: child_path };
    let enrolled = netns("icna");
    let outside = netns("icnb");
    let dst: SocketAddr = SERVER.parse().unwrap();

    let mut dp = Datapath::load(Default::default()).expect("load eBPF");
    dp.enroll_pod_netns(
        enrolled.cookie,
        PodSettings {
            outbound_port: AGENT_PORT,
            inbound_port: 0,
            inbound_slot: 0,
            steer_inbound: false,
            local_leg_skmsg: false,
            join_skmsg: false,
        },
        &[POD_IP.parse().unwrap()],
    )
    .expect("pod config");
    dp.set_destination("10.78.0.1".parse().unwrap(), None, Destination::Steer)
        .expect("destination");
    // Once, at the parent: the pod's own cgroup (created by the runtime later) inherits it.
    dp.enroll_cgroup(&parent.path)
        .expect("attach to the parent");

    // Enrolled netns, a process in a cgroup below the parent: steered, redirect invisible.
    let before = dp.counters();
    let app = connect_from(Some(&child.path), &enrolled.ns.path(), dst, b"hi");
    assert_eq!(
        app.peer,
        Ok(dst),
        "getpeername must show the original destination"
    );
    let (_conn, app_addr) =
        accept_within(&enrolled.agent, Duration::from_secs(5)).expect("agent got nothing");
    assert!(accept_within(&enrolled.server, Duration::from_millis(100)).is_none());
    assert_eq!(
        dp.original_destination(enrolled.cookie, app_addr),
        Some(dst)
    );
    let after = dp.counters();
    for c in [
        Counter::ConnectSeen,
        Counter::ConnectSteered,
        Counter::SockopsActiveEstablished,
        Counter::SockopsRekeyed,
        Counter::GetpeernameRewritten,
    ] {
        assert_eq!(after.get(c) - before.get(c), 1, "{c:?}");
    }
    drop(app);

    // The agent's own socket in the enrolled netns (marked): not steered, reaches the server.
    let before = dp.counters();
    let dial = connect_from_marked(
        Some(&child.path),
        &enrolled.ns.path(),
        dst,
        b"",
        AGENT_SOCKET_MARK,
    );
    assert_eq!(dial.peer, Ok(dst));
    assert!(
        accept_within(&enrolled.server, Duration::from_secs(5)).is_some(),
        "the agent's marked dial did not reach its destination"
    );
    assert!(accept_within(&enrolled.agent, Duration::from_millis(100)).is_none());
    assert_eq!(
        dp.counters().get(Counter::ConnectSteered),
        before.get(Counter::ConnectSteered)
    );
    drop(dial);

    // Same cgroup, same destination, a netns that is not enrolled: nothing changes, and
    // nothing is counted or recorded. Several connections, so a leak would show.
    let held_before = (
        occupancy(&dp, maps::ORIG_DST_BY_COOKIE),
        occupancy(&dp, maps::ORIG_DST_BY_FLOW),
    );
    let before = dp.counters();
    for _ in 0..5 {
        let plain = connect_from(Some(&child.path), &outside.ns.path(), dst, b"hi");
        assert_eq!(plain.peer, Ok(dst));
        let (_c, addr) = accept_within(&outside.server, Duration::from_secs(5))
            .expect("unenrolled netns did not reach its server");
        assert!(accept_within(&outside.agent, Duration::from_millis(50)).is_none());
        assert_eq!(dp.original_destination(outside.cookie, addr), None);
        drop(plain);
    }
    let after = dp.counters();
    assert_eq!(after, before, "an unenrolled netns moved a counter");
    assert_eq!(
        (
            occupancy(&dp, maps::ORIG_DST_BY_COOKIE),
            occupancy(&dp, maps::ORIG_DST_BY_FLOW)
        ),
        held_before
    );
    assert_eq!(dp.original_destinations_held(outside.cookie), (0, 0));

    // Unenrolling the netns turns the same pod's next connect into a plain one, with the
    // parent attachment still in place.
    dp.unenroll_pod_netns(enrolled.cookie, &[POD_IP.parse().unwrap()]);
    let app = connect_from(Some(&child.path), &enrolled.ns.path(), dst, b"hi");
    assert_eq!(app.peer, Ok(dst));
    assert!(accept_within(&enrolled.server, Duration::from_secs(5)).is_some());
    assert_eq!(occupancy(&dp, maps::POD_CONFIG), 0);
    assert_eq!(occupancy(&dp, maps::POD_ADDRS), 0);
}
