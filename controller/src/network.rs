//! ClusterNetwork reconciler. Managed mode (spec has pools): pushes the definition to the store
//! (`UpsertNetwork`, managed by `cluster/<id>`). Bound mode (no pools): reads the store's
//! definition (`GetNetwork`) and never writes it; a network not defined yet is
//! `Ready=False/NetworkNotFound` and looked up again every few seconds. In both modes: finds or
//! allocates the cluster's API-server VIP, and writes status: mode, the store's definition,
//! conditions `Ready`/`Conflict`/`Degraded`, usage per pool and family, the API-server VIP and
//! `observedGeneration`.
//!
//! Of several ClusterNetworks naming one store network, only the oldest is reconciled; the
//! others show `Conflict=True/DuplicateNetwork` and touch nothing.
//!
//! A definition the store refuses (another cluster manages a different one, or it overlaps
//! another network) sets `Conflict` and changes nothing in the store. Deleting a ClusterNetwork
//! leaves the store's network alone: other clusters may share it.

use std::{sync::Arc, time::Duration};

use cairn_proto::v1 as pb;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;

use crate::{
    API_SERVER_OWNER, Error, MANAGER, Result, StoreRefusal,
    conflict::{self, Vetted},
    context::Context,
    crd::{
        ClusterNetwork, ClusterNetworkStatus, NetworkDefinition, NetworkMode, PoolDefinition, PoolPurpose,
        PoolUsage,
    },
    ipam::owner,
};

/// Status refresh period (usage changes as any cluster allocates).
const RESYNC: Duration = Duration::from_secs(30);
/// How soon a bound ClusterNetwork looks again for a network not yet defined in the store.
const NOT_FOUND_RETRY: Duration = Duration::from_secs(5);
/// How soon a duplicate ClusterNetwork looks again (the one it yields to may be deleted).
const DUPLICATE_RETRY: Duration = Duration::from_secs(5);

/// The store definition of a ClusterNetwork.
pub fn to_store(cn: &ClusterNetwork, cluster_id: &str) -> pb::Network {
    let s = &cn.spec;
    pb::Network {
        name: s.network.clone(),
        prefixes: s.prefixes.clone(),
        gateways: s.gateways.clone(),
        dns_servers: s.dns_servers.clone(),
        vlan: s.vlan,
        pools: s
            .pools
            .iter()
            .map(|p| pb::Pool {
                name: p.name.clone(),
                purpose: match p.purpose {
                    PoolPurpose::Vip => pb::PoolPurpose::Vip,
                    PoolPurpose::Node => pb::PoolPurpose::Node,
                } as i32,
                ranges: p.ranges.clone(),
                exclusions: p.exclusions.clone(),
                auto_assign: p.auto_assign,
            })
            .collect(),
        reuse_grace_seconds: s.reuse_grace_seconds,
        managed_by: format!("cluster/{cluster_id}"),
        ..Default::default()
    }
}

/// The store's definition, as status shows it.
fn definition(n: pb::Network) -> NetworkDefinition {
    NetworkDefinition {
        prefixes: n.prefixes,
        gateways: n.gateways,
        dns_servers: n.dns_servers,
        vlan: n.vlan,
        reuse_grace_seconds: n.reuse_grace_seconds,
        managed_by: n.managed_by,
        pools: n
            .pools
            .into_iter()
            .map(|p| PoolDefinition {
                purpose: purpose_name(p.purpose).into(),
                name: p.name,
                ranges: p.ranges,
                exclusions: p.exclusions,
                auto_assign: p.auto_assign.unwrap_or(true),
            })
            .collect(),
    }
}

