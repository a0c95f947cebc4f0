//! TLS origination for DestinationRule `SIMPLE` and `MUTUAL`: the app speaks plaintext to the
//! agent, the agent speaks TLS to a server outside the mesh (a database that requires client
//! certificates, an external API), with the rule's files.
//!
//! Credentials are read when a policy generation is built, never per connection, and only
//! from inside `policy.certDirs` (see [`super::files`]): a rule whose files are outside it,
//! missing, not regular files, too large or unparsable makes the whole generation invalid (at
//! start the agent refuses to start, at runtime the last good policy stays), naming the rule's
//! file, document and field. A setting whose files have not changed since the last build
//! (same [`Stamp`](super::files::Stamp)s) reuses its config without reading them again.
//!
//! Server verification, as Envoy does for Istio: the chain must lead to `caCertificates` (or
//! the system roots when the rule names none); then the certificate must carry one of
//! `subjectAltNames` (DNS names, IP addresses or URIs such as SPIFFE IDs), or, when the rule
//! lists none, the name the agent connects with (`sni`, else the service host, else the
//! endpoint address). `insecureSkipVerify` skips all of it.
//!
//! These flows always use the rustls relay: a foreign server may send session tickets, pad
//! records or send warning alerts, which rustls handles and the kernel record layer would not.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, DigitallySignedStruct, Error,
    RootCertStore, SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_name,
    },
    pki_types::{
        CertificateDer, PrivateKeyDer, ServerName, UnixTime,
        pem::{self, PemObject as _},
    },
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use x509_parser::{certificate::X509Certificate, prelude::FromDer as _};

use super::files;
use crate::{
    handshake::{self, CryptoPolicy, ServerChain},
    policy::{ClientTls, DestinationRule, TlsMode},
};

/// Where distributions keep the system trust bundle; the first that exists is used when a rule
/// names no `caCertificates`.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Client configs for every `SIMPLE`/`MUTUAL` setting of a policy generation.
#[derive(Default)]
pub struct Configs {
    entries: Vec<(ClientTls, Arc<ClientConfig>)>,
}

/// Why a rule's TLS settings cannot be used: the field and what is wrong.
#[derive(Debug)]
pub struct CredentialError {
    pub field: &'static str,
    pub message: String,
}

/// Where origination credentials may be read from (`policy.certDirs`), and the configs built
/// from them, by setting and the stamps of the files they were read from.
#[derive(Default)]
pub struct CertFiles {
    dirs: Vec<PathBuf>,
    cache: std::sync::Mutex<Vec<Cached>>,
}

struct Cached {
    tls: ClientTls,
    crypto: CryptoPolicy,
    stamps: Vec<files::Stamp>,
    config: Arc<ClientConfig>,
}

/// The setting's files, open: the rule's own, or the system bundle.
struct Opened {
    roots: Option<files::Opened>,
    key_pair: Option<(files::Opened, files::Opened)>,
}

impl Opened {
    fn stamps(&self) -> Vec<files::Stamp> {
        self.roots
            .iter()
            .chain(self.key_pair.iter().flat_map(|(c, k)| [c, k]))
            .map(|o| o.stamp)
            .collect()
    }
}

impl CertFiles {
    /// Credentials may be read from inside `dirs` only.
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self {
            dirs,
            cache: Default::default(),
        }
    }

    /// Opens a file a rule names (`field`), inside `policy.certDirs`.
    fn open(&self, path: &str, field: &'static str) -> Result<files::Opened, CredentialError> {
        files::open_in(
            Path::new(path),
            &self.dirs,
            "policy.certDirs",
            files::CERT_FILE_MAX,
        )
        .map_err(|message| CredentialError { field, message })
    }

    /// What change detection compares for one credential file (see
    /// [`files::Opened::fingerprint`]); an error when it cannot be opened, which the next
    /// build reports.
    pub fn fingerprint(&self, path: &Path) -> Option<Vec<u8>> {
        files::open_in(path, &self.dirs, "policy.certDirs", files::CERT_FILE_MAX)
            .ok()
            .map(files::Opened::fingerprint)
    }

    fn open_setting(&self, tls: &ClientTls) -> Result<Opened, CredentialError> {
        let roots = match &tls.ca_certificates {
            Some(file) => Some(self.open(file, "caCertificates")?),
            None => SYSTEM_BUNDLES
                .iter()
                .find_map(|p| files::open_trusted(Path::new(p), files::CERT_FILE_MAX * 4).ok()),
        };
        let key_pair = match (tls.mode, &tls.client_certificate, &tls.private_key) {
            (TlsMode::Mutual, Some(cert), Some(key)) => Some((
                self.open(cert, "clientCertificate")?,
                self.open(key, "privateKey")?,
            )),
            (TlsMode::Mutual, _, _) => {
                return Err(CredentialError {
                    field: "clientCertificate",
                    message: "MUTUAL needs clientCertificate and privateKey".to_owned(),
                });
            }
            _ => None,
        };
        Ok(Opened { roots, key_pair })
    }

    /// The config for `tls`: from the cache when its files have the stamps they had when it
    /// was built, else read and built (and cached once the files have settled).
    fn config(
        &self,
        tls: &ClientTls,
        crypto: CryptoPolicy,
    ) -> Result<Arc<ClientConfig>, CredentialError> {
        let opened = self.open_setting(tls)?;
        let stamps = opened.stamps();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cache
            .iter()
            .find(|c| c.tls == *tls && c.crypto == crypto && c.stamps == stamps)
        {
            return Ok(Arc::clone(&hit.config));
        }
        let settled = stamps.iter().all(files::Stamp::settled);
        let config = client_config(tls, opened, crypto)?;
        cache.retain(|c| c.tls != *tls);
        if settled {
            cache.push(Cached {
                tls: tls.clone(),
                crypto,
                stamps,
                config: Arc::clone(&config),
            });
        }
        Ok(config)
    }

    /// Forgets cached configs of settings not in `used`.
    fn keep_only(&self, used: &[(ClientTls, Arc<ClientConfig>)]) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| used.iter().any(|(t, _)| *t == c.tls));
    }
}

