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
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::response::IntoResponse as _;
use cairn_proto::v1::ipam_service_server::IpamServiceServer;
use cairn_runtime::{Endpoints, ProbeServer, Status};
use tokio::{net::TcpListener, sync::watch};
use tower::ServiceExt as _;

use crate::{
    auth::TrustDomain,
    grpc::IpamService,
    ha::Gate,
    ledger::Ledger,
    metrics::{CommitMetrics, Metrics},
    store::{Engine, etcd::EtcdEngine, etcd::EtcdOptions, sled_engine::SledEngine},
    tls::{ServerTls, TlsFiles},
};

/// Concurrent HTTP/2 streams (calls and watches) per client connection; further calls wait
/// for a free stream (tonic's default is no limit).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

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
    /// With etcd: the URL clients reach this replica at, published while it leads (default
    /// `http(s)://<bound --listen>`).
    pub advertise: Option<String>,
    /// With etcd: the leader lease's TTL in seconds (failover takes about this long).
    pub leader_lease_secs: i64,
    /// Commit batches a watcher may fall behind before it is ended with ABORTED.
    pub watch_buffer: usize,
    /// Watches open at once (on this replica); one more is RESOURCE_EXHAUSTED.
    pub max_watchers: usize,
}

/// What `/metrics`, `/healthz` and `/readyz` answer: the ledger's figures, and whether it
/// still reads (a failed ledger is neither healthy nor ready). A follower replica (no ledger
/// yet) is healthy but not ready.
struct Probes {
    ledger: watch::Receiver<Option<Arc<Ledger>>>,
    metrics: Arc<Metrics>,
}

impl Probes {
    fn ledger(&self) -> Option<Arc<Ledger>> {
        self.ledger.borrow().clone()
    }
}

impl Endpoints for Probes {
    async fn metrics(&self) -> String {
        match self.ledger() {
            Some(l) => self.metrics.render(&l).await,
            None => self.metrics.render_follower(),
        }
    }

    async fn health(&self) -> Status {
        match self.ledger() {
            None => Status::Ok("ok (follower)\n"),
            Some(l) => match l.usage(None).await {
                Ok(_) => Status::Ok("ok\n"),
                Err(_) => Status::Unavailable("storage failure\n"),
            },
        }
    }

    async fn readiness(&self) -> Status {
        match self.ledger() {
            None => Status::Unavailable("not ready: this replica follows the leader\n"),
            Some(_) => self.health().await,
        }
    }
}

/// The web view once the ledger is loaded; 503 before (a follower has no ledger).
fn gated_web(cell: Arc<OnceLock<axum::Router>>) -> axum::Router {
    axum::Router::new().fallback(move |req: axum::extract::Request| {
        let cell = cell.clone();
        async move {
            match cell.get() {
                Some(r) => r.clone().oneshot(req).await.into_response(),
                None => (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "this cairn-ipam replica follows the leader; the web view is on the leader\n",
                )
                    .into_response(),
            }
        }
    })
}

/// Hands each replica the follower loads to the gate (as the service answering follower
/// reads), ending the open watches of the one before; ends the last one's watches when this
/// replica starts leading or the process stops. `service` makes the service over a replica
/// whose watches end when its receiver turns true.
async fn publish_replicas(
    mut replicas: watch::Receiver<Option<Arc<Ledger>>>,
    gate: Gate<IpamServiceServer<IpamService>>,
    service: impl Fn(Arc<Ledger>, watch::Receiver<bool>) -> IpamServiceServer<IpamService>,
    mut stopping: watch::Receiver<bool>,
    mut leading: watch::Receiver<bool>,
) {
    let mut current: Option<watch::Sender<bool>> = None;
    loop {
        tokio::select! {
            changed = replicas.changed() => {
                if changed.is_err() {
                    break;
                }
                let Some(replica) = replicas.borrow_and_update().clone() else { continue };
                if let Some(end) = current.take() {
                    end.send_replace(true);
                }
                let (end_tx, end_rx) = watch::channel(false);
                gate.follow(Some(service(replica, end_rx)));
                current = Some(end_tx);
            }
            _ = stopping.wait_for(|s| *s) => break,
            _ = leading.wait_for(|l| *l) => break,
        }
    }
    gate.follow(None);
    if let Some(end) = current {
        end.send_replace(true);
    }
}

