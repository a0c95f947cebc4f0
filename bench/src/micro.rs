//! Shared setup for the criterion microbenchmarks (`bench/benches`): an in-memory CA, leaves
//! for two service accounts, and the agent's own rustls configurations
//! (`interceptor::handshake::{server_config, client_config}`), so a benchmarked handshake is
//! exactly the one the agent performs: TLS 1.3, the node's key-exchange group (X25519MLKEM768
//! by default; [`Mesh::with`] picks others), ECDSA P-256 on both sides, SPIFFE identity checks
//! in both verifiers, no resumption.

use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use interceptor::{
    ca::{Ca, CertificateAuthority as _},
    handshake::{self, MeshCrypto},
    identity::{SpiffeId, TrustDomain},
};
use rustls::{
    ClientConfig, ClientConnection, ServerConfig, ServerConnection, pki_types::ServerName,
};

/// Both ends' configurations.
pub struct Mesh {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
}

impl Mesh {
    /// A fresh CA with a `client` and a `server` service account in namespace `bench`, both
    /// ends with the node default crypto.
    pub fn new() -> Result<Self> {
        let crypto = MeshCrypto::default_aes_gcm();
        Self::with(&crypto, &crypto)
    }

    /// Like [`Mesh::new`], with the crypto of each end given.
    pub fn with(client: &MeshCrypto, server: &MeshCrypto) -> Result<Self> {
        Self::resuming(client, server, &handshake::SessionResumption::disabled())
    }

    /// Like [`Mesh::with`], with session resumption as the agent configures it: after the
    /// first connection every handshake resumes (`psk_dhe_ke`).
    pub fn resuming(
        client: &MeshCrypto,
        server: &MeshCrypto,
        resumption: &handshake::SessionResumption,
    ) -> Result<Self> {
        let td: TrustDomain = "cluster.local".parse().context("trust domain")?;
        let ca = Ca::generate(&td).context("CA")?;
        let ttl = std::time::Duration::from_secs(3600);
        let client_id = SpiffeId::new(td.clone(), "bench", "client")?;
        let server_id = SpiffeId::new(td.clone(), "bench", "server")?;
        let client_leaf = ca.issue(&client_id, ttl)?;
        let server_leaf = ca.issue(&server_id, ttl)?;
        let roots = handshake::mesh_roots(ca.roots())?;
        Ok(Self {
            client: handshake::client_config_with(
                &client_leaf,
                Arc::clone(&roots),
                &td,
                &server_id,
                client,
                resumption,
            )?,
            server: handshake::server_config_with(&server_leaf, roots, &td, server, resumption)?,
        })
    }

    /// One mutual-TLS handshake in memory (full, or resumed when the configs resume), both
    /// ends on this thread, including the SPIFFE identity read of the peer on each side
    /// (`handshake::negotiated`). A resuming server's ticket reaches the client too.
    pub fn handshake(&self) -> Result<(ClientConnection, ServerConnection)> {
        let name = ServerName::try_from("10.88.1.3").context("server name")?;
        let mut c = ClientConnection::new(Arc::clone(&self.client), name)?;
        let mut s = ServerConnection::new(Arc::clone(&self.server))?;
        let mut buf = Vec::with_capacity(8192);
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            move_bytes(&mut buf, |b| c.write_tls(b), |b| s.read_tls(b))?;
            s.process_new_packets()?;
            move_bytes(&mut buf, |b| s.write_tls(b), |b| c.read_tls(b))?;
            c.process_new_packets()?;
        }
        if s.wants_write() {
            move_bytes(&mut buf, |b| s.write_tls(b), |b| c.read_tls(b))?;
            c.process_new_packets()?;
        }
        if c.is_handshaking() || s.is_handshaking() {
            bail!("handshake did not finish");
        }
        let from_server = handshake::negotiated(&c)?;
        let from_client = handshake::negotiated(&s)?;
        if from_server.peer.service_account() != "server"
            || from_client.peer.service_account() != "client"
        {
            bail!("wrong peer identities");
        }
        Ok((c, s))
    }
}

fn move_bytes(
    buf: &mut Vec<u8>,
    mut write: impl FnMut(&mut Vec<u8>) -> std::io::Result<usize>,
    mut read: impl FnMut(&mut &[u8]) -> std::io::Result<usize>,
) -> Result<()> {
    buf.clear();
    while write(buf)? > 0 {}
    let mut rest = &buf[..];
    while !rest.is_empty() {
        if read(&mut rest)? == 0 {
            bail!("peer accepted no bytes");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_mesh_handshake_completes() {
        let mesh = Mesh::new().unwrap();
        let (c, _s) = mesh.handshake().unwrap();
        assert_eq!(
            c.negotiated_cipher_suite().unwrap().suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
