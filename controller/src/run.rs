//! Wiring: flags, the Kubernetes client, leader election on a `coordination.k8s.io` Lease,
//! the four controllers, the store watch that wakes pending Services, and `/metrics`,
//! `/healthz`, `/readyz`.
//!
//! Only the leader reconciles. A replica that loses its lease exits (its Deployment restarts
//! it as a follower) rather than risk two writers; on SIGTERM the leader releases the lease so
//! a standby takes over at once.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use cairn_proto::tls::ClientTlsFiles;
use cairn_runtime::check_cluster_id;
use futures::{FutureExt, StreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use kube::{
    Api,
    runtime::{Controller, WatchStreamExt, controller::Config as ControllerConfig, watcher},
};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{
    conflict,
    context::Context,
    crd::ClusterNetwork,
    ipam::Ipam,
    k8s::{self, reflect, strip_managed_fields},
    metrics::{Metrics, serve_probes},
    network, node, repair, service,
};

/// Flags of the controller.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// This cluster's id in the store (required): lowercase letters, digits, '-' and '.'.
    #[arg(long, env = "CAIRN_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// The store's gRPC endpoint; an HA store's replicas comma-separated (calls follow the
    /// leader).
    #[arg(long, env = "CAIRN_IPAM_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    pub ipam_endpoint: String,
    /// CA bundle the store's certificate must chain to; turns on TLS to the store.
    #[arg(long, env = "CAIRN_IPAM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This cluster's client certificate for the store (PEM); its SPIFFE id must be
    /// spiffe://<trust domain>/cluster/<--cluster-id>.
    #[arg(long, env = "CAIRN_IPAM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CAIRN_IPAM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Kubeconfig file (default: in-cluster config, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Serve only Services with this loadBalancerClass (default: those with none).
    #[arg(long)]
    pub load_balancer_class: Option<String>,
    /// Reconciles in flight per controller.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    /// Take part in leader election (off: act as the only replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Lease name.
    #[arg(long, default_value = "cairn-ccm")]
    pub lease_name: String,
    /// Lease namespace.
    #[arg(long, env = "CAIRN_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,
    /// Lease duration in seconds (a standby takes over this long after a leader dies).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_duration: u64,
    /// This replica's identity in the lease (default: $POD_NAME or hostname + pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds between repair passes.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub repair_interval: u64,
    /// Seconds an allocation must stay orphaned before repair releases it.
    #[arg(long, default_value_t = 300)]
    pub orphan_grace: u64,
    /// Seconds between passes that probe, ahead of need, the next address each probed pool
    /// would hand out (ClusterNetwork `spec.conflictProbe`); 0 = only probe when a Service
    /// gets an address.
    #[arg(long, default_value_t = 2)]
    pub probe_ahead_interval: u64,
}

