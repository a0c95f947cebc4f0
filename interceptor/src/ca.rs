//! The built-in certificate authority, and the seam for an external one.
//!
//! A CA directory (`caDir`) uses Istio's plug-in CA layout, so an Istio `cacerts` secret can
//! be mounted as it is:
//!
//! - `ca-cert.pem` + `ca-key.pem`: the signing CA (usually an intermediate) and its key
//!   (PKCS#8, PKCS#1 or SEC1 PEM; ECDSA P-256/P-384 or RSA; mode 0600 or stricter);
//! - `cert-chain.pem`: the chain from the signer up to its root, signer first;
//! - `root-cert.pem`: the trust bundle, one or more roots. Peers are trusted when they chain to
//!   any of them, which is what makes root rotation possible without an outage.
//!
//! `interceptor ca init` writes a self-signed root as both signer and only root (the quick
//! start); `interceptor ca intermediate` mints a per-node (or per-cluster) intermediate from
//! a root directory so the root key never has to be on a node. The older layout of this
//! project (`root.key` + `root.crt`, a root that signs directly) is still read.
//!
//! Leaves are short-lived (24 hours by default) instead of revocable: nothing in the mesh
//! checks CRLs or OCSP. No leaf outlives any certificate of its signer's chain.
//!
//! The trust domain comes from a `spiffe://<trust domain>` URI SAN on the signer or a root,
//! as SPIRE's and this project's CAs carry; Istio's CAs carry none, and then the node's
//! configured trust domain is used.

use std::{
    fmt,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
    PKCS_RSA_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer,
    pem::{self, PemObject},
};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};
use zeroize::{Zeroize, Zeroizing};

use crate::identity::{CertIdentityError, SpiffeId, TrustDomain};

/// Issues workload certificates for SPIFFE IDs.
///
/// The agent's certificate store depends on this trait rather than on [`Ca`], so an external
/// CA (SPIRE, cert-manager, a cloud CA) can replace the built-in one. Issuance is synchronous:
/// the built-in CA only generates a key and signs, which takes well under a millisecond; an
/// implementation that talks to a remote CA should be driven from a blocking task.
pub trait CertificateAuthority: Send + Sync {
    /// Mints a certificate for `id` that is valid for `ttl` from `now` (the caller's wall
    /// clock, so a test can move it), possibly clipped to the signer's own validity.
    fn issue_at(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<LeafCert, CaError>;

    /// [`CertificateAuthority::issue_at`] the system clock's current time.
    fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<LeafCert, CaError> {
        self.issue_at(id, ttl, SystemTime::now())
    }

    /// The trust anchors peers' certificates must chain to.
    fn roots(&self) -> Vec<CertificateDer<'static>>;

    /// What an operator should be told about upcoming expiry of the CA itself.
    fn expiry_warnings(&self, _now: SystemTime) -> Vec<String> {
        Vec::new()
    }
}

/// The built-in CA: a signing key and certificate, the chain it presents and the roots it
/// trusts, held in memory.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// Sent after each leaf: the signer and intermediates, without self-signed roots.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    /// The window every leaf must fit in: the intersection of the signer chain's validities.
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    /// What `status` and the expiry warnings report.
    signer_info: CertInfo,
    root_info: Vec<CertInfo>,
}

/// The facts about one CA certificate that operators need to see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub trust_domain: Option<TrustDomain>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    pub self_signed: bool,
}

/// What [`Ca::init`] does when the directory already holds a CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExisting {
    /// Fail: replacing the root invalidates every certificate in the mesh.
    Refuse,
    /// Write a new root over the old one.
    Replace,
}

/// A workload certificate and its private key, ready for rustls.
///
/// The key is zeroed when the value is dropped and never appears in `Debug` output.
pub struct LeafCert {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: Vec<u8>,
}

