//! The kernel-TLS hand-off, timed inside the harness so it runs wherever the harness runs: on
//! the host (where the kernel lacks the `tls` ULP and only the userspace half can be timed) and
//! in the VM, whose kernels have it. The criterion bench `ktls_handoff` measures the same two
//! steps more finely, but only where `cargo bench` can run.
//!
//! Each sample is one fresh in-memory mTLS session (`micro::Mesh`, the agent's own configs):
//! * `extract`: `dangerous_extract_secrets()` plus conversion to the kernel's crypto-info
//!   structs for both directions;
//! * `install`: `setsockopt(TCP_ULP "tls")`, `TLS_TX`, `TLS_RX` and `TLS_RX_EXPECT_NO_PAD` on
//!   a connected loopback socket, exactly what the agent does per mesh connection.

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsFd as _,
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow};
use interceptor::ktls::{self, Cipher, SessionSecrets};
use serde::{Deserialize, Serialize};

use crate::micro::Mesh;

/// Percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Micros {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handoff {
    pub samples: usize,
    pub extract_us: Micros,
    /// `None` where the kernel cannot take the keys; `install_unavailable` says why.
    pub install_us: Option<Micros>,
    pub install_unavailable: Option<String>,
}

/// Times `samples` hand-offs (each on a fresh session and socket).
pub fn measure(samples: usize) -> Result<Handoff> {
    let mesh = Mesh::new()?;
    let support = ktls::probe();
    let can_install = support.supports(Cipher::Aes128Gcm);
    let listener = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let addr = listener.local_addr()?;
    let mut extract = Vec::with_capacity(samples);
    let mut install = Vec::with_capacity(samples);
    for _ in 0..samples {
        let (client, _server) = mesh.handshake()?;
        let start = Instant::now();
        let extracted = client
            .dangerous_extract_secrets()
            .map_err(|e| anyhow!("extract secrets: {e}"))?;
        let secrets = SessionSecrets::try_from(extracted)?;
        secrets.tx.to_crypto_info(secrets.cipher)?;
        secrets.rx.to_crypto_info(secrets.cipher)?;
        extract.push(start.elapsed().as_secs_f64() * 1e6);
        if can_install {
            let sock = TcpStream::connect(addr).context("connect")?;
            let (_peer, _) = listener.accept().context("accept")?;
            let start = Instant::now();
            secrets.install(sock.as_fd(), true)?;
            install.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(Handoff {
        samples,
        extract_us: micros(&mut extract),
        install_us: can_install.then(|| micros(&mut install)),
        install_unavailable: (!can_install).then(|| support.summary()),
    })
}

fn micros(v: &mut [f64]) -> Micros {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    Micros {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_extraction_and_reports_install_only_where_the_kernel_takes_keys() {
        let h = measure(5).unwrap();
        assert_eq!(h.samples, 5);
        assert!(h.extract_us.p50 > 0.0 && h.extract_us.p50 <= h.extract_us.p99);
        let kernel_takes_keys = ktls::probe().supports(Cipher::Aes128Gcm);
        assert_eq!(h.install_us.is_some(), kernel_takes_keys);
        assert_eq!(h.install_unavailable.is_some(), !kernel_takes_keys);
    }
}
