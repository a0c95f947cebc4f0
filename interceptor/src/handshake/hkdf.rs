//! The TLS 1.3 key schedule's HKDF on HMAC keys that are set up once per secret.
//!
//! rustls' aws-lc suites run every HKDF-Expand through aws-lc's one-shot `HKDF_expand`, which
//! sets the HMAC key up again (hashing the key's two pad blocks) for every label it derives.
//! A handshake derives a few dozen labels from a handful of secrets, so the key set-up was
//! most of the key schedule's SHA-256 work: callgrind put aws-lc's HKDF at ~0.35–0.40 M of
//! the ~1.5 M instructions an agent spends per resumed mesh connection (bench/README.md,
//! "Per-connection work, counted"). rustls' [`HkdfUsingHmac`] keeps one HMAC key per secret
//! and expands from copies of it; the HMAC is still aws-lc's, and HKDF is the same function
//! whoever computes it (RFC 5869), so the keys, the wire and the peers are unchanged
//! (`tests::the_key_schedule_matches_rustls_own`).

use rustls::{
    SupportedCipherSuite, Tls13CipherSuite,
    crypto::{CipherSuiteCommon, hmac, tls13::HkdfUsingHmac},
};

/// aws-lc's HMAC as rustls' [`hmac::Hmac`].
struct Hmac(aws_lc_rs::hmac::Algorithm);

/// One HMAC key, its pads already hashed; each signature starts from a copy of that state.
struct Key(aws_lc_rs::hmac::Key);

impl hmac::Hmac for Hmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn hmac::Key> {
        Box::new(Key(aws_lc_rs::hmac::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }

    fn fips(&self) -> bool {
        aws_lc_rs::try_fips_mode().is_ok()
    }
}

impl hmac::Key for Key {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> hmac::Tag {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.0);
        ctx.update(first);
        for part in middle {
            ctx.update(part);
        }
        ctx.update(last);
        hmac::Tag::new(ctx.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

static HMAC_SHA256: Hmac = Hmac(aws_lc_rs::hmac::HMAC_SHA256);
static HMAC_SHA384: Hmac = Hmac(aws_lc_rs::hmac::HMAC_SHA384);
static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA256);
static HKDF_SHA384: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA384);

/// `base` (one of rustls' aws-lc TLS 1.3 suites) with the key schedule above: the same
/// suite, hash and AEAD.
fn with_hmac_hkdf(base: SupportedCipherSuite) -> Tls13CipherSuite {
    let SupportedCipherSuite::Tls13(base) = base else {
        unreachable!("mesh suites are TLS 1.3")
    };
    let sha384 = base.common.hash_provider.output_len() == 48;
    Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: base.common.suite,
            hash_provider: base.common.hash_provider,
            confidentiality_limit: base.common.confidentiality_limit,
        },
        hkdf_provider: if sha384 { &HKDF_SHA384 } else { &HKDF_SHA256 },
        aead_alg: base.aead_alg,
        quic: base.quic,
    }
}

static AES_128_GCM: std::sync::LazyLock<Tls13CipherSuite> = std::sync::LazyLock::new(|| {
    with_hmac_hkdf(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256)
});
static AES_256_GCM: std::sync::LazyLock<Tls13CipherSuite> = std::sync::LazyLock::new(|| {
    with_hmac_hkdf(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384)
});
static CHACHA20_POLY1305: std::sync::LazyLock<Tls13CipherSuite> = std::sync::LazyLock::new(|| {
    with_hmac_hkdf(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256)
});

pub(super) fn tls13_aes_128_gcm_sha256() -> SupportedCipherSuite {
    SupportedCipherSuite::Tls13(&AES_128_GCM)
}

pub(super) fn tls13_aes_256_gcm_sha384() -> SupportedCipherSuite {
    SupportedCipherSuite::Tls13(&AES_256_GCM)
}

pub(super) fn tls13_chacha20_poly1305_sha256() -> SupportedCipherSuite {
    SupportedCipherSuite::Tls13(&CHACHA20_POLY1305)
}

#[cfg(test)]
mod tests {
    use rustls::crypto::{aws_lc_rs::cipher_suite, tls13::OkmBlock};

    use super::*;

    /// Every operation the key schedule uses gives rustls' own result, for both hashes, on
    /// secrets and labels of the sizes TLS 1.3 uses.
    #[test]
    fn the_key_schedule_matches_rustls_own() {
        let pairs = [
            (
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                tls13_aes_128_gcm_sha256(),
            ),
            (
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                tls13_aes_256_gcm_sha384(),
            ),
            (
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                tls13_chacha20_poly1305_sha256(),
            ),
        ];
        for (theirs, ours) in pairs {
            let (SupportedCipherSuite::Tls13(theirs), SupportedCipherSuite::Tls13(ours)) =
                (theirs, ours)
            else {
                panic!("TLS 1.3 suites");
            };
            assert_eq!(theirs.common.suite, ours.common.suite);
            let (a, b) = (theirs.hkdf_provider, ours.hkdf_provider);
            let secret: Vec<u8> = (0u8..48).collect();
            let salt: Vec<u8> = (100u8..148).collect();
            let info: [&[u8]; 3] = [
                b"\x00\x20",
                b"\x0dtls13 derived",
                b"\x20context-hash-32-bytes-long.....!",
            ];
            let pairs = [
                (a.extract_from_zero_ikm(None), b.extract_from_zero_ikm(None)),
                (
                    a.extract_from_zero_ikm(Some(&salt)),
                    b.extract_from_zero_ikm(Some(&salt)),
                ),
                (
                    a.extract_from_secret(Some(&salt), &secret),
                    b.extract_from_secret(Some(&salt), &secret),
                ),
                (
                    a.extract_from_secret(None, &secret[..32]),
                    b.extract_from_secret(None, &secret[..32]),
                ),
            ];
            for (x, y) in pairs {
                assert_eq!(x.hash_len(), y.hash_len());
                assert_eq!(
                    x.expand_block(&info).as_ref(),
                    y.expand_block(&info).as_ref()
                );
                for len in [12, 16, 32, 48, 100] {
                    let (mut p, mut q) = (vec![0u8; len], vec![1u8; len]);
                    x.expand_slice(&info, &mut p).unwrap();
                    y.expand_slice(&info, &mut q).unwrap();
                    assert_eq!(p, q, "expand to {len} bytes");
                }
            }
            let okm = OkmBlock::new(&secret[..a.extract_from_zero_ikm(None).hash_len()]);
            assert_eq!(
                a.hmac_sign(&okm, b"finished").as_ref(),
                b.hmac_sign(&okm, b"finished").as_ref()
            );
            assert_eq!(
                a.expander_for_okm(&okm).expand_block(&info).as_ref(),
                b.expander_for_okm(&okm).expand_block(&info).as_ref()
            );
        }
    }
}
