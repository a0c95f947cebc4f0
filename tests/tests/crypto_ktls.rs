//! Kernel TLS takes over sessions negotiated with the hybrid post-quantum group, with both
//! AES-GCM key sizes (VM only: the host kernel has no `tls` module). The group only shapes the
//! handshake secret; this proves the keys the kernel gets still decrypt the peer's records,
//! on each supported kernel.

use std::net::SocketAddr;

use interceptor::{
    handshake::{CompliancePolicy, CryptoPolicy, MeshCrypto},
    intercept::table::Protection,
};
use interceptor_tests::{
    agent::{RunningAgent, workload},
    apps::{curl, sha256_hex},
    crypto::{
        AES_128_GCM, AES_256_GCM, MeshSession, PEER_ID, X25519MLKEM768, any_port, assert_hello,
        assert_ktls_moved_bytes, captured, hellos, peer_client_resuming, reconfigure, tls_stat,
    },
    require_privileged,
    scenario::{Cluster, Scenario, serve_blob},
    wire::assert_no_plaintext,
};

#[test]
fn ktls_carries_hybrid_group_sessions_with_aes_128_and_aes_256() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(72, "pqk-client", "pqk-server");
    let www = serve_blob(&mut server, "pqk-www", 1 << 20);
    let cluster = Cluster::new("crypto-ktls");
    let mut config = cluster.config(
        vec![
            workload(&client, "crypto", "client"),
            workload(&server, "crypto", "server"),
        ],
        vec![],
    );
    // The VM emulates its CPU; a hybrid ClientHello must not be mistaken for a silent client.
    config.tuning.first_byte_wait_ms = 2_000;
    let file = cluster.scratch.0.join("node.yaml");
    let agent = RunningAgent::start_watching(config.clone(), &file);
    let server_http = SocketAddr::from((server.ip, 80));

    for (aes256, suite) in [(false, AES_128_GCM), (true, AES_256_GCM)] {
        if aes256 {
            let policy = CryptoPolicy {
                compliance_policy: CompliancePolicy::Default,
                require_aes256_gcm: true,
            };
            reconfigure(&agent.agent, &file, &mut config, policy);
        }
        let before = [tls_stat(&client), tls_stat(&server)];
        let (f, streams) = captured(&node, &server, || {
            curl(
                client.command("curl"),
                &format!("http://{}/blob", server.ip),
            )
        });
        assert_eq!(
            (f.code.as_str(), f.sha256()),
            ("200", www.want.clone()),
            "suite {suite:#06x}: payload through kTLS"
        );
        let (_, sh) = hellos(&streams, any_port(client.ip), server_http);
        assert_hello(&sh, X25519MLKEM768, suite, None);
        assert_no_plaintext(&streams, &www.payload);
        // Kernel state: both agents' peer sockets became kTLS sessions and decrypted cleanly.
        for (pod, before) in [&client, &server].into_iter().zip(before) {
            assert_ktls_moved_bytes(pod, &before, &format!("suite {suite:#06x}"));
        }
        let row = agent
            .agent
            .flows_with_recent()
            .into_iter()
            .filter(|r| r.pod == "pqk-server")
            .max_by_key(|r| r.id)
            .expect("the server's flow");
        assert_eq!(row.protection, Protection::Ktls);
        assert_eq!(row.group.as_deref(), Some("X25519MLKEM768"));
    }
}

