//! One service account's mesh credentials: its leaf and every rustls config built from it.
//! They are built and dropped as one piece, so a renewed leaf, a new trust bundle or a new
//! crypto policy never shares a config (or a resumption store) with the one before; the
//! connection path only asks for "the server config" or "a client config for that peer".

use std::{collections::HashMap, sync::Arc, sync::Mutex};

use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::{
    MESH_ALPN, MeshClient, MeshCrypto, SPARE_ALPN, SessionResumption, TlsConfigError,
    mesh_client_with, server_config_with,
};
use crate::{
    ca::{LeafCert, renew::HoldsLeaf},
    identity::{SpiffeId, TrustDomain},
};

pub struct Credentials {
    leaf: LeafCert,
    server: Arc<ServerConfig>,
    /// What the client configs are built with, lazily, one per expected server identity.
    roots: Arc<RootCertStore>,
    trust_domain: TrustDomain,
    crypto: Arc<MeshCrypto>,
    resumption: SessionResumption,
    /// Client configs by expected server identity (the verifier pins it).
    clients: Mutex<HashMap<SpiffeId, MeshClient>>,
    /// The same, for spare connections (see [`Credentials::spare_client`]).
    spare_clients: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
    /// Roots of derived connection keys (`tuning.connectionKeys: derived`): the store of
    /// this identity's leaf generation, which the credentials of a renewed leaf share
    /// ([`super::derived::Stores`]). Shared so the agent's periodic sweep can erase expired
    /// roots without holding the credentials alive.
    derived: Arc<super::derived::Store>,
}

impl Credentials {
    pub fn new(
        leaf: LeafCert,
        roots: Arc<RootCertStore>,
        trust_domain: &TrustDomain,
        crypto: Arc<MeshCrypto>,
        resumption: &SessionResumption,
        derived: Arc<super::derived::Store>,
    ) -> Result<Self, TlsConfigError> {
        let server =
            server_config_with(&leaf, Arc::clone(&roots), trust_domain, &crypto, resumption)?;
        Ok(Credentials {
            leaf,
            server,
            roots,
            trust_domain: trust_domain.clone(),
            crypto,
            resumption: resumption.clone(),
            clients: Mutex::new(HashMap::new()),
            spare_clients: Mutex::new(HashMap::new()),
            derived,
        })
    }

    /// This service account's roots of derived connection keys, as server and as client.
    pub fn derived(&self) -> &super::derived::Store {
        &self.derived
    }

    /// The config that terminates mesh mTLS for this service account.
    pub fn server(&self) -> &Arc<ServerConfig> {
        &self.server
    }

    /// The config that dials a mesh peer which must prove `expected` (its full offer).
    pub fn client(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsConfigError> {
        Ok(Arc::clone(self.mesh_client(expected)?.full()))
    }

    /// The configs that dial a mesh peer which must prove `expected`: the full offer and the
    /// resumed one (see [`MeshClient`]).
    pub fn mesh_client(&self, expected: &SpiffeId) -> Result<MeshClient, TlsConfigError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(expected) {
            return Ok(c.clone());
        }
        let c = mesh_client_with(
            &self.leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            expected,
            &self.crypto,
            &self.resumption,
        )?;
        clients.insert(expected.clone(), c.clone());
        Ok(c)
    }
}

impl Credentials {
    /// The config that opens a spare connection to a mesh peer which must prove `expected`:
    /// [`Credentials::client`]'s, offering [`SPARE_ALPN`] first. It shares that config's
    /// verifier and ticket store, so spares resume from the tickets plain connections
    /// brought back and the other way round.
    pub fn spare_client(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let mut spares = self.spare_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = spares.get(expected) {
            return Ok(Arc::clone(c));
        }
        let mut config = ClientConfig::clone(&*self.client(expected)?);
        config.alpn_protocols = vec![SPARE_ALPN.to_vec(), MESH_ALPN.to_vec()];
        let config = Arc::new(config);
        spares.insert(expected.clone(), Arc::clone(&config));
        Ok(config)
    }
}

impl HoldsLeaf for Credentials {
    fn leaf(&self) -> &LeafCert {
        &self.leaf
    }
}
