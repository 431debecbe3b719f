//! `cairn-ccm haproxy-agent`: the watch loop.
//!
//! Reflectors over Services, Nodes, EndpointSlices (and ClusterNetworks, for the API-server
//! VIP, unless `--api-server-vip` is given) wake one loop. Each turn renders the whole
//! configuration ([`super::model`] + [`super::render`]); when the text differs from what
//! HAProxy runs, it is validated, swapped in and HAProxy reloaded ([`super::apply`]). Reloads
//! are at least `--min-reload-interval` apart (changes in between are coalesced into one); a
//! configuration that failed is retried after `--retry-interval` unless the objects change.
//! The agent only reads the cluster; it writes Events and nothing else.
//!
//! - [`flags`] — [`AgentArgs`] and the checks on values that go into `haproxy.cfg`.
//! - `watches` — the reflectors and the change signal that wakes the loop.
//! - `step` — one turn: desired configuration, reload gate, apply.
//! - `events` — Events on the Services a warning or refusal is about.
//! - [`metrics`] — [`AgentMetrics`] and the HAProxy stats poller.
//! - this module — start-up (probes, HAProxy, initial lists), the loop, shutdown.

pub mod flags;
pub mod metrics;

mod events;
mod step;
mod watches;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::{FutureExt as _, future::BoxFuture};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::Api;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use self::{
    events::Events,
    metrics::poll_stats,
    step::{Agent, Caches},
    watches::{strip_node, watch_store},
};
pub use self::{events::REPORTER, flags::AgentArgs, metrics::AgentMetrics};
use super::apply::{Haproxy, default_bin, write_atomic};
use crate::{
    crd::ClusterNetwork,
    k8s::{self, strip_managed_fields},
    metrics::serve_probes,
};

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(args: AgentArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    if args.load_balancer_class.as_deref() == Some("") {
        anyhow::bail!("--load-balancer-class: must not be empty");
    }
    let s = args.stats_listen;
    if !s.ip().is_loopback() {
        tracing::warn!(%s, "--stats-listen is not on loopback: HAProxy's stats page is unauthenticated");
    }
    let mut shutdown: BoxFuture<'static, ()> = shutdown.boxed();
    let client = k8s::client(args.kubeconfig.as_deref()).await?;

    let changed = Arc::new(Notify::new());
    let (services, svc_ready, t1) = watch_store(
        Api::<Service>::all(client.clone()),
        changed.clone(),
        strip_managed_fields,
    );
    let (nodes, node_ready, t2) = watch_store(Api::<Node>::all(client.clone()), changed.clone(), strip_node);
    let (slices, slice_ready, t3) = watch_store(
        Api::<EndpointSlice>::all(client.clone()),
        changed.clone(),
        strip_managed_fields,
    );
    let mut tasks = vec![t1, t2, t3];
    let mut readies = vec![svc_ready, node_ready, slice_ready];
    let networks = if args.api_server_vip.is_empty() {
        let (cns, ready, t) = watch_store(
            Api::<ClusterNetwork>::all(client.clone()),
            changed.clone(),
            strip_managed_fields,
        );
        tasks.push(t);
        readies.push(ready);
        Some(cns)
    } else {
        None
    };
    let caches = Caches {
        services,
        nodes,
        slices,
        networks,
    };
    let all_ready = async {
        for r in &mut readies {
            r.wait_for(|v| *v).await.context("watch ended")?;
        }
        anyhow::Ok(())
    };
    let abort = |tasks: &[tokio::task::JoinHandle<()>]| tasks.iter().for_each(|t| t.abort());

    if args.dry_run {
        let r = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(60), all_ready) => r,
            () = &mut shutdown => { abort(&tasks); return Ok(()); }
        };
        abort(&tasks);
        r.context("the initial lists did not arrive within 60s")??;
        let (_, warnings, rendered) = caches.desired(&args);
        for w in warnings {
            let who = w.owner.map(|o| o.to_string()).unwrap_or_default();
            eprintln!("warning: {who}: {}: {}", w.reason, w.message);
        }
        print!("{}", rendered.text);
        return Ok(());
    }

    let bin = args.haproxy_bin.clone().unwrap_or_else(default_bin);
    let haproxy = Haproxy::new(
        bin,
        args.config.clone(),
        args.master_socket.clone(),
        args.reload_timeout,
    );
    let version = haproxy.version().await?;
    tracing::info!(%version, config = %args.config.display(), manage = args.manage_haproxy, "haproxy agent starting");

    let metrics = Arc::new(AgentMetrics::new());
    let (ready_tx, ready_rx) = watch::channel(false);
    let probes = serve_probes(args.metrics_listen, metrics.clone(), ready_rx).await?;
    if let Some(f) = &args.addr_file {
        write_atomic(f, &format!("metrics={}\n", probes.local_addr()))
            .await
            .with_context(|| format!("--addr-file {}", f.display()))?;
    }
    let stats = tokio::spawn(poll_stats(
        haproxy.master.clone(),
        metrics.clone(),
        args.stats_interval,
    ));

    tokio::select! {
        r = all_ready => r?,
        () = &mut shutdown => {
            abort(&tasks);
            stats.abort();
            probes.stop().await;
            return Ok(());
        }
    }
    tracing::info!("initial lists loaded");

    let events = Events::new(client.clone(), caches.services.clone());
    let mut agent = Agent {
        args,
        haproxy,
        metrics: metrics.clone(),
        events,
        caches,
        running: None,
        failed: None,
        last_apply: None,
        ready: ready_tx,
    };
    let manage = agent.args.manage_haproxy;
    loop {
        let wake = agent.step().await;
        tokio::select! {
            () = changed.notified() => {}
            () = sleep_until(wake) => {}
            status = agent.haproxy.exited(), if manage => {
                tracing::error!(status = ?status, "haproxy exited; restarting it");
                agent.running = None;
                agent.metrics.up.set(0);
                let _ = agent.ready.send(false);
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down");
    abort(&tasks);
    stats.abort();
    if manage {
        agent.haproxy.stop(Duration::from_secs(5)).await;
    }
    probes.stop().await;
    Ok(())
}