/// Why a CA could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CA directory could not be created.
    #[error("cannot create CA directory `{path}`")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `init` found CA files and was not asked to replace them.
    #[error(
        "`{path}` already exists; refusing to overwrite the mesh root (every issued certificate \
         would stop verifying): remove it or ask for replacement explicitly"
    )]
    AlreadyExists { path: PathBuf },
    /// A CA file could not be written.
    #[error("cannot write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A CA file could not be read.
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The key file is not a regular file (a symlink target is fine, a directory or FIFO is not).
    #[error("`{path}` is not a regular file")]
    NotAFile { path: PathBuf },
    /// The key file can be read by users other than its owner.
    #[error(
        "`{path}` has mode {mode:03o}; refusing a CA key that group or others can read \
         (run `chmod 600 {path}`; for a kubernetes secret volume set `defaultMode: 0400`)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    /// The key file does not hold a usable ECDSA P-256 PKCS#8 key.
    #[error("`{path}` does not hold a usable CA key: {reason}")]
    InvalidKey { path: PathBuf, reason: String },
    /// The certificate file does not hold a usable CA certificate.
    #[error("`{path}` does not hold a usable CA certificate: {reason}")]
    InvalidCertificate { path: PathBuf, reason: String },
    /// Key and certificate come from different roots.
    #[error("`{key}` does not match the public key in `{cert}`; the files come from different CAs")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    /// A certificate of the signer's chain is outside its validity at load time.
    #[error(
        "`{path}` holds a certificate that expired at {not_after} (now {now}); install a current \
         one (`interceptor ca status` shows every file)"
    )]
    CertificateExpired {
        path: PathBuf,
        not_after: When,
        now: When,
    },
    /// A certificate of the signer's chain is not valid yet.
    #[error(
        "`{path}` holds a certificate not valid before {not_before} (now {now}); check the \
         node's clock or the certificate"
    )]
    CertificateNotYetValid {
        path: PathBuf,
        not_before: When,
        now: When,
    },
    /// The directory holds neither layout.
    #[error(
        "`{dir}` holds no CA: expected `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem` and \
         `root-cert.pem` (Istio's plug-in layout; `interceptor ca init` writes it) or the older \
         `root.key` + `root.crt`"
    )]
    NoCa { dir: PathBuf },
    /// `cert-chain.pem` does not start with the signer.
    #[error("`{path}` must begin with the certificate in `ca-cert.pem` (signer first, root last)")]
    ChainMismatch { path: PathBuf },
    /// What the signer issues would not verify against the trust bundle.
    #[error(
        "a certificate signed by `{signer}` does not verify against the roots in `{roots}`: \
         {reason}"
    )]
    NotTrusted {
        signer: PathBuf,
        roots: PathBuf,
        reason: String,
    },
    /// The CA names another trust domain than the node's.
    #[error("`{path}` is a CA for trust domain `{found}`, but this node is `{expected}`")]
    TrustDomainMismatch {
        path: PathBuf,
        found: TrustDomain,
        expected: TrustDomain,
    },
    /// No trust domain could be found and none was given.
    #[error(
        "`{path}` carries no spiffe://<trust domain> URI SAN; pass the trust domain explicitly"
    )]
    NoTrustDomain { path: PathBuf },
    /// rcgen failed to generate a key or sign a certificate.
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The requested identity belongs to another trust domain.
    #[error("cannot issue for {id}: this CA signs only trust domain `{trust_domain}`")]
    ForeignTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    /// The requested lifetime is zero or too large to represent.
    #[error("certificate lifetime {ttl:?} is not usable; pick between 1 second and 10 years")]
    InvalidTtl { ttl: Duration },
    /// The signing certificate has expired, so nothing it signs would verify.
    #[error(
        "the signing CA certificate expired at {not_after} (now {now}); install a current signer"
    )]
    SignerExpired { not_after: When, now: When },
    /// The signing certificate is not valid yet (or the clock is behind).
    #[error(
        "the signing CA certificate is not valid before {not_before} (now {now}); check the \
         node's clock or install a current signer"
    )]
    SignerNotYetValid { not_before: When, now: When },
    /// A certificate handed to [`LeafCert::new`] has no usable identity.
    #[error("certificate carries no usable mesh identity")]
    LeafIdentity(#[source] CertIdentityError),
    /// A certificate handed to [`LeafCert::new`] could not be parsed.
    #[error("certificate cannot be parsed: {reason}")]
    LeafCertificate { reason: String },
    /// [`LeafCert::new`] was given no certificate.
    #[error("certificate chain is empty")]
    EmptyChain,
}