impl Configs {
    /// Builds a config for each distinct origination setting in `rules`, under the node's
    /// crypto policy, reading credentials through `files`; the error names the rule, its
    /// location and the field.
    pub fn build(
        rules: &[DestinationRule],
        crypto: CryptoPolicy,
        files: &CertFiles,
    ) -> Result<Self, String> {
        let mut configs = Self::default();
        for rule in rules {
            let settings = rule
                .tls
                .iter()
                .map(|t| (t, "spec.trafficPolicy.tls".to_owned()))
                .chain(
                    rule.port_level
                        .iter()
                        .enumerate()
                        .filter_map(|(i, (_, t))| {
                            t.as_ref().map(|t| {
                                (t, format!("spec.trafficPolicy.portLevelSettings[{i}].tls"))
                            })
                        }),
                );
            for (tls, path) in settings {
                if !matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual)
                    || configs.get(tls).is_some()
                {
                    continue;
                }
                let config = files.config(tls, crypto).map_err(|e| {
                    format!(
                        "{}: {}: {path}.{}: {}",
                        rule.resource.location, rule.resource, e.field, e.message
                    )
                })?;
                configs.entries.push((tls.clone(), config));
            }
        }
        files.keep_only(&configs.entries);
        Ok(configs)
    }

    /// The config built for `tls`.
    pub fn get(&self, tls: &ClientTls) -> Option<Arc<ClientConfig>> {
        self.entries
            .iter()
            .find(|(t, _)| t == tls)
            .map(|(_, c)| Arc::clone(c))
    }
}

/// The files the origination settings of `rules` read, so a change to them (a rotated client
/// certificate) rebuilds the policy like a change to the policy files does.
pub fn credential_files(rules: &[DestinationRule]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = rules
        .iter()
        .flat_map(|r| {
            r.tls
                .iter()
                .chain(r.port_level.iter().filter_map(|(_, t)| t.as_ref()))
        })
        .filter(|t| matches!(t.mode, TlsMode::Simple | TlsMode::Mutual))
        .flat_map(|t| {
            let key_pair = (t.mode == TlsMode::Mutual)
                .then_some([t.client_certificate.as_ref(), t.private_key.as_ref()])
                .into_iter()
                .flatten();
            key_pair
                .chain([t.ca_certificates.as_ref()])
                .flatten()
                .map(PathBuf::from)
        })
        .collect();
    files.sort();
    files.dedup();
    files
}