/// Watches the store on every network this cluster's ClusterNetworks name — one watch per
/// network, not the whole fleet — and wakes the Services waiting there when an address is freed
/// (released, or out of its reuse grace). Networks come and go with the ClusterNetworks.
async fn store_watches(ctx: Arc<Context>) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut running: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    loop {
        let want: std::collections::BTreeSet<String> = ctx
            .networks
            .state()
            .iter()
            .map(|cn| cn.spec.network.clone())
            .collect();
        running.retain(|n, h| {
            let keep = want.contains(n);
            if !keep {
                h.abort();
            }
            keep
        });
        for n in want {
            if let std::collections::hash_map::Entry::Vacant(e) = running.entry(n) {
                let h = tasks.spawn(store_watch(ctx.clone(), e.key().clone()));
                e.insert(h);
            }
        }
        // Reap finished (aborted) tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn store_watch(ctx: Arc<Context>, network: String) {
    use cairn_proto::v1::WatchEventType as T;
    let mut backoff = Duration::from_millis(200);
    loop {
        match ctx.ipam.watch(&network).await {
            Ok(mut stream) => {
                backoff = Duration::from_millis(200);
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(ev) if ev.r#type == T::Deleted as i32 || ev.r#type == T::Modified as i32 => {
                            ctx.retrigger_pending_on(&network)
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(%network, error = %e, "store watch ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(%network, error = %e, "store watch failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Logs what a controller stream yields besides successful reconciles (watch failures,
/// queue errors); reconcile errors themselves are logged by each `error_policy`.
fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(
    controller: &'static str,
) -> impl FnMut(std::result::Result<T, kube::runtime::controller::Error<crate::Error, E>>) -> std::future::Ready<()>
{
    move |r| {
        match r {
            Ok(obj) => tracing::debug!(controller, object = ?obj, "reconciled"),
            Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
            Err(e) => tracing::warn!(controller, error = %e, "controller stream error"),
        }
        std::future::ready(())
    }
}

/// Runs the controllers until `shutdown` resolves (or the lease is lost).
pub async fn run(args: RunArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let cluster_id = args.cluster_id.clone().context("--cluster-id is required")?;
    check_cluster_id("--cluster-id", &cluster_id)?;
    if let Some(c) = &args.load_balancer_class
        && c.is_empty()
    {
        anyhow::bail!("--load-balancer-class: must not be empty");
    }
    let tls = ClientTlsFiles {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    };
    // Never run with another cluster's identity: the store would refuse every call anyway.
    tls.check_cluster_identity(&cluster_id)?;
    if !tls.is_set() {
        tracing::warn!("no --tls-ca/--tls-cert/--tls-key: talking to the store in plaintext");
    }
    let ipam = Ipam::new(&args.ipam_endpoint, &tls)?;
    let client = k8s::client(args.kubeconfig.as_deref()).await?;
    let metrics = Arc::new(Metrics::new());
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Ready once this replica can serve: as a standby waiting for the lease, or leading.
    let probes = serve_probes(args.metrics_listen, metrics.clone(), ready_rx).await?;
    let mut shutdown: BoxFuture<'static, ()> = shutdown.boxed();

    // Leader election.
    let mut lease = None;
    if args.leader_elect {
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(&args.lease_namespace)
            .with_identity(&identity)
            .with_duration(args.lease_duration)
            .with_grace((args.lease_duration / 3).max(1))
            .build()
            .await
            .context("leader election lease")?;
        let (mut rx, task) = manager.watch().await;
        tracing::info!(%identity, lease = %args.lease_name, "waiting for leadership");
        let _ = ready_tx.send(true); // a standby is ready: it serves by taking over
        loop {
            if *rx.borrow_and_update() {
                break;
            }
            tokio::select! {
                r = rx.changed() => r.context("leader election stopped")?,
                () = &mut shutdown => {
                    drop(rx);
                    let _ = task.await;
                    let _ = stop_tx.send(true);
                    probes.stop().await;
                    return Ok(());
                }
            }
        }
        tracing::info!(%identity, "leading");
        lease = Some((rx, task));
    }
    metrics.leader.set(1);

    // Each resource gets its own reflector with a readiness signal any number of tasks can
    // wait on. (kube-runtime's `Store::wait_until_ready` wakes only the last of several
    // concurrent waiters, so reconcilers must not call it.)
    let cfg = ControllerConfig::default().concurrency(args.concurrency);
    let (cn_store, cn_events, mut cn_ready) = reflect(
        Api::<ClusterNetwork>::all(client.clone()),
        watcher::Config::default(),
        strip_managed_fields,
    );
    let (svc_store, svc_events, svc_ready) = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        strip_managed_fields,
    );
    let (node_store, node_events, node_ready) = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        strip_managed_fields,
    );
    // Namespaces only for their labels (pool policies): cached, never reconciled.
    let (ns_store, ns_events, mut ns_ready) = reflect(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default().any_semantic(),
        strip_managed_fields,
    );
    let namespaces = tokio::spawn(ns_events.for_each(|ev| {
        if let Err(e) = ev {
            tracing::warn!(error = %e, "namespace watch");
        }
        std::future::ready(())
    }));
    let (retrigger_tx, retrigger_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Context::new(
        client.clone(),
        ipam,
        cluster_id.clone(),
        args.load_balancer_class.clone(),
        metrics.clone(),
        (cn_store.clone(), ns_store),
        retrigger_tx,
    ));

    let networks = tokio::spawn(
        Controller::for_stream(cn_events.applied_objects(), cn_store)
            .with_config(cfg.clone())
            .graceful_shutdown_on(stopped(stop_rx.clone()))
            .run(network::reconcile, network::error_policy, ctx.clone())
            .for_each(log_result("clusternetwork")),
    );
    // Services and Nodes are placed on networks: load the ClusterNetworks first.
    tokio::select! {
        r = async { (cn_ready.wait_for(|r| *r).await.map(|_| ()), ns_ready.wait_for(|r| *r).await.map(|_| ())) } => {
            r.0.context("ClusterNetwork watch ended")?;
            r.1.context("Namespace watch ended")?;
        }
        () = &mut shutdown => {
            let _ = stop_tx.send(true);
            probes.stop().await;
            return Ok(());
        }
    }
    let services = tokio::spawn(
        Controller::for_stream(svc_events.applied_objects(), svc_store.clone())
            .with_config(cfg.clone())
            .reconcile_on(UnboundedReceiverStream::new(retrigger_rx))
            .graceful_shutdown_on(stopped(stop_rx.clone()))
            .run(service::reconcile, service::error_policy, ctx.clone())
            .for_each(log_result("service")),
    );
    let nodes = tokio::spawn(
        Controller::for_stream(node_events.applied_objects(), node_store.clone())
            .with_config(cfg)
            .graceful_shutdown_on(stopped(stop_rx.clone()))
            .run(node::reconcile, node::error_policy, ctx.clone())
            .for_each(log_result("node")),
    );
    let repair = tokio::spawn(repair::run(
        ctx.clone(),
        (svc_store, svc_ready),
        (node_store, node_ready),
        Duration::from_secs(args.repair_interval),
        Duration::from_secs(args.orphan_grace),
    ));
    let ahead = (args.probe_ahead_interval > 0).then(|| {
        tokio::spawn(conflict::ahead(
            ctx.clone(),
            Duration::from_secs(args.probe_ahead_interval),
        ))
    });
    let watch = tokio::spawn(store_watches(ctx.clone()));
    let store_up = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                ctx.metrics.store_up.set(i64::from(ctx.store_ok()));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let _ = ready_tx.send(true);

    let controllers = async {
        let _ = tokio::join!(networks, services, nodes);
    };
    tokio::pin!(controllers);
    let mut result = Ok(());
    {
        let lost = async {
            match &mut lease {
                Some((rx, _)) => {
                    let _ = rx.wait_for(|leading| !*leading).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => tracing::info!("shutting down"),
            () = lost => {
                tracing::error!("lost the leader lease; exiting so no two replicas write");
                result = Err(anyhow::anyhow!("lost the leader lease"));
            }
            () = &mut controllers => {}
        }
    }
    // Drain in-flight reconciles, then give the lease away.
    let _ = stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(10), &mut controllers)
        .await
        .is_err()
    {
        tracing::warn!("reconciles still running after 10s; leaving them");
    }
    repair.abort();
    if let Some(a) = ahead {
        a.abort();
    }
    watch.abort();
    store_up.abort();
    namespaces.abort();
    if let Some((rx, task)) = lease {
        drop(rx);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    probes.stop().await;
    result
}