// === impl Ca ===

impl Ca {
    /// Generates a new self-signed root for `trust_domain` and stores it in `dir` (created
    /// with mode 0700 if missing) in the plug-in layout, as signer and only root.
    ///
    /// The key file is created with mode 0600 in the same `open` call that creates it, so it is
    /// never readable by others, whatever the umask. With [`OnExisting::Replace`] every file
    /// is written under a temporary name first and renamed into place.
    pub fn init(
        trust_domain: &TrustDomain,
        dir: &Path,
        existing: OnExisting,
    ) -> Result<Ca, CaError> {
        let (ca, cert_pem) = Ca::generate_with_pem(trust_domain)?;
        let key_pem = Zeroizing::new(ca.issuer.key().serialize_pem());
        let files = Files {
            key: key_pem.as_bytes(),
            cert: cert_pem.as_bytes(),
            chain: cert_pem.as_bytes(),
            roots: cert_pem.as_bytes(),
        };
        write_layout(dir, &files, existing)?;
        Ok(ca)
    }

    /// Mints an intermediate CA signed by the CA in `root_dir` and writes it into `dir` in the
    /// plug-in layout: the intermediate as signer, the chain up to the root, and as trust
    /// bundle the roots of `root_dir` added to those `dir` already trusts (so switching a
    /// node to a new root's intermediate never drops the old root by itself; removing it is
    /// the last, explicit step of a root rotation).
    ///
    /// The lifetime is clipped to the root's. The root key is only read, never copied.
    pub fn intermediate(
        root_dir: &Path,
        dir: &Path,
        ttl: Duration,
        trust_domain: Option<&TrustDomain>,
        existing: OnExisting,
    ) -> Result<Ca, CaError> {
        if let (Ok(a), Ok(b)) = (fs::canonicalize(root_dir), fs::canonicalize(dir))
            && a == b
        {
            // With `--force` this would replace the root's own key with the intermediate's.
            return Err(CaError::AlreadyExists {
                path: dir.join(SIGNER_KEY_FILE),
            });
        }
        let parent = Ca::load_for(root_dir, trust_domain, SystemTime::now())?;
        let now = whole_seconds(OffsetDateTime::now_utc());
        let not_after = time::Duration::try_from(ttl)
            .ok()
            .filter(|ttl| ttl.whole_seconds() >= 60 && *ttl <= ROOT_LIFETIME)
            .and_then(|ttl| now.checked_add(ttl))
            .ok_or(CaError::InvalidTtl { ttl })?
            .min(parent.not_after);
        let td = parent.trust_domain.clone();
        let mut params = ca_params(format!("interceptor intermediate {td}"), &td, 0)?;
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let cert = params
            .signed_by(&key, &parent.issuer)
            .map_err(CaError::Generate)?;

        // Chain: the new intermediate, then the parent's whole chain up to its root.
        let parent_chain = match layout(root_dir)? {
            Layout::Plugin => read_certs_or(&root_dir.join(CHAIN_FILE), || {
                read_certs(&root_dir.join(SIGNER_CERT_FILE))
            })?,
            Layout::Legacy => read_certs(&root_dir.join(LEGACY_CERT_FILE))?,
        };
        let mut chain_pem = cert.pem();
        for c in &parent_chain {
            chain_pem.push_str(&pem_cert(c));
        }
        let mut roots: Vec<CertificateDer<'static>> = Vec::new();
        if let Ok(existing_roots) = read_certs(&dir.join(ROOTS_FILE)) {
            roots.extend(existing_roots);
        }
        for r in &parent.roots {
            if !roots.contains(r) {
                roots.push(r.clone());
            }
        }
        let roots_pem: String = roots.iter().map(pem_cert).collect();
        let key_pem = Zeroizing::new(key.serialize_pem());
        let cert_pem = cert.pem();
        write_layout(
            dir,
            &Files {
                key: key_pem.as_bytes(),
                cert: cert_pem.as_bytes(),
                chain: chain_pem.as_bytes(),
                roots: roots_pem.as_bytes(),
            },
            existing,
        )?;
        Ca::load_for(dir, Some(&td), SystemTime::now())
    }

