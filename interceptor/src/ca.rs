//! The built-in certificate authority, and the seam for an external one.
//!
//! The built-in CA is a single self-signed ECDSA P-256 root kept as two files: `root.key`
//! (PKCS#8 PEM, mode 0600) and `root.crt` (PEM). Every agent that loads the same directory
//! issues leaves that chain to the same root, so pods on different nodes trust each other
//! without the agents talking to one another. Leaves are short-lived (24 hours by default)
//! instead of revocable: nothing in the mesh checks CRLs or OCSP.
//!
//! The root carries a `spiffe://<trust domain>` URI SAN, as SPIRE's roots do, so [`Ca::load`]
//! recovers the trust domain from the certificate itself rather than from a third file that
//! could drift.

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
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer,
    pem::{self, PemObject},
};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};
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
}

/// The built-in CA: a root key and certificate held in memory.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_not_before: OffsetDateTime,
    root_not_after: OffsetDateTime,
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
    /// The root has expired, so nothing it signs can verify.
    #[error("`{path}` expired at {not_after}; create a new CA")]
    RootExpired {
        path: PathBuf,
        not_after: OffsetDateTime,
    },
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
    /// Generates a new root for `trust_domain` and stores it in `dir` (created with mode 0700 if
    /// missing).
    ///
    /// The key file is created with mode 0600 in the same `open` call that creates it, so it is
    /// never readable by others, whatever the umask. With [`OnExisting::Replace`] both files are
    /// written under temporary names first and renamed into place.
    pub fn init(
        trust_domain: &TrustDomain,
        dir: &Path,
        existing: OnExisting,
    ) -> Result<Ca, CaError> {
        let (ca, cert_pem) = Ca::generate_with_pem(trust_domain)?;
        let key_pem = Zeroizing::new(ca.issuer.key().serialize_pem());

        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CaError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        let (key_path, cert_path) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
        match existing {
            OnExisting::Refuse => {
                for path in [&key_path, &cert_path] {
                    if fs::symlink_metadata(path).is_ok() {
                        return Err(CaError::AlreadyExists { path: path.clone() });
                    }
                }
                // `create_new` makes the refusal atomic even if another `init` races this one.
                write_new(&key_path, key_pem.as_bytes(), KEY_MODE)?;
                if let Err(e) = write_new(&cert_path, cert_pem.as_bytes(), CERT_MODE) {
                    // Best effort: a key without its certificate is useless and blocks a retry.
                    let _ = fs::remove_file(&key_path);
                    return Err(e);
                }
            }
            OnExisting::Replace => {
                let key_tmp = dir.join(format!(".{KEY_FILE}.new"));
                let cert_tmp = dir.join(format!(".{CERT_FILE}.new"));
                write_replacing(&key_tmp, key_pem.as_bytes(), KEY_MODE)?;
                write_replacing(&cert_tmp, cert_pem.as_bytes(), CERT_MODE)?;
                // Key first: a crash between the renames leaves a pair `load` reports as
                // mismatched rather than one that silently signs with the old key.
                rename(&key_tmp, &key_path)?;
                rename(&cert_tmp, &cert_path)?;
            }
        }
        sync_dir(dir)?;
        Ok(ca)
    }

    /// Generates a new root in memory only; [`Ca::init`] is the variant that persists it.
    pub fn generate(trust_domain: &TrustDomain) -> Result<Ca, CaError> {
        Ca::generate_with_pem(trust_domain).map(|(ca, _)| ca)
    }

    fn generate_with_pem(trust_domain: &TrustDomain) -> Result<(Ca, String), CaError> {
        // Whole seconds, as the certificate stores them, so the in-memory validity is the same.
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("interceptor root {trust_domain}"),
        );
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(CaError::Generate)?,
        )];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial()?);

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let root = params.self_signed(&key).map_err(CaError::Generate)?;
        let pem = root.pem();
        let ca = Ca {
            trust_domain: trust_domain.clone(),
            root_not_before: params.not_before,
            root_not_after: params.not_after,
            issuer: Issuer::new(params, key),
            root: root.into(),
        };
        Ok((ca, pem))
    }

    /// Reads the CA written by [`Ca::init`] from `dir`.
    ///
    /// Refuses a key file that group or others can read, a key that does not match the
    /// certificate, and an expired root, so a misconfigured node fails at startup instead of
    /// at its first handshake.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let (key_path, cert_path) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
        let key = read_key(&key_path)?;

        let cert_pem = fs::read(&cert_path).map_err(|source| CaError::Read {
            path: cert_path.clone(),
            source,
        })?;
        let invalid_cert = |reason: String| CaError::InvalidCertificate {
            path: cert_path.clone(),
            reason,
        };
        let root = CertificateDer::from_pem_slice(&cert_pem)
            .map_err(|e| invalid_cert(format!("no PEM certificate: {e}")))?;
        let (_, cert) = X509Certificate::from_der(&root)
            .map_err(|e| invalid_cert(format!("not x.509 der: {e}")))?;
        if !cert.is_ca() {
            return Err(invalid_cert("it is not a CA certificate".into()));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let root_not_before = cert.validity().not_before.to_datetime();
        let root_not_after = cert.validity().not_after.to_datetime();
        if root_not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::RootExpired {
                path: cert_path,
                not_after: root_not_after,
            });
        }
        let trust_domain = root_trust_domain(&cert).map_err(invalid_cert)?;
        let issuer = Issuer::from_ca_cert_der(&root, key)
            .map_err(|e| invalid_cert(format!("unusable as an issuer: {e}")))?;
        Ok(Ca {
            trust_domain,
            issuer,
            root: root.into_owned(),
            root_not_before,
            root_not_after,
        })
    }

    /// The trust domain whose identities this CA signs.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// When the signing certificate expires; no leaf it issues outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.root_not_after.into()
    }

    /// The root certificate, for building trust stores.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }
}

