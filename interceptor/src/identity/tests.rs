use rcgen::{CertificateParams, KeyPair, SanType};

use super::*;

fn td(s: &str) -> TrustDomain {
    s.parse().unwrap()
}

#[test]
fn parses_and_displays_a_service_account_id() {
    let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
    assert_eq!(id.trust_domain().as_str(), "cluster.local");
    assert_eq!(id.namespace(), "default");
    assert_eq!(id.service_account(), "web");
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(
        id,
        SpiffeId::new(td("cluster.local"), "default", "web").unwrap()
    );
}

#[test]
fn trust_domain_rejections_name_the_problem() {
    assert_eq!(
        "".parse::<TrustDomain>(),
        Err(IdentityError::EmptyTrustDomain)
    );
    assert_eq!(
        "Cluster.local".parse::<TrustDomain>(),
        Err(IdentityError::TrustDomainCharacter {
            trust_domain: "Cluster.local".into(),
            found: 'C'
        })
    );
    assert_eq!(
        "a".repeat(256).parse::<TrustDomain>(),
        Err(IdentityError::TrustDomainTooLong { len: 256 })
    );
    for bad in [
        "example.org:8080",
        "user@example.org",
        "exa%6dple.org",
        "ex ample",
    ] {
        assert!(
            matches!(
                bad.parse::<TrustDomain>(),
                Err(IdentityError::TrustDomainCharacter { .. })
            ),
            "{bad}"
        );
    }
    assert_eq!(td("a_b-c.9").as_str(), "a_b-c.9");
}

#[test]
fn spiffe_id_rejections_name_the_problem() {
    let err = |s: &str| s.parse::<SpiffeId>().unwrap_err();

    assert!(matches!(
        err("https://cluster.local/ns/a/sa/b"),
        IdentityError::Scheme { .. }
    ));
    assert!(matches!(
        err("SPIFFE://cluster.local/ns/a/sa/b"),
        IdentityError::Scheme { .. }
    ));
    assert_eq!(err("spiffe:///ns/a/sa/b"), IdentityError::EmptyTrustDomain);
    assert!(matches!(
        err("spiffe://Cluster.local/ns/a/sa/b"),
        IdentityError::TrustDomainCharacter { found: 'C', .. }
    ));
    for bad_path in [
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/ns/a/sa",
        "spiffe://cluster.local/ns/a/sa/b/",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local/sa/b/ns/a",
        "spiffe://cluster.local//ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b?q=1",
    ] {
        let e = err(bad_path);
        assert!(
            matches!(
                e,
                IdentityError::Path { .. } | IdentityError::ServiceAccount { .. }
            ),
            "{bad_path}: {e}"
        );
    }
    assert_eq!(
        err("spiffe://cluster.local/ns/Kube/sa/b"),
        IdentityError::Namespace {
            namespace: "Kube".into(),
            rule: "may contain only lowercase letters, digits and `-`"
        }
    );
    assert!(matches!(
        err("spiffe://cluster.local/ns/-a/sa/b"),
        IdentityError::Namespace { .. }
    ));
    assert!(matches!(
        err(&format!(
            "spiffe://cluster.local/ns/{}/sa/b",
            "a".repeat(64)
        )),
        IdentityError::Namespace { .. }
    ));
    assert!(matches!(
        err("spiffe://cluster.local/ns/a/sa/b..c"),
        IdentityError::ServiceAccount { .. }
    ));
    assert!(matches!(
        err("spiffe://cluster.local/ns/a/sa/"),
        IdentityError::ServiceAccount { .. }
    ));
    assert_eq!(
        err(&format!("spiffe://{}", "a".repeat(2048))),
        IdentityError::TooLong { len: 2057 }
    );
    // Service-account names may contain dots, namespaces may not.
    assert!(
        "spiffe://cluster.local/ns/a/sa/b.c"
            .parse::<SpiffeId>()
            .is_ok()
    );
    assert!(matches!(
        err("spiffe://cluster.local/ns/a.b/sa/c"),
        IdentityError::Namespace { .. }
    ));
}

#[test]
fn error_messages_escape_hostile_input() {
    let e = "spiffe://cluster.local/ns/a\nFAKE LOG LINE/sa/b"
        .parse::<SpiffeId>()
        .unwrap_err();
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("a\\nFAKE"), "{msg}");
    assert_eq!(
        msg,
        "namespace `a\\nFAKE LOG LINE` is not a kubernetes namespace name: it may contain only \
         lowercase letters, digits and `-`"
    );

    let long = format!("http://{}", "x".repeat(1000));
    let msg = long.parse::<SpiffeId>().unwrap_err().to_string();
    assert!(msg.len() < 400, "{msg}");
}