/// `VIP`/`NODE` from the proto enum.
fn purpose_name(p: i32) -> &'static str {
    pb::PoolPurpose::try_from(p).map_or("UNSPECIFIED", |p| {
        p.as_str_name().trim_start_matches("POOL_PURPOSE_")
    })
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    old: &[Condition],
) -> Condition {
    let status = if status { "True" } else { "False" };
    // The transition time moves only when the status does.
    let last = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.chars().take(32 * 1024).collect(),
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// Whether `conds` already show condition `type_` with `status` for `reason` (an event is sent
/// when a condition appears, not on every resync).
fn shows(conds: &[Condition], type_: &str, status: &str, reason: &str) -> bool {
    conds
        .iter()
        .any(|c| c.type_ == type_ && c.status == status && c.reason == reason)
}

fn summary(usage: &[PoolUsage], purpose: &str) -> Option<String> {
    let rows: Vec<_> = usage.iter().filter(|u| u.purpose == purpose).collect();
    if rows.is_empty() {
        return None;
    }
    let sum = |f: fn(&PoolUsage) -> &str| {
        rows.iter()
            .map(|u| f(u).parse::<u128>().unwrap_or(0))
            .sum::<u128>()
    };
    Some(format!("{}/{}", sum(|u| &u.used), sum(|u| &u.total)))
}

fn usage_rows(u: Vec<pb::PoolUsage>) -> Vec<PoolUsage> {
    u.into_iter()
        .map(|u| PoolUsage {
            purpose: purpose_name(u.purpose).into(),
            family: match pb::IpFamily::try_from(u.family) {
                Ok(pb::IpFamily::Ipv6) => "IPv6".into(),
                _ => "IPv4".into(),
            },
            pool: u.pool,
            total: u.total,
            used: u.used,
            free: u.free,
            quarantined: u.quarantined,
            out_of_range: u.out_of_range,
            // Shown only when there are any (and absent from a store that predates them).
            unknown_hosts: if u.unknown_hosts == "0" {
                String::new()
            } else {
                u.unknown_hosts
            },
        })
        .collect()
}

/// The API-server VIP: allocated when the spec asks for it, else looked up.
async fn api_server_vip(cn: &ClusterNetwork, ctx: &Context) -> Result<Option<String>> {
    let o = owner(
        &ctx.cluster_id,
        pb::OwnerKind::ApiServer,
        "",
        API_SERVER_OWNER,
        "",
    );
    let net = &cn.spec.network;
    let alloc = match &cn.spec.api_server_vip {
        Some(v) if v.enabled != Some(false) => {
            let req = pb::AllocateRequest {
                network: net.clone(),
                owner: Some(o),
                pool: v.pool.clone().unwrap_or_default(),
                requested_addresses: v.address.iter().cloned().collect(),
                ..Default::default()
            };
            // A VIP this ClusterNetwork does not show yet is probed first (when it asks for
            // probing); one a host answers for is reported and another one taken.
            let shown: Vec<String> = cn
                .status
                .as_ref()
                .and_then(|s| s.api_server_vip.clone())
                .into_iter()
                .collect();
            let mut in_use = 0;
            loop {
                let a = ctx.ipam.allocate(req.clone()).await?.allocation;
                let Some(a) = a else { break None };
                match conflict::vet(ctx, cn, cn, &a, &shown).await? {
                    Vetted::Clean => break Some(a),
                    Vetted::InUse { .. } => in_use += 1,
                }
                if in_use >= conflict::MAX_IN_USE_IN_A_ROW {
                    return Err(Error::Store(StoreRefusal::Exhausted(format!(
                        "apiServerVIP: {in_use} addresses in a row answered a conflict probe (recorded as in use by unknown hosts)"
                    ))));
                }
            }
        }
        _ => ctx.ipam.get_allocation(net, o).await?,
    };
    Ok(alloc.and_then(|a| a.addresses.first().cloned()))
}

/// Reconciles one ClusterNetwork.
#[tracing::instrument(name = "reconcile_clusternetwork", skip_all, fields(
    name = cn.metadata.name.as_deref(),
    generation = cn.metadata.generation,
    resource_version = cn.metadata.resource_version.as_deref(),
))]
pub async fn reconcile(cn: Arc<ClusterNetwork>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let r = apply(&cn, &ctx).await;
    ctx.metrics.reconciled(
        "clusternetwork",
        r.as_ref().map_or_else(Error::metric_label, |_| "ok"),
        started.elapsed(),
    );
    if r.is_ok() {
        ctx.reconciled_ok(cn.as_ref());
    }
    r
}

