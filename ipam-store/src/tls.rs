//! Server-side mutual TLS: `--tls-cert`, `--tls-key`, `--client-ca` (and optional
//! `--client-crl`) PEM files → a rustls [`ServerConfig`] that requires a client certificate
//! issued by the CA, with rotation without restart.
//!
//! Contract:
//! - Crypto is rustls with the `ring` provider only (the one kube uses; a second provider makes
//!   rustls panic). TLS 1.2 and 1.3, ALPN `h2`.
//! - [`ServerTls::load`] fails at startup with an error naming the flag and file.
//! - [`ServerTls::reload_if_changed`] re-reads every file; if any content changed it builds a new
//!   config and swaps it atomically. New handshakes use the new config; established connections
//!   keep theirs. A file that does not load keeps the previous config and returns (and, in
//!   [`ServerTls::watch_files`], logs) an error naming the file; the same bad content is reported
//!   once, a later change is tried again.
//! - [`ServerTls::incoming`] turns a listener into a stream of TLS streams for tonic's
//!   `serve_with_incoming`. Handshakes run concurrently with a deadline; a refused one (no
//!   certificate, unknown CA, expired, revoked, plaintext) is logged and counted, never yielded.
//!   tonic implements `Connected` for `tokio_rustls::server::TlsStream<TcpStream>`, so handlers
//!   see the client chain via `Request::peer_certs()` (see [`crate::auth::identity_of`]).

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files the server's TLS is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// `--tls-cert`: the server's certificate chain (leaf first).
    pub cert: PathBuf,
    /// `--tls-key`: the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `--client-ca`: the CA bundle client certificates must chain to.
    pub client_ca: PathBuf,
    /// `--client-crl`: revocation lists (optional). When given, a client whose issuer has no CRL
    /// among them is refused too (revocation status unknown).
    pub crls: Vec<PathBuf>,
}

/// Why the TLS files do not make a server config. Every variant names the flag and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{flag} {}: {source}", path.display())]
    Read {
        /// The command-line flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file was read but its content is unusable.
    #[error("{flag} {}: {msg}", path.display())]
    Invalid {
        /// The command-line flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The flags do not go together.
    #[error("{0}")]
    Flags(String),
}

/// `cairn-ipam serve`'s TLS flags besides `--tls-cert`/`--tls-key` (which `serve` shares with
/// the client subcommands: "this process's certificate and key").
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeTlsArgs {
    /// CA bundle that client certificates must chain to. With --tls-cert and --tls-key the store
    /// speaks TLS only and requires a client certificate from this CA.
    #[arg(long, env = "CAIRN_IPAM_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation list(s) of the client CA, PEM; repeatable. Re-read like the
    /// certificates.
    #[arg(long, env = "CAIRN_IPAM_CLIENT_CRL", value_delimiter = ',')]
    pub client_crl: Vec<PathBuf>,
    /// SPIFFE trust domain of client identities (spiffe://<this>/cluster/<id>, /cloud, /reader).
    #[arg(long, env = "CAIRN_IPAM_TRUST_DOMAIN", default_value = "cairn.local")]
    pub trust_domain: String,
}

impl ServeTlsArgs {
    /// The files for [`ServerTls::load`], `None` for plaintext (no TLS flag at all). mTLS
    /// needs all of `--tls-cert`, `--tls-key`, `--client-ca`; a partial set is an error naming
    /// the missing flag.
    pub fn files(&self, cert: Option<&Path>, key: Option<&Path>) -> Result<Option<TlsFiles>, TlsError> {
        match (cert, key, &self.client_ca) {
            (None, None, None) if self.client_crl.is_empty() => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                client_ca: ca.clone(),
                crls: self.client_crl.clone(),
            })),
            _ => {
                let missing: Vec<&str> = [
                    (cert.is_none(), "--tls-cert"),
                    (key.is_none(), "--tls-key"),
                    (self.client_ca.is_none(), "--client-ca"),
                ]
                .into_iter()
                .filter_map(|(m, f)| m.then_some(f))
                .collect();
                Err(TlsError::Flags(format!(
                    "mutual TLS needs --tls-cert, --tls-key and --client-ca together; missing {}",
                    missing.join(", ")
                )))
            }
        }
    }

    /// `--trust-domain`, checked.
    pub fn trust_domain(&self) -> Result<crate::auth::TrustDomain, TlsError> {
        crate::auth::TrustDomain::new(&self.trust_domain)
            .map_err(|e| TlsError::Flags(format!("--trust-domain {:?}: {e}", self.trust_domain)))
    }
}

