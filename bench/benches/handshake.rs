//! Full mTLS handshakes per second per core, with SPIFFE verification on both sides: what one
//! agent core pays per new mesh connection (same-node, the one agent runs both ends; cross-node
//! each agent runs one end, so roughly half of this per agent). In memory, no sockets, so the
//! number is the TLS work alone; compare with rustls' published server-auth-only figures
//! (performance-anchors §5.1) and with the connection-churn workload of `cargo xtask bench`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use interceptor::handshake::{CompliancePolicy, CryptoPolicy, MeshCrypto, MeshSuite};
use interceptor_bench::micro::Mesh;

fn handshakes(c: &mut Criterion) {
    let mesh = match Mesh::new() {
        Ok(m) => m,
        Err(e) => panic!("cannot build the in-memory mesh: {e:#}"),
    };
    let mut g = c.benchmark_group("mtls");
    g.throughput(Throughput::Elements(1));
    g.bench_function("full_handshake_both_ends_spiffe", |b| {
        b.iter(|| match mesh.handshake() {
            Ok(pair) => pair,
            Err(e) => panic!("handshake failed: {e:#}"),
        })
    });
    g.finish();
}

/// The same handshake per key-exchange group, in one run: the node default (X25519MLKEM768),
/// an agent offering classical groups only (x25519) and `fips-140-2` (secp256r1).
fn key_exchange(c: &mut Criterion) {
    let fips = CryptoPolicy {
        compliance_policy: CompliancePolicy::Fips1402,
        require_aes256_gcm: false,
    };
    let variants = [
        ("X25519MLKEM768", MeshCrypto::default_aes_gcm()),
        (
            "x25519",
            MeshCrypto::legacy_classical(MeshSuite::AES_GCM).expect("legacy"),
        ),
        (
            "secp256r1",
            MeshCrypto::new(fips, MeshSuite::AES_GCM).expect("fips"),
        ),
    ];
    let mut g = c.benchmark_group("mtls_kx");
    g.throughput(Throughput::Elements(1));
    for (name, crypto) in &variants {
        let mesh = match Mesh::with(crypto, crypto) {
            Ok(m) => m,
            Err(e) => panic!("cannot build the in-memory mesh: {e:#}"),
        };
        g.bench_function(*name, |b| {
            b.iter(|| match mesh.handshake() {
                Ok(pair) => pair,
                Err(e) => panic!("handshake failed: {e:#}"),
            })
        });
    }
    g.finish();
}

criterion_group!(benches, handshakes, key_exchange);
criterion_main!(benches);
