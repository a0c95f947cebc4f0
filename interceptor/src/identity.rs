//! Workload identity: SPIFFE IDs of Kubernetes service accounts.
//!
//! Everything here is pure parsing and formatting, so the policy and handshake code can rely on
//! a [`SpiffeId`] being well formed without re-checking it. Peer certificates reach this module
//! as untrusted bytes: every failure is an error value, and any input echoed in an error message
//! is escaped and truncated so a hostile peer cannot forge log lines.

use std::{fmt, str::FromStr, sync::Arc};

use serde::{Deserialize, Serialize};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// The SPIFFE trust domain of the mesh, such as `cluster.local`.
///
/// Kept as its own type so a bare string can never be compared against a parsed identity's
/// trust domain by accident.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

/// The identity of one Kubernetes service account: `spiffe://<td>/ns/<namespace>/sa/<name>`.
///
/// Only this path shape is accepted because it is the only one the mesh issues; anything else
/// in a peer certificate is a foreign or malformed identity.
///
/// Shared, not copied: every open flow keeps the identities it was decided on (to decide it
/// again when policy changes), and a clone is a reference count, not three strings per flow.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId(Arc<SpiffeParts>);

/// What a [`SpiffeId`] names; the field order is its sort order.
#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SpiffeParts {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeId")
            .field("trust_domain", &self.0.trust_domain)
            .field("namespace", &self.0.namespace)
            .field("service_account", &self.0.service_account)
            .finish()
    }
}

/// Why a trust domain or SPIFFE ID string was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The trust domain is the empty string.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is longer than SPIFFE allows.
    #[error("trust domain is {len} bytes long; the limit is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong { len: usize },
    /// The trust domain contains a character SPIFFE forbids (uppercase included).
    #[error(
        "trust domain `{trust_domain}` contains {found:?}; only lowercase letters, digits, `.`, \
         `-` and `_` are allowed"
    )]
    TrustDomainCharacter { trust_domain: String, found: char },
    /// The whole ID is longer than SPIFFE allows.
    #[error("spiffe id is {len} bytes long; the limit is {MAX_SPIFFE_ID_LEN}")]
    TooLong { len: usize },
    /// The string does not start with the lowercase `spiffe://` scheme.
    #[error("`{id}` does not start with `spiffe://`")]
    Scheme { id: String },
    /// The path is not `/ns/<namespace>/sa/<service account>`.
    #[error("`{id}` has path `{path}`; expected `/ns/<namespace>/sa/<service account>`")]
    Path { id: String, path: String },
    /// The namespace segment is not a valid Kubernetes namespace name.
    #[error("namespace `{namespace}` is not a kubernetes namespace name: it {rule}")]
    Namespace {
        namespace: String,
        rule: &'static str,
    },
    /// The service-account segment is not a valid Kubernetes service-account name.
    #[error("service account `{service_account}` is not a kubernetes object name: it {rule}")]
    ServiceAccount {
        service_account: String,
        rule: &'static str,
    },
}

/// Why no single mesh identity could be read from a certificate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertIdentityError {
    /// The bytes are not a DER X.509 certificate.
    #[error("certificate is not valid x.509 der: {reason}")]
    Malformed { reason: String },
    /// Bytes follow the certificate; a well-formed peer never sends them.
    #[error("certificate is followed by {len} trailing bytes")]
    TrailingData { len: usize },
    /// No URI SAN with the `spiffe` scheme.
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// More than one `spiffe` URI SAN, so the identity would be ambiguous.
    #[error("certificate has {count} spiffe:// URI SANs; exactly one is required")]
    MultipleSpiffeIds { count: usize },
    /// The single `spiffe` URI SAN is not a mesh identity.
    #[error("certificate URI SAN is not a valid mesh spiffe id")]
    InvalidSpiffeId(#[source] IdentityError),
}

// === impl TrustDomain ===

impl TrustDomain {
    /// The trust domain a CA certificate names in its single `spiffe://<trust domain>` URI
    /// SAN (how `interceptor ca init` marks its roots), under the rules of
    /// [`SpiffeId::from_certificate`].
    pub fn from_certificate(cert: &X509Certificate<'_>) -> Result<Self, CertIdentityError> {
        let uri = single_spiffe_uri(cert)?;
        uri.get(SCHEME.len()..)
            .unwrap_or_default()
            .parse()
            .map_err(CertIdentityError::InvalidSpiffeId)
    }

