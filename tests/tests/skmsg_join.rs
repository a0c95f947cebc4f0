//! The sk_msg leg join's rules (`tuning.sameNodeJoin: skMsg`), checked against the running
//! kernel without an agent: the agent's join program on two real loopback legs in this
//! process (an app socket `c` connected to the agent's `a`; the agent's `b` connected to a
//! server socket `s`), with the grants set by hand where the agent's relay would set them.
//! Runs on the host and in both VM kernels: the kernel's sk_msg redirect path changed between
//! them (6.1 sends pages, 6.12 `MSG_SPLICE_PAGES`).
//!
//! * Order: while bytes that took TCP to `a` are not yet relayed (`passed != relayed`), a
//!   later message must take TCP too, even with room granted; once relayed, the next one is
//!   redirected and arrives behind them.
//! * Room: a message larger than the grant's room takes TCP.
//! * The userspace relay's app leg (`tuning.relayAppLeg: skMsg`, `JOIN_INGRESS`): a message
//!   lands in the agent's own end only while the one before it did, or once the agent has
//!   read everything sent; beyond the granted window it takes TCP; the agent reads it all in
//!   order, FIN last.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsFd as _,
    time::Duration,
};

use interceptor::datapath::LegJoins;
use interceptor_common::{JOIN_EGRESS, JOIN_INGRESS, JoinGrant, LegKey};
use interceptor_tests::require_privileged;

fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let c = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (a, _) = listener.accept().expect("accept");
    for s in [&c, &a] {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
    }
    (c, a)
}

/// Joins the app socket `c` to `to` (the leg its messages are redirected to).
fn join(joins: &mut LegJoins, c: &TcpStream, to: &TcpStream) -> LegKey {
    joins
        .join_msg(
            c.as_fd(),
            c.local_addr().expect("addr"),
            c.peer_addr().expect("addr"),
            to.as_fd(),
        )
        .expect("join")
}

