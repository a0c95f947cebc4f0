//! The userspace (rustls) relay end to end: client app → client agent ══mTLS══ server agent →
//! server app, all on 127.0.0.1 in this process (`interceptor_tests::pair`).
//!
//! Runs on any host. The wire-oracle test needs root (a private network namespace and an
//! `AF_PACKET` capture) and fails, saying so, without it. `relay_ktls.rs` runs the same
//! scenarios with kernel TLS in the VM.
//!
//! The tests sit in a module named after the file, so their paths start with `relay_userspace::`:
//! that is what the libtest filter of `cargo xtask vm-test relay_userspace` matches.

mod relay_userspace {
    use std::{
        io,
        time::{Duration, Instant},
    };

    use interceptor::{
        handshake::{HandshakeError, PeerIdentityError, driver::DriveError},
        relay::RelayError,
    };
    use interceptor_tests::pair::{
        self, FlowError, Layer, Pair, PairOptions, ServerCa, Side, exchange, read_until_end,
    };
    use tokio::net::TcpStream;

    const MIB: u64 = 1 << 20;

    fn userspace() -> PairOptions {
        PairOptions::new(Layer::Userspace)
    }

    #[test]
    fn integrity_at_record_boundaries() {
        pair::run(async {
            let mut pair = Pair::start(userspace()).await;
            for size in [0, 1, 16383, 16384, 16385, MIB] {
                // Different lengths each way, so a swapped direction cannot pass.
                exchange(&mut pair, size, size / 2 + 3, 64 << 10).await;
            }
        });
    }

    /// 256 MiB each way on the host. `cargo xtask vm-test` runs this binary too, under QEMU's TCG
    /// emulation, where that would take minutes; there 16 MiB (the VM is about kTLS, which
    /// `relay_ktls.rs` covers with larger transfers).
    #[test]
    fn integrity_large_both_ways() {
        pair::run(async {
            let mut pair = Pair::start(userspace()).await;
            let size = if interceptor_tests::in_vm() { 16 } else { 256 } * MIB;
            let x = exchange(&mut pair, size, size, 256 << 10).await;
            let secs = x.elapsed.as_secs_f64();
            eprintln!(
                "userspace relay: {} MiB each way at once in {secs:.2} s: {:.0} MB/s per \
             direction, {:.0} MB/s both directions together (two agents in one process)",
                size >> 20,
                size as f64 / secs / 1e6,
                2.0 * size as f64 / secs / 1e6,
            );
        });
    }

    #[test]
    fn ten_thousand_small_writes() {
        pair::run(async {
            let mut pair = Pair::start(userspace()).await;
            // 10 000 writes of 7 bytes each way, Nagle off on both apps.
            exchange(&mut pair, 70_000, 70_000, 7).await;
        });
    }

    #[test]
    fn request_half_close_response() {
        pair::run(pair::request_half_close_response(userspace()));
    }

    #[test]
    fn two_hundred_concurrent_flows() {
        pair::run(pair::concurrent_flows(userspace(), 200));
    }

    #[test]
    fn server_speaks_first() {
        pair::run(pair::server_speaks_first(userspace()));
    }

    #[test]
    fn wrong_spiffe_id_is_refused_with_the_reason() {
        pair::run(async {
            let mut opts = userspace();
            opts.client_expects = "spiffe://cluster.local/ns/backend/sa/other".into();
            let mut pair = Pair::start(opts).await;
            pair::app_sees_reset(&pair, b"").await;
            let r = pair.report(Side::Client).await;
            match &r.result {
                Err(FlowError::Handshake(DriveError::Handshake(
                    e @ HandshakeError::PeerIdentity(id),
                ))) if matches!(**id, PeerIdentityError::UnexpectedIdentity { .. }) => {
                    assert_eq!(
                        e.to_string(),
                        "peer presented spiffe://cluster.local/ns/backend/sa/api, expected \
                     spiffe://cluster.local/ns/backend/sa/other"
                    );
                }
                other => panic!("client agent: {other:?}"),
            }
            let r = pair.report(Side::Server).await;
            assert!(
                matches!(
                    r.result,
                    Err(FlowError::Handshake(DriveError::Handshake(
                        HandshakeError::RefusedByPeer(_)
                    )))
                ),
                "server agent: {:?}",
                r.result
            );
        });
    }

    #[test]
    fn foreign_ca_is_refused_with_the_reason() {
        pair::run(async {
            let mut opts = userspace();
            opts.server_ca = ServerCa::Foreign;
            let mut pair = Pair::start(opts).await;
            pair::app_sees_reset(&pair, b"").await;
            let r = pair.report(Side::Client).await;
            match &r.result {
                Err(FlowError::Handshake(DriveError::Handshake(
                    e @ HandshakeError::UntrustedPeer(_),
                ))) => {
                    assert_eq!(e.to_string(), "certificate not signed by the mesh root");
                }
                other => panic!("client agent: {other:?}"),
            }
        });
    }

    #[test]
    fn fin_without_close_notify_resets_the_app() {
        pair::run(pair::fin_without_close_notify_resets_the_app(userspace()));
    }

    #[test]
    fn idle_flow_is_reset() {
        pair::run(async {
            let mut opts = userspace();
            opts.relay.idle_timeout = Duration::from_millis(300);
            let mut pair = Pair::start(opts).await;
            let t0 = Instant::now();
            let mut client = TcpStream::connect(pair.entry).await.unwrap();
            let _server = pair.accept_app().await;
            let (_, end) = read_until_end(&mut client).await;
            assert_eq!(
                end.expect_err("idle flow").kind(),
                io::ErrorKind::ConnectionReset
            );
            let waited = t0.elapsed();
            assert!(
                waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
                "{waited:?}"
            );
            // Both agents idle out; whichever fires first resets the other.
            let reports = [
                pair.report(Side::Client).await,
                pair.report(Side::Server).await,
            ];
            assert!(
                reports
                    .iter()
                    .any(|r| matches!(r.result, Err(FlowError::Relay(RelayError::IdleTimeout(_))))),
                "{reports:?}"
            );
        });
    }

    /// While the server app does not read, the client app's writes stall after a bounded amount;
    /// everything still arrives once it reads.
    #[test]
    fn slow_reader_back_pressure() {
        // More than all socket buffers on the path can hold (they autotune up to tcp_rmem/tcp_wmem
        // max: ~20 MiB were in flight at the stall on the development host).
        let total = if interceptor_tests::in_vm() { 64 } else { 256 } * MIB as usize;
        pair::run(pair::slow_reader_back_pressure(userspace(), total));
    }

    #[test]
    fn wire_oracle_no_plaintext_between_agents() {
        pair::private_netns();
        pair::run(pair::wire_oracle(userspace()));
    }
}
