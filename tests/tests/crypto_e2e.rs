//! The node's crypto policy, end to end and on the wire: which key-exchange group and suite
//! two agents really agree on (the ServerHello in a capture of the server pod's link), that a
//! `default` node still serves an agent of an older version (classical groups only) while a
//! `pqc` node refuses it with `handshake_failure`, and that a policy change in the node config
//! file applies while the agent runs, closing open flows it no longer allows.
//!
//! The older agent is played by the test itself: a mesh client with a leaf from the cluster CA
//! and the groups agents offered before the compliance policy existed (x25519, secp256r1), run
//! from an unenrolled pod.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use interceptor::{
    app::Agent,
    handshake::{CompliancePolicy, CryptoPolicy, MeshCrypto, MeshSuite},
    intercept::table::FlowRow,
};
use interceptor_tests::{
    agent::{RunningAgent, workload},
    apps::{curl, sha256_hex},
    crypto::{
        AES_128_GCM, AES_256_GCM, MeshSession, PEER_ID, SECP256R1, X25519, X25519MLKEM768,
        any_port, assert_hello, captured, hellos, peer_client, reconfigure,
        refused_with_handshake_failure,
    },
    require_privileged,
    scenario::{Cluster, Scenario, serve_blob},
    wire::assert_no_plaintext,
};

const SERVER_ID: &str = "spiffe://cluster.local/ns/crypto/sa/server";

/// An older agent's mesh client towards the server pod.
fn older_agent(cluster: &Cluster) -> std::sync::Arc<rustls::ClientConfig> {
    let crypto = MeshCrypto::legacy_classical(MeshSuite::AES_GCM).expect("legacy crypto");
    peer_client(&cluster.ca, &crypto, SERVER_ID)
}

fn policy(compliance_policy: CompliancePolicy, require_aes256_gcm: bool) -> CryptoPolicy {
    CryptoPolicy {
        compliance_policy,
        require_aes256_gcm,
    }
}

/// The newest flow row (open or just closed) of `pod` whose peer is `peer`.
fn last_flow(agent: &Agent, pod: &str, peer: &str) -> FlowRow {
    agent
        .flows_with_recent()
        .into_iter()
        .filter(|r| r.pod == pod && r.peer_id.as_deref() == Some(peer))
        .max_by_key(|r| r.id)
        .unwrap_or_else(|| panic!("no flow of {pod} with peer {peer}"))
}

fn stat(agent: &Agent, key: &str) -> u64 {
    agent.policy_stats().get(key).copied().unwrap_or(0)
}

#[test]
fn default_node_negotiates_the_hybrid_group_and_still_serves_an_older_agent() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(70, "cry-client", "cry-server");
    let older = node.pod("cry-older", 4);
    let www = serve_blob(&mut server, "crypto-www", 256 << 10);
    let cluster = Cluster::new("crypto");
    let agent = cluster.start(
        vec![
            workload(&client, "crypto", "client"),
            workload(&server, "crypto", "server"),
        ],
        vec![],
    );
    assert_eq!(agent.agent.crypto_policy(), CryptoPolicy::default());
    let server_http = SocketAddr::from((server.ip, 80));

    // Agent ↔ agent: X25519MLKEM768, with the x25519 half offered as a second share.
    let (f, streams) = captured(&node, &server, || {
        curl(
            client.command("curl"),
            &format!("http://{}/blob", server.ip),
        )
    });
    assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
    let (ch, sh) = hellos(&streams, any_port(client.ip), server_http);
    assert_eq!(ch.groups, [X25519MLKEM768, X25519, SECP256R1], "{ch:?}");
    assert_eq!(ch.key_shares, [(X25519MLKEM768, 1216), (X25519, 32)]);
    assert_eq!(ch.cipher_suites, [AES_128_GCM, AES_256_GCM]);
    assert_hello(&sh, X25519MLKEM768, AES_128_GCM, None);
    assert_eq!(
        sh.unwrap().key_share_len,
        1120,
        "ML-KEM-768 ciphertext + x25519"
    );
    assert_no_plaintext(&streams, &www.payload);
    let row = last_flow(
        &agent.agent,
        "cry-server",
        "spiffe://cluster.local/ns/crypto/sa/client",
    );
    assert_eq!(row.group.as_deref(), Some("X25519MLKEM768"));
    assert_eq!(row.cipher.as_deref(), Some("TLS13_AES_128_GCM_SHA256"));

    // An older agent (x25519, secp256r1): x25519 at once, no retry, data intact.
    let (got, streams) = captured(&node, &server, || {
        let session = MeshSession::open(&older, server_http, older_agent(&cluster))?;
        let local = session.local;
        session.get("/blob").map(|body| (local, body))
    });
    let (local, body) = got.expect("a default node serves an older agent");
    assert_eq!(sha256_hex(&body), www.want);
    let (ch, sh) = hellos(&streams, local, server_http);
    assert_eq!(ch.groups, [X25519, SECP256R1]);
    assert_hello(&sh, X25519, AES_128_GCM, None);
    let row = last_flow(&agent.agent, "cry-server", PEER_ID);
    assert_eq!(row.group.as_deref(), Some("x25519"));
}