impl CertificateAuthority for Ca {
    /// Issues a leaf valid from 5 minutes ago (to absorb clock skew between nodes) until `ttl`
    /// from now, cut short to the root's own expiry.
    fn issue_at(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<LeafCert, CaError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let now = OffsetDateTime::from(now);
        if now >= self.root_not_after {
            return Err(CaError::SignerExpired {
                not_after: When(self.root_not_after),
                now: When(now),
            });
        }
        if now < self.root_not_before {
            return Err(CaError::SignerNotYetValid {
                not_before: When(self.root_not_before),
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
        params.not_after = not_after.min(self.root_not_after);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Generate)?;
        LeafCert::new(
            vec![cert.into()],
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.clone()]
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("root_not_after", &self.root_not_after)
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
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => invalid("no `PRIVATE KEY` (PKCS#8) PEM block".into()),
        e => invalid(format!("malformed PEM: {e}")),
    });
    let mut der = der?;
    let key = KeyPair::try_from(&der).map_err(|e| invalid(e.to_string()));
    der.zeroize();
    let key = key?;
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(invalid(format!(
            "it is a {:?} key; the built-in CA uses ECDSA P-256",
            key.algorithm()
        )));
    }
    Ok(key)
}

/// The trust domain is the root's single `spiffe://<trust domain>` URI SAN.
fn root_trust_domain(cert: &X509Certificate<'_>) -> Result<TrustDomain, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative name: {e}"))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix("spiffe://"),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [trust_domain] => trust_domain
            .parse()
            .map_err(|e| format!("its spiffe URI SAN names no valid trust domain: {e}")),
        _ => Err("it has no single spiffe://<trust domain> URI SAN; create it with `interceptor ca init`".into()),
    }
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

const KEY_FILE: &str = "root.key";
const CERT_FILE: &str = "root.crt";
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
/// Backdating of `notBefore`, so a peer whose clock runs a little behind still accepts us.
const CLOCK_SKEW: time::Duration = time::Duration::minutes(5);
const ROOT_LIFETIME: time::Duration = time::Duration::days(3650);

pub mod renew;

#[cfg(test)]
mod tests;
