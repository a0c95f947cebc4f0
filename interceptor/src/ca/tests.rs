use std::{
    fs::Permissions,
    os::unix::fs::PermissionsExt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use rustls::{
    RootCertStore,
    client::verify_server_cert_signed_by_trust_anchor,
    crypto::aws_lc_rs,
    pki_types::UnixTime,
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use x509_parser::extensions::ParsedExtension;

use super::*;

/// A scratch directory removed on drop (no `tempfile` crate in the workspace).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "interceptor-ca-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        Self(path)
    }

    fn ca_dir(&self) -> PathBuf {
        self.0.join("ca")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn td() -> TrustDomain {
    "cluster.local".parse().unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}

/// Verifies `leaf` against `root` for both TLS roles, the way the handshake will.
fn chains_to(leaf: &LeafCert, root: &CertificateDer<'static>) -> bool {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let roots = Arc::new(roots);
    let now = UnixTime::now();
    let provider = Arc::new(aws_lc_rs::default_provider());
    let parsed = ParsedCertificate::try_from(&leaf.chain()[0]).unwrap();
    let as_server = verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &leaf.chain()[1..],
        now,
        provider.signature_verification_algorithms.all,
    );
    let as_client = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .unwrap()
        .verify_client_cert(&leaf.chain()[0], &leaf.chain()[1..], now);
    assert_eq!(as_server.is_ok(), as_client.is_ok());
    as_server.is_ok()
}

#[test]
fn init_writes_private_key_and_certificate() {
    let tmp = TempDir::new();
    let dir = tmp.ca_dir();
    Ca::init(&td(), &dir, OnExisting::Refuse).unwrap();

    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("root.key")), 0o600);
    assert_eq!(mode(&dir.join("root.crt")), 0o644);
    let key = fs::read_to_string(dir.join("root.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
    let cert = fs::read_to_string(dir.join("root.crt")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    assert!(!dir.join(".root.key.new").exists());
}

#[test]
fn root_certificate_shape() {
    let ca = Ca::generate(&td()).unwrap();
    let (_, cert) = X509Certificate::from_der(ca.root()).unwrap();

    assert!(cert.is_ca());
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    assert_eq!(
        cert.subject().to_string(),
        "CN=interceptor root cluster.local"
    );
    assert_eq!(cert.subject(), cert.issuer());
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 3650 * 86_400 + 300);
    assert_eq!(root_trust_domain(&cert).unwrap(), td());
    assert_eq!(
        cert.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
}

#[test]
fn init_refuses_to_overwrite_unless_asked() {
    let tmp = TempDir::new();
    let dir = tmp.ca_dir();
    let first = Ca::init(&td(), &dir, OnExisting::Refuse).unwrap();

    let err = Ca::init(&td(), &dir, OnExisting::Refuse).unwrap_err();
    assert!(
        matches!(&err, CaError::AlreadyExists { path } if path.ends_with("root.key")),
        "{err}"
    );
    assert_eq!(Ca::load(&dir).unwrap().root(), first.root());

    // A lone certificate (say, a half-finished copy) also blocks a fresh init.
    fs::remove_file(dir.join("root.key")).unwrap();
    let err = Ca::init(&td(), &dir, OnExisting::Refuse).unwrap_err();
    assert!(
        matches!(&err, CaError::AlreadyExists { path } if path.ends_with("root.crt")),
        "{err}"
    );

    let replaced = Ca::init(&td(), &dir, OnExisting::Replace).unwrap();
    assert_ne!(replaced.root(), first.root());
    assert_eq!(Ca::load(&dir).unwrap().root(), replaced.root());
    assert_eq!(mode(&dir.join("root.key")), 0o600);
}

#[test]
fn loaded_cas_issue_leaves_that_trust_each_other() {
    let tmp = TempDir::new();
    let dir = tmp.ca_dir();
    let original = Ca::init(&td(), &dir, OnExisting::Refuse).unwrap();
    let node_a = Ca::load(&dir).unwrap();
    let node_b = Ca::load(&dir).unwrap();
    assert_eq!(node_a.trust_domain(), &td());

    let leaf_a = node_a
        .issue(&id("spiffe://cluster.local/ns/a/sa/x"), DEFAULT_LEAF_TTL)
        .unwrap();
    let leaf_b = node_b
        .issue(&id("spiffe://cluster.local/ns/b/sa/y"), DEFAULT_LEAF_TTL)
        .unwrap();
    assert!(chains_to(&leaf_a, node_b.root()));
    assert!(chains_to(&leaf_b, node_a.root()));
    assert!(chains_to(&leaf_a, original.root()));

    // Same trust domain, different root: not trusted.
    let stranger = Ca::generate(&td()).unwrap();
    assert!(!chains_to(&leaf_a, stranger.root()));
}

#[test]
fn leaf_certificate_shape() {
    let ca = Ca::generate(&td()).unwrap();
    let spiffe = id("spiffe://cluster.local/ns/default/sa/web");
    let ttl = Duration::from_hours(1);
    let before = OffsetDateTime::now_utc().unix_timestamp();
    let leaf = ca.issue(&spiffe, ttl).unwrap();
    let after = OffsetDateTime::now_utc().unix_timestamp();

    assert_eq!(leaf.id(), &spiffe);
    assert_eq!(leaf.chain().len(), 1);
    assert!(matches!(leaf.key(), PrivateKeyDer::Pkcs8(_)));
    let (_, cert) = X509Certificate::from_der(&leaf.chain()[0]).unwrap();

    assert!(!cert.is_ca());
    assert!(
        cert.subject().iter().next().is_none(),
        "subject should be empty"
    );
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN must be critical with an empty subject");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert!(cert.extensions().iter().any(|ext| matches!(
        ext.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));

    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    assert!((before - 300..=after - 300).contains(&not_before));
    assert!((before + 3600..=after + 3600).contains(&not_after));
    assert_eq!(
        leaf.not_after(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(not_after as u64)
    );

    let serial = cert.raw_serial();
    assert_eq!(serial.len(), 16);
    assert!(serial[0] & 0x80 == 0);
    let other = ca.issue(&spiffe, ttl).unwrap();
    let (_, other) = X509Certificate::from_der(&other.chain()[0]).unwrap();
    assert_ne!(other.raw_serial(), serial);
    assert_ne!(other.public_key().raw, cert.public_key().raw);
}

#[test]
fn issue_refuses_foreign_trust_domain_and_bad_ttl() {
    let ca = Ca::generate(&td()).unwrap();
    let err = ca
        .issue(&id("spiffe://other.org/ns/a/sa/b"), DEFAULT_LEAF_TTL)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot issue for spiffe://other.org/ns/a/sa/b: this CA signs only trust domain \
         `cluster.local`"
    );
    let local = id("spiffe://cluster.local/ns/a/sa/b");
    assert!(matches!(
        ca.issue(&local, Duration::ZERO),
        Err(CaError::InvalidTtl { .. })
    ));
    assert!(matches!(
        ca.issue(&local, Duration::MAX),
        Err(CaError::InvalidTtl { .. })
    ));
}

