//! Client-side TLS for the store's clients (the `cairn-ipam` CLI, `cairn-ccm`): a tonic
//! [`ClientTlsConfig`] from `--tls-ca`, `--tls-cert`, `--tls-key` PEM files, an [`Endpoint`]
//! that uses it, the controller's check that its certificate names its cluster, and
//! [`explain`], which turns the errors a client sees when it and the server disagree into one
//! clear message.
//!
//! Contract:
//! - No flag set: plaintext (`Ok(None)`). Any flag set: `--tls-ca` is required (there are no
//!   system roots: the store's CA is private), and `--tls-cert`/`--tls-key` come together.
//! - Files are read and parsed up front, so a wrong path or a non-PEM file fails before any
//!   connection, naming the flag and the file.
//! - With TLS the endpoint's scheme becomes `https` (tonic would otherwise silently connect in
//!   plaintext to an `http://` URI); an `https://` endpoint without TLS flags is an error.
//! - Crypto: rustls with `ring` (tonic feature `tls-ring`), the provider kube uses.

use std::{
    error::Error as StdError,
    fmt,
    path::{Path, PathBuf},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Why the client's TLS settings are unusable. Each names the flag and, where there is one, the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    /// A file could not be read.
    #[error("{flag} {}: {source}", path.display())]
    Read {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file's content is unusable.
    #[error("{flag} {}: {msg}", path.display())]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A flag that needs another one.
    #[error("{flag} is set but {missing} is not; {why}")]
    Missing {
        /// The flag that was set.
        flag: &'static str,
        /// The flag that is missing.
        missing: &'static str,
        /// Why it is needed.
        why: &'static str,
    },
    /// The endpoint does not fit the TLS settings.
    #[error("endpoint {endpoint:?}: {msg}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        msg: String,
    },
    /// The certificate names another identity than the one the program runs as.
    #[error("{flag} {}: {msg}", path.display())]
    Identity {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What it names and what was expected.
        msg: String,
    },
}

/// The client's TLS files (`--tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// `--tls-ca`: the CA bundle the store's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// `--tls-cert`: this client's certificate chain.
    pub cert: Option<PathBuf>,
    /// `--tls-key`: this client's private key.
    pub key: Option<PathBuf>,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ClientTlsError> {
    std::fs::read(path).map_err(|source| ClientTlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(flag: &'static str, path: &Path, msg: impl Into<String>) -> ClientTlsError {
    ClientTlsError::Invalid {
        flag,
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn certs(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ClientTlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(flag, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(flag, path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

impl ClientTlsFiles {
    /// True when any flag is set.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The tonic TLS config, or `None` for plaintext (no flag set).
    pub fn config(&self) -> Result<Option<ClientTlsConfig>, ClientTlsError> {
        if !self.is_set() {
            return Ok(None);
        }
        let Some(ca) = &self.ca else {
            let flag = if self.cert.is_some() {
                "--tls-cert"
            } else {
                "--tls-key"
            };
            return Err(ClientTlsError::Missing {
                flag,
                missing: "--tls-ca",
                why: "the store's certificate is checked against that CA only",
            });
        };
        let ca_pem = read("--tls-ca", ca)?;
        certs("--tls-ca", ca, &ca_pem)?;
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert_pem = read("--tls-cert", cert)?;
                certs("--tls-cert", cert, &cert_pem)?;
                let key_pem = read("--tls-key", key)?;
                PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|e| invalid("--tls-key", key, format!("no usable private key: {e}")))?;
                cfg = cfg.identity(Identity::from_pem(cert_pem, key_pem));
            }
            (Some(_), None) => {
                return Err(ClientTlsError::Missing {
                    flag: "--tls-cert",
                    missing: "--tls-key",
                    why: "a certificate is useless without its key",
                });
            }
            (None, Some(_)) => {
                return Err(ClientTlsError::Missing {
                    flag: "--tls-key",
                    missing: "--tls-cert",
                    why: "a key is useless without its certificate",
                });
            }
            // Server-authenticated TLS only; a store that requires client certificates will
            // refuse it, and `explain` says so.
            (None, None) => {}
        }
        Ok(Some(cfg))
    }

    /// An endpoint for `uri` with these settings (see the module docs for the scheme rules).
    pub fn endpoint(&self, uri: &str) -> Result<Endpoint, ClientTlsError> {
        let bad = |msg: String| ClientTlsError::Endpoint {
            endpoint: uri.to_string(),
            msg,
        };
        let tls = self.config()?;
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad("must start with http:// or https://".into()))?;
        let uri = match (scheme, &tls) {
            ("http", None) | ("https", Some(_)) => uri.to_string(),
            ("http", Some(_)) => format!("https://{rest}"),
            ("https", None) => {
                return Err(bad(
                    "https:// needs --tls-ca (and --tls-cert/--tls-key for the store's mTLS)".into(),
                ));
            }
            _ => return Err(bad(format!("unknown scheme {scheme:?}; use http:// or https://"))),
        };
        let ep = Endpoint::from_shared(uri).map_err(|e| bad(e.to_string()))?;
        match tls {
            Some(t) => ep.tls_config(t).map_err(|e| bad(e.to_string())),
            None => Ok(ep),
        }
    }

    /// The SPIFFE ids (`spiffe://...` URI SANs) of the leaf certificate in `--tls-cert`.
    pub fn spiffe_ids(&self) -> Result<Vec<String>, ClientTlsError> {
        let Some(path) = &self.cert else {
            return Ok(vec![]);
        };
        let pem = read("--tls-cert", path)?;
        let leaf = certs("--tls-cert", path, &pem)?.swap_remove(0);
        let ee = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| invalid("--tls-cert", path, format!("cannot be parsed: {e}")))?;
        Ok(ee
            .valid_uri_names()
            .filter(|u| u.starts_with("spiffe://"))
            .map(str::to_string)
            .collect())
    }

    /// For `cairn-ccm`: the certificate in `--tls-cert` must name exactly
    /// `spiffe://<any trust domain>/cluster/<cluster_id>`, so a controller never runs with
    /// another cluster's identity. Without `--tls-cert` there is nothing to check.
    pub fn check_cluster_identity(&self, cluster_id: &str) -> Result<(), ClientTlsError> {
        let Some(path) = &self.cert else {
            return Ok(());
        };
        let ids = self.spiffe_ids()?;
        let want = format!("/cluster/{cluster_id}");
        let fail = |msg: String| ClientTlsError::Identity {
            flag: "--tls-cert",
            path: path.clone(),
            msg,
        };
        match ids.as_slice() {
            [one] => {
                let path_part = one
                    .strip_prefix("spiffe://")
                    .and_then(|r| r.find('/').map(|i| &r[i..]))
                    .unwrap_or("");
                if path_part == want {
                    Ok(())
                } else {
                    Err(fail(format!(
                        "names {one}, but --cluster-id is {cluster_id:?} (expected spiffe://<trust domain>{want})"
                    )))
                }
            }
            [] => Err(fail(format!(
                "has no spiffe:// URI SAN; expected spiffe://<trust domain>{want}"
            ))),
            several => Err(fail(format!(
                "has several spiffe:// URI SANs {several:?}; exactly one is allowed"
            ))),
        }
    }
}

/// What went wrong when a client and the store disagree about TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The client spoke plaintext to a TLS server.
    PlaintextToTls,
    /// The client spoke TLS to a plaintext server.
    TlsToPlaintext,
    /// The store's certificate does not chain to `--tls-ca`.
    UnknownServerCa,
    /// The store's certificate is not valid for the endpoint's host.
    WrongServerName,
    /// The store requires a client certificate and none was sent.
    ClientCertRequired,
    /// The store refused the client certificate; the reason as the store's alert names it.
    ClientCertRefused(&'static str),
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::PlaintextToTls => f.write_str(
                "the store closed a plaintext connection at once, so it speaks TLS: set --tls-ca, --tls-cert and --tls-key",
            ),
            Mismatch::TlsToPlaintext => f.write_str(
                "this client speaks TLS but the store is plaintext: drop --tls-ca/--tls-cert/--tls-key or start the store with --tls-cert/--tls-key/--client-ca",
            ),
            Mismatch::UnknownServerCa => {
                f.write_str("the store's certificate is not signed by the CA in --tls-ca")
            }
            Mismatch::WrongServerName => f.write_str(
                "the store's certificate is not valid for the endpoint's host name or address (check --endpoint against the certificate's DNS/IP SANs)",
            ),
            Mismatch::ClientCertRequired => {
                f.write_str("the store requires a client certificate: set --tls-cert and --tls-key")
            }
            Mismatch::ClientCertRefused(why) => write!(
                f,
                "the store refused this client's certificate ({why}): it must be issued by the store's --client-ca, unexpired and not revoked"
            ),
        }
    }
}