/// The PEM bytes of every file, in [`TlsFiles`] order (cert, key, CA, CRLs...).
type Contents = Vec<Vec<u8>>;

/// Counters for metrics (`cairn_ipam_tls_*`), read with [`ServerTls::stats`].
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Configs swapped in after a file change.
    pub reloads: AtomicU64,
    /// File changes that did not load (the old config stayed).
    pub reload_failures: AtomicU64,
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes refused or timed out.
    pub handshake_failures: AtomicU64,
}

/// The server's TLS config, reloadable. Share it as `Arc<ServerTls>`.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: tokio::sync::watch::Sender<Arc<ServerConfig>>,
    last_seen: Mutex<Contents>,
    stats: TlsStats,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(flag: &'static str, path: &Path, msg: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        flag,
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Every certificate in a PEM file; at least one.
fn certs(flag: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(flag, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(flag, path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

impl ServerTls {
    /// Loads the files (ring provider). Errors name the flag and file.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let contents = read_all(&files)?;
        let config = build(&files, &provider, &contents)?;
        let (current, _) = tokio::sync::watch::channel(config);
        Ok(Arc::new(ServerTls {
            files,
            provider,
            current,
            last_seen: Mutex::new(contents),
            stats: TlsStats::default(),
        }))
    }

    /// The files this config is built from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The config new handshakes use.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.borrow().clone()
    }

    /// Counters.
    pub fn stats(&self) -> &TlsStats {
        &self.stats
    }

    /// Re-reads the files; swaps in a new config if their content changed. `Ok(true)` = swapped,
    /// `Ok(false)` = nothing changed (or the same bad content as last time), `Err` = changed
    /// but unusable (the previous config stays).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let contents = read_all(&self.files)?;
        {
            let mut last = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            if *last == contents {
                return Ok(false);
            }
            // Remember even a bad version, so it is reported once, not every poll.
            last.clone_from(&contents);
        }
        match build(&self.files, &self.provider, &contents) {
            Ok(config) => {
                self.current.send_replace(config);
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Polls the files every `every` until `stop` resolves, logging swaps and failures.
    pub async fn watch_files(self: Arc<Self>, every: Duration, stop: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            match self.reload_if_changed() {
                Ok(true) => tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "TLS files changed but cannot be used; keeping the previous certificates")
                }
            }
        }
    }

    /// Accepts connections on `listener` and yields the ones whose TLS handshake (with the
    /// config current at accept time) succeeds. Stops accepting when the stream is dropped.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    () = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // E.g. out of file descriptors: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(this.config());
                let tx = tx.clone();
                let this = Arc::clone(&this);
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            this.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => {
                            this.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%peer, error = %e, "TLS handshake refused");
                        }
                        Err(_) => {
                            this.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn read_all(files: &TlsFiles) -> Result<Contents, TlsError> {
    let mut out = vec![
        read("--tls-cert", &files.cert)?,
        read("--tls-key", &files.key)?,
        read("--client-ca", &files.client_ca)?,
    ];
    for crl in &files.crls {
        out.push(read("--client-crl", crl)?);
    }
    Ok(out)
}

fn build(
    files: &TlsFiles,
    provider: &Arc<CryptoProvider>,
    contents: &Contents,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs("--tls-cert", &files.cert, &contents[0])?;
    let key = PrivateKeyDer::from_pem_slice(&contents[1])
        .map_err(|e| invalid("--tls-key", &files.key, format!("no usable private key: {e}")))?;

    let mut roots = RootCertStore::empty();
    for (i, ca) in certs("--client-ca", &files.client_ca, &contents[2])?
        .into_iter()
        .enumerate()
    {
        roots.add(ca).map_err(|e| {
            invalid(
                "--client-ca",
                &files.client_ca,
                format!("certificate #{}: {e}", i + 1),
            )
        })?;
    }
    let mut crls = Vec::new();
    for (path, pem) in files.crls.iter().zip(&contents[3..]) {
        let list = CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("--client-crl", path, format!("not a PEM CRL file: {e}")))?;
        if list.is_empty() {
            return Err(invalid("--client-crl", path, "no X509 CRL block found"));
        }
        crls.extend(list);
    }
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(|e| {
        let (flag, path) = if files.crls.is_empty() {
            ("--client-ca", &files.client_ca)
        } else {
            ("--client-crl", &files.crls[0])
        };
        invalid(flag, path, format!("cannot verify clients with it: {e}"))
    })?;

    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("--tls-cert", &files.cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            invalid(
                "--tls-key",
                &files.key,
                format!(
                    "does not fit the certificate in --tls-cert {}: {e}",
                    files.cert.display()
                ),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests;
