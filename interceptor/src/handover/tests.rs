use std::{
    io::Write as _,
    os::{fd::AsFd as _, unix::net::UnixStream},
};

use super::{channel::Channel, *};

fn workload(name: &str) -> Workload {
    Workload {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        service_account: "sa".to_owned(),
        labels: Default::default(),
        cgroup: "/sys/fs/cgroup/pod".into(),
        netns: "/run/netns/pod".into(),
        ips: vec!["10.0.0.1".parse().unwrap()],
    }
}

fn pod(name: &str) -> PodTransfer {
    PodTransfer {
        workload: workload(name),
        netns_cookie: 7,
        listeners: vec![
            ListenerSpec {
                role: ListenerRole::Outbound,
                ip: "127.0.0.1".parse().unwrap(),
                port: 15001,
            },
            ListenerSpec {
                role: ListenerRole::Inbound,
                ip: "127.0.0.1".parse().unwrap(),
                port: 15006,
            },
        ],
    }
}

fn flow() -> FlowTransfer {
    FlowTransfer {
        pod: "a".to_owned(),
        direction: Direction::Outbound,
        source: "10.0.0.1:40000".parse().unwrap(),
        destination: "10.0.0.2:80".parse().unwrap(),
        endpoint: None,
        peer_id: Some("spiffe://cluster.local/ns/b/sa/b".to_owned()),
        cipher: Some("TLS13_AES_128_GCM_SHA256".to_owned()),
        session: Some(SessionTransfer {
            suite: 0x1301,
            group: Some(0x11ec),
            retried: false,
            resumed: true,
        }),
        reason: Some("mode STRICT".to_owned()),
        check: CheckTransfer::Outbound {
            source: "10.0.0.1:40000".parse().unwrap(),
            destination: "10.0.0.2:80".parse().unwrap(),
            endpoint: "10.0.0.2:80".parse().unwrap(),
            client: "spiffe://cluster.local/ns/a/sa/a".to_owned(),
            server: "spiffe://cluster.local/ns/b/sa/b".to_owned(),
        },
        policy_generation: 4,
        relay: KtlsRelayState {
            up_in_pipe: 10,
            up_cap: 1 << 18,
            down_in_pipe: 0,
            down_cap: 1 << 18,
            app_eof: false,
            close_notify_sent: false,
            peer_write_shut: false,
            peer_fin_first: true,
            peer_closed: false,
            app_write_shut: false,
            to_app: vec![1, 2, 3],
            tx_seq_base: 2,
            tx_queued_base: Some(100),
            tx_plaintext: 5000,
            tx_since_check: 5000,
            tx_limit: Some(1 << 24),
            idle_for_ms: 3,
            bytes_app_to_peer: 5000,
            bytes_peer_to_app: 4000,
        },
    }
}

#[test]
fn a_flow_carries_six_descriptors_and_bounded_state() {
    let m = Message::Flow {
        flow: Box::new(flow()),
    };
    assert_eq!(m.fds(), FLOW_FDS);
    let frame = encode(&m).unwrap();
    assert_eq!(decode(&frame[4..], FLOW_FDS).unwrap(), m);
    assert!(matches!(
        decode(&frame[4..], 2),
        Err(ProtocolError::Descriptors {
            want: 6,
            got: 2,
            ..
        })
    ));
    // A flow's own checks run when it is admitted (one bad flow is reset, the takeover goes
    // on): its frame decodes.
    let bad = |f: fn(&mut FlowTransfer)| {
        let mut t = flow();
        f(&mut t);
        let body = serde_json::to_vec(&Message::Flow {
            flow: Box::new(t.clone()),
        })
        .unwrap();
        assert!(decode(&body, FLOW_FDS).is_ok());
        check_flow(&t).unwrap_err().to_string()
    };
    // More bytes in a pipe than its size is legal (a spliced buffer can hold more than a page).
    let mut big = flow();
    big.relay.up_in_pipe = big.relay.up_cap * 4;
    assert!(check_flow(&big).is_ok());
    assert!(bad(|t| t.relay.down_cap = 2 << 20).contains("1 MiB"));
    assert!(bad(|t| t.relay.to_app = vec![0; MAX_FLOW_PLAINTEXT + 1]).contains("plaintext"));
    assert!(bad(|t| t.direction = Direction::Inbound).contains("other direction"));
    assert!(bad(|t| t.pod.clear()).contains("no pod"));
}