    /// Generates a new root in memory only; [`Ca::init`] is the variant that persists it.
    pub fn generate(trust_domain: &TrustDomain) -> Result<Ca, CaError> {
        Ca::generate_with_pem(trust_domain).map(|(ca, _)| ca)
    }

    fn generate_with_pem(trust_domain: &TrustDomain) -> Result<(Ca, String), CaError> {
        // Whole seconds, as the certificate stores them, so the in-memory validity is the same.
        let now = whole_seconds(OffsetDateTime::now_utc());
        // Path length 1: the root may sign intermediates (`ca intermediate`), which sign
        // leaves only.
        let mut params = ca_params(format!("interceptor root {trust_domain}"), trust_domain, 1)?;
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_LIFETIME;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let root = params.self_signed(&key).map_err(CaError::Generate)?;
        let pem = root.pem();
        let der: CertificateDer<'static> = root.into();
        let info = cert_info(&der).map_err(|reason| CaError::InvalidCertificate {
            path: PathBuf::from("(generated)"),
            reason,
        })?;
        let ca = Ca {
            trust_domain: trust_domain.clone(),
            not_before: params.not_before,
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
            intermediates: Vec::new(),
            roots: vec![der],
            signer_info: info.clone(),
            root_info: vec![info],
        };
        Ok((ca, pem))
    }

