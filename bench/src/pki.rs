//! Certificates for every encrypted mode come from one CA: the project's own, created with
//! `interceptor ca init`. The agent loads it directly; the HAProxy sidecars get leaf
//! certificates issued by the same code the agent uses (`CertificateAuthority::issue`:
//! ECDSA P-256, SPIFFE URI SAN), written as PEM because the CLI has no leaf export.
//!
//! So both sides of the comparison present the same kind of certificate chained to the same
//! root, and a handshake costs the same signature work in every mode.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use interceptor::{
    ca::{Ca, CertificateAuthority as _, LeafCert},
    identity::{SpiffeId, TrustDomain},
};

pub const TRUST_DOMAIN: &str = "cluster.local";
/// Kubernetes namespace and service accounts of the two benchmark pods.
pub const NAMESPACE: &str = "bench";
pub const CLIENT_SA: &str = "client";
pub const SERVER_SA: &str = "server";

/// Files for one run.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_dir: PathBuf,
    /// PEM root certificate (HAProxy `ca-file`).
    pub ca_pem: PathBuf,
    /// PEM leaf certificate + PKCS#8 key (HAProxy `crt`), client side.
    pub client_pem: PathBuf,
    pub server_pem: PathBuf,
}

/// Creates the CA in `dir/ca` with the agent binary (`interceptor ca init`), then issues the
/// sidecars' leaves from it.
pub fn create(dir: &Path, agent_bin: Option<&Path>) -> Result<Pki> {
    let ca_dir = dir.join("ca");
    let td: TrustDomain = TRUST_DOMAIN.parse().context("trust domain")?;
    match agent_bin {
        Some(bin) => {
            let out = Command::new(bin)
                .args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--dir"])
                .arg(&ca_dir)
                .output()
                .with_context(|| format!("run {} ca init", bin.display()))?;
            if !out.status.success() {
                bail!(
                    "`interceptor ca init` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        // Without an agent binary (sidecar-only runs) the library creates the same files.
        None => {
            Ca::init(&td, &ca_dir, interceptor::ca::OnExisting::Refuse).context("create the CA")?;
        }
    }
    let ca = Ca::load(&ca_dir).context("load the CA")?;
    let ca_pem = dir.join("ca.pem");
    fs::write(&ca_pem, pem("CERTIFICATE", ca.root().as_ref()))?;
    let ttl = Duration::from_secs(24 * 3600);
    let leaf_file = |sa: &str| -> Result<PathBuf> {
        let id = SpiffeId::new(td.clone(), NAMESPACE, sa).context("SPIFFE id")?;
        let leaf: LeafCert = ca.issue(&id, ttl).context("issue leaf")?;
        let mut text = String::new();
        for cert in leaf.chain() {
            text.push_str(&pem("CERTIFICATE", cert.as_ref()));
        }
        text.push_str(&pem("PRIVATE KEY", leaf.key().secret_der()));
        let path = dir.join(format!("{sa}.pem"));
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    };
    let client_pem = leaf_file(CLIENT_SA)?;
    let server_pem = leaf_file(SERVER_SA)?;
    Ok(Pki {
        ca_dir,
        ca_pem,
        client_pem,
        server_pem,
    })
}

/// PEM armour (RFC 7468): base64 in 64-column lines.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