#[test]
fn negotiation_picks_the_highest_common_version() {
    let v = |min, max| Versions { min, max };
    assert_eq!(v(1, 1).negotiate(v(1, 1)), Some(1));
    // N+1 talking to N (upgrade) and N to N+1 (rollback) both settle on N.
    assert_eq!(v(1, 2).negotiate(v(1, 1)), Some(1));
    assert_eq!(v(1, 1).negotiate(v(1, 2)), Some(1));
    assert_eq!(v(1, 2).negotiate(v(2, 3)), Some(2));
    // No overlap: no handover.
    assert_eq!(v(2, 2).negotiate(v(1, 1)), None);
    assert_eq!(v(1, 1).negotiate(v(3, 4)), None);
}

#[test]
fn version_override_parses_or_names_the_problem() {
    assert_eq!(Versions::parse("2").unwrap(), Versions { min: 2, max: 2 });
    assert_eq!(Versions::parse("1-3").unwrap(), Versions { min: 1, max: 3 });
    for bad in ["", "0", "3-1", "x", "1-", "-1"] {
        let e = Versions::parse(bad).unwrap_err().to_string();
        assert!(e.contains(VERSION_ENV), "{bad}: {e}");
    }
}

#[test]
fn every_message_round_trips() {
    let msgs = [
        Message::Hello {
            versions: Versions::BUILT_IN,
            agent: "x".to_owned(),
        },
        Message::Accept { version: 1 },
        Message::Refuse {
            reason: "r".to_owned(),
            versions: Versions::BUILT_IN,
        },
        Message::Pod { pod: pod("a") },
        Message::Sent {
            pods: 1,
            flows_kept: 3,
        },
        Message::Taken { pods: 1 },
        Message::Released { flows_kept: 3 },
        Message::Draining { flows: 2 },
        Message::Abort {
            reason: "r".to_owned(),
        },
    ];
    for m in msgs {
        let frame = encode(&m).unwrap();
        let len = body_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode(&frame[4..], m.fds()).unwrap(), m);
    }
}