    /// Reads the CA in `dir`, taking the trust domain from its certificates.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        Ca::load_for(dir, None, SystemTime::now())
    }

    /// Reads the CA in `dir` (either layout) and checks it is usable at `now`.
    ///
    /// Refuses a key file that group or others can read, a key that does not match the
    /// signer, a signer chain with a certificate outside its validity, a chain file that does
    /// not start at the signer, a trust domain other than `trust_domain`, and a signer whose
    /// leaves would not verify against the trust bundle (checked by issuing one and verifying
    /// it as a peer would), so a misconfigured node fails at start-up or reload instead of at
    /// its first handshake.
    pub fn load_for(
        dir: &Path,
        trust_domain: Option<&TrustDomain>,
        now: SystemTime,
    ) -> Result<Ca, CaError> {
        let (key_path, cert_path, chain_path, roots_path) = match layout(dir)? {
            Layout::Plugin => (
                dir.join(SIGNER_KEY_FILE),
                dir.join(SIGNER_CERT_FILE),
                Some(dir.join(CHAIN_FILE)),
                dir.join(ROOTS_FILE),
            ),
            Layout::Legacy => (
                dir.join(LEGACY_KEY_FILE),
                dir.join(LEGACY_CERT_FILE),
                None,
                dir.join(LEGACY_CERT_FILE),
            ),
        };
        let key = read_key(&key_path)?;
        let signer = read_certs(&cert_path)?.swap_remove(0);
        let invalid = |path: &Path, reason: String| CaError::InvalidCertificate {
            path: path.to_owned(),
            reason,
        };
        let signer_info = cert_info(&signer).map_err(|r| invalid(&cert_path, r))?;
        if !signer_info.is_ca {
            return Err(invalid(&cert_path, "it is not a CA certificate".into()));
        }
        {
            let (_, cert) = X509Certificate::from_der(&signer)
                .map_err(|e| invalid(&cert_path, format!("not x.509 der: {e}")))?;
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(CaError::KeyMismatch {
                    key: key_path,
                    cert: cert_path,
                });
            }
        }
        let chain = match &chain_path {
            Some(path) => {
                let chain = read_certs_or(path, || Ok(vec![signer.clone()]))?;
                if chain[0] != signer {
                    return Err(CaError::ChainMismatch { path: path.clone() });
                }
                chain
            }
            None => vec![signer.clone()],
        };
        let roots = read_certs(&roots_path)?;
        let root_info = roots
            .iter()
            .map(|r| cert_info(r).map_err(|e| invalid(&roots_path, e)))
            .collect::<Result<Vec<_>, _>>()?;

        let now_utc = OffsetDateTime::from(now);
        let chain_file = chain_path.as_deref().unwrap_or(&cert_path);
        let mut not_before = OffsetDateTime::UNIX_EPOCH;
        let mut not_after: OffsetDateTime = time::PrimitiveDateTime::MAX.assume_utc();
        let mut intermediates = Vec::new();
        for (i, der) in chain.iter().enumerate() {
            let path = if i == 0 { &cert_path } else { chain_file };
            let info = cert_info(der).map_err(|r| invalid(path, r))?;
            if now_utc >= info.not_after {
                return Err(CaError::CertificateExpired {
                    path: path.to_owned(),
                    not_after: When(info.not_after),
                    now: When(now_utc),
                });
            }
            if now_utc < info.not_before {
                return Err(CaError::CertificateNotYetValid {
                    path: path.to_owned(),
                    not_before: When(info.not_before),
                    now: When(now_utc),
                });
            }
            not_before = not_before.max(info.not_before);
            not_after = not_after.min(info.not_after);
            if !info.self_signed {
                intermediates.push(der.clone());
            }
        }

        let found = signer_info
            .trust_domain
            .clone()
            .or_else(|| root_info.iter().find_map(|r| r.trust_domain.clone()));
        let trust_domain = match (found, trust_domain) {
            (Some(found), Some(expected)) if &found != expected => {
                return Err(CaError::TrustDomainMismatch {
                    path: cert_path,
                    found,
                    expected: expected.clone(),
                });
            }
            (_, Some(expected)) => expected.clone(),
            (Some(found), None) => found,
            (None, None) => return Err(CaError::NoTrustDomain { path: cert_path }),
        };
        let issuer = Issuer::from_ca_cert_der(&signer, key)
            .map_err(|e| invalid(&cert_path, format!("unusable as an issuer: {e}")))?;
        let ca = Ca {
            trust_domain,
            issuer,
            intermediates,
            roots,
            not_before,
            not_after,
            signer_info,
            root_info,
        };
        ca.check_trusted(now)
            .map_err(|reason| CaError::NotTrusted {
                signer: cert_path,
                roots: roots_path,
                reason,
            })?;
        Ok(ca)
    }

    /// Issues a throwaway leaf and verifies it against the bundle the way a peer's verifier
    /// does (same signature algorithms), so a chain that would fail every handshake is found
    /// at load time.
    fn check_trusted(&self, now: SystemTime) -> Result<(), String> {
        let probe = SpiffeId::new(self.trust_domain.clone(), "interceptor", "ca-check")
            .map_err(|e| e.to_string())?;
        let leaf = self
            .issue_at(&probe, Duration::from_secs(60), now)
            .map_err(|e| e.to_string())?;
        let mut store = rustls::RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone()).map_err(|e| e.to_string())?;
        }
        let provider = crate::handshake::MeshCrypto::default_aes_gcm().provider();
        let parsed = rustls::server::ParsedCertificate::try_from(&leaf.chain()[0])
            .map_err(|e| e.to_string())?;
        let at = rustls_pki_types::UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .map_err(|e| e.to_string())?,
        );
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &store,
            &leaf.chain()[1..],
            at,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| e.to_string())
    }

    /// The trust domain whose identities this CA signs.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The first root of the trust bundle (the only one for a CA from [`Ca::init`]).
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.roots[0]
    }

    /// When the signer chain's validity ends; no leaf outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after.into()
    }

    /// The signing certificate's facts.
    pub fn signer(&self) -> &CertInfo {
        &self.signer_info
    }

    /// Warnings about the signer and the roots at `now`: expired roots (useless in the
    /// bundle), and a signer or root ending within [`EXPIRY_WARNING`].
    pub fn expiry_report(&self, now: SystemTime) -> Vec<String> {
        let now = OffsetDateTime::from(now);
        let mut out = Vec::new();
        let left = |end: OffsetDateTime| (end - now).whole_days();
        if self.not_after - now < EXPIRY_WARNING {
            out.push(format!(
                "the signing CA chain (signer `{}`) expires at {} ({} days); leaves are cut short to \
                 it: install a new signer before then",
                self.signer_info.subject,
                When(self.not_after),
                left(self.not_after)
            ));
        }
        for root in &self.root_info {
            if root.not_after <= now {
                out.push(format!(
                    "trust bundle root `{}` (serial {}) expired at {}; remove it from the bundle",
                    root.subject,
                    root.serial,
                    When(root.not_after)
                ));
            } else if root.not_after - now < EXPIRY_WARNING {
                out.push(format!(
                    "trust bundle root `{}` (serial {}) expires at {} ({} days): rotate to a new \
                     root before then",
                    root.subject,
                    root.serial,
                    When(root.not_after),
                    left(root.not_after)
                ));
            }
        }
        out
    }
}