/// Whatever `s` holds now (reads until a 300 ms silence).
fn drain(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return out;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn sk_msg_join_redirects_only_behind_relayed_bytes_and_within_room() {
    require_privileged();
    let mut joins = LegJoins::load().expect("load the join program");
    let agent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (mut c, mut a) = pair(&agent);
    let (mut b, mut s) = pair(&server);
    let key = join(&mut joins, &c, &b);
    let grant = |relayed, granted| JoinGrant {
        relayed,
        granted,
        kind: JOIN_EGRESS,
    };

    // The agent has not relayed up to here: TCP, counted as passed.
    joins
        .set_grant(key, grant(u64::MAX, u64::MAX))
        .expect("grant");
    c.write_all(b"first-").expect("send");
    // Room, but 6 bytes passed and none relayed: must still take TCP.
    joins.set_grant(key, grant(0, u64::MAX)).expect("grant");
    c.write_all(b"second-").expect("send");
    assert_eq!(
        drain(&mut s),
        b"",
        "a message overtook bytes not yet relayed"
    );
    let sent = joins.sent(key).expect("counted");
    assert_eq!((sent.passed, sent.redirected), (13, 0), "{sent:?}");

    // The relay's part: what took TCP goes on, then the grant says so.
    let early = drain(&mut a);
    assert_eq!(early, b"first-second-");
    b.write_all(&early).expect("relay");
    joins.set_grant(key, grant(13, 1 << 20)).expect("grant");
    c.write_all(b"third-").expect("send");
    assert_eq!(drain(&mut a), b"", "a relayed-up-to-date message took TCP");
    assert_eq!(drain(&mut s), b"first-second-third-", "order at the switch");

    // No room for this one: TCP again, then behind it nothing is redirected until relayed.
    let sent = joins.sent(key).expect("counted");
    assert_eq!((sent.passed, sent.redirected), (13, 6), "{sent:?}");
    joins
        .set_grant(key, grant(13, sent.redirected + 4))
        .expect("grant");
    c.write_all(b"fourth-").expect("send");
    joins.set_grant(key, grant(13, u64::MAX)).expect("grant");
    c.write_all(b"fifth-").expect("send");
    assert_eq!(drain(&mut s), b"", "a full leg must not be written to");
    let rest = drain(&mut a);
    assert_eq!(rest, b"fourth-fifth-");
    b.write_all(&rest).expect("relay");
    joins.set_grant(key, grant(26, u64::MAX)).expect("grant");
    c.write_all(b"sixth").expect("send");
    assert_eq!(drain(&mut s), b"fourth-fifth-sixth");
    let sent = joins.sent(key).expect("counted");
    assert_eq!((sent.passed, sent.redirected), (26, 11), "{sent:?}");

    // The app's FIN still travels its own leg, behind everything.
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(drain(&mut a), b"", "FIN at the agent's leg");
}

#[test]
fn sk_msg_app_leg_redirects_into_the_agents_end_in_order_and_within_the_window() {
    require_privileged();
    let mut joins = LegJoins::load().expect("load the join program");
    let agent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (mut c, mut a) = pair(&agent);
    // The app socket's messages go into `a`, its own peer: the agent's end.
    let key = join(&mut joins, &c, &a);
    let grant = |relayed, granted| JoinGrant {
        relayed,
        granted,
        kind: JOIN_INGRESS,
    };
    let counted = |joins: &LegJoins| {
        let s = joins.sent(key).expect("counted");
        (s.passed, s.redirected, s.redirecting)
    };

    // No window yet (the agent armed nothing beyond what it read): TCP.
    joins.set_grant(key, grant(0, 0)).expect("grant");
    c.write_all(b"first-").expect("send");
    // A window, but 6 bytes that took TCP are not known to be read: TCP again.
    joins.set_grant(key, grant(0, 1 << 20)).expect("grant");
    c.write_all(b"second-").expect("send");
    assert_eq!(
        counted(&joins),
        (13, 0, 0),
        "redirected behind unread TCP bytes"
    );
    assert_eq!(drain(&mut a), b"first-second-");

    // The agent published that it read all 13: redirected from here on, and the next one too
    // although the published count is behind it (the one before it was redirected).
    joins
        .set_grant(key, grant(13, 13 + (1 << 20)))
        .expect("grant");
    c.write_all(b"third-").expect("send");
    c.write_all(b"fourth-").expect("send");
    assert_eq!(counted(&joins), (13, 13, 1));

    // Beyond the window: TCP, queued behind the two redirected messages the agent has not
    // read yet, and from then on TCP until the agent has read everything.
    joins.set_grant(key, grant(13, 13 + 13 + 4)).expect("grant");
    c.write_all(b"fifth-").expect("send");
    joins.set_grant(key, grant(13, u64::MAX)).expect("grant");
    c.write_all(b"sixth-").expect("send");
    assert_eq!(counted(&joins), (25, 13, 0));
    assert_eq!(
        drain(&mut a),
        b"third-fourth-fifth-sixth-",
        "order across the redirected and the TCP queue"
    );
    joins.set_grant(key, grant(38, u64::MAX)).expect("grant");
    c.write_all(b"seventh").expect("send");
    assert_eq!(counted(&joins), (25, 20, 1));

    // The FIN travels TCP behind the redirected bytes: the agent reads them, then EOF.
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).expect("read to EOF");
    assert_eq!(rest, b"seventh");
}

/// The agent's end closes (the agent went away): the kernel drops it from the socket map,
/// the program finds nowhere to redirect and sends by TCP, to a closed socket: the app's
/// connection fails rather than its bytes vanishing into a queue no one reads.
#[test]
fn sk_msg_app_leg_without_the_agents_end_fails_the_apps_connection() {
    require_privileged();
    let mut joins = LegJoins::load().expect("load the join program");
    let agent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (mut c, a) = pair(&agent);
    let key = join(&mut joins, &c, &a);
    let grant = JoinGrant {
        relayed: 0,
        granted: u64::MAX,
        kind: JOIN_INGRESS,
    };
    joins.set_grant(key, grant).expect("grant");
    drop(a);
    drop(agent);
    // The first send may still be taken by the kernel (TCP answers it with a reset); what
    // follows fails, and nothing was redirected.
    let _ = c.write_all(b"to nobody");
    std::thread::sleep(Duration::from_millis(50));
    let failed = c.write_all(b"to nobody again").is_err() || {
        let mut buf = [0u8; 16];
        match c.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    assert!(failed, "the app's connection outlived the agent's end");
    let sent = joins.sent(key);
    assert!(
        sent.is_none_or(|s| s.redirected == 0),
        "redirected into a closed socket: {sent:?}"
    );
}