#[test]
fn bad_frames_are_errors_naming_the_problem() {
    assert!(matches!(
        body_len((MAX_FRAME as u32 + 1).to_be_bytes()),
        Err(ProtocolError::TooLarge(_))
    ));
    assert!(body_len(u32::MAX.to_be_bytes()).is_err());
    assert!(body_len([0; 4]).is_err());
    assert!(matches!(decode(b"{", 0), Err(ProtocolError::Malformed(_))));
    assert!(matches!(
        decode(br#"{"type":"accept","version":1,"extra":2}"#, 0),
        Err(ProtocolError::Malformed(_))
    ));
    assert!(matches!(
        decode(br#"{"type":"launchMissiles"}"#, 0),
        Err(ProtocolError::Malformed(_))
    ));
    // Descriptors must match what the message announces, both ways.
    let body = serde_json::to_vec(&Message::Pod { pod: pod("a") }).unwrap();
    assert!(matches!(
        decode(&body, 1),
        Err(ProtocolError::Descriptors {
            want: 2,
            got: 1,
            ..
        })
    ));
    assert!(matches!(
        decode(br#"{"type":"accept","version":1}"#, 1),
        Err(ProtocolError::Descriptors {
            want: 0,
            got: 1,
            ..
        })
    ));
    // A pod without an inbound listener, or with relative paths, is refused.
    let mut p = pod("a");
    p.listeners.truncate(1);
    let body = serde_json::to_vec(&Message::Pod { pod: p }).unwrap();
    assert!(matches!(decode(&body, 1), Err(ProtocolError::Invalid(_))));
    let mut p = pod("a");
    p.workload.netns = "relative".into();
    let body = serde_json::to_vec(&Message::Pod { pod: p }).unwrap();
    assert!(matches!(decode(&body, 2), Err(ProtocolError::Invalid(_))));
    // A pod enrolled by netns (CNI) has no cgroup: accepted.
    let mut p = pod("a");
    p.workload.cgroup = "".into();
    let body = serde_json::to_vec(&Message::Pod { pod: p }).unwrap();
    assert!(decode(&body, 2).is_ok());
}

#[test]
fn descriptors_travel_with_their_message() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut tx = Channel::new(a).unwrap();
    let mut rx = Channel::new(b).unwrap();
    assert_eq!(rx.peer.pid, std::process::id() as i32);
    let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let m = Message::Pod { pod: pod("a") };
    tx.send(&m, &[l1.as_fd(), l2.as_fd()]).unwrap();
    tx.send(&Message::Taken { pods: 1 }, &[]).unwrap();
    let (got, fds) = rx.recv().unwrap();
    assert_eq!(got, m);
    assert_eq!(fds.len(), 2);
    let r1 = std::net::TcpListener::from(fds.into_iter().next().unwrap());
    assert_eq!(r1.local_addr().unwrap(), l1.local_addr().unwrap());
    assert!(crate::sys::is_listening(r1.as_fd()).unwrap());
    // A connection to the original listener can be accepted through the received one: the
    // same socket, one accept queue.
    let _c = std::net::TcpStream::connect(l1.local_addr().unwrap()).unwrap();
    r1.accept().unwrap();
    let (got, fds) = rx.expect("taken").unwrap();
    assert_eq!(got, Message::Taken { pods: 1 });
    assert!(fds.is_empty());
    // Sending a count that does not match the message is refused before anything is sent.
    assert!(tx.send(&m, &[l1.as_fd()]).is_err());
}

#[test]
fn a_bad_peer_ends_the_conversation_without_a_panic() {
    // Oversized length.
    let (mut a, b) = UnixStream::pair().unwrap();
    let mut rx = Channel::new(b).unwrap();
    a.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(rx.recv().unwrap_err().to_string().contains("bytes"));
    // Garbage body.
    let (mut a, b) = UnixStream::pair().unwrap();
    let mut rx = Channel::new(b).unwrap();
    a.write_all(&5u32.to_be_bytes()).unwrap();
    a.write_all(b"\xff\xfe{}x").unwrap();
    assert!(rx.recv().is_err());
    // Descriptors the message does not announce.
    let (a, b) = UnixStream::pair().unwrap();
    let mut rx = Channel::new(b).unwrap();
    let frame = encode(&Message::Accept { version: 1 }).unwrap();
    crate::sys::send_with_fds(a.as_fd(), &frame, &[a.as_fd()]).unwrap();
    assert!(rx.recv().is_err());
    // Half a frame, then the peer goes away.
    let (mut a, b) = UnixStream::pair().unwrap();
    let mut rx = Channel::new(b).unwrap();
    a.write_all(&100u32.to_be_bytes()).unwrap();
    a.write_all(b"{\"type\"").unwrap();
    drop(a);
    assert!(rx.recv().unwrap_err().to_string().contains("closed"));
    // The wrong message at a step, and an abort, are named.
    let (a, b) = UnixStream::pair().unwrap();
    let mut tx = Channel::new(a).unwrap();
    let mut rx = Channel::new(b).unwrap();
    tx.send(&Message::Accept { version: 1 }, &[]).unwrap();
    tx.send(
        &Message::Abort {
            reason: "no".to_owned(),
        },
        &[],
    )
    .unwrap();
    assert!(
        rx.expect("taken")
            .unwrap_err()
            .to_string()
            .contains("accept")
    );
    assert!(
        rx.expect("taken")
            .unwrap_err()
            .to_string()
            .contains("gave up: no")
    );
}