/// Serves until `shutdown` resolves, the ledger fails or (etcd) leadership is lost; then
/// drains and syncs.
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
    let (engine, etcd): (Arc<dyn Engine>, Option<Arc<EtcdEngine>>) = match &opts.etcd {
        Some(o) => {
            let e = Arc::new(EtcdEngine::connect(o)?);
            (e.clone(), Some(e))
        }
        None => {
            std::fs::create_dir_all(&opts.data_dir)
                .with_context(|| format!("creating --data-dir {}", opts.data_dir.display()))?;
            (
                Arc::new(SledEngine::open(&opts.data_dir, opts.cache_bytes)?),
                None,
            )
        }
    };
    let metrics = Arc::new(Metrics::new());
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_not_serving::<IpamServiceServer<IpamService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cairn_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cairn_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // Set when shutdown begins, so open watch streams end and the graceful drain can finish.
    let (stopping_tx, stopping_rx) = watch::channel(false);

    // What a leader serves, opened once the ledger is loaded (at once with sled; on winning
    // the election with etcd). Until then the gates answer as a follower.
    let (leader_tx, leader_rx) = watch::channel(String::new());
    let gate: Gate<IpamServiceServer<IpamService>> = Gate::new(leader_rx);
    let web_cell: Arc<OnceLock<axum::Router>> = Arc::new(OnceLock::new());
    let (ledger_tx, ledger_rx) = watch::channel::<Option<Arc<Ledger>>>(None);
    let activate = {
        let (gate, web_cell, metrics) = (gate.clone(), web_cell.clone(), metrics.clone());
        let (stopping_rx, tls_td) = (stopping_rx.clone(), tls.as_ref().map(|(_, td)| td.clone()));
        let (grace, web_view, data_dir) = (opts.default_grace_secs, opts.web_view, opts.data_dir.clone());
        let (watch_buffer, max_watchers) = (opts.watch_buffer, opts.max_watchers);
        move |engine: Arc<dyn Engine>| -> anyhow::Result<Arc<Ledger>> {
            let backend = engine.name();
            let t = Instant::now();
            let ledger = Ledger::open_with(
                engine,
                grace,
                Arc::new(CommitMetrics(metrics.clone())),
                watch_buffer,
            )?;
            tracing::info!(
                allocations = ledger.allocation_count(),
                load_ms = t.elapsed().as_millis() as u64,
                backend,
                data_dir = %data_dir.display(),
                "ledger loaded"
            );
            let mut svc = IpamService::new(ledger.clone(), metrics.clone(), grace)
                .with_shutdown(stopping_rx.clone())
                .with_max_watchers(max_watchers);
            if let Some(td) = &tls_td {
                svc = svc.with_auth(td.clone());
            }
            gate.open(
                IpamServiceServer::new(svc)
                    .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(cairn_proto::MAX_MESSAGE_SIZE),
            );
            if web_view {
                let _ = web_cell.set(crate::web::router(ledger.clone(), stopping_rx.clone()));
            }
            Ok(ledger)
        }
    };
    if etcd.is_none() {
        ledger_tx.send_replace(Some(activate(engine.clone())?));
        health.set_serving::<IpamServiceServer<IpamService>>().await;
    }

    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding --listen {}", opts.listen))?;
    let grpc_addr = listener.local_addr()?;
    let mut addrs = format!("grpc={grpc_addr}\n");

    let mut probes = None;
    if let Some(m) = opts.metrics_listen {
        let web = if opts.web_view {
            gated_web(web_cell.clone())
        } else {
            axum::Router::new()
        };
        let p = ProbeServer::start_with(
            "--metrics-listen",
            m,
            Arc::new(Probes {
                ledger: ledger_rx.clone(),
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

    // With etcd: campaign (serving as a follower meanwhile), then load the ledger and open the
    // gates. Losing the lease afterwards stops the process (see `ha`).
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<String>();
    // The won leadership, resigned at a graceful stop (a standby takes over at once).
    let held: Arc<std::sync::Mutex<Option<crate::store::etcd::Leadership>>> = Arc::default();
    let resign = etcd.clone().map(|e| (e, held.clone()));
    if let Some(etcd) = etcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let id = opts
            .advertise
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{grpc_addr}"));
        let ttl = opts.leader_lease_secs;
        let (ledger_tx, health) = (ledger_tx.clone(), health.clone());
        // While following: a replica of the ledger from etcd answers reads and watches.
        let (replica_tx, replica_rx) = watch::channel::<Option<Arc<Ledger>>>(None);
        let follower = tokio::spawn(crate::ha::follow(
            etcd.clone(),
            opts.default_grace_secs,
            opts.watch_buffer,
            replica_tx,
            metrics.clone(),
        ));
        let (leading_tx, leading_rx) = watch::channel(false);
        let service = {
            let (metrics, grace, max_watchers) =
                (metrics.clone(), opts.default_grace_secs, opts.max_watchers);
            let trust_domain = tls.as_ref().map(|(_, td)| td.clone());
            move |replica: Arc<Ledger>, end: watch::Receiver<bool>| {
                let mut svc = IpamService::new(replica, metrics.clone(), grace)
                    .with_shutdown(end)
                    .with_max_watchers(max_watchers);
                if let Some(td) = &trust_domain {
                    svc = svc.with_auth(td.clone());
                }
                IpamServiceServer::new(svc)
                    .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
            }
        };
        let publisher = tokio::spawn(publish_replicas(
            replica_rx,
            gate.clone(),
            service,
            stopping_rx.clone(),
            leading_rx,
        ));
        tokio::spawn(async move {
            let lead = crate::ha::campaign(etcd, id, ttl, leader_tx).await;
            // The replica's watchers end (they watch again, here as the leader) before the
            // ledger loads; the follower stops applying.
            follower.abort();
            leading_tx.send_replace(true);
            let _ = publisher.await;
            let mut lost = lead.lost_signal();
            *held.lock().unwrap_or_else(|p| p.into_inner()) = Some(lead);
            let opened = tokio::task::spawn_blocking(move || activate(engine)).await;
            match opened {
                Ok(Ok(l)) => {
                    ledger_tx.send_replace(Some(l));
                    health.set_serving::<IpamServiceServer<IpamService>>().await;
                }
                Ok(Err(e)) => {
                    let _ = lost_tx.send(format!("loading the ledger after winning the election: {e:#}"));
                    return;
                }
                Err(e) => {
                    let _ = lost_tx.send(format!("loading the ledger after winning the election: {e}"));
                    return;
                }
            }
            let _ = lost.wait_for(|l| *l).await;
            drop(held.lock().unwrap_or_else(|p| p.into_inner()).take());
            let _ = lost_tx
                .send("lost the leader lease; stopping so a restart campaigns again as a follower".into());
        });
    } else {
        drop(lost_tx);
    }

    let failure = {
        let mut ledger_rx = ledger_rx.clone();
        async move {
            // Only once a ledger is loaded (never, on a follower that never leads).
            let ledger = ledger_rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|l| l.clone());
            match ledger {
                Some(l) => l.failure().await,
                None => std::future::pending().await,
            }
        }
    };
    let lost = async move {
        match lost_rx.await {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    };
    let (fail_tx, mut fail_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        tokio::select! {
            () = shutdown => tracing::info!("shutting down"),
            e = failure => {
                tracing::error!(error = %e, "storage failure; stopping so a restart reloads from disk");
                let _ = fail_tx.send(format!("storage failure: {e}"));
            }
            why = lost => {
                tracing::error!(reason = %why, "stepping down");
                let _ = fail_tx.send(why);
            }
        }
        let _ = stopping_tx.send(true);
    };
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(gate);
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
        anyhow::bail!("{e}");
    }
    let ledger = ledger_rx.borrow().clone();
    if let Some(l) = ledger {
        l.sync().await?;
        tracing::info!("stopped; every acknowledged write is on disk");
    } else {
        tracing::info!("stopped (a follower: nothing to sync)");
    }
    if let Some((engine, held)) = resign {
        let lead = held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(lead) = lead {
            match tokio::task::spawn_blocking(move || engine.resign(lead)).await {
                Ok(Ok(())) => tracing::info!("resigned the leadership: a standby takes over now"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not resign; a standby takes over when the lease expires")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not resign; a standby takes over when the lease expires")
                }
            }
        }
    }
    Ok(())
}