/// A resumed session (no certificates in its handshake, keys from the ticket's secret and a
/// fresh key exchange) goes to the kernel like a full one: the server agent extracts its keys
/// after sending the next ticket under them, so the kernel's record sequence starts past it.
/// The client is first the test's own rustls, which keeps tickets as a userspace client agent
/// does, then an enrolled pod whose agent is a kTLS client: the ticket reaches that agent as a
/// kTLS control record after the hand-off, and its second connection resumes with it.
#[test]
fn ktls_takes_over_resumed_sessions() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(96, "rsk-client", "rsk-server");
    let stranger = node.pod("rsk-peer", 4);
    let www = serve_blob(&mut server, "rsk-www", 256 << 10);
    let cluster = Cluster::new("resume-ktls");
    let mut config = cluster.config(
        vec![
            workload(&server, "crypto", "server"),
            workload(&client, "crypto", "client"),
        ],
        vec![],
    );
    config.tuning.first_byte_wait_ms = 2_000;
    // Resumed handshakes on the wire: derived keys (the default) would skip them.
    config.tuning.connection_keys = interceptor::config::ConnectionKeysMode::Handshake;
    let agent = RunningAgent::start(config);
    let server_http = SocketAddr::from((server.ip, 80));
    let own_client = peer_client_resuming(
        &cluster.ca,
        &MeshCrypto::default_aes_gcm(),
        "spiffe://cluster.local/ns/crypto/sa/server",
    );
    for (round, resumed) in [(0, false), (1, true)] {
        let before = tls_stat(&server);
        let (got, streams) = captured(&node, &server, || {
            let session =
                MeshSession::open(&stranger, server_http, std::sync::Arc::clone(&own_client))?;
            let (local, resumed) = (session.local, session.negotiated.resumed);
            session.get("/blob").map(|body| (local, resumed, body))
        });
        let (local, was_resumed, body) = got.unwrap_or_else(|e| panic!("connection {round}: {e}"));
        assert_eq!(was_resumed, resumed, "connection {round}");
        assert_eq!(sha256_hex(&body), www.want, "connection {round}: payload");
        let (ch, sh) = hellos(&streams, local, server_http);
        let sh = sh.expect("ServerHello");
        assert_eq!(
            (ch.psk_identities, sh.psk_identity),
            if resumed { (1, Some(0)) } else { (0, None) },
            "connection {round} on the wire"
        );
        assert_no_plaintext(&streams, &www.payload);
        assert_ktls_moved_bytes(&server, &before, &format!("connection {round}"));
        let row = agent
            .agent
            .flows_with_recent()
            .into_iter()
            .filter(|r| r.pod == "rsk-server" && r.peer_id.as_deref() == Some(PEER_ID))
            .max_by_key(|r| r.id)
            .expect("the server's flow");
        assert_eq!(
            (row.protection, row.resumed),
            (Protection::Ktls, Some(resumed)),
            "connection {round}"
        );
    }
    // A kTLS client agent: the first connection's ticket arrives after the hand-off, as a
    // control record on the kernel socket; the second connection offers and uses it.
    let client_id = "spiffe://cluster.local/ns/crypto/sa/client";
    for (round, resumed) in [(2, false), (3, true)] {
        let before = [tls_stat(&client), tls_stat(&server)];
        let fast_open_before = server.ns.tcp_ext("TCPFastOpenPassive");
        let (f, streams) = captured(&node, &server, || {
            curl(
                client.command("curl"),
                &format!("http://{}/blob", server.ip),
            )
        });
        assert_eq!(
            (f.code.as_str(), f.sha256()),
            ("200", www.want.clone()),
            "connection {round}: payload through kTLS"
        );
        let (ch, sh) = hellos(&streams, any_port(client.ip), server_http);
        let sh = sh.expect("ServerHello");
        assert_eq!(
            (ch.psk_identities, sh.psk_identity),
            if resumed { (1, Some(0)) } else { (0, None) },
            "connection {round} on the wire: the kTLS client offers its ticket"
        );
        assert_no_plaintext(&streams, &www.payload);
        for (pod, before) in [&client, &server].into_iter().zip(before) {
            assert_ktls_moved_bytes(pod, &before, &format!("connection {round}"));
        }
        let rows = agent.agent.flows_with_recent();
        let latest = |pod: &str, peer: &str| {
            rows.iter()
                .filter(|r| r.pod == pod && r.peer_id.as_deref() == Some(peer))
                .max_by_key(|r| r.id)
                .map(|r| (r.protection, r.resumed))
                .unwrap_or_else(|| panic!("connection {round}: no flow of {pod}"))
        };
        assert_eq!(
            latest("rsk-client", "spiffe://cluster.local/ns/crypto/sa/server"),
            (Protection::Ktls, Some(resumed)),
            "connection {round}: the client agent's flow"
        );
        assert_eq!(
            latest("rsk-server", client_id),
            (Protection::Ktls, Some(resumed)),
            "connection {round}: the server agent's flow"
        );
        // The second connection's ClientHello rode in its SYN (the first fetched the cookie):
        // both agents still handed the session to the kernel, though neither socket was
        // established when the agent first tried the `tls` ULP.
        if round == 3 {
            assert!(
                server.ns.tcp_ext("TCPFastOpenPassive") > fast_open_before,
                "connection {round}: not accepted with data in its SYN (TCP Fast Open)"
            );
        }
    }
}
