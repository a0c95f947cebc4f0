//! SHA-256 for the data-integrity checks of load tests, from aws-lc's assembly.
//!
//! Test builds compile dependencies without optimisation, and the pure-Rust `sha2` then hashes
//! about 7 MB/s on the host and far less under TCG: in the VMs, hashing every byte of the
//! upgrade load (both ends) took half the guest's CPU, the agent's handshakes waited tens of
//! seconds for a CPU, and the load client's read timeout fired before the first echo came
//! back. aws-lc's SHA-256 is assembly whatever the profile (about 65 times faster here).

use aws_lc_rs::digest::{Context, SHA256};

/// An incremental SHA-256.
pub struct Sha256(Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Self(Context::new(&SHA256))
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest in lower-case hex.
    pub fn hex(self) -> String {
        hex(self.0.finish().as_ref())
    }

    /// The digest.
    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finish()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
