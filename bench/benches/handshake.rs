//! Full mTLS handshakes per second per core, with SPIFFE verification on both sides: what one
//! agent core pays per new mesh connection (same-node, the one agent runs both ends; cross-node
//! each agent runs one end, so roughly half of this per agent). In memory, no sockets, so the
//! number is the TLS work alone; compare with rustls' published server-auth-only figures
//! (performance-anchors §5.1) and with the connection-churn workload of `cargo xtask bench`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
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

criterion_group!(benches, handshakes);
criterion_main!(benches);
