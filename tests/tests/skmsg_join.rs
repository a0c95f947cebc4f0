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

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsFd as _,
    time::Duration,
};

use interceptor::datapath::LegJoins;
use interceptor_common::JoinGrant;
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
    let key = joins
        .join_msg(
            c.as_fd(),
            c.local_addr().expect("addr"),
            c.peer_addr().expect("addr"),
            b.as_fd(),
        )
        .expect("join");
    let grant = |relayed, granted| JoinGrant { relayed, granted };

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