#[test]
fn load_refuses_a_key_others_can_read() {
    let tmp = TempDir::new();
    let dir = tmp.ca_dir();
    Ca::init(&td(), &dir, OnExisting::Refuse).unwrap();
    let key = dir.join("root.key");

    for bad in [0o640, 0o604, 0o644] {
        fs::set_permissions(&key, Permissions::from_mode(bad)).unwrap();
        let err = Ca::load(&dir).unwrap_err();
        assert!(
            matches!(&err, CaError::KeyPermissions { mode, .. } if *mode == bad),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
    fs::set_permissions(&key, Permissions::from_mode(0o400)).unwrap();
    Ca::load(&dir).unwrap();
}

#[test]
fn load_errors_name_the_file_and_problem() {
    let tmp = TempDir::new();
    let dir = tmp.ca_dir();

    let err = Ca::load(&dir).unwrap_err();
    assert!(
        matches!(&err, CaError::Read { path, .. } if path.ends_with("root.key")),
        "{err}"
    );

    Ca::init(&td(), &dir, OnExisting::Refuse).unwrap();
    let other = tmp.0.join("other");
    Ca::init(&td(), &other, OnExisting::Refuse).unwrap();
    fs::copy(other.join("root.crt"), dir.join("root.crt")).unwrap();
    let err = Ca::load(&dir).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");

    fs::write(dir.join("root.crt"), "garbage").unwrap();
    let err = Ca::load(&dir).unwrap_err();
    assert!(
        matches!(&err, CaError::InvalidCertificate { path, .. } if path.ends_with("root.crt")),
        "{err}"
    );

    fs::remove_file(dir.join("root.key")).unwrap();
    write_new(&dir.join("root.key"), b"not a key", 0o600).unwrap();
    let err = Ca::load(&dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` does not hold a usable CA key: no `PRIVATE KEY` (PKCS#8) PEM block",
            dir.join("root.key").display()
        )
    );
}

#[test]
fn debug_output_redacts_keys() {
    let ca = Ca::generate(&td()).unwrap();
    let leaf = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/b"), DEFAULT_LEAF_TTL)
        .unwrap();
    let key_bytes = format!("{:?}", leaf.key().secret_der());
    for debug in [format!("{ca:?}"), format!("{leaf:?}"), format!("{leaf:#?}")] {
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(!debug.contains(&key_bytes[1..20]), "{debug}");
    }
}

#[test]
fn leaf_from_external_parts() {
    let ca = Ca::generate(&td()).unwrap();
    let issued = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/b"), DEFAULT_LEAF_TTL)
        .unwrap();
    let rebuilt = LeafCert::new(issued.chain().to_vec(), issued.key().clone_key()).unwrap();
    assert_eq!(rebuilt.id(), issued.id());
    assert!(matches!(
        LeafCert::new(Vec::new(), issued.key().clone_key()),
        Err(CaError::EmptyChain)
    ));
    assert!(matches!(
        LeafCert::new(ca.roots(), issued.key().clone_key()),
        Err(CaError::LeafIdentity(CertIdentityError::InvalidSpiffeId(_)))
    ));
}
