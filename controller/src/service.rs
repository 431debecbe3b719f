//! LoadBalancer Service reconciler.
//!
//! A Service is ours when `type: LoadBalancer` and its `loadBalancerClass` is unset (and no
//! `--load-balancer-class` is configured) or equals the configured class. For ours: finalizer
//! first, then `Allocate` (one address per family as `ipFamilyPolicy`/`ipFamilies` demand,
//! honouring `spec.loadBalancerIP` or `cairn.dev/load-balancer-ips`, `cairn.dev/pool` and
//! `cairn.dev/sharing-key`), then `status.loadBalancer.ingress` and `cairn.dev/allocated-from`.
//! On delete, type change or class change: `Release`, clear the ingress we wrote, drop the
//! finalizer. A Service the store cannot serve yet (pool full, address held elsewhere) is
//! pending: it gets an `AllocationFailed` event and is retried as soon as the store frees an
//! address anywhere (store watch), or periodically.
//!
//! Adoption: a Service that shows ingress IPs but has no allocation yet (first start after
//! migrating from another LB implementation) asks for exactly those IPs, so it keeps them when
//! no other owner holds them.

use std::{net::IpAddr, sync::Arc, time::Duration};

use cairn_proto::v1 as pb;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType, reflector::ObjectRef},
};
use serde_json::json;

use crate::{
    ANN_ALLOCATED_FROM, ANN_IPS, ANN_POOL, ANN_SHARING, Error, MANAGER, Result, SERVICE_FINALIZER,
    StoreRefusal,
    conflict::{self, Vetted},
    context::Context,
    crd::PoolPurpose,
    ipam::owner,
    policy::{self, Admission},
    svc::{ann, family_named, family_of, other_family, wants_lb},
};

/// Re-exported for the tests and benchmark that read what the reconciler wrote.
pub use crate::svc::ingress_ips;

/// Periodic resync of allocated Services (cheap: an idempotent Allocate).
const RESYNC: Duration = Duration::from_secs(600);
/// Retry period of pending Services, besides the store-watch trigger.
const PENDING_RETRY: Duration = Duration::from_secs(15);

fn has_finalizer(svc: &Service) -> bool {
    svc.finalizers().iter().any(|f| f == SERVICE_FINALIZER)
}