#[test]
fn policy_changes_apply_while_running_and_pqc_refuses_an_older_agent() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(71, "crz-client", "crz-server");
    let older = node.pod("crz-older", 4);
    let www = serve_blob(&mut server, "crypto-www", 64 << 10);
    let cluster = Cluster::new("crypto-reload");
    let mut config = cluster.config(
        vec![
            workload(&client, "crypto", "client"),
            workload(&server, "crypto", "server"),
        ],
        vec![],
    );
    let file = cluster.scratch.0.join("node.yaml");
    let agent = RunningAgent::start_watching(config.clone(), &file);
    let agent = &agent.agent;
    let server_http = SocketAddr::from((server.ip, 80));
    let mesh_get = || {
        captured(&node, &server, || {
            curl(
                client.command("curl"),
                &format!("http://{}/blob", server.ip),
            )
        })
    };

    // An older agent holds a flow under `default`.
    let mut held = MeshSession::open(&older, server_http, older_agent(&cluster))
        .expect("default serves an older agent");
    held.send(b"GET /blob HTTP/1.0\r\n")
        .expect("partial request");

    // → pqc: the held x25519 flow is closed, and a new one is refused on the wire.
    let closed_before = stat(agent, "closed.crypto_policy");
    let refused_before = stat(agent, "refused.crypto_mismatch");
    reconfigure(
        agent,
        &file,
        &mut config,
        policy(CompliancePolicy::Pqc, false),
    );
    assert!(
        held.ends_within(Duration::from_secs(5)),
        "an x25519 flow stayed open under pqc"
    );
    assert_eq!(stat(agent, "closed.crypto_policy"), closed_before + 1);
    let (refused, streams) = captured(&node, &server, || {
        MeshSession::open(&older, server_http, older_agent(&cluster)).map(|s| s.local)
    });
    let err = refused.expect_err("a pqc node must refuse an older agent");
    assert!(err.contains("HandshakeFailure"), "{err}");
    let up = streams
        .streams
        .iter()
        .find(|s| s.dst == server_http && s.src.ip() == std::net::IpAddr::V4(older.ip))
        .expect("the refused connection was captured");
    let (_, sh) = hellos(&streams, up.src, server_http);
    assert!(sh.is_err(), "a ServerHello crossed the wire: {sh:?}");
    assert!(
        refused_with_handshake_failure(&streams, up.src, server_http),
        "no handshake_failure alert on the wire"
    );
    assert_eq!(stat(agent, "refused.crypto_mismatch"), refused_before + 1);
    // Agent ↔ agent under pqc: the hybrid only, nothing classical offered.
    let (f, streams) = mesh_get();
    assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
    let (ch, sh) = hellos(&streams, any_port(client.ip), server_http);
    assert_eq!(ch.groups, [X25519MLKEM768]);
    assert_eq!(ch.key_shares, [(X25519MLKEM768, 1216)]);
    assert_hello(&sh, X25519MLKEM768, AES_128_GCM, None);

    // → fips-140-2: NIST curves and AES-GCM; the older agent gets in on secp256r1 after a
    // HelloRetryRequest (it sent an x25519 share only).
    reconfigure(
        agent,
        &file,
        &mut config,
        policy(CompliancePolicy::Fips1402, false),
    );
    let (f, streams) = mesh_get();
    assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
    let (ch, sh) = hellos(&streams, any_port(client.ip), server_http);
    assert_eq!(ch.groups, [SECP256R1, 0x0018]);
    assert_eq!(ch.cipher_suites, [AES_128_GCM, AES_256_GCM]);
    assert_hello(&sh, SECP256R1, AES_128_GCM, None);
    let (got, streams) = captured(&node, &server, || {
        let s = MeshSession::open(&older, server_http, older_agent(&cluster))?;
        let local = s.local;
        s.get("/blob").map(|b| (local, b))
    });
    let (local, body) = got.expect("fips serves an older agent on secp256r1");
    assert_eq!(sha256_hex(&body), www.want);
    let (_, sh) = hellos(&streams, local, server_http);
    assert_hello(&sh, SECP256R1, AES_128_GCM, Some(SECP256R1));
    assert_eq!(
        last_flow(agent, "crz-server", PEER_ID).group.as_deref(),
        Some("secp256r1 (retry)")
    );

    // → default with AES-256-GCM required: the hybrid group and the 256-bit suite only.
    reconfigure(
        agent,
        &file,
        &mut config,
        policy(CompliancePolicy::Default, true),
    );
    let (f, streams) = mesh_get();
    assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
    let (ch, sh) = hellos(&streams, any_port(client.ip), server_http);
    assert_eq!(ch.cipher_suites, [AES_256_GCM]);
    assert_hello(&sh, X25519MLKEM768, AES_256_GCM, None);

    // A config that does not parse keeps the running policy and is counted.
    let failures = stat(agent, "config.reload_failures");
    std::fs::write(&file, "trustDomain: [").expect("write bad config");
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(agent, "config.reload_failures") == failures {
        assert!(Instant::now() < deadline, "a bad config was not noticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        agent.crypto_policy(),
        policy(CompliancePolicy::Default, true)
    );
}
