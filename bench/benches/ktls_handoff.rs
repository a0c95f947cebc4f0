//! Cost of handing a finished session to kernel TLS: rustls secret extraction, conversion to
//! the kernel's `tls12_crypto_info_*` structs for both directions, and (only where the
//! running kernel has the `tls` ULP) the `setsockopt(TCP_ULP)` + `TLS_TX` + `TLS_RX` calls on a
//! connected loopback socket. On a kernel without the ULP the setsockopt part is reported as
//! unavailable, never estimated.

use std::net::{TcpListener, TcpStream};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use interceptor::ktls::{self, SessionSecrets};
use interceptor_bench::micro::Mesh;

fn handoff(c: &mut Criterion) {
    let mesh = match Mesh::new() {
        Ok(m) => m,
        Err(e) => panic!("cannot build the in-memory mesh: {e:#}"),
    };
    let fresh = || match mesh.handshake() {
        Ok((client, _server)) => client,
        Err(e) => panic!("handshake failed: {e:#}"),
    };
    let mut g = c.benchmark_group("ktls_handoff");
    g.bench_function("extract_and_convert_secrets", |b| {
        b.iter_batched(
            fresh,
            |client| {
                let extracted = match client.dangerous_extract_secrets() {
                    Ok(s) => s,
                    Err(e) => panic!("extract: {e}"),
                };
                let secrets = match SessionSecrets::try_from(extracted) {
                    Ok(s) => s,
                    Err(e) => panic!("convert: {e}"),
                };
                let tx = secrets.tx.to_crypto_info(secrets.cipher);
                let rx = secrets.rx.to_crypto_info(secrets.cipher);
                (tx.is_ok(), rx.is_ok())
            },
            BatchSize::SmallInput,
        )
    });
    let support = ktls::probe();
    if support.supports(ktls::Cipher::Aes128Gcm) {
        let listener = match TcpListener::bind("127.0.0.1:0") {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("local_addr: {e}"),
        };
        g.bench_function("setsockopt_ulp_tx_rx", |b| {
            b.iter_batched(
                || {
                    let client = fresh();
                    let secrets = match client
                        .dangerous_extract_secrets()
                        .map_err(|e| e.to_string())
                        .and_then(|s| SessionSecrets::try_from(s).map_err(|e| e.to_string()))
                    {
                        Ok(s) => s,
                        Err(e) => panic!("secrets: {e}"),
                    };
                    let sock = match TcpStream::connect(addr) {
                        Ok(s) => s,
                        Err(e) => panic!("connect: {e}"),
                    };
                    let peer = listener.accept().map(|(s, _)| s);
                    (secrets, sock, peer)
                },
                |(secrets, sock, peer)| {
                    use std::os::fd::AsFd as _;
                    if let Err(e) = secrets.install(sock.as_fd(), true) {
                        panic!("install: {e}");
                    }
                    (sock, peer)
                },
                BatchSize::SmallInput,
            )
        });
    } else {
        println!(
            "ktls_handoff/setsockopt_ulp_tx_rx: unavailable on this kernel ({}); run it in the \
             VM (cargo xtask vm-test has the kernels) for this part",
            support.summary()
        );
    }
    g.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);
