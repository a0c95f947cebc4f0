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

/// A successor adopts the running agent's pinned maps (a handover): both agents' programs
/// steer with the same entries until the old one lets go. Then the successor removes the
/// destinations the predecessor steered and it would not steer itself (a peer dropped from
/// the config between the versions, the address of a pod it does not enroll), keeps its own,
/// and keeps what a stale enrollment (kept fail-closed on the predecessor's pinned programs)
/// still needs. Entries keyed by a pod's netns stay: a pod it does not know keeps failing
/// closed rather than leaving unsteered.
#[test]
fn adopted_maps_keep_only_the_destinations_the_successor_steers() {
    require_privileged();
    let pin_dir = interceptor_tests::pin_dir("adopt");
    let _pins = interceptor_tests::agent::PinCleanup(pin_dir.clone());
    let load = |adopt_maps| {
        Datapath::load(interceptor::datapath::DatapathOptions {
            pin_dir: Some(pin_dir.clone()),
            adopt_maps,
        })
        .expect("load eBPF")
    };
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    let (kept_peer, dropped_peer) = (ip("10.78.1.1"), ip("10.78.1.2"));
    let (pod_ip, gone_ip, stale_ip) = (ip(POD_IP), ip("10.78.2.2"), ip("10.78.3.3"));
    let (pod, gone, stale) = (netns("ada"), 0xdead_0001_u64, 0xdead_0002_u64);
    let settings = |slot| PodSettings {
        outbound_port: AGENT_PORT,
        inbound_slot: slot,
        steer_inbound: true,
        ..Default::default()
    };
    let listener = || pod.ns.run(|| TcpListener::bind(("127.0.0.1", 0)));
    let (l0, l1, l2) = (listener(), listener(), listener());

    // The old agent: two peers, the pod it hands over, a pod the successor will not enroll,
    // and a stale one, each with its own inbound slot.
    let mut old = load(false);
    for (dest, _) in [(kept_peer, 0), (dropped_peer, 0)] {
        old.set_destination(dest, None, Destination::Steer).unwrap();
    }
    for (cookie, addr, slot, l) in [
        (pod.cookie, pod_ip, 0, &l0),
        (gone, gone_ip, 1, &l1),
        (stale, stale_ip, 2, &l2),
    ] {
        old.enroll_pod_netns(cookie, settings(slot), &[addr])
            .unwrap();
        old.steer_inbound(slot, l, None, &[addr]).unwrap();
        old.set_destination(addr, None, Destination::Steer).unwrap();
    }

    // The successor writes what its own configuration says: one peer, the handed-over pod.
    let mut new = load(true);
    assert!(
        new.steers(dropped_peer, None) && new.has_pod(gone),
        "the successor does not see the maps it adopted"
    );
    // Slots: the handed-over pod keeps its own, and the others' are known to be taken.
    let (own, mut others) = new.slots_in_maps(Some(pod.cookie));
    others.sort_unstable();
    assert_eq!((own, others), (Some(0), vec![1, 2]));
    new.set_destination(kept_peer, None, Destination::Steer)
        .unwrap();
    new.enroll_pod_netns(pod.cookie, settings(0), &[pod_ip])
        .unwrap();
    new.steer_inbound(0, &l0, None, &[pod_ip]).unwrap();
    new.set_destination(pod_ip, None, Destination::Steer)
        .unwrap();
    // Nothing is removed before the predecessor let go: its entries are still its own.
    assert_eq!(occupancy(&new, maps::POD_CONFIG), 3);
    assert_eq!(occupancy(&new, maps::DEST_POLICY), 5);

    let removed = new.refresh_adopted(&interceptor::datapath::KeepSteering {
        ips: vec![stale_ip],
    });
    assert_eq!(
        removed,
        [(maps::DEST_POLICY, 2)],
        "the dropped peer and the unenrolled pod's address"
    );

    // What the successor wrote stays; so does what the stale pod needs.
    assert!(new.steers(kept_peer, None) && new.steers(pod_ip, None));
    assert!(!new.steers(dropped_peer, None) && !new.steers(gone_ip, None));
    assert!(new.steers(stale_ip, None), "the stale pod's address");
    // Pods it does not enroll keep their netns entries (fail closed), and their slots.
    assert!(new.has_pod(pod.cookie) && new.has_pod(stale) && new.has_pod(gone));
    assert_eq!(
        (new.pod_slot(stale), new.pod_slot(gone)),
        (Some(2), Some(1))
    );
    assert_eq!(occupancy(&new, maps::POD_ADDRS), 3);
    assert_eq!(occupancy(&new, maps::INBOUND_SLOTS), 3);
    // The old agent's programs read the same maps: they see the refresh too.
    assert!(!old.steers(dropped_peer, None));

    // Only once: from here on the successor's own unenrollments keep the maps exact.
    assert!(
        new.refresh_adopted(&Default::default())
            .iter()
            .all(|(_, n)| *n == 0)
    );
    assert!(
        new.steers(stale_ip, None),
        "a second refresh removed the stale pod's address"
    );
    // Fresh maps (no adoption) are never refreshed.
    assert!(load(false).refresh_adopted(&Default::default()).is_empty());
    drop(old);
}