#[test]
fn serde_uses_the_string_form() {
    let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, r#""spiffe://td/ns/a/sa/b""#);
    assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    assert!(serde_json::from_str::<SpiffeId>(r#""spiffe://td/ns/a""#).is_err());
    assert!(serde_json::from_str::<TrustDomain>(r#""TD""#).is_err());
}

/// SplitMix64: a tiny deterministic generator so property tests need no extra crates and every
/// failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick(&mut self, alphabet: &[u8]) -> char {
        char::from(alphabet[self.below(alphabet.len())])
    }

    fn string(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len).map(|_| self.pick(alphabet)).collect()
    }

    /// A DNS label: alphanumeric ends, `-` allowed inside.
    fn label(&mut self, max: usize) -> String {
        let len = 1 + self.below(max);
        let mut s = self.string(LOWER_DIGITS, 1);
        if len > 1 {
            s.push_str(&self.string(b"abcdefghijklmnopqrstuvwxyz0123456789-", len - 2));
            s.push_str(&self.string(LOWER_DIGITS, 1));
        }
        s
    }
}

const LOWER_DIGITS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

#[test]
fn property_generated_ids_round_trip() {
    let mut rng = Rng(0x5eed);
    for _ in 0..5_000 {
        let trust_domain_len = 1 + rng.below(40);
        let trust_domain = rng.string(b"abcdefghijklmnopqrstuvwxyz0123456789.-_", trust_domain_len);
        let namespace = rng.label(63);
        let service_account = (0..=rng.below(3))
            .map(|_| rng.label(20))
            .collect::<Vec<_>>()
            .join(".");

        let id = SpiffeId::new(td(&trust_domain), &namespace, &service_account).unwrap();
        let text = id.to_string();
        assert_eq!(
            text,
            format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
        );
        assert_eq!(text.parse::<SpiffeId>().unwrap(), id, "{text}");
    }
}

#[test]
fn property_accepted_strings_are_canonical() {
    // Mutate valid IDs with characters from a hostile alphabet: parsing must never panic, and
    // whatever it accepts must print back byte for byte (one spelling per identity).
    let mut rng = Rng(0xbad5eed);
    let alphabet = "abcz09./-_:@%?#AZ\n \u{e9}\u{0}sn".as_bytes();
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut s: Vec<char> = "spiffe://cluster.local/ns/ns-1/sa/sa.x".chars().collect();
        for _ in 0..=rng.below(3) {
            let at = rng.below(s.len() + 1);
            match rng.below(3) {
                0 if at < s.len() => {
                    s.remove(at);
                }
                1 if at < s.len() => s[at] = rng.pick(alphabet),
                _ => s.insert(at, rng.pick(alphabet)),
            }
        }
        let s: String = s.into_iter().collect();
        if let Ok(id) = s.parse::<SpiffeId>() {
            accepted += 1;
            assert_eq!(id.to_string(), s);
        }
    }
    assert!(
        accepted > 100,
        "the mutation mix should keep some IDs valid"
    );
}

fn cert_with_sans(sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.self_signed(&key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

#[test]
fn reads_the_single_spiffe_uri_san() {
    let der = cert_with_sans(vec![
        SanType::DnsName("web.default.svc".try_into().unwrap()),
        uri("https://example.org/not-an-identity"),
        uri("spiffe://cluster.local/ns/default/sa/web"),
    ]);
    let id = SpiffeId::from_certificate(&der).unwrap();
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
}

#[test]
fn certificate_identity_errors() {
    let none = cert_with_sans(vec![SanType::DnsName("web".try_into().unwrap())]);
    assert_eq!(
        SpiffeId::from_certificate(&none),
        Err(CertIdentityError::NoSpiffeId)
    );
    assert_eq!(
        SpiffeId::from_certificate(&cert_with_sans(vec![])),
        Err(CertIdentityError::NoSpiffeId)
    );

    let two = cert_with_sans(vec![
        uri("spiffe://cluster.local/ns/a/sa/b"),
        uri("SPIFFE://cluster.local/ns/c/sa/d"),
    ]);
    assert_eq!(
        SpiffeId::from_certificate(&two),
        Err(CertIdentityError::MultipleSpiffeIds { count: 2 })
    );

    let foreign_shape = cert_with_sans(vec![uri("spiffe://cluster.local/workload/x")]);
    let err = SpiffeId::from_certificate(&foreign_shape).unwrap_err();
    assert!(
        matches!(
            err,
            CertIdentityError::InvalidSpiffeId(IdentityError::Path { .. })
        ),
        "{err}"
    );

    assert!(matches!(
        SpiffeId::from_certificate(b"not a certificate"),
        Err(CertIdentityError::Malformed { .. })
    ));
    let mut trailing = cert_with_sans(vec![uri("spiffe://td/ns/a/sa/b")]);
    trailing.extend_from_slice(&[0, 0]);
    assert_eq!(
        SpiffeId::from_certificate(&trailing),
        Err(CertIdentityError::TrailingData { len: 2 })
    );
}

/// A CA's trust domain is read by the same rules as a workload's identity: one `spiffe` URI
/// SAN, whatever the case of its scheme, among URIs of other schemes.
#[test]
fn trust_domain_of_a_ca_certificate() {
    use x509_parser::{certificate::X509Certificate, prelude::FromDer as _};
    let of = |sans| {
        let der = cert_with_sans(sans);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        TrustDomain::from_certificate(&cert)
    };
    assert_eq!(
        of(vec![
            uri("https://example.org/x"),
            uri("spiffe://cluster.local")
        ]),
        Ok(td("cluster.local"))
    );
    assert_eq!(
        of(vec![uri("spiffe://a.example"), uri("SPIFFE://b.example")]),
        Err(CertIdentityError::MultipleSpiffeIds { count: 2 })
    );
    assert_eq!(of(vec![]), Err(CertIdentityError::NoSpiffeId));
    assert!(matches!(
        of(vec![uri("spiffe://")]),
        Err(CertIdentityError::InvalidSpiffeId(
            IdentityError::EmptyTrustDomain
        ))
    ));
    let der = cert_with_sans(vec![uri("spiffe://td/ns/a/sa/b"), uri("urn:x")]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        crate::identity::uri_sans(&cert).unwrap(),
        ["spiffe://td/ns/a/sa/b", "urn:x"]
    );
}