/// The store request for a Service, or the user error that prevents one.
pub fn allocate_request(svc: &Service, cluster_id: &str, network: &str) -> Result<pb::AllocateRequest> {
    let spec = svc.spec.as_ref().ok_or(Error::MissingObjectKey("spec"))?;
    let ns = svc
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let uid = svc.uid().ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let invalid = |field: &str, message: String| Error::Invalid {
        field: field.into(),
        message,
    };

    // Requested addresses: the annotation or spec.loadBalancerIP, never both.
    let legacy = spec
        .load_balancer_ip
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let mut requested: Vec<IpAddr> = Vec::new();
    match (ann(svc, ANN_IPS), legacy) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "spec.loadBalancerIP",
                format!("set together with annotation {ANN_IPS}; use only the annotation"),
            ));
        }
        (Some(list), None) => {
            for (i, s) in list.split(',').map(str::trim).enumerate() {
                let ip: IpAddr = s.parse().map_err(|_| {
                    invalid(
                        &format!("annotation {ANN_IPS}[{i}]"),
                        format!("{s:?} is not an IP address"),
                    )
                })?;
                if requested.iter().any(|r| r.is_ipv4() == ip.is_ipv4()) {
                    return Err(invalid(
                        &format!("annotation {ANN_IPS}[{i}]"),
                        "at most one address per family".into(),
                    ));
                }
                requested.push(ip);
            }
        }
        (None, Some(s)) => requested.push(
            s.parse()
                .map_err(|_| invalid("spec.loadBalancerIP", format!("{s:?} is not an IP address")))?,
        ),
        (None, None) => {}
    }

    // Families from ipFamilies / ipFamilyPolicy.
    let mut families: Vec<pb::IpFamily> = spec
        .ip_families
        .iter()
        .flatten()
        .map(|s| family_named(s))
        .collect();
    if families.is_empty() {
        families = requested.iter().map(family_of).collect();
    }
    if families.is_empty() {
        families.push(pb::IpFamily::Ipv4);
    }
    let policy = spec.ip_family_policy.as_deref().unwrap_or("SingleStack");
    let optional_extra = match policy {
        "SingleStack" => {
            families.truncate(1);
            false
        }
        "PreferDualStack" | "RequireDualStack" => {
            if families.len() == 1 {
                families.push(other_family(families[0]));
            }
            policy == "PreferDualStack"
        }
        other => {
            return Err(invalid(
                "spec.ipFamilyPolicy",
                format!("unknown policy {other:?}"),
            ));
        }
    };
    // A requested address's family must be served.
    for ip in &requested {
        let f = family_of(ip);
        if !families.contains(&f) {
            return Err(invalid(
                ANN_IPS,
                format!("{ip} is {f:?}, which the Service's ipFamilies do not include"),
            ));
        }
    }

    // Adoption: no explicit request, but ingress IPs are shown — and not ones this controller
    // wrote from another network (a Service moving networks starts afresh there).
    if requested.is_empty() && allocated_network(svc).is_none_or(|n| n == network) {
        requested = ingress_ips(svc)
            .into_iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        requested.retain(|ip: &IpAddr| families.contains(&family_of(ip)));
        requested.dedup_by_key(|ip| ip.is_ipv4());
    }

    let ports: Vec<pb::PortSpec> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| pb::PortSpec {
            protocol: match p.protocol.as_deref() {
                Some("UDP") => pb::Protocol::Udp,
                Some("SCTP") => pb::Protocol::Sctp,
                _ => pb::Protocol::Tcp,
            } as i32,
            port: p.port.max(0) as u32,
        })
        .collect();

    Ok(pb::AllocateRequest {
        network: network.to_string(),
        owner: Some(owner(
            cluster_id,
            pb::OwnerKind::Service,
            &ns,
            &svc.name_any(),
            &uid,
        )),
        pool: ann(svc, ANN_POOL).unwrap_or_default().to_string(),
        purpose: pb::PoolPurpose::Vip as i32,
        families: families.into_iter().map(|f| f as i32).collect(),
        optional_extra_families: optional_extra,
        requested_addresses: requested.iter().map(ToString::to_string).collect(),
        sharing_key: ann(svc, ANN_SHARING).unwrap_or_default().to_string(),
        ports,
        dry_run: false,
    })
}