    /// The trust domain as written in SPIFFE IDs.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(IdentityError::EmptyTrustDomain);
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdentityError::TrustDomainTooLong { len: s.len() });
        }
        let allowed = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_');
        if let Some(found) = s.chars().find(|&c| !allowed(c)) {
            return Err(IdentityError::TrustDomainCharacter {
                trust_domain: printable(s),
                found,
            });
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = IdentityError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TrustDomain> for String {
    fn from(trust_domain: TrustDomain) -> Self {
        trust_domain.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Builds the identity of `service_account` in `namespace`, checking both names.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        if let Some(rule) = dns_label_violation(namespace) {
            return Err(IdentityError::Namespace {
                namespace: printable(namespace),
                rule,
            });
        }
        if let Some(rule) = dns_subdomain_violation(service_account) {
            return Err(IdentityError::ServiceAccount {
                service_account: printable(service_account),
                rule,
            });
        }
        Ok(Self(Arc::new(SpiffeParts {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })))
    }

    /// Reads the single SPIFFE ID from a DER certificate's URI SANs.
    ///
    /// URI SANs with other schemes are ignored; more than one `spiffe` URI (matched without
    /// regard to case, so `SPIFFE://` cannot hide a second identity) is an error because the
    /// peer's identity would be ambiguous. This does not verify the certificate: call it only
    /// on a certificate whose chain has been checked.
    pub fn from_certificate(der: &[u8]) -> Result<Self, CertIdentityError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| CertIdentityError::Malformed {
                reason: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(CertIdentityError::TrailingData { len: rest.len() });
        }
        single_spiffe_uri(&cert)?
            .parse()
            .map_err(CertIdentityError::InvalidSpiffeId)
    }

    /// The trust domain that vouches for this identity.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.0.trust_domain
    }

    /// The Kubernetes namespace of the service account.
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    /// The service account's name within its namespace.
    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong { len: s.len() });
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Err(IdentityError::Scheme { id: printable(s) });
        };
        let (trust_domain, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        let trust_domain = trust_domain.parse()?;
        let mut segments = path.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some(""), Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) => {
                Self::new(trust_domain, namespace, service_account)
            }
            _ => Err(IdentityError::Path {
                id: printable(s),
                path: printable(path),
            }),
        }
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdentityError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

// === helpers ===

/// The URI SANs of a certificate, in order, whatever their scheme.
pub fn uri_sans<'c>(cert: &'c X509Certificate<'_>) -> Result<Vec<&'c str>, CertIdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertIdentityError::Malformed {
            reason: e.to_string(),
        })?;
    Ok(san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect())
}

/// The one URI SAN with the `spiffe` scheme (matched without regard to case, so
/// `SPIFFE://` cannot hide a second identity); none, or more than one, is an error.
fn single_spiffe_uri<'c>(cert: &'c X509Certificate<'_>) -> Result<&'c str, CertIdentityError> {
    let uris: Vec<&str> = uri_sans(cert)?
        .into_iter()
        .filter(|uri| has_spiffe_scheme(uri))
        .collect();
    match uris.as_slice() {
        [uri] => Ok(uri),
        [] => Err(CertIdentityError::NoSpiffeId),
        many => Err(CertIdentityError::MultipleSpiffeIds { count: many.len() }),
    }
}

fn has_spiffe_scheme(uri: &str) -> bool {
    uri.get(..SCHEME.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
}

/// Kubernetes namespace names are RFC 1123 labels.
fn dns_label_violation(label: &str) -> Option<&'static str> {
    if label.is_empty() || label.len() > 63 {
        return Some("must be 1 to 63 characters long");
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("may contain only lowercase letters, digits and `-`");
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Some("must start and end with a letter or digit");
    }
    None
}

/// Kubernetes service-account names are RFC 1123 subdomains: dot-separated labels.
fn dns_subdomain_violation(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 253 {
        return Some("must be 1 to 253 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Some("may contain only lowercase letters, digits, `-` and `.`");
    }
    let bad_label =
        |label: &str| label.is_empty() || label.starts_with('-') || label.ends_with('-');
    if name.split('.').any(bad_label) {
        return Some("must start and end each `.`-separated part with a letter or digit");
    }
    None
}

/// Makes untrusted input safe to embed in an error message: control characters are escaped and
/// long input is cut, so a peer certificate cannot inject log lines or flood the log.
fn printable(input: &str) -> String {
    const LIMIT: usize = 256;
    let mut out: String = input
        .chars()
        .take(LIMIT)
        .flat_map(char::escape_debug)
        .collect();
    if input.chars().nth(LIMIT).is_some() {
        out.push('…');
    }
    out
}

const SCHEME: &str = "spiffe://";
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_SPIFFE_ID_LEN: usize = 2048;

#[cfg(test)]
mod tests;
