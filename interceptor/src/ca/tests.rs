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
use x509_parser::extensions::{GeneralName, ParsedExtension};

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
fn init_writes_the_plugin_layout() {
    let tmp = TempDir::new();
    let dir = tmp.ca_dir();
    let ca = Ca::init(&td(), &dir, OnExisting::Refuse).unwrap();

    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    let key = fs::read_to_string(dir.join("ca-key.pem")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
    // A self-signed root: signer, whole chain and trust bundle are the same certificate.
    for name in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
        assert_eq!(mode(&dir.join(name)), 0o644);
        assert_eq!(
            read_certs(&dir.join(name)).unwrap(),
            vec![ca.root().clone()]
        );
    }
    assert!(!dir.join(".ca-key.pem.new").exists());
    // Nothing but the leaf is presented (the root is the peer's trust anchor already).
    let leaf = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/x"), DEFAULT_LEAF_TTL)
        .unwrap();
    assert_eq!(leaf.chain().len(), 1);
}

#[test]
fn root_certificate_shape() {
    let ca = Ca::generate(&td()).unwrap();
    let (_, cert) = X509Certificate::from_der(ca.root()).unwrap();

    assert!(cert.is_ca());
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    // The root may sign intermediates, which sign leaves only.
    assert_eq!(bc.value.path_len_constraint, Some(1));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    assert_eq!(
        cert.subject().to_string(),
        "CN=interceptor root cluster.local"
    );
    assert_eq!(cert.subject(), cert.issuer());
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 3650 * 86_400 + 300);
    assert_eq!(TrustDomain::from_certificate(&cert).unwrap(), td());
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
        matches!(&err, CaError::AlreadyExists { path } if path.ends_with("ca-key.pem")),
        "{err}"
    );
    assert_eq!(Ca::load(&dir).unwrap().root(), first.root());

    // A lone certificate (say, a half-finished copy) also blocks a fresh init.
    fs::remove_file(dir.join("ca-key.pem")).unwrap();
    let err = Ca::init(&td(), &dir, OnExisting::Refuse).unwrap_err();
    assert!(
        matches!(&err, CaError::AlreadyExists { path } if path.ends_with("ca-cert.pem")),
        "{err}"
    );

    let replaced = Ca::init(&td(), &dir, OnExisting::Replace).unwrap();
    assert_ne!(replaced.root(), first.root());
    assert_eq!(Ca::load(&dir).unwrap().root(), replaced.root());
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);

    // A directory of the older layout blocks it too.
    let legacy = tmp.0.join("legacy");
    fs::create_dir_all(&legacy).unwrap();
    fs::write(legacy.join("root.crt"), "x").unwrap();
    let err = Ca::init(&td(), &legacy, OnExisting::Refuse).unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
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
    let key = dir.join("ca-key.pem");

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
    assert!(matches!(&err, CaError::NoCa { .. }), "{err}");
    assert!(err.to_string().contains("ca-cert.pem"), "{err}");

    Ca::init(&td(), &dir, OnExisting::Refuse).unwrap();
    let other = tmp.0.join("other");
    Ca::init(&td(), &other, OnExisting::Refuse).unwrap();
    fs::copy(other.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    let err = Ca::load(&dir).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");

    fs::write(dir.join("ca-cert.pem"), "garbage").unwrap();
    let err = Ca::load(&dir).unwrap_err();
    assert!(
        matches!(&err, CaError::InvalidCertificate { path, .. } if path.ends_with("ca-cert.pem")),
        "{err}"
    );

    fs::remove_file(dir.join("ca-key.pem")).unwrap();
    write_new(&dir.join("ca-key.pem"), b"not a key", 0o600).unwrap();
    let err = Ca::load(&dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` does not hold a usable CA key: no `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC \
             PRIVATE KEY` PEM block",
            dir.join("ca-key.pem").display()
        )
    );
}

/// Copies `from`'s files into a fresh directory `name` under `tmp`, keeping modes.
fn copy_dir(tmp: &TempDir, from: &Path, name: &str) -> PathBuf {
    let to = tmp.0.join(name);
    fs::create_dir_all(&to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

#[test]
fn the_older_root_key_layout_still_loads() {
    let tmp = TempDir::new();
    let fresh = tmp.ca_dir();
    let ca = Ca::init(&td(), &fresh, OnExisting::Refuse).unwrap();
    let legacy = tmp.0.join("legacy");
    fs::create_dir_all(&legacy).unwrap();
    fs::copy(fresh.join("ca-key.pem"), legacy.join("root.key")).unwrap();
    fs::copy(fresh.join("ca-cert.pem"), legacy.join("root.crt")).unwrap();
    let loaded = Ca::load(&legacy).unwrap();
    assert_eq!(loaded.root(), ca.root());
    let leaf = loaded
        .issue(&id("spiffe://cluster.local/ns/a/sa/x"), DEFAULT_LEAF_TTL)
        .unwrap();
    assert!(chains_to(&leaf, ca.root()));
}

#[test]
fn intermediate_signs_presents_its_chain_and_needs_no_root_key() {
    let tmp = TempDir::new();
    let root_dir = tmp.0.join("root");
    let root = Ca::init(&td(), &root_dir, OnExisting::Refuse).unwrap();
    let node = tmp.0.join("node");
    let int = Ca::intermediate(
        &root_dir,
        &node,
        Duration::from_hours(24 * 30),
        None,
        OnExisting::Refuse,
    )
    .unwrap();
    // The node directory holds no root key: its key is the intermediate's.
    let node_key = fs::read(node.join("ca-key.pem")).unwrap();
    assert_ne!(node_key, fs::read(root_dir.join("ca-key.pem")).unwrap());
    assert_eq!(read_certs(&node.join("cert-chain.pem")).unwrap().len(), 2);
    assert_eq!(
        read_certs(&node.join("root-cert.pem")).unwrap(),
        vec![root.root().clone()]
    );

    let loaded = Ca::load(&node).unwrap();
    assert_eq!(loaded.signer().issuer, "CN=interceptor root cluster.local");
    let leaf = loaded
        .issue(&id("spiffe://cluster.local/ns/a/sa/x"), DEFAULT_LEAF_TTL)
        .unwrap();
    // Leaf + intermediate on the wire; the root is the peer's anchor.
    assert_eq!(leaf.chain().len(), 2);
    assert!(chains_to(&leaf, root.root()));
    // A leaf of the root itself and a leaf of the intermediate trust each other.
    let direct = root
        .issue(&id("spiffe://cluster.local/ns/b/sa/y"), DEFAULT_LEAF_TTL)
        .unwrap();
    assert!(chains_to(&direct, loaded.root()));
    // TTL: 30 days asked, granted; a leaf asked for longer is clipped to the intermediate.
    assert!(int.not_after() < root.not_after());
    let long = loaded
        .issue_at(
            &id("spiffe://cluster.local/ns/a/sa/x"),
            Duration::from_hours(24 * 60),
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(long.not_after(), int.not_after());

    // Never over the root itself, even when asked to replace.
    assert!(matches!(
        Ca::intermediate(
            &root_dir,
            &root_dir,
            Duration::from_hours(24),
            None,
            OnExisting::Replace
        ),
        Err(CaError::AlreadyExists { .. })
    ));
    assert_eq!(Ca::load(&root_dir).unwrap().root(), root.root());

    // Refuses to overwrite, replaces when asked, and then keeps the roots already trusted.
    assert!(matches!(
        Ca::intermediate(
            &root_dir,
            &node,
            Duration::from_hours(24),
            None,
            OnExisting::Refuse
        ),
        Err(CaError::AlreadyExists { .. })
    ));
    let new_root_dir = tmp.0.join("root2");
    let new_root = Ca::init(&td(), &new_root_dir, OnExisting::Refuse).unwrap();
    Ca::intermediate(
        &new_root_dir,
        &node,
        Duration::from_hours(24),
        None,
        OnExisting::Replace,
    )
    .unwrap();
    assert_eq!(
        read_certs(&node.join("root-cert.pem")).unwrap(),
        vec![root.root().clone(), new_root.root().clone()]
    );
}

#[test]
fn istio_style_rsa_cacerts_without_spiffe_san_work_with_the_node_trust_domain() {
    let tmp = TempDir::new();
    let now = OffsetDateTime::now_utc();
    let rsa = |name: &str, parent: Option<&Issuer<'_, KeyPair>>| {
        let key = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, "Istio");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(365);
        let cert = match parent {
            None => p.self_signed(&key).unwrap(),
            Some(issuer) => p.signed_by(&key, issuer).unwrap(),
        };
        let issuer = Issuer::new(p, key);
        (cert, issuer)
    };
    let (root, root_issuer) = rsa("Root CA", None);
    let (int, int_issuer) = rsa("Intermediate CA", Some(&root_issuer));
    let dir = tmp.ca_dir();
    fs::create_dir_all(&dir).unwrap();
    // PKCS#1 (`RSA PRIVATE KEY`), as Istio's sample `cacerts` ship it.
    let pkcs1 = rustls_pki_types::PrivatePkcs1KeyDer::from(rsa_pkcs1_from_pkcs8(
        &int_issuer.key().serialize_der(),
    ));
    let pem = format!(
        "-----BEGIN RSA PRIVATE KEY-----\n{}-----END RSA PRIVATE KEY-----\n",
        pem_cert(&CertificateDer::from(pkcs1.secret_pkcs1_der().to_vec()))
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    write_new(&dir.join("ca-key.pem"), pem.as_bytes(), 0o600).unwrap();
    fs::write(dir.join("ca-cert.pem"), int.pem()).unwrap();
    fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", int.pem(), root.pem()),
    )
    .unwrap();
    fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();

    let err = Ca::load(&dir).unwrap_err();
    assert!(matches!(err, CaError::NoTrustDomain { .. }), "{err}");
    let ca = Ca::load_for(&dir, Some(&td()), SystemTime::now()).unwrap();
    let leaf = ca
        .issue(&id("spiffe://cluster.local/ns/a/sa/x"), DEFAULT_LEAF_TTL)
        .unwrap();
    assert_eq!(leaf.chain().len(), 2);
    let root_der: CertificateDer<'static> = root.der().clone();
    assert!(chains_to_mesh(&leaf, &root_der));
    drop(root_issuer);
}

/// The PKCS#1 RSAPrivateKey inside a PKCS#8 PrivateKeyInfo (the OCTET STRING at its end).
fn rsa_pkcs1_from_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    // SEQUENCE { INTEGER 0, AlgorithmIdentifier, OCTET STRING { RSAPrivateKey } }
    fn len(b: &[u8], i: usize) -> (usize, usize) {
        if b[i] < 0x80 {
            (b[i] as usize, i + 1)
        } else {
            let n = (b[i] & 0x7f) as usize;
            let v = b[i + 1..i + 1 + n]
                .iter()
                .fold(0usize, |a, x| a << 8 | *x as usize);
            (v, i + 1 + n)
        }
    }
    let (_, mut i) = len(pkcs8, 1); // outer SEQUENCE
    for _ in 0..2 {
        let (l, start) = len(pkcs8, i + 1);
        i = start + l;
    }
    assert_eq!(pkcs8[i], 0x04, "OCTET STRING");
    let (l, start) = len(pkcs8, i + 1);
    pkcs8[start..start + l].to_vec()
}

/// [`chains_to`] with the mesh's own signature algorithms (the ones handshakes use).
fn chains_to_mesh(leaf: &LeafCert, root: &CertificateDer<'static>) -> bool {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = crate::handshake::MeshCrypto::default_aes_gcm().provider();
    let parsed = ParsedCertificate::try_from(&leaf.chain()[0]).unwrap();
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &leaf.chain()[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .is_ok()
}

#[test]
fn unusable_material_is_refused_with_the_file_and_reason() {
    let tmp = TempDir::new();
    let root_dir = tmp.0.join("root");
    let root = Ca::init(&td(), &root_dir, OnExisting::Refuse).unwrap();
    let node = tmp.0.join("node");
    let int = Ca::intermediate(
        &root_dir,
        &node,
        Duration::from_hours(48),
        None,
        OnExisting::Refuse,
    )
    .unwrap();

    // Expired and not-yet-valid signer, seen through the injectable clock.
    let after = int.not_after() + Duration::from_secs(1);
    let err = Ca::load_for(&node, None, after).unwrap_err();
    assert!(
        matches!(&err, CaError::CertificateExpired { path, .. } if path.ends_with("ca-cert.pem")),
        "{err}"
    );
    assert!(err.to_string().contains("expired at"), "{err}");
    let before = SystemTime::now() - Duration::from_hours(1);
    let err = Ca::load_for(&node, None, before).unwrap_err();
    assert!(
        matches!(err, CaError::CertificateNotYetValid { .. }),
        "{err}"
    );

    // A bundle that does not hold the signer's root.
    let bad = copy_dir(&tmp, &node, "bad-bundle");
    let stranger = Ca::generate(&td()).unwrap();
    fs::write(bad.join("root-cert.pem"), pem_cert(stranger.root())).unwrap();
    let err = Ca::load(&bad).unwrap_err();
    assert!(matches!(err, CaError::NotTrusted { .. }), "{err}");
    assert!(err.to_string().contains("root-cert.pem"), "{err}");
    // Adding the right root next to it makes it usable (a bundle of several roots).
    fs::write(
        bad.join("root-cert.pem"),
        format!("{}{}", pem_cert(stranger.root()), pem_cert(root.root())),
    )
    .unwrap();
    assert_eq!(Ca::load(&bad).unwrap().roots().len(), 2);

    // A chain file that does not start at the signer.
    let bad = copy_dir(&tmp, &node, "bad-chain");
    fs::write(bad.join("cert-chain.pem"), pem_cert(root.root())).unwrap();
    let err = Ca::load(&bad).unwrap_err();
    assert!(matches!(err, CaError::ChainMismatch { .. }), "{err}");

    // Another trust domain than the node's.
    let err = Ca::load_for(
        &node,
        Some(&"other.org".parse().unwrap()),
        SystemTime::now(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` is a CA for trust domain `cluster.local`, but this node is `other.org`",
            node.join("ca-cert.pem").display()
        )
    );
}