/// How a handover moves the programs: the successor attaches its own links beside the running
/// agent's (cgroup links always stack) and pins them over the old pins; the old agent's links
/// detach when it drops them. No connect may escape at any point of that: before, while both
/// are attached, and after, every connect from an enrolled pod is steered exactly once (never
/// twice: the second program sees a loopback destination), reaches the agent's listener,
/// never the server, and is recorded in the shared maps where either agent finds it. A loop
/// of connects runs through both transitions, and the programs attached are counted at each
/// step (a connect to a destination nothing steers is seen once by each).
#[test]
fn stacked_links_in_a_handover_steer_every_connect_exactly_once() {
    require_privileged();
    let parent = Cgroup::new("ics");
    let child_path = parent.path.join("pod");
    std::fs::create_dir(&child_path).expect("child cgroup");
    let child = Cgroup { path: child_path };
    let pod = netns("icsa");
    let dst: SocketAddr = SERVER.parse().unwrap();
    let pin_dir = interceptor_tests::pin_dir("stack");
    let _pins = interceptor_tests::agent::PinCleanup(pin_dir.clone());
    let load = |adopt_maps| {
        let mut dp = Datapath::load(interceptor::datapath::DatapathOptions {
            pin_dir: Some(pin_dir.clone()),
            adopt_maps,
        })
        .expect("load eBPF");
        dp.enroll_pod_netns(
            pod.cookie,
            PodSettings {
                outbound_port: AGENT_PORT,
                ..Default::default()
            },
            &[POD_IP.parse().unwrap()],
        )
        .expect("pod config");
        dp.set_destination("10.78.0.1".parse().unwrap(), None, Destination::Steer)
            .expect("destination");
        dp.enroll_cgroup(&parent.path).expect("attach");
        dp
    };
    // Programs attached: a connect to the pod's own address is seen by each, steered by none.
    let attached = |dp: &Datapath| {
        let before = dp.counters().get(Counter::ConnectSeen);
        let own: SocketAddr = format!("{POD_IP}:9").parse().unwrap();
        drop(connect_from(Some(&child.path), &pod.ns.path(), own, b""));
        dp.counters().get(Counter::ConnectSeen) - before
    };
    // One connect: steered once, to the agent, recorded, invisible to the app.
    let steered_once = |dp: &Datapath, what: &str| {
        let before = dp.counters().get(Counter::ConnectSteered);
        let app = connect_from(Some(&child.path), &pod.ns.path(), dst, b"hi");
        assert_eq!(app.peer, Ok(dst), "{what}: getpeername");
        let (_conn, at) = accept_within(&pod.agent, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{what}: the agent got nothing"));
        assert_eq!(dp.original_destination(pod.cookie, at), Some(dst), "{what}");
        assert!(
            accept_within(&pod.server, Duration::from_millis(50)).is_none(),
            "{what}: a connect reached the server directly"
        );
        assert_eq!(
            dp.counters().get(Counter::ConnectSteered) - before,
            1,
            "{what}: steered more or less than once"
        );
    };
    // Connects in a loop while `step` runs; every one must reach the agent. The agent's
    // listener is drained while the loop runs: a slow `step` (loading programs under load)
    // lets the loop outrun a backlog of 128, and a connect beyond it waits for SYN retries.
    let through = |step: &mut dyn FnMut(), what: &str| {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let (stop, looping) = (AtomicBool::new(false), AtomicBool::new(true));
        let (child, ns) = (&child.path, pod.ns.path());
        let (n, at_agent) = std::thread::scope(|s| {
            let looped = s.spawn(|| {
                let mut n = 0usize;
                while n < 20 || !stop.load(Relaxed) {
                    let app = connect_from(Some(child), &ns, dst, b"x");
                    assert_eq!(app.peer, Ok(dst), "a connect failed or escaped");
                    n += 1;
                }
                looping.store(false, Relaxed);
                n
            });
            let drained = s.spawn(|| {
                // Held, not dropped: closing one with its byte unread resets it, and the
                // child's getpeername would fail. Each connect is queued before its child
                // reports, so once the loop is done one empty wait means all have been taken.
                let mut at_agent = Vec::new();
                loop {
                    let done = !looping.load(Relaxed);
                    match accept_within(&pod.agent, Duration::from_millis(200)) {
                        Some(c) => at_agent.push(c),
                        None if done => return at_agent.len(),
                        None => {}
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(50));
            step();
            stop.store(true, Relaxed);
            let n = looped.join().unwrap_or_else(|_| {
                looping.store(false, Relaxed);
                panic!("{what}: connect loop")
            });
            (n, drained.join().expect("drain"))
        });
        assert_eq!(at_agent, n, "{what}: connects that did not reach the agent");
        assert!(
            accept_within(&pod.server, Duration::from_millis(50)).is_none(),
            "{what}: a connect escaped to the server"
        );
        eprintln!("{what}: {n} connects, all steered");
    };

    let old = load(false);
    assert_eq!(attached(&old), 1);
    steered_once(&old, "old agent alone");
    let mut new = None;
    through(&mut || new = Some(load(true)), "successor attaching");
    let mut new = new.expect("successor");
    assert_eq!(
        attached(&new),
        2,
        "the successor's links stack on the old ones"
    );
    steered_once(&new, "both attached");
    let mut old = Some(old);
    through(
        &mut || {
            if let Some(mut dp) = old.take() {
                dp.release_links();
            }
        },
        "old agent letting go",
    );
    assert_eq!(attached(&new), 1, "the old agent's links outlived it");
    steered_once(&new, "successor alone");
    new.release_links();
}
