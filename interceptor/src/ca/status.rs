//! `interceptor ca status`: what is in a CA directory, file by file, and whether the agent
//! would accept it now.

use std::{fmt::Write as _, os::unix::fs::MetadataExt as _, path::Path, time::SystemTime};

use time::OffsetDateTime;

use super::{CA_FILES, Ca, When, cert_info, parse_certs, read_key};
use crate::identity::TrustDomain;

/// The report, and whether the directory loads as a CA at `now` (the error says why not).
pub fn report(
    dir: &Path,
    trust_domain: Option<&TrustDomain>,
    now: SystemTime,
) -> (String, Result<Ca, super::CaError>) {
    let mut out = String::new();
    let now_utc = OffsetDateTime::from(now);
    for name in CA_FILES {
        let path = dir.join(name);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let _ = writeln!(out, "{name}:");
        if name.ends_with("key.pem") || name.ends_with(".key") {
            // Never the key itself: its kind and who can read it.
            match read_key(&path) {
                Ok(key) => {
                    let _ = writeln!(
                        out,
                        "  private key {:?}, mode {:03o}",
                        key.algorithm(),
                        meta.mode() & 0o7777
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "  unusable: {e}");
                }
            }
            continue;
        }
        let certs = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| parse_certs(&path, &b).map_err(|e| e.to_string()))
        {
            Ok(certs) => certs,
            Err(e) => {
                let _ = writeln!(out, "  unusable: {e}");
                continue;
            }
        };
        for (i, der) in certs.iter().enumerate() {
            let Ok(info) = cert_info(der) else {
                let _ = writeln!(out, "  [{i}] unparsable certificate");
                continue;
            };
            let state = if now_utc >= info.not_after {
                "EXPIRED".to_owned()
            } else if now_utc < info.not_before {
                "NOT YET VALID".to_owned()
            } else {
                format!(
                    "expires in {} days",
                    (info.not_after - now_utc).whole_days()
                )
            };
            let td = info
                .trust_domain
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), ToString::to_string);
            let _ = writeln!(out, "  [{i}] subject: {}", info.subject);
            let _ = writeln!(out, "      issuer: {}", info.issuer);
            let _ = writeln!(out, "      serial: {}", info.serial);
            let _ = writeln!(out, "      spiffe trust domain: {td}");
            let _ = writeln!(
                out,
                "      valid: {} to {} ({state}){}",
                When(info.not_before),
                When(info.not_after),
                if info.self_signed {
                    ", self-signed"
                } else {
                    ""
                }
            );
        }
    }
    let loaded = Ca::load_for(dir, trust_domain, now);
    match &loaded {
        Ok(ca) => {
            let _ = writeln!(
                out,
                "usable: signs for trust domain `{}` with `{}`; leaves end by {} at the latest; \
                 {} root(s) trusted",
                ca.trust_domain(),
                ca.signer().subject,
                When(ca.not_after),
                ca.roots.len()
            );
            for w in ca.expiry_report(now) {
                let _ = writeln!(out, "warning: {w}");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "NOT usable: {e}");
        }
    }
    (out, loaded)
}