/// Server-side applies what the controller owns on the Service itself: its finalizer and, when
/// given, the `cairn.dev/allocated-from` annotation. Every apply states all of them: a field
/// left out of an apply is a field given up. `resourceVersion` keeps the old guarantee that an
/// apply never creates a Service that was deleted meanwhile.
async fn apply_meta(
    api: &Api<Service>,
    svc: &Service,
    rv: Option<String>,
    allocated_from: Option<&str>,
) -> Result<()> {
    let rv = rv.ok_or(Error::MissingObjectKey("metadata.resourceVersion"))?;
    let mut meta = json!({
        "name": svc.name_any(),
        "resourceVersion": rv,
        "finalizers": [SERVICE_FINALIZER],
    });
    if let Some(from) = allocated_from {
        meta["annotations"] = json!({ ANN_ALLOCATED_FROM: from });
    }
    let patch = json!({ "apiVersion": "v1", "kind": "Service", "metadata": meta });
    api.patch(
        &svc.name_any(),
        &PatchParams::apply(MANAGER),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Server-side applies the Service's `status.loadBalancer.ingress` (an atomic list: the
/// controller owns all of it) and, riding along in the same write, the allocated-from
/// annotation. Forced: these are the load balancer's fields by contract, and an earlier writer
/// (another LB implementation being replaced, or this controller before it used apply) must
/// not turn every allocation into a conflict; the old merge patches overwrote them too.
async fn apply_status(
    api: &Api<Service>,
    svc: &Service,
    allocated_from: Option<&str>,
    ingress: Vec<serde_json::Value>,
) -> Result<Service> {
    let mut meta = json!({ "name": svc.name_any() });
    if let Some(from) = allocated_from {
        meta["annotations"] = json!({ ANN_ALLOCATED_FROM: from });
    }
    let patch = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "status": { "loadBalancer": { "ingress": ingress } },
    });
    Ok(api
        .patch_status(
            &svc.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?)
}

/// Drops the finalizer. A JSON patch, not an apply: leaving the finalizer out of an apply only
/// gives up this manager's claim, while a finalizer written by someone else (an older version of
/// this controller, a user) must go too. The `test` makes a stale index a conflict, not the
/// removal of another finalizer.
async fn remove_finalizer(api: &Api<Service>, svc: &Service) -> Result<()> {
    let Some(i) = svc.finalizers().iter().position(|f| f == SERVICE_FINALIZER) else {
        return Ok(());
    };
    let patch: json_patch::Patch = serde_json::from_value(json!([
        { "op": "test", "path": format!("/metadata/finalizers/{i}"), "value": SERVICE_FINALIZER },
        { "op": "remove", "path": format!("/metadata/finalizers/{i}") },
    ]))?;
    let pp = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    api.patch(&svc.name_any(), &pp, &Patch::<()>::Json(patch)).await?;
    Ok(())
}

/// Releases the Service's VIP(s) on every network it could hold them on.
async fn release(svc: &Service, ctx: &Context, api: &Api<Service>) -> Result<()> {
    let networks: Vec<String> = ctx
        .networks
        .state()
        .iter()
        .filter(|cn| cn.has_pool(PoolPurpose::Vip))
        .map(|cn| cn.spec.network.clone())
        .collect();
    release_on(svc, ctx, api, &networks).await?;
    ctx.set_pending(ObjectRef::from_obj(svc), None);
    Ok(())
}

/// The store network named by the Service's `cairn.dev/allocated-from` (`<network>/<pool>`).
fn allocated_network(svc: &Service) -> Option<&str> {
    ann(svc, ANN_ALLOCATED_FROM)
        .and_then(|from| from.split_once('/'))
        .map(|(network, _)| network)
        .filter(|n| !n.is_empty())
}

/// The Service's ingress entries without `drop` (only those go: the rest may be someone else's).
fn ingress_without(svc: &Service, drop: &[String]) -> Vec<serde_json::Value> {
    ingress_ips(svc)
        .into_iter()
        .filter(|ip| !drop.contains(ip))
        .map(|ip| json!({ "ip": ip }))
        .collect()
}

/// Releases the Service's VIP(s) on `networks`, takes the released addresses out of its
/// ingress (only those: another implementation may own the Service now) and records it.
async fn release_on(
    svc: &Service,
    ctx: &Context,
    api: &Api<Service>,
    networks: &[String],
) -> Result<Vec<String>> {
    let ns = svc.namespace().unwrap_or_default();
    let uid = svc.uid().unwrap_or_default();
    let o = owner(
        &ctx.cluster_id,
        pb::OwnerKind::Service,
        &ns,
        &svc.name_any(),
        &uid,
    );
    let mut released = Vec::new();
    for network in networks {
        match ctx.ipam.release(network, o.clone()).await {
            Ok(r) => released.extend(r.allocation.map(|a| a.addresses).unwrap_or_default()),
            Err(Error::Store(StoreRefusal::NotFound(_))) => {}
            Err(e) => return Err(e),
        }
    }
    if !released.is_empty() {
        let keep = ingress_without(svc, &released);
        if svc.metadata.deletion_timestamp.is_none() {
            // The annotation is restated so the apply keeps it, as the merge patch used to.
            apply_status(api, svc, ann(svc, ANN_ALLOCATED_FROM), keep).await?;
        }
        ctx.event(
            svc,
            EventType::Normal,
            "Released",
            "Release",
            format!("released {}", released.join(", ")),
        )
        .await;
        ctx.retrigger_pending();
    }
    Ok(released)
}

/// Reconciles one Service.
#[tracing::instrument(name = "reconcile_service", skip_all, fields(
    namespace = svc.metadata.namespace.as_deref(),
    name = svc.metadata.name.as_deref(),
    generation = svc.metadata.generation,
    resource_version = svc.metadata.resource_version.as_deref(),
))]
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let r = apply(&svc, &ctx).await;
    ctx.metrics.reconciled(
        "service",
        r.as_ref().map_or_else(Error::metric_label, |_| "ok"),
        started.elapsed(),
    );
    if r.is_ok() {
        ctx.reconciled_ok(svc.as_ref());
    }
    r
}