impl CertificateAuthority for Ca {
    /// Issues a leaf valid from 5 minutes before `now` (to absorb clock skew between nodes)
    /// until `ttl` after it, cut short to the end of the signer chain's validity.
    fn issue_at(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<LeafCert, CaError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let now = whole_seconds(OffsetDateTime::from(now));
        if now >= self.not_after {
            return Err(CaError::SignerExpired {
                not_after: When(self.not_after),
                now: When(now),
            });
        }
        if now < self.not_before {
            return Err(CaError::SignerNotYetValid {
                not_before: When(self.not_before),
                now: When(now),
            });
        }
        let not_after = time::Duration::try_from(ttl)
            .ok()
            .filter(|ttl| ttl.whole_seconds() >= 1 && *ttl <= ROOT_LIFETIME)
            .and_then(|ttl| now.checked_add(ttl))
            .ok_or(CaError::InvalidTtl { ttl })?;

        let mut params = CertificateParams::default();
        // An empty subject is what SPIFFE expects; rcgen then marks the SAN critical (RFC 5280).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string().try_into().map_err(CaError::Generate)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after.min(self.not_after);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Generate)?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.into());
        chain.extend(self.intermediates.iter().cloned());
        LeafCert::new(chain, PrivatePkcs8KeyDer::from(key.serialize_der()).into())
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    fn expiry_warnings(&self, now: SystemTime) -> Vec<String> {
        self.expiry_report(now)
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.roots.len())
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

// === impl LeafCert ===

impl LeafCert {
    /// Wraps a chain (leaf first) and the leaf's private key, reading the leaf's identity and
    /// expiry so callers can schedule rotation without parsing the certificate again.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<LeafCert, CaError> {
        let Some(leaf) = chain.first() else {
            return Err(CaError::EmptyChain);
        };
        let id = SpiffeId::from_certificate(leaf).map_err(CaError::LeafIdentity)?;
        let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| CaError::LeafCertificate {
            reason: e.to_string(),
        })?;
        let not_before = cert.validity().not_before.to_datetime().into();
        let not_after = cert.validity().not_after.to_datetime().into();
        let serial = cert.raw_serial().to_vec();
        Ok(LeafCert {
            id,
            chain,
            key,
            not_before,
            not_after,
            serial,
        })
    }

    /// The identity the leaf certifies.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf certificate followed by any intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf's private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// When the leaf stops being valid; rotation must finish before this.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the leaf starts being valid (backdated a little at issuance for clock skew).
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The certificate serial number in hex, which tells two leaves of one identity apart in
    /// logs.
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Drop for LeafCert {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl fmt::Debug for LeafCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCert")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .field("serial", &self.serial_hex())
            .field("key", &"<redacted>")
            .finish()
    }
}

// === helpers ===

/// A point in time shown as RFC 3339 UTC (`2026-12-06T05:42:14Z`) in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct When(pub OffsetDateTime);

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0.to_offset(time::UtcOffset::UTC);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    }
}