#[test]
fn expiry_warnings_name_what_expires_and_when() {
    let tmp = TempDir::new();
    let root_dir = tmp.0.join("root");
    Ca::init(&td(), &root_dir, OnExisting::Refuse).unwrap();
    let node = tmp.0.join("node");
    let int = Ca::intermediate(
        &root_dir,
        &node,
        Duration::from_hours(24 * 20),
        None,
        OnExisting::Refuse,
    )
    .unwrap();
    let w = int.expiry_report(SystemTime::now());
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("signing CA chain") && w[0].contains("19 days"),
        "{w:?}"
    );
    let root = Ca::load(&root_dir).unwrap();
    assert!(root.expiry_report(SystemTime::now()).is_empty());
    let late = root.not_after() - Duration::from_hours(24 * 10);
    let w = root.expiry_report(late);
    assert!(
        w.iter()
            .any(|w| w.contains("trust bundle root") && w.contains("10 days")),
        "{w:?}"
    );

    let (report, loaded) = status::report(&node, None, SystemTime::now());
    assert!(loaded.is_ok());
    for want in [
        "ca-cert.pem:",
        "issuer: CN=interceptor root cluster.local",
        "spiffe trust domain: cluster.local",
        "root-cert.pem:",
        "self-signed",
        "usable: signs for trust domain `cluster.local`",
        "warning: the signing CA chain",
    ] {
        assert!(report.contains(want), "{want}\n{report}");
    }
    assert!(!report.contains("BEGIN"), "{report}");
    let (report, loaded) = status::report(&node, None, int.not_after() + Duration::from_secs(5));
    assert!(loaded.is_err());
    assert!(
        report.contains("EXPIRED") && report.contains("NOT usable"),
        "{report}"
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
        LeafCert::new(CertificateAuthority::roots(&ca), issued.key().clone_key()),
        Err(CaError::LeafIdentity(CertIdentityError::InvalidSpiffeId(_)))
    ));
}