async fn apply(cn: &ClusterNetwork, ctx: &Context) -> Result<Action> {
    let api: Api<ClusterNetwork> = Api::all(ctx.client.clone());
    let name = cn.name_any();
    let generation = cn.metadata.generation;
    let old = cn.status.clone().unwrap_or_default();
    let mut st = ClusterNetworkStatus {
        observed_generation: generation,
        ..old.clone()
    };
    let mut conds: Vec<Condition> = Vec::new();

    // Another ClusterNetwork of this cluster already stands for this store network: this one
    // stays out of the store (two would overwrite each other on every resync) until it is the
    // only one.
    if let Some(first) = ctx.duplicate_of(cn) {
        let message = format!(
            "ClusterNetwork {first:?} already binds this cluster to network {:?}; this one is ignored until that one is deleted",
            cn.spec.network
        );
        // Nothing of the store's view: this object stands for nothing there.
        st = ClusterNetworkStatus {
            observed_generation: generation,
            ..Default::default()
        };
        st.conditions = vec![
            condition(
                "Conflict",
                true,
                "DuplicateNetwork",
                &message,
                generation,
                &old.conditions,
            ),
            condition(
                "Ready",
                false,
                "DuplicateNetwork",
                &message,
                generation,
                &old.conditions,
            ),
        ];
        if !shows(&old.conditions, "Conflict", "True", "DuplicateNetwork") {
            ctx.event(cn, EventType::Warning, "DuplicateNetwork", "Reconcile", message)
                .await;
        }
        if st != old {
            write_status(&api, &name, &st).await?;
        }
        return Ok(Action::requeue(DUPLICATE_RETRY));
    }

    // Managed: our definition goes to the store. Bound: the store's is read, never written.
    let synced = if cn.is_bound() {
        st.mode = Some(NetworkMode::Bound);
        ctx.ipam.get_network(&cn.spec.network).await
    } else {
        st.mode = Some(NetworkMode::Managed);
        ctx.ipam
            .upsert_network(pb::UpsertNetworkRequest {
                network: Some(to_store(cn, &ctx.cluster_id)),
                ..Default::default()
            })
            .await
            .map(|r| r.network)
    };
    let mut unavailable = None;
    let mut requeue = RESYNC;
    match synced {
        Ok(None) => {
            ctx.set_store_ok(true);
            // Bound to a network nobody defined (yet): nothing to draw from.
            let message = format!(
                "network {:?} is not defined in the store; the on-prem cloud service (or `cairn-ipam network apply`) defines it, or give this ClusterNetwork pools to define it here",
                cn.spec.network
            );
            st.definition = None;
            st.store_version = None;
            conds.push(condition(
                "Conflict",
                false,
                "NoConflict",
                "nothing to conflict with",
                generation,
                &old.conditions,
            ));
            conds.push(condition(
                "Ready",
                false,
                "NetworkNotFound",
                &message,
                generation,
                &old.conditions,
            ));
            if !shows(&old.conditions, "Ready", "False", "NetworkNotFound") {
                ctx.event(cn, EventType::Warning, "NetworkNotFound", "GetNetwork", message)
                    .await;
            }
            requeue = NOT_FOUND_RETRY;
        }
        Ok(Some(n)) => {
            ctx.set_store_ok(true);
            st.store_version = Some(n.version);
            let (reason, message) = if cn.is_bound() {
                (
                    "Bound",
                    format!("bound to the store's network, managed by {}", n.managed_by),
                )
            } else {
                ("NoConflict", "the store accepted the definition".to_string())
            };
            let def = definition(n);
            if !cn.spec.policies.is_empty() {
                let vip_pools: Vec<&str> = def
                    .pools
                    .iter()
                    .filter(|d| d.purpose == "VIP")
                    .map(|d| d.name.as_str())
                    .collect();
                let problems = crate::policy::problems(cn, &vip_pools);
                conds.push(if problems.is_empty() {
                    condition(
                        "PoliciesValid",
                        true,
                        "Valid",
                        "every policy names a VIP pool and reads",
                        generation,
                        &old.conditions,
                    )
                } else {
                    condition(
                        "PoliciesValid",
                        false,
                        "InvalidPolicy",
                        &problems.join("; "),
                        generation,
                        &old.conditions,
                    )
                });
            }
            st.definition = Some(def);
            conds.push(condition(
                "Conflict",
                false,
                reason,
                &message,
                generation,
                &old.conditions,
            ));
            let vip = api_server_vip(cn, ctx).await;
            let usage = ctx.ipam.usage(&cn.spec.network).await;
            match (vip, usage) {
                (Ok(vip), Ok(u)) => {
                    st.api_server_vip = vip;
                    st.usage = usage_rows(u);
                    st.vip_usage = summary(&st.usage, "VIP");
                    st.node_usage = summary(&st.usage, "NODE");
                    conds.push(condition(
                        "Ready",
                        true,
                        "Synced",
                        "the network is in the store",
                        generation,
                        &old.conditions,
                    ));
                }
                (Err(e), _) | (_, Err(e)) => match e {
                    Error::StoreUnavailable(m) => unavailable = Some(m),
                    e => conds.push(condition(
                        "Ready",
                        false,
                        "APIServerVIPFailed",
                        &e.to_string(),
                        generation,
                        &old.conditions,
                    )),
                },
            }
        }
        Err(Error::Store(refusal)) => {
            let (reason, conflict, message) = match refusal {
                StoreRefusal::Conflict(m) => ("ManagedElsewhere", true, m),
                StoreRefusal::Overlap(m) => ("Overlap", true, m),
                StoreRefusal::Invalid(m) => ("Invalid", false, m),
                StoreRefusal::NotFound(m)
                | StoreRefusal::Exhausted(m)
                | StoreRefusal::PermissionDenied(m)
                | StoreRefusal::Unauthenticated(m)
                | StoreRefusal::Other { message: m, .. } => ("Refused", false, m),
            };
            conds.push(condition(
                "Conflict",
                conflict,
                if conflict { reason } else { "NoConflict" },
                &message,
                generation,
                &old.conditions,
            ));
            conds.push(condition(
                "Ready",
                false,
                reason,
                &message,
                generation,
                &old.conditions,
            ));
            ctx.event(cn, EventType::Warning, reason, "UpsertNetwork", message)
                .await;
        }
        Err(Error::StoreUnavailable(m)) => unavailable = Some(m),
        Err(e) => return Err(e),
    }
    if let Some(m) = &unavailable {
        ctx.set_store_ok(false);
        // Keep what we knew; say why it may be stale.
        conds = old
            .conditions
            .iter()
            .filter(|c| c.type_ != "Degraded")
            .cloned()
            .collect();
        conds.push(condition(
            "Degraded",
            true,
            "StoreUnavailable",
            m,
            generation,
            &old.conditions,
        ));
    } else {
        conds.push(condition(
            "Degraded",
            false,
            "StoreAvailable",
            "the store answers",
            generation,
            &old.conditions,
        ));
    }
    st.conditions = conds;
    if st != old {
        write_status(&api, &name, &st).await?;
    }
    match unavailable {
        Some(m) => Err(Error::StoreUnavailable(m)),
        None => Ok(Action::requeue(requeue)),
    }
}

/// The whole status, applied: only this controller writes it. Forced because a status written
/// before the controller used apply belongs to an `Update` manager, whose ownership would
/// otherwise make every changed field a conflict.
async fn write_status(api: &Api<ClusterNetwork>, name: &str, st: &ClusterNetworkStatus) -> Result<()> {
    let patch = json!({
        "apiVersion": ClusterNetwork::api_version(&()),
        "kind": ClusterNetwork::kind(&()),
        "metadata": { "name": name },
        "status": st,
    });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Retries with per-object exponential backoff and jitter ([`Context::retry_after`]); the store
/// being down is logged, never a crash.
pub fn error_policy(cn: Arc<ClusterNetwork>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(clusternetwork = %cn.name_any(), error = %err, "reconcile failed");
    ctx.retry_after(cn.as_ref(), err)
}
