//! `cairn-ipam serve`: wires the ledger, the gRPC services (IpamService, health, reflection)
//! and the metrics endpoint with the read-only web view, and shuts down gracefully.
//!
//! With [`ServeOptions::tls`] the gRPC port speaks mutual TLS only (a plaintext or
//! certificate-less client fails at the handshake), the certificate files are re-read when they
//! change, and IpamService authorizes every call by the client's identity. Health and
//! reflection are served on the same port without authorization. Without TLS the store warns
//! that nothing is authorized.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use cairn_proto::v1::ipam_service_server::IpamServiceServer;
use cairn_runtime::{Endpoints, ProbeServer, Status};
use tokio::net::TcpListener;

use crate::{
    auth::TrustDomain,
    grpc::IpamService,
    ledger::Ledger,
    metrics::{CommitMetrics, Metrics},
    store::{Engine, etcd::EtcdEngine, etcd::EtcdOptions, sled_engine::SledEngine},
    tls::{ServerTls, TlsFiles},
};

/// How often the TLS files are checked for changes.
pub const TLS_RELOAD_EVERY: Duration = Duration::from_secs(2);

/// What `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Metrics/health HTTP address; None = off.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the read-only web view (`/ui/`, `/api/v1/`) on the metrics listener too.
    pub web_view: bool,
    /// sled directory (unused with `etcd`).
    pub data_dir: PathBuf,
    /// The etcd backend's settings; `None` = sled in `data_dir`.
    pub etcd: Option<EtcdOptions>,
    /// Reuse grace for networks that set none.
    pub default_grace_secs: u32,
    /// sled page cache bound.
    pub cache_bytes: u64,
    /// Where to write the bound addresses once serving (for tests and scripts using port 0).
    pub addr_file: Option<PathBuf>,
    /// Mutual TLS and authorization: the files and the trust domain of client identities;
    /// `None` = plaintext, no authorization.
    pub tls: Option<(TlsFiles, TrustDomain)>,
}

/// What `/metrics`, `/healthz` and `/readyz` answer: the ledger's figures, and whether it
/// still reads (a failed ledger is neither healthy nor ready).
struct Probes {
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
}

impl Endpoints for Probes {
    async fn metrics(&self) -> String {
        self.metrics.render(&self.ledger).await
    }

    async fn health(&self) -> Status {
        match self.ledger.usage(None).await {
            Ok(_) => Status::Ok("ok\n"),
            Err(_) => Status::Unavailable("storage failure\n"),
        }
    }

    async fn readiness(&self) -> Status {
        self.health().await
    }
}

/// Serves until `shutdown` resolves or the ledger fails; then drains and syncs.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // Loaded first: bad certificate files fail startup before the ledger is opened.
    let tls = match &opts.tls {
        Some((files, td)) => Some((ServerTls::load(files.clone())?, td.clone())),
        None => {
            tracing::warn!(
                "serving plaintext without --tls-cert/--tls-key/--client-ca: any client that reaches the port may change anything (no authorization)"
            );
            None
        }
    };
    let engine: Arc<dyn Engine> = match &opts.etcd {
        Some(etcd) => Arc::new(EtcdEngine::connect(etcd)?),
        None => {
            std::fs::create_dir_all(&opts.data_dir)
                .with_context(|| format!("creating --data-dir {}", opts.data_dir.display()))?;
            Arc::new(SledEngine::open(&opts.data_dir, opts.cache_bytes)?)
        }
    };
    let backend = engine.name();
    let metrics = Arc::new(Metrics::new());
    let ledger = Ledger::open(
        engine,
        opts.default_grace_secs,
        Arc::new(CommitMetrics(metrics.clone())),
    )?;
    tracing::info!(
        allocations = ledger.allocation_count(),
        load_ms = started.elapsed().as_millis() as u64,
        backend,
        data_dir = %opts.data_dir.display(),
        "ledger loaded"
    );

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<IpamServiceServer<IpamService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cairn_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cairn_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // Set when shutdown begins, so open watch streams end and the graceful drain can finish.
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let mut svc = IpamService::new(ledger.clone(), metrics.clone(), opts.default_grace_secs)
        .with_shutdown(stopping_rx.clone());
    if let Some((_, td)) = &tls {
        svc = svc.with_auth(td.clone());
    }

    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding --listen {}", opts.listen))?;
    let grpc_addr = listener.local_addr()?;
    let mut addrs = format!("grpc={grpc_addr}\n");

    let mut probes = None;
    if let Some(m) = opts.metrics_listen {
        let web = if opts.web_view {
            crate::web::router(ledger.clone(), stopping_rx.clone())
        } else {
            axum::Router::new()
        };
        let p = ProbeServer::start_with(
            "--metrics-listen",
            m,
            Arc::new(Probes {
                ledger: ledger.clone(),
                metrics: metrics.clone(),
            }),
            web,
        )
        .await?;
        addrs.push_str(&format!("metrics={}\n", p.local_addr()));
        if opts.web_view {
            tracing::info!(url = %format!("http://{}/ui/", p.local_addr()), "serving the read-only web view");
        }
        probes = Some(p);
    }
    if let Some(f) = &opts.addr_file {
        // Written whole, then renamed, so a reader never sees half a file.
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, &addrs).with_context(|| format!("writing --addr-file {}", tmp.display()))?;
        std::fs::rename(&tmp, f)?;
    }
    tracing::info!(%grpc_addr, tls = tls.is_some(), ready_ms = started.elapsed().as_millis() as u64, "serving cairn.ipam.v1.IpamService");

    let failure = {
        let ledger = ledger.clone();
        async move { ledger.failure().await }
    };
    let (fail_tx, mut fail_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        tokio::select! {
            () = shutdown => tracing::info!("shutting down"),
            e = failure => {
                tracing::error!(error = %e, "storage failure; stopping so a restart reloads from disk");
                let _ = fail_tx.send(e);
            }
        }
        let _ = stopping_tx.send(true);
    };
    let router = tonic::transport::Server::builder()
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            IpamServiceServer::new(svc)
                .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
                .max_encoding_message_size(cairn_proto::MAX_MESSAGE_SIZE),
        );
    let served = match tls {
        Some((tls, _)) => {
            let mut stopping = stopping_rx;
            let watcher = tokio::spawn(tls.clone().watch_files(TLS_RELOAD_EVERY, async move {
                let _ = stopping.wait_for(|s| *s).await;
            }));
            // `incoming` sets TCP_NODELAY too and yields only completed handshakes.
            let served = router
                .serve_with_incoming_shutdown(tls.incoming(listener), stop)
                .await;
            watcher.abort();
            served
        }
        None => {
            // TCP_NODELAY on every accepted connection: with Nagle on (a plain TcpListenerStream), a
            // reply's last small write waits for the client's delayed ACK, ~40 ms (docs/benchmarks.md).
            router
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stop,
                )
                .await
        }
    };
    if let Some(p) = probes {
        p.stop().await;
    }
    served.context("gRPC server")?;
    if let Ok(e) = fail_rx.try_recv() {
        anyhow::bail!("storage failure: {e}");
    }
    ledger.sync().await?;
    tracing::info!("stopped; every acknowledged write is on disk");
    Ok(())
}