/// Every message in an error's source chain, outermost first.
fn chain(err: &(dyn StdError + 'static)) -> Vec<String> {
    let mut out = vec![];
    let mut cur = Some(err);
    while let Some(e) = cur {
        out.push(e.to_string());
        cur = e.source();
    }
    out
}

/// Classifies a connection or call error (`tonic::transport::Error`, `tonic::Status`, ...);
/// `client_tls`: whether this client used TLS. `None` when it is not a TLS disagreement.
pub fn diagnose(err: &(dyn StdError + 'static), client_tls: bool) -> Option<Mismatch> {
    let text = chain(err).join(": ");
    let has = |s: &str| text.contains(s);
    // Order matters: the more specific markers first.
    if has("UnknownIssuer") {
        Some(Mismatch::UnknownServerCa)
    } else if has("NotValidForName") || has("certificate not valid for name") {
        Some(Mismatch::WrongServerName)
    } else if has("CertificateRequired") {
        Some(Mismatch::ClientCertRequired)
    } else if has("received fatal alert: UnknownCA") {
        Some(Mismatch::ClientCertRefused("unknown CA"))
    } else if has("received fatal alert: CertificateExpired") {
        Some(Mismatch::ClientCertRefused("expired"))
    } else if has("received fatal alert: CertificateRevoked") {
        Some(Mismatch::ClientCertRefused("revoked"))
    } else if has("received fatal alert: BadCertificate") || has("received fatal alert: CertificateUnknown") {
        Some(Mismatch::ClientCertRefused("bad certificate"))
    } else if has("InvalidContentType") || has("corrupt message") {
        // A TLS client reading HTTP/2 frames from a plaintext server.
        Some(Mismatch::TlsToPlaintext)
    } else if !client_tls
        && (has("frame with invalid size")
            || has("broken pipe")
            || has("connection reset")
            || has("connection closed"))
    {
        // A TLS server hangs up on (or answers with a TLS alert to) an HTTP/2 preface.
        Some(Mismatch::PlaintextToTls)
    } else {
        None
    }
}

/// One line for the user: the mismatch, if recognised, followed by the underlying error chain.
pub fn explain(err: &(dyn StdError + 'static), client_tls: bool) -> String {
    let detail = chain(err).join(": ");
    match diagnose(err, client_tls) {
        Some(m) => format!("{m} ({detail})"),
        None => detail,
    }
}

#[cfg(test)]
mod tests;
