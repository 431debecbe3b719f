//! Repair: periodically compares the store's allocations of *this* cluster with the live
//! objects that own them, and releases an orphan (its Service or Node is gone, no longer a
//! LoadBalancer of ours, or was recreated under another uid) only after it has been seen
//! orphaned for a whole grace period — a watch lag or a half-created object is never a leak.
//! It never lists, let alone releases, another cluster's allocations; API-server VIPs are the
//! cloud service's and are left alone.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use cairn_proto::v1 as pb;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{ResourceExt, runtime::reflector::Store};
use tokio::sync::watch;

use crate::{Result, context::Context, crd::PoolPurpose, svc::wants_lb};

/// First time each allocation (by key) was seen orphaned.
#[derive(Default)]
pub struct Repair {
    seen: HashMap<String, Instant>,
}

fn key(a: &pb::Allocation) -> String {
    let o = a.owner.clone().unwrap_or_default();
    format!("{}/{}/{}/{}", a.network, o.kind, o.namespace, o.name)
}

impl Repair {
    /// One pass. Returns how many allocations it released. Costs O(allocations + Services +
    /// Nodes): the caches are indexed once per pass, then each allocation is one lookup.
    pub async fn pass(
        &mut self,
        ctx: &Context,
        services: &Store<Service>,
        nodes: &Store<Node>,
        grace: Duration,
    ) -> Result<usize> {
        let started = Instant::now();
        let r = self.pass_inner(ctx, services, nodes, grace).await;
        ctx.metrics
            .repair_seconds
            .observe(started.elapsed().as_secs_f64());
        r
    }

    async fn pass_inner(
        &mut self,
        ctx: &Context,
        services: &Store<Service>,
        nodes: &Store<Node>,
        grace: Duration,
    ) -> Result<usize> {
        let allocs = ctx.ipam.list_cluster(&ctx.cluster_id).await?;
        let services = services.state();
        let by_service: HashMap<(String, String), &Service> = services
            .iter()
            .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s.as_ref()))
            .collect();
        let nodes = nodes.state();
        let by_node: HashMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), n.as_ref())).collect();
        let mut orphans = Vec::new();
        for a in &allocs {
            let Some(o) = &a.owner else { continue };
            if o.cluster_id != ctx.cluster_id {
                continue; // never another cluster's, whatever the store returned
            }
            let live = match pb::OwnerKind::try_from(o.kind) {
                Ok(pb::OwnerKind::Service) => by_service
                    .get(&(o.namespace.clone(), o.name.clone()))
                    .is_some_and(|s| {
                        (o.uid.is_empty() || s.uid().as_deref() == Some(o.uid.as_str()))
                            && (wants_lb(s, ctx.lb_class.as_deref())
                                || s.finalizers().iter().any(|f| f == crate::SERVICE_FINALIZER))
                            && !moved_away(ctx, s, &a.network)
                    }),
                Ok(pb::OwnerKind::Node) => by_node
                    .get(&o.name)
                    .is_some_and(|n| o.uid.is_empty() || n.uid().as_deref() == Some(o.uid.as_str())),
                // An address found in use by an unknown host stays recorded until an operator
                // releases it; so does anything of a kind this controller does not manage.
                _ => true,
            };
            let k = key(a);
            if live {
                self.seen.remove(&k);
                continue;
            }
            let first = *self.seen.entry(k.clone()).or_insert_with(Instant::now);
            if first.elapsed() >= grace {
                orphans.push((k, a.clone()));
            }
        }
        // Forget entries whose allocation went away by itself.
        let present: std::collections::HashSet<String> = allocs.iter().map(key).collect();
        self.seen.retain(|k, _| present.contains(k));

        let mut released = 0;
        for (k, a) in orphans {
            let Some(o) = a.owner.clone() else { continue };
            let r = ctx.ipam.release(&a.network, o).await?;
            if r.released {
                released += 1;
                ctx.metrics.orphans_released.inc();
                tracing::info!(allocation = %k, addresses = %a.addresses.join(","), "released orphaned allocation");
            }
            self.seen.remove(&k);
        }
        if released > 0 {
            ctx.retrigger_pending();
        }
        Ok(released)
    }
}

/// Whether a live Service now draws from another network than `network` (its
/// `cairn.dev/network` annotation changed): its allocation on `network` is an orphan. The
/// reconciler releases it on the move; this catches a move it missed.
fn moved_away(ctx: &Context, svc: &Service, network: &str) -> bool {
    ctx.network_for(svc, PoolPurpose::Vip)
        .is_ok_and(|cn| cn.spec.network != network)
}

/// Runs passes every `interval` until the task is dropped.
pub async fn run(
    ctx: Arc<Context>,
    (services, mut services_ready): (Store<Service>, watch::Receiver<bool>),
    (nodes, mut nodes_ready): (Store<Node>, watch::Receiver<bool>),
    interval: Duration,
    grace: Duration,
) {
    let mut repair = Repair::default();
    // An empty cache would make every allocation look orphaned.
    if services_ready.wait_for(|r| *r).await.is_err() || nodes_ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Err(e) = repair.pass(&ctx, &services, &nodes, grace).await {
            tracing::warn!(error = %e, "repair pass failed");
        }
    }
}
