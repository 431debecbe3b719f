//! Node reconciler (the cloud node controller's role for address assignment).
//!
//! A Node carrying the taint `node.cloudprovider.kubernetes.io/uninitialized` gets a node-pool
//! address from the store (found, when the cloud service allocated it at VM creation under the
//! same owner), `spec.providerID = cairn://<cluster-id>/<node>`, `InternalIP` and `Hostname`
//! addresses, the finalizer `cairn.dev/node-ip-release`, and then loses the taint. Deleting the
//! Node releases the address, then drops the finalizer.

use std::sync::Arc;

use cairn_proto::v1 as pb;
use k8s_openapi::api::core::v1::{Node, NodeAddress};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;

use crate::{
    Error, NODE_FINALIZER, Result, UNINITIALIZED_TAINT, context::Context, crd::PoolPurpose, ipam::owner,
};

/// The providerID Cairn gives a node.
pub fn provider_id(cluster_id: &str, node: &str) -> String {
    format!("cairn://{cluster_id}/{node}")
}

fn tainted(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == UNINITIALIZED_TAINT))
}

fn has_finalizer(node: &Node) -> bool {
    node.finalizers().iter().any(|f| f == NODE_FINALIZER)
}

/// Reconciles one Node.
pub async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let r = apply(&node, &ctx).await;
    ctx.metrics.reconciled(
        "node",
        r.as_ref().map_or_else(Error::metric_label, |_| "ok"),
        started.elapsed(),
    );
    r
}

async fn apply(node: &Node, ctx: &Context) -> Result<Action> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let name = node.name_any();
    let uid = node.uid().unwrap_or_default();
    let o = owner(&ctx.cluster_id, pb::OwnerKind::Node, "", &name, &uid);

    if node.metadata.deletion_timestamp.is_some() {
        if has_finalizer(node) {
            let cn = ctx.network_for(node, PoolPurpose::Node)?;
            let r = ctx.ipam.release(&cn.spec.network, o).await?;
            if let Some(a) = r.allocation {
                ctx.event(
                    node,
                    EventType::Normal,
                    "Released",
                    "Release",
                    format!("released {}", a.addresses.join(", ")),
                )
                .await;
                ctx.retrigger_pending();
            }
            let fins: Vec<String> = node
                .finalizers()
                .iter()
                .filter(|f| *f != NODE_FINALIZER)
                .cloned()
                .collect();
            let patch: json_patch::Patch = serde_json::from_value(json!([
                { "op": "test", "path": "/metadata/resourceVersion", "value": node.resource_version() },
                { "op": "replace", "path": "/metadata/finalizers", "value": fins },
            ]))?;
            api.patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await?;
        }
        return Ok(Action::await_change());
    }
    if !tainted(node) && !has_finalizer(node) {
        // Not ours to initialise (or initialised by someone else).
        return Ok(Action::await_change());
    }

    let cn = match ctx.network_for(node, PoolPurpose::Node) {
        Ok(cn) => cn,
        Err(e) => return Err(allocation_failed(ctx, node, e).await),
    };
    let req = pb::AllocateRequest {
        network: cn.spec.network.clone(),
        owner: Some(o),
        purpose: pb::PoolPurpose::Node as i32,
        families: vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32],
        optional_extra_families: true,
        ..Default::default()
    };
    let a = match ctx.ipam.allocate(req).await {
        Ok(r) => r.allocation.ok_or(Error::MissingObjectKey("allocation"))?,
        Err(e @ Error::Store { .. }) => return Err(allocation_failed(ctx, node, e).await),
        Err(e) => return Err(e),
    };

    // Finalizer and providerID first (spec), then addresses (status), then the taint goes:
    // the taint is removed only once everything else is in place.
    let mut fins: Vec<String> = node.finalizers().to_vec();
    if !fins.iter().any(|f| f == NODE_FINALIZER) {
        fins.push(NODE_FINALIZER.into());
    }
    let pid = provider_id(&ctx.cluster_id, &name);
    let current_pid = node.spec.as_ref().and_then(|s| s.provider_id.clone());
    let mut ops = vec![json!({ "op": "add", "path": "/metadata/finalizers", "value": fins })];
    if current_pid.is_none() {
        ops.push(json!({ "op": "add", "path": "/spec/providerID", "value": pid }));
    } else if current_pid.as_deref() != Some(pid.as_str()) {
        ctx.event(
            node,
            EventType::Warning,
            "ProviderIDMismatch",
            "Initialize",
            format!("providerID is {current_pid:?}, not {pid}; leaving it"),
        )
        .await;
    }
    let taints: Vec<_> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let kept: Vec<_> = taints
        .iter()
        .filter(|t| t.key != UNINITIALIZED_TAINT)
        .cloned()
        .collect();

    let mut addrs: Vec<NodeAddress> = a
        .addresses
        .iter()
        .map(|ip| NodeAddress {
            type_: "InternalIP".into(),
            address: ip.clone(),
        })
        .collect();
    addrs.push(NodeAddress {
        type_: "Hostname".into(),
        address: name.clone(),
    });
    let shown = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    // The resourceVersion the spec patch is tested against: the status patch bumps it.
    let mut rv = node.resource_version();
    if shown != addrs {
        let patch = json!({ "status": { "addresses": addrs } });
        rv = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?
            .resource_version();
    }
    let needs_spec = !has_finalizer(node) || current_pid.is_none() || kept.len() != taints.len();
    if needs_spec {
        if kept.len() != taints.len() {
            ops.push(json!({ "op": "add", "path": "/spec/taints", "value": kept }));
        }
        // A concurrent edit (e.g. of taints) turns into a conflict and a retry, not a loss.
        ops.insert(
            0,
            json!({ "op": "test", "path": "/metadata/resourceVersion", "value": rv }),
        );
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
        api.patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await?;
        ctx.event(
            node,
            EventType::Normal,
            "Allocated",
            "Initialize",
            format!(
                "{} from {}/{}; providerID {pid}",
                a.addresses.join(", "),
                a.network,
                a.pool
            ),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Tells the Node's readers why it stays uninitialised; returns the error for the retry.
async fn allocation_failed(ctx: &Context, node: &Node, e: Error) -> Error {
    ctx.event(
        node,
        EventType::Warning,
        "AllocationFailed",
        "Allocate",
        e.to_string(),
    )
    .await;
    e
}

/// Retries with backoff.
pub fn error_policy(node: Arc<Node>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(node = %node.name_any(), error = %err, "reconcile failed");
    Action::requeue(err.backoff(1))
}