/// Reads the root key, checking permissions on the open file so the check and the read see the
/// same inode.
fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let read_err = |source| CaError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(CaError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut pem = Zeroizing::new(Vec::new());
    file.read_to_end(&mut pem).map_err(read_err)?;

    let invalid = |reason: String| CaError::InvalidKey {
        path: path.to_owned(),
        reason,
    };
    // PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) and SEC1 (`EC PRIVATE KEY`): Istio's
    // tooling writes all three.
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            invalid("no `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` PEM block".into())
        }
        e => invalid(format!("malformed PEM: {e}")),
    });
    let mut der = der?;
    let key = KeyPair::try_from(&der).map_err(|e| invalid(e.to_string()));
    der.zeroize();
    let key = key?;
    let alg = key.algorithm();
    if alg != &PKCS_ECDSA_P256_SHA256 && alg != &PKCS_ECDSA_P384_SHA384 && alg != &PKCS_RSA_SHA256 {
        return Err(invalid(format!(
            "it is a {alg:?} key; a signing CA key must be ECDSA P-256, ECDSA P-384 or RSA"
        )));
    }
    Ok(key)
}

/// Which layout a CA directory uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Istio's plug-in CA files.
    Plugin,
    /// `root.key` + `root.crt`, written by this project before it had intermediates.
    Legacy,
}

fn layout(dir: &Path) -> Result<Layout, CaError> {
    let exists = |name: &str| fs::symlink_metadata(dir.join(name)).is_ok();
    if exists(SIGNER_CERT_FILE) || exists(SIGNER_KEY_FILE) {
        Ok(Layout::Plugin)
    } else if exists(LEGACY_CERT_FILE) || exists(LEGACY_KEY_FILE) {
        Ok(Layout::Legacy)
    } else {
        Err(CaError::NoCa {
            dir: dir.to_owned(),
        })
    }
}

/// Every certificate in a PEM file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bytes = fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_certs(path, &bytes)
}

fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let invalid = |reason: String| CaError::InvalidCertificate {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no PEM certificate".into()));
    }
    for (i, c) in certs.iter().enumerate() {
        X509Certificate::from_der(c)
            .map_err(|e| invalid(format!("certificate {} is not x.509 der: {e}", i + 1)))?;
    }
    Ok(certs)
}

/// [`read_certs`], or `missing` when the file does not exist.
fn read_certs_or(
    path: &Path,
    missing: impl FnOnce() -> Result<Vec<CertificateDer<'static>>, CaError>,
) -> Result<Vec<CertificateDer<'static>>, CaError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => missing(),
        _ => read_certs(path),
    }
}

/// Facts about a certificate for messages and `ca status`.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not x.509 der: {e}"))?;
    let trust_domain = TrustDomain::from_certificate(&cert).ok();
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        trust_domain,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        is_ca: cert.is_ca(),
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
    })
}

/// The common shape of the CA certificates this project mints.
fn ca_params(
    common_name: String,
    trust_domain: &TrustDomain,
    path_len: u8,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(CaError::Generate)?,
    )];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

fn pem_cert(der: &CertificateDer<'_>) -> String {
    use std::fmt::Write as _;
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.as_ref().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The four files of the plug-in layout, as bytes to write.
struct Files<'a> {
    key: &'a [u8],
    cert: &'a [u8],
    chain: &'a [u8],
    roots: &'a [u8],
}