/// The rustls client config for one `SIMPLE` or `MUTUAL` setting, from its open files:
/// hybrid post-quantum key exchange first with classical fallback, or what the node's
/// compliance policy allows.
fn client_config(
    tls: &ClientTls,
    opened: Opened,
    crypto: CryptoPolicy,
) -> Result<Arc<ClientConfig>, CredentialError> {
    let provider = handshake::origination_provider(crypto);
    let roots = match (&tls.ca_certificates, opened.roots) {
        (Some(file), Some(roots)) => {
            let pem = roots.read().map_err(|message| CredentialError {
                field: "caCertificates",
                message,
            })?;
            roots_from(file, &pem).map_err(|message| CredentialError {
                field: "caCertificates",
                message,
            })?
        }
        (None, Some(bundle)) => system_roots(bundle),
        (_, None) => RootCertStore::empty(),
    };
    let verifier = Arc::new(OriginVerifier {
        chain: ServerChain {
            roots: Arc::new(roots),
            algorithms: provider.signature_verification_algorithms,
        },
        subject_alt_names: tls.subject_alt_names.clone(),
        skip: tls.insecure_skip_verify,
    });
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(handshake::origination_versions(crypto))
        .map_err(|e| CredentialError {
            field: "mode",
            message: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&tls.client_certificate, &tls.private_key, opened.key_pair) {
        (Some(cert_file), Some(key_file), Some((cert, key))) => {
            let field = |field| move |message| CredentialError { field, message };
            let cert_pem = cert.read().map_err(field("clientCertificate"))?;
            let chain = certs_from(cert_file, &cert_pem).map_err(field("clientCertificate"))?;
            let key_pem = key.read().map_err(field("privateKey"))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CredentialError {
                field: "privateKey",
                message: format!("cannot read a PEM private key from `{key_file}`: {e}"),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| CredentialError {
                    field: "privateKey",
                    message: format!("does not match clientCertificate: {e}"),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    // Every connection authenticates the server in full; policy changes take effect at once.
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

fn certs_from(file: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| format!("cannot read PEM certificates from `{file}`: {e}"))?;
    if certs.is_empty() {
        return Err(format!("`{file}` holds no PEM certificate"));
    }
    Ok(certs)
}

fn roots_from(file: &str, pem: &[u8]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in certs_from(file, pem)? {
        store
            .add(cert)
            .map_err(|e| format!("`{file}`: unusable CA certificate: {e}"))?;
    }
    Ok(store)
}

/// The system bundle's certificates, or an empty store (every server refused) when it does
/// not read.
fn system_roots(bundle: files::Opened) -> RootCertStore {
    let mut store = RootCertStore::empty();
    if let Ok(pem) = bundle.read()
        && let Ok(certs) = certs_from("system bundle", &pem)
    {
        let _ = store.add_parsable_certificates(certs);
    }
    store
}

/// The name a connection presents and, without `subjectAltNames`, verifies: the rule's `sni`,
/// else the service host, else the endpoint address (no SNI is sent for an address).
pub fn server_name(
    tls: &ClientTls,
    service: Option<&str>,
    endpoint: SocketAddr,
) -> ServerName<'static> {
    tls.sni
        .as_deref()
        .or(service)
        .and_then(|n| ServerName::try_from(n.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(endpoint.ip().into()))
}

/// Why an origination handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum OriginateError {
    #[error("TLS handshake with the server failed")]
    Tls(#[source] Error),
    #[error("the server closed the connection during the TLS handshake")]
    PeerClosed,
    #[error("the TLS handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("socket error during the TLS handshake")]
    Io(#[source] std::io::Error),
}

/// Runs the client handshake on `sock`; returns the session and any application data the
/// server already sent (to be delivered to the app first).
pub async fn handshake(
    sock: &mut TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    timeout: Duration,
) -> Result<(Connection, Vec<u8>), OriginateError> {
    let conn = ClientConnection::new(config, name).map_err(OriginateError::Tls)?;
    let mut conn = Connection::from(conn);
    tokio::time::timeout(timeout, exchange(sock, &mut conn))
        .await
        .map_err(|_| OriginateError::Timeout(timeout))??;
    let mut leftover = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut conn.reader(), &mut chunk) {
            Ok(0) => break,
            Ok(n) => leftover.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(OriginateError::Io(e)),
        }
    }
    Ok((conn, leftover))
}

async fn exchange(sock: &mut TcpStream, conn: &mut Connection) -> Result<(), OriginateError> {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        flush(sock, conn).await?;
        if !conn.is_handshaking() {
            return Ok(());
        }
        let n = sock.read(&mut buf).await.map_err(OriginateError::Io)?;
        if n == 0 {
            return Err(OriginateError::PeerClosed);
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            conn.read_tls(&mut rest).map_err(OriginateError::Io)?;
            if let Err(e) = conn.process_new_packets() {
                // Best effort: the alert tells the server why.
                let _ = flush(sock, conn).await;
                return Err(OriginateError::Tls(e));
            }
        }
    }
}

async fn flush(sock: &mut TcpStream, conn: &mut Connection) -> Result<(), OriginateError> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).map_err(OriginateError::Io)?;
    }
    if !out.is_empty() {
        sock.write_all(&out).await.map_err(OriginateError::Io)?;
    }
    Ok(())
}

/// webpki chain validation against the rule's roots, then the name check described in the
/// module documentation.
#[derive(Debug)]
struct OriginVerifier {
    chain: ServerChain,
    subject_alt_names: Vec<String>,
    skip: bool,
}

impl ServerCertVerifier for OriginVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if self.skip {
            return Ok(ServerCertVerified::assertion());
        }
        let cert = self.chain.verify(end_entity, intermediates, now)?;
        if self.subject_alt_names.is_empty() {
            verify_server_name(&cert, server_name)?;
            return Ok(ServerCertVerified::assertion());
        }
        let uris = uri_sans(end_entity);
        let matched = self.subject_alt_names.iter().any(|san| {
            if san.contains("://") {
                uris.iter().any(|u| u == san)
            } else {
                ServerName::try_from(san.as_str())
                    .is_ok_and(|name| verify_server_name(&cert, &name).is_ok())
            }
        });
        if matched {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_schemes()
    }
}

/// The URI SANs of a certificate (empty if it does not parse; webpki has accepted it by then).
fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    crate::identity::uri_sans(&cert)
        .map(|uris| uris.into_iter().map(str::to_owned).collect())
        .unwrap_or_default()
}
