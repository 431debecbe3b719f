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
    Error, MANAGER, NODE_FINALIZER, Result, StoreRefusal, UNINITIALIZED_TAINT, context::Context,
    crd::PoolPurpose, ipam::owner,
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

/// Patch parameters of the writes that are not applies: still under the controller's name.
fn update_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

/// Removes the list entry at `/{path}/{i}` after testing that it is still `value` (or, for
/// taints, still has that key): a stale index becomes a conflict and a retry, never the removal
/// of someone else's entry. Used for what the controller takes away but does not own (the
/// kubelet's taint, a finalizer however it was added), which an apply cannot remove.
fn remove_at(path: &str, i: usize, test_path: &str, value: &str) -> Result<json_patch::Patch> {
    Ok(serde_json::from_value(json!([
        { "op": "test", "path": format!("{path}/{i}{test_path}"), "value": value },
        { "op": "remove", "path": format!("{path}/{i}") },
    ]))?)
}

/// Releases a deleted Node's address(es); returns what was released. On the network its
/// ClusterNetwork names; when that cannot be resolved any more (the ClusterNetwork was deleted,
/// the annotation names a missing one, or two now have a node pool), on every network where the
/// store holds an allocation of this Node, so the finalizer never stays stuck and the address
/// never stays held.
async fn release(node: &Node, ctx: &Context, o: pb::Owner) -> Result<Vec<String>> {
    let networks = match ctx.network_for(node, PoolPurpose::Node) {
        Ok(cn) => vec![cn.spec.network.clone()],
        Err(e) => {
            tracing::info!(node = %node.name_any(), reason = %e, "network not resolvable; releasing wherever the store holds this node's address");
            ctx.ipam
                .list_owned(&ctx.cluster_id, pb::OwnerKind::Node)
                .await?
                .into_iter()
                .filter(|a| {
                    a.owner
                        .as_ref()
                        .is_some_and(|x| x.name == o.name && (x.uid.is_empty() || x.uid == o.uid))
                })
                .map(|a| a.network)
                .collect()
        }
    };
    let mut released = Vec::new();
    for net in networks {
        match ctx.ipam.release(&net, o.clone()).await {
            Ok(r) => released.extend(r.allocation.map(|a| a.addresses).unwrap_or_default()),
            Err(Error::Store(StoreRefusal::NotFound(_))) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(released)
}

/// Whether the Node is done: no cloud taint, our finalizer, our providerID, and addresses with
/// an InternalIP and its Hostname — everything the reconcile would otherwise (re)write.
fn initialised(node: &Node, pid: &str) -> bool {
    let addrs = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    !tainted(node)
        && has_finalizer(node)
        && node.spec.as_ref().and_then(|s| s.provider_id.as_deref()) == Some(pid)
        && addrs.iter().any(|a| a.type_ == "InternalIP")
        && addrs
            .iter()
            .any(|a| a.type_ == "Hostname" && Some(a.address.as_str()) == node.metadata.name.as_deref())
}

/// Reconciles one Node.
#[tracing::instrument(name = "reconcile_node", skip_all, fields(
    name = node.metadata.name.as_deref(),
    generation = node.metadata.generation,
    resource_version = node.metadata.resource_version.as_deref(),
))]
pub async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let r = apply(&node, &ctx).await;
    ctx.metrics.reconciled(
        "node",
        r.as_ref().map_or_else(Error::metric_label, |_| "ok"),
        started.elapsed(),
    );
    if r.is_ok() {
        ctx.reconciled_ok(node.as_ref());
    }
    r
}

async fn apply(node: &Node, ctx: &Context) -> Result<Action> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let name = node.name_any();
    let uid = node.uid().unwrap_or_default();
    let o = owner(&ctx.cluster_id, pb::OwnerKind::Node, "", &name, &uid);

    if node.metadata.deletion_timestamp.is_some() {
        if has_finalizer(node) {
            let released = release(node, ctx, o).await?;
            if !released.is_empty() {
                ctx.event(
                    node,
                    EventType::Normal,
                    "Released",
                    "Release",
                    format!("released {}", released.join(", ")),
                )
                .await;
                ctx.retrigger_pending();
            }
            if let Some(i) = node.finalizers().iter().position(|f| f == NODE_FINALIZER) {
                let patch = remove_at("/metadata/finalizers", i, "", NODE_FINALIZER)?;
                api.patch(&name, &update_params(), &Patch::<()>::Json(patch))
                    .await?;
            }
        }
        return Ok(Action::await_change());
    }
    if !tainted(node) && !has_finalizer(node) {
        // Not ours to initialise (or initialised by someone else).
        return Ok(Action::await_change());
    }
    if initialised(node, &provider_id(&ctx.cluster_id, &name)) {
        // A status heartbeat or a resync of a Node we finished: no store call.
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
        Err(e @ Error::Store(_)) => return Err(allocation_failed(ctx, node, e).await),
        Err(e) => return Err(e),
    };

    // Addresses (status), then finalizer and providerID (spec), then the taint goes: the taint
    // is removed only once everything else is in place.
    let pid = provider_id(&ctx.cluster_id, &name);
    let current_pid = node.spec.as_ref().and_then(|s| s.provider_id.clone());
    if current_pid.as_deref().is_some_and(|p| p != pid) {
        ctx.event(
            node,
            EventType::Warning,
            "ProviderIDMismatch",
            "Initialize",
            format!("providerID is {current_pid:?}, not {pid}; leaving it"),
        )
        .await;
    }

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
    // The resourceVersion the spec apply is conditioned on: the status patch bumps it.
    let no_rv = || Error::MissingObjectKey("metadata.resourceVersion");
    let mut rv = node.resource_version().ok_or_else(no_rv)?;
    if shown != addrs {
        // A merge patch, not an apply: the API declares addresses a map keyed by `type`, but a
        // dual-stack node has two `InternalIP`s, which an apply rejects as duplicate keys. The
        // merge patch replaces the whole list, as the cloud node controller's does.
        let patch = json!({ "status": { "addresses": addrs } });
        rv = api
            .patch_status(&name, &update_params(), &Patch::Merge(&patch))
            .await?
            .resource_version()
            .ok_or_else(no_rv)?;
    }
    let needs_apply = !has_finalizer(node) || current_pid.is_none();
    if needs_apply {
        // Everything the controller owns on the Node, applied together (an apply that leaves a
        // field out gives it up): its finalizer, and the providerID unless another one is set.
        // `resourceVersion` makes a concurrent edit a conflict and a retry, and keeps an apply
        // from creating a Node that was deleted meanwhile.
        let mut patch = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "resourceVersion": rv, "finalizers": [NODE_FINALIZER] },
        });
        if current_pid.is_none() || current_pid.as_deref() == Some(pid.as_str()) {
            patch["spec"] = json!({ "providerID": pid });
        }
        api.patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(&patch))
            .await?;
    }
    let taint = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .and_then(|t| t.iter().position(|t| t.key == UNINITIALIZED_TAINT));
    if let Some(i) = taint {
        // The kubelet's taint, in an atomic list: only a patch can take one entry out.
        let patch = remove_at("/spec/taints", i, "/key", UNINITIALIZED_TAINT)?;
        api.patch(&name, &update_params(), &Patch::<()>::Json(patch))
            .await?;
    }
    if needs_apply || taint.is_some() {
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

/// Retries with per-object exponential backoff and jitter ([`Context::retry_after`]).
pub fn error_policy(node: Arc<Node>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(node = %node.name_any(), error = %err, "reconcile failed");
    ctx.retry_after(node.as_ref(), err)
}