/// Writes the plug-in layout into `dir` (created 0700 if missing).
///
/// With [`OnExisting::Refuse`] nothing is written if any CA file (of either layout) exists.
/// With [`OnExisting::Replace`] each file is written under a temporary name and renamed into
/// place, key first: a crash or a reload between the renames sees a key that does not match
/// the certificate, which `load` refuses, rather than material that silently mixes two CAs.
fn write_layout(dir: &Path, files: &Files<'_>, existing: OnExisting) -> Result<(), CaError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    let plan = [
        (SIGNER_KEY_FILE, files.key, KEY_MODE),
        (SIGNER_CERT_FILE, files.cert, CERT_MODE),
        (CHAIN_FILE, files.chain, CERT_MODE),
        (ROOTS_FILE, files.roots, CERT_MODE),
    ];
    match existing {
        OnExisting::Refuse => {
            for name in [
                SIGNER_KEY_FILE,
                SIGNER_CERT_FILE,
                CHAIN_FILE,
                ROOTS_FILE,
                LEGACY_KEY_FILE,
                LEGACY_CERT_FILE,
            ] {
                let path = dir.join(name);
                if fs::symlink_metadata(&path).is_ok() {
                    return Err(CaError::AlreadyExists { path });
                }
            }
            let mut written = Vec::new();
            for (name, contents, mode) in plan {
                let path = dir.join(name);
                // `create_new` makes the refusal atomic even if another `init` races this one.
                if let Err(e) = write_new(&path, contents, mode) {
                    // Best effort: a partial CA is useless and blocks a retry.
                    for p in written {
                        let _ = fs::remove_file(p);
                    }
                    return Err(e);
                }
                written.push(path);
            }
        }
        OnExisting::Replace => {
            for (name, contents, mode) in plan {
                write_replacing(&dir.join(format!(".{name}.new")), contents, mode)?;
            }
            for (name, _, _) in plan {
                rename(&dir.join(format!(".{name}.new")), &dir.join(name))?;
            }
        }
    }
    sync_dir(dir)
}

/// A positive 128-bit serial from the system RNG; RFC 5280 asks for unpredictable serials.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    // rcgen exposes no RNG; borrow the one from the aws-lc-rs provider rustls uses anyway.
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    // Clear the sign bit and keep the top byte non-zero so the DER integer stays 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Creates `path` with `mode` in one `open` call (no window with wider permissions) and
/// flushes it to disk.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let write_err = |source: io::Error| match source.kind() {
        io::ErrorKind::AlreadyExists => CaError::AlreadyExists {
            path: path.to_owned(),
        },
        _ => CaError::Write {
            path: path.to_owned(),
            source,
        },
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

/// Like [`write_new`], first removing a leftover from an interrupted earlier run.
fn write_replacing(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(CaError::Write {
                path: path.to_owned(),
                source,
            });
        }
    }
    write_new(path, contents, mode)
}

fn rename(from: &Path, to: &Path) -> Result<(), CaError> {
    fs::rename(from, to).map_err(|source| CaError::Write {
        path: to.to_owned(),
        source,
    })
}

/// Makes the new directory entries durable, not just the file contents.
fn sync_dir(dir: &Path) -> Result<(), CaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Lifetime of a leaf when the caller has no reason to choose another.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_hours(24);

/// The signing CA's certificate (Istio plug-in layout).
pub const SIGNER_CERT_FILE: &str = "ca-cert.pem";
/// The signing CA's private key.
pub const SIGNER_KEY_FILE: &str = "ca-key.pem";
/// The chain from the signer to its root, signer first.
pub const CHAIN_FILE: &str = "cert-chain.pem";
/// The trust bundle.
pub const ROOTS_FILE: &str = "root-cert.pem";
/// Every file of either layout a CA directory may hold, for watching and `ca status`.
pub const CA_FILES: [&str; 6] = [
    SIGNER_CERT_FILE,
    SIGNER_KEY_FILE,
    CHAIN_FILE,
    ROOTS_FILE,
    LEGACY_CERT_FILE,
    LEGACY_KEY_FILE,
];
const LEGACY_KEY_FILE: &str = "root.key";
const LEGACY_CERT_FILE: &str = "root.crt";
/// A signer or root closer than this to its end is warned about (Istio's own root
/// certificate check warns at the same distance).
pub const EXPIRY_WARNING: time::Duration = time::Duration::days(30);
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
/// Backdating of `notBefore`, so a peer whose clock runs a little behind still accepts us.
const CLOCK_SKEW: time::Duration = time::Duration::minutes(5);
const ROOT_LIFETIME: time::Duration = time::Duration::days(3650);

pub mod renew;
pub mod status;

#[cfg(test)]
mod tests;