async fn apply(svc: &Service, ctx: &Context) -> Result<Action> {
    let ns = svc
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let ours = wants_lb(svc, ctx.lb_class.as_deref());

    if svc.metadata.deletion_timestamp.is_some() || !ours {
        if has_finalizer(svc) {
            release(svc, ctx, &api).await?;
            remove_finalizer(&api, svc).await?;
        }
        return Ok(Action::await_change());
    }
    if !has_finalizer(svc) {
        // The watch event of this patch brings the Service back with the finalizer on.
        apply_meta(&api, svc, svc.resource_version(), None).await?;
        return Ok(Action::await_change());
    }

    let me = ObjectRef::from_obj(svc);
    let cn = match ctx.network_for(svc, PoolPurpose::Vip) {
        Ok(cn) => cn,
        Err(e) => {
            ctx.set_pending(me, Some(None));
            ctx.event(
                svc,
                EventType::Warning,
                "AllocationFailed",
                "Allocate",
                e.to_string(),
            )
            .await;
            return Ok(Action::requeue(PENDING_RETRY));
        }
    };
    // The Service now asks for another network (its `cairn.dev/network` annotation changed, or
    // the ClusterNetwork it drew from went away): its VIP on the old one is given back first, so
    // nothing stays held for an owner that no longer wants it. Crash-safe: until the new
    // allocation is written, the annotation still names the old network.
    if let Some(old) = allocated_network(svc).filter(|old| *old != cn.spec.network) {
        let old = old.to_string();
        release_on(svc, ctx, &api, std::slice::from_ref(&old)).await?;
    }
    let req = match allocate_request(svc, &ctx.cluster_id, &cn.spec.network) {
        Ok(r) => r,
        Err(e @ Error::Invalid { .. }) => {
            ctx.event(
                svc,
                EventType::Warning,
                "AllocationFailed",
                "Allocate",
                e.to_string(),
            )
            .await;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let adopting = ann(svc, ANN_IPS).is_none()
        && svc
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_ip.as_ref())
            .is_none()
        && !req.requested_addresses.is_empty();

    let admission = policy::admission(&cn, svc, ctx.namespace_labels(&ns).as_ref());
    // What to ask again when a probe finds the new address in use.
    let mut again = req.clone();
    let mut alloc = match allocate_admitted(ctx, req.clone(), &admission).await {
        Ok(r) => r,
        Err(
            Error::Store(StoreRefusal::Conflict(message) | StoreRefusal::Invalid(message))
            | Error::Policy(message),
        ) if adopting => {
            // The shown IP cannot be kept (outside the pool, held by another owner, or in a
            // pool the policies keep this Service from).
            ctx.event(
                svc,
                EventType::Warning,
                "AdoptionRefused",
                "Allocate",
                format!("cannot keep {}: {message}", req.requested_addresses.join(",")),
            )
            .await;
            let fresh = pb::AllocateRequest {
                requested_addresses: vec![],
                ..req.clone()
            };
            again = fresh.clone();
            match allocate_admitted(ctx, fresh, &admission).await {
                Ok(r) => r,
                Err(e) => {
                    // Fail closed: the address the Service shows is not its own, so it must not
                    // stay in status, where the load balancer would serve it.
                    let keep = ingress_without(svc, &req.requested_addresses);
                    apply_status(&api, svc, ann(svc, ANN_ALLOCATED_FROM), keep).await?;
                    return pending(svc, ctx, me, &cn.spec.network, e).await;
                }
            }
        }
        Err(Error::Policy(message)) => {
            ctx.event(svc, EventType::Warning, "PolicyDenied", "Allocate", message)
                .await;
            return Ok(Action::requeue(PENDING_RETRY));
        }
        Err(Error::StoreUnavailable(m)) => {
            ctx.set_store_ok(false);
            return Err(Error::StoreUnavailable(m));
        }
        Err(e) => return pending(svc, ctx, me, &cn.spec.network, e).await,
    };
    let shown = ingress_ips(svc);
    // A new address is published only once nothing else answers for it (when the
    // ClusterNetwork asks for probing); one that answers is reported and another one taken.
    let mut in_use = 0;
    loop {
        let Some(a) = alloc.allocation.as_ref() else {
            return Err(Error::MissingObjectKey("allocation"));
        };
        match conflict::vet(ctx, &cn, svc, a, &shown).await? {
            Vetted::Clean => break,
            Vetted::InUse { .. } => in_use += 1,
        }
        if in_use >= conflict::MAX_IN_USE_IN_A_ROW {
            let e = Error::Store(StoreRefusal::Exhausted(format!(
                "{in_use} addresses in a row answered a conflict probe (recorded as in use by unknown hosts); retrying later"
            )));
            return pending(svc, ctx, me, &cn.spec.network, e).await;
        }
        alloc = match allocate_admitted(ctx, again.clone(), &admission).await {
            Ok(r) => r,
            Err(e) => return pending(svc, ctx, me, &cn.spec.network, e).await,
        };
    }
    ctx.set_store_ok(true);
    ctx.set_pending(me, None);
    let Some(a) = alloc.allocation else {
        return Err(Error::MissingObjectKey("allocation"));
    };

    let from = format!("{}/{}", a.network, a.pool);
    let mut annotated = ann(svc, ANN_ALLOCATED_FROM) == Some(from.as_str());
    let mut rv = svc.resource_version();
    if shown != a.addresses {
        let ingress: Vec<_> = a
            .addresses
            .iter()
            .map(|ip| json!({ "ip": ip, "ipMode": "VIP" }))
            .collect();
        // One write for both: the status subresource also stores metadata changes, which
        // halves the Service writes per allocation (each is an etcd write and a watch fan-out).
        let after = apply_status(&api, svc, Some(&from), ingress).await?;
        annotated = ann(&after, ANN_ALLOCATED_FROM) == Some(from.as_str());
        rv = after.resource_version();
        ctx.event(
            svc,
            EventType::Normal,
            "Allocated",
            "Allocate",
            format!("{} from {}/{}", a.addresses.join(", "), a.network, a.pool),
        )
        .await;
    }
    if !annotated {
        apply_meta(&api, svc, rv, Some(&from)).await?;
    }
    Ok(Action::requeue(RESYNC))
}

/// `Allocate`, within the pools the pool policies admit the Service to. Unrestricted: one
/// request, the store picks the pool. Restricted: an address the Service already holds is kept
/// (policies govern new allocations); a named pool must be admitted; otherwise each admitted
/// pool is asked in turn (auto-assign ones, or any when addresses are requested).
async fn allocate_admitted(
    ctx: &Context,
    req: pb::AllocateRequest,
    admission: &Admission,
) -> Result<pb::AllocateResponse> {
    let Admission::Only { allowed, denied } = admission else {
        return ctx.ipam.allocate(req).await;
    };
    let o = req.owner.clone().ok_or(Error::MissingObjectKey("owner"))?;
    if let Some(held) = ctx.ipam.get_allocation(&req.network, o).await? {
        return ctx
            .ipam
            .allocate(pb::AllocateRequest {
                pool: held.pool,
                ..req
            })
            .await;
    }
    if !req.pool.is_empty() {
        if let Some((_, why)) = denied.iter().find(|(p, _)| *p == req.pool) {
            return Err(Error::Policy(format!("annotation {ANN_POOL}: {why}")));
        }
        return ctx.ipam.allocate(req).await;
    }
    let candidates: Vec<&String> = allowed
        .iter()
        .filter(|(_, auto)| *auto || !req.requested_addresses.is_empty())
        .map(|(p, _)| p)
        .collect();
    let mut last = None;
    for pool in candidates {
        match ctx
            .ipam
            .allocate(pb::AllocateRequest {
                pool: pool.clone(),
                ..req.clone()
            })
            .await
        {
            Ok(r) => return Ok(r),
            Err(Error::Store(
                r @ (StoreRefusal::Exhausted(_) | StoreRefusal::Conflict(_) | StoreRefusal::Invalid(_)),
            )) => last = Some(r),
            Err(e) => return Err(e),
        }
    }
    match last {
        // A requested address in none of the admitted pools: the policies are why.
        Some(StoreRefusal::Invalid(m)) if !req.requested_addresses.is_empty() => Err(Error::Policy(format!(
            "requested_addresses {}: not in a pool this Service may use ({m}); {}",
            req.requested_addresses.join(","),
            admission.denials()
        ))),
        // Every admitted pool refused: pending like any refusal (retried when an address frees).
        Some(r) => Err(Error::Store(r)),
        None => Err(Error::Policy(admission.denials())),
    }
}

/// Records a Service the store cannot serve now.
async fn pending(
    svc: &Service,
    ctx: &Context,
    me: ObjectRef<Service>,
    network: &str,
    e: Error,
) -> Result<Action> {
    match e {
        Error::Store(refusal) => {
            ctx.set_store_ok(true);
            ctx.set_pending(me, Some(Some(network.to_string())));
            ctx.event(
                svc,
                EventType::Warning,
                "AllocationFailed",
                "Allocate",
                refusal.to_string(),
            )
            .await;
            Ok(Action::requeue(PENDING_RETRY))
        }
        Error::Policy(message) => {
            ctx.event(svc, EventType::Warning, "PolicyDenied", "Allocate", message)
                .await;
            Ok(Action::requeue(PENDING_RETRY))
        }
        Error::StoreUnavailable(m) => {
            ctx.set_store_ok(false);
            Err(Error::StoreUnavailable(m))
        }
        e => Err(e),
    }
}

/// Backs off per object, exponentially with jitter ([`Context::retry_after`]); a store outage
/// never drops a finalizer or crashes the process.
pub fn error_policy(svc: Arc<Service>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()), error = %err, "reconcile failed");
    ctx.retry_after(svc.as_ref(), err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    fn svc(anns: &[(&str, &str)], policy: Option<&str>, fams: &[&str], lb_ip: Option<&str>) -> Service {
        let mut s = Service::default();
        s.metadata.name = Some("web".into());
        s.metadata.namespace = Some("default".into());
        s.metadata.uid = Some("u1".into());
        s.metadata.annotations = Some(anns.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        s.spec = Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ip_family_policy: policy.map(Into::into),
            ip_families: Some(fams.iter().map(|f| f.to_string()).collect()),
            load_balancer_ip: lb_ip.map(Into::into),
            ports: Some(vec![ServicePort {
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        s
    }

    #[test]
    fn families_follow_policy_and_order() {
        let r = allocate_request(&svc(&[], None, &["IPv6"], None), "c", "n").unwrap();
        assert_eq!(r.families, vec![pb::IpFamily::Ipv6 as i32]);
        let r = allocate_request(&svc(&[], Some("PreferDualStack"), &["IPv6"], None), "c", "n").unwrap();
        assert_eq!(
            r.families,
            vec![pb::IpFamily::Ipv6 as i32, pb::IpFamily::Ipv4 as i32]
        );
        assert!(r.optional_extra_families);
        let r = allocate_request(
            &svc(&[], Some("RequireDualStack"), &["IPv4", "IPv6"], None),
            "c",
            "n",
        )
        .unwrap();
        assert!(!r.optional_extra_families);
        assert_eq!(r.families.len(), 2);
    }

    #[test]
    fn requested_ips_and_their_errors_name_the_field() {
        let r = allocate_request(&svc(&[(ANN_IPS, "10.0.0.5")], None, &["IPv4"], None), "c", "n").unwrap();
        assert_eq!(r.requested_addresses, vec!["10.0.0.5"]);
        let r = allocate_request(&svc(&[], None, &["IPv4"], Some("10.0.0.6")), "c", "n").unwrap();
        assert_eq!(r.requested_addresses, vec!["10.0.0.6"]);
        let e = allocate_request(
            &svc(&[(ANN_IPS, "10.0.0.5")], None, &["IPv4"], Some("10.0.0.6")),
            "c",
            "n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("spec.loadBalancerIP"), "{e}");
        let e = allocate_request(
            &svc(&[(ANN_IPS, "10.0.0.5,nope")], None, &["IPv4"], None),
            "c",
            "n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("load-balancer-ips[1]"), "{e}");
        let e = allocate_request(
            &svc(&[(ANN_IPS, "10.0.0.5,10.0.0.6")], None, &["IPv4"], None),
            "c",
            "n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("one address per family"), "{e}");
        let e = allocate_request(&svc(&[(ANN_IPS, "fd00::1")], None, &["IPv4"], None), "c", "n").unwrap_err();
        assert!(e.to_string().contains("ipFamilies"), "{e}");
    }
}
