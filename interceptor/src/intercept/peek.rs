//! Inbound classification from peeked bytes (nothing is consumed): a TLS ClientHello offering
//! the mesh ALPN is mesh mTLS; any other bytes are plaintext (or the application's own TLS),
//! handled by policy. Pure and bounded: reads at most one record.

use crate::handshake::{MESH_ALPN, SPARE_ALPN};

/// What the first bytes of an inbound connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// A ClientHello offering [`MESH_ALPN`] or [`SPARE_ALPN`].
    Mesh,
    /// The header of a connection on derived keys (`handshake::derived`).
    Derived,
    /// Anything else: plaintext, or TLS that is not ours.
    Other,
    /// A TLS handshake record has started but is not complete yet: peek again.
    NeedMore,
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_ALPN: u16 = 16;
/// Largest ClientHello record we wait for; ours is well under 1 KiB.
pub const MAX_PEEK: usize = 5 + 16_384;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Classifies the peeked prefix of an inbound stream.
pub fn classify(bytes: &[u8]) -> FirstBytes {
    let Some(&first) = bytes.first() else {
        return FirstBytes::NeedMore;
    };
    match crate::handshake::derived::starts_derived(bytes) {
        Some(true) => return FirstBytes::Derived,
        None => return FirstBytes::NeedMore,
        Some(false) => {}
    }
    if first != HANDSHAKE {
        return FirstBytes::Other;
    }
    if bytes.len() < 5 {
        return if bytes.len() >= 2 && bytes[1] != 3 {
            FirstBytes::Other
        } else {
            FirstBytes::NeedMore
        };
    }
    let len = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
    if bytes[1] != 3 || len > 16_384 {
        return FirstBytes::Other;
    }
    let Some(body) = bytes.get(5..5 + len) else {
        return FirstBytes::NeedMore;
    };
    if offers_mesh_alpn(body).unwrap_or(false) {
        FirstBytes::Mesh
    } else {
        FirstBytes::Other
    }
}

/// Walks a ClientHello handshake message to its ALPN extension. A ClientHello split over
/// several records is not ours (ours always fits one), so it counts as `Other`.
fn offers_mesh_alpn(record: &[u8]) -> Option<bool> {
    let mut r = Reader(record);
    if r.u8()? != CLIENT_HELLO {
        return Some(false);
    }
    let len = r.take(3)?;
    let len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
    let mut r = Reader(r.take(len)?);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty == EXT_ALPN {
            let mut list = Reader(Reader(data).vec16()?);
            while !list.0.is_empty() {
                let offered = list.vec8()?;
                if offered == MESH_ALPN || offered == SPARE_ALPN {
                    return Some(true);
                }
            }
            return Some(false);
        }
    }
    Some(false)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        ca::{Ca, CertificateAuthority as _},
        handshake,
        identity::SpiffeId,
    };

    /// A real ClientHello from our own client config.
    pub(crate) fn mesh_client_hello() -> Vec<u8> {
        client_hello(&[MESH_ALPN])
    }

    /// The same, offering `alpn`.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let ca = Ca::generate(&"cluster.local".parse().unwrap()).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let leaf = ca.issue(&id, std::time::Duration::from_secs(60)).unwrap();
        let roots = handshake::mesh_roots([ca.root().clone()]).unwrap();
        let cfg = handshake::client_config(
            &leaf,
            roots,
            ca.trust_domain(),
            &id,
            &handshake::MeshCrypto::default_aes_gcm(),
        )
        .unwrap();
        let mut cfg = rustls::ClientConfig::clone(&cfg);
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), "10.0.0.1".try_into().unwrap()).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn our_client_hello_is_mesh_at_every_split() {
        let hello = mesh_client_hello();
        assert_eq!(classify(&hello), FirstBytes::Mesh);
        for cut in 0..hello.len() {
            assert_eq!(
                classify(&hello[..cut]),
                FirstBytes::NeedMore,
                "cut at {cut}"
            );
        }
    }

    /// A spare's ClientHello (the spare protocol, alone or first) is mesh.
    #[test]
    fn a_spare_client_hello_is_mesh() {
        for alpn in [vec![SPARE_ALPN], vec![SPARE_ALPN, MESH_ALPN]] {
            let hello = client_hello(&alpn);
            assert_eq!(classify(&hello), FirstBytes::Mesh);
        }
        assert_eq!(classify(&client_hello(&[b"h2"])), FirstBytes::Other);
    }

    #[test]
    fn plaintext_and_foreign_tls_are_other() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), FirstBytes::Other);
        assert_eq!(classify(b"\x16\x01"), FirstBytes::Other);
        let mut hello = mesh_client_hello();
        // Change one byte of the ALPN value: no longer ours.
        let pos = hello
            .windows(MESH_ALPN.len())
            .position(|w| w == MESH_ALPN)
            .unwrap();
        hello[pos] ^= 0x20;
        assert_eq!(classify(&hello), FirstBytes::Other);
    }

    /// A derived-key header is recognised from its magic alone, and a prefix of it is
    /// awaited (it may come in pieces without Fast Open).
    #[test]
    fn a_derived_header_is_derived_at_every_split() {
        let header = crate::handshake::derived::Root::new(
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            &[3; 32],
        )
        .unwrap()
        .connection(1)
        .unwrap()
        .header;
        assert_eq!(classify(&header[..1]), FirstBytes::NeedMore);
        assert_eq!(classify(&header[..3]), FirstBytes::NeedMore);
        for cut in 4..=header.len() {
            assert_eq!(classify(&header[..cut]), FirstBytes::Derived, "{cut}");
        }
        assert_eq!(classify(&[0xd1, b'x']), FirstBytes::Other);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 1;
        for len in 0..600 {
            let buf: Vec<u8> = (0..len)
                .map(|i| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    if i == 0 { 22 } else { (x >> 24) as u8 }
                })
                .collect();
            let _ = classify(&buf);
        }
    }
}
