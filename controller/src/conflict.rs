//! Conflict probing of new VIPs (`ClusterNetwork.spec.conflictProbe`): before the Service
//! reconciler publishes an address the store just handed out (or the ClusterNetwork reconciler
//! its API-server VIP), the network is asked whether a host already answers for it ([`crate::probe`]: RFC 5227 ARP probe, IPv6 DAD).
//!
//! Contract of [`vet`]:
//! - Only addresses the Service does not show yet are probed: a shown address is live, and
//!   this cluster's load balancer answers for it. Node addresses are never probed: the
//!   cloud service allocated them when it created the VM, which answers for its own.
//! - An answer is reported to the store (`ReportConflict`, holder = the Service): in one commit
//!   the Service's allocation is released and the address is held by an unknown-host record,
//!   so no cluster gets it again until an operator releases that record. A Warning event on
//!   the Service and `cairn_ccm_address_conflicts` name the address and the MAC that answered;
//!   the caller then allocates again.
//! - The store refusing the report because another owner holds the address too (a sharing
//!   key: a sibling Service of this cluster serves it, and that is what answered) leaves the
//!   address to the Service.
//! - A probe that cannot run (no such interface, no CAP_NET_RAW) fails closed: the address is
//!   not published, a `ProbeFailed` Warning says why, and the reconcile is retried.
//! - An address [`ahead`] found free less than [`FRESH`] ago is published without another
//!   probe, so the request path pays nothing in the common case.
//!
//! [`ahead`] probes ahead of need: every interval, per ClusterNetwork with `conflictProbe`,
//! it asks the store (Allocate `dry_run`) which address each probed pool and family would hand
//! out next, probes it, and either remembers it as free or reports it (no holder: the address
//! is recorded before anyone is given it; a Warning event on the ClusterNetwork) and asks for
//! the next (the recorder folds repeated events of one reason on one object into a series
//! showing the newest; `cairn_ccm_address_conflicts` keeps every address). Another cluster
//! may take a remembered address first; the Service then gets a
//! different one and probes it inline.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use cairn_proto::v1 as pb;
use kube::{Resource, ResourceExt, runtime::events::EventType};

use crate::{
    Error, Result, StoreRefusal, context::Context, crd::ClusterNetwork, crd::ConflictProbeSpec, probe::Prober,
};

/// Addresses found in use in a row before the Service waits instead of asking again.
pub const MAX_IN_USE_IN_A_ROW: usize = 8;
/// How long an address probed free ahead of need is published without another probe.
pub const FRESH: Duration = Duration::from_secs(30);
/// The owner a dry-run Allocate asks for: it never holds anything (dry runs write nothing).
const AHEAD_OWNER: &str = "cairn-conflict-probe";

/// Addresses (network, address) probed free ahead of need, with when.
#[derive(Debug, Default)]
pub struct ProbedFree(Mutex<HashMap<(String, String), Instant>>);

impl ProbedFree {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Instant>> {
        // A panic elsewhere while holding it leaves a map that is still valid.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `address` on `network` was probed free less than [`FRESH`] ago.
    pub fn fresh(&self, network: &str, address: &str) -> bool {
        self.map()
            .get(&(network.to_string(), address.to_string()))
            .is_some_and(|t| t.elapsed() < FRESH)
    }

    fn insert(&self, network: &str, address: &str) {
        self.map()
            .insert((network.to_string(), address.to_string()), Instant::now());
    }

    fn forget_stale(&self) {
        self.map().retain(|_, t| t.elapsed() < FRESH);
    }
}

/// What [`vet`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vetted {
    /// Nothing answered (or nothing needed probing): publish.
    Clean,
    /// `address` answered from `mac`; it was reported and the allocation released.
    InUse {
        /// The address.
        address: String,
        /// The MAC that answered.
        mac: String,
    },
}

/// The probe settings of `cn` that cover `pool`, if any.
pub fn settings<'a>(cn: &'a ClusterNetwork, pool: &str) -> Option<&'a ConflictProbeSpec> {
    cn.spec.conflict_probe.as_ref().filter(|p| p.covers(pool))
}

/// Probes the addresses of `a` that `obj` (the Service, or the ClusterNetwork for its
/// API-server VIP) does not show yet (see the module contract); events go to `obj`.
pub async fn vet<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    cn: &ClusterNetwork,
    obj: &K,
    a: &pb::Allocation,
    shown: &[String],
) -> Result<Vetted> {
    let svc = obj;
    let Some(spec) = settings(cn, &a.pool) else {
        return Ok(Vetted::Clean);
    };
    let fresh: Vec<&String> = a.addresses.iter().filter(|ip| !shown.contains(ip)).collect();
    if fresh.is_empty() {
        return Ok(Vetted::Clean);
    }
    let timeout = Duration::from_millis(u64::from(
        spec.timeout_milliseconds
            .unwrap_or(ConflictProbeSpec::DEFAULT_TIMEOUT_MS),
    ));
    let attempts = spec.attempts.unwrap_or(ConflictProbeSpec::DEFAULT_ATTEMPTS);
    let failed = |e: String| Error::Probe(format!("spec.conflictProbe (interface {}): {e}", spec.interface));
    let prober = match Prober::new(&spec.interface) {
        Ok(p) => p,
        Err(e) => return Err(probe_failed(ctx, svc, failed(e.to_string())).await),
    };
    for ip in fresh {
        if ctx.probed_free.fresh(&a.network, ip) {
            ctx.metrics.probe_skipped_fresh();
            continue;
        }
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| Error::MissingObjectKey("allocation.addresses (an IP address)"))?;
        let started = Instant::now();
        let answer = match prober.probe(addr, timeout, attempts).await {
            Ok(a) => a,
            Err(e) => {
                ctx.metrics.probed("error", started.elapsed());
                return Err(probe_failed(ctx, svc, failed(e.to_string())).await);
            }
        };
        let Some(answer) = answer else {
            ctx.metrics.probed("free", started.elapsed());
            continue;
        };
        ctx.metrics.probed("in_use", started.elapsed());
        let mac = answer.mac_string();
        match ctx
            .ipam
            .report_conflict(&a.network, ip, &mac, &ctx.cluster_id, a.owner.clone())
            .await
        {
            Ok(_) => {}
            // Another owner holds it too: a sibling sharing it serves it, and answered.
            Err(Error::Store(StoreRefusal::Conflict(m))) => {
                tracing::info!(address = %ip, %mac, reason = %m, "probe answered for an address another owner of this cluster shares; kept");
                continue;
            }
            Err(e) => return Err(e),
        }
        ctx.metrics.conflict(&a.network, &a.pool, ip, &mac);
        ctx.event(
            svc,
            EventType::Warning,
            "AddressInUse",
            "Probe",
            format!(
                "{ip} from {}/{} is answered by {mac} on {}: recorded in the store as in use by an unknown host; taking another address",
                a.network, a.pool, spec.interface
            ),
        )
        .await;
        return Ok(Vetted::InUse {
            address: ip.clone(),
            mac,
        });
    }
    Ok(Vetted::Clean)
}

async fn probe_failed<K: Resource<DynamicType = ()>>(ctx: &Context, svc: &K, e: Error) -> Error {
    ctx.event(svc, EventType::Warning, "ProbeFailed", "Probe", e.to_string())
        .await;
    e
}

/// Probes ahead of need every `interval` until the task is dropped (see the module docs).
pub async fn ahead(ctx: Arc<Context>, interval: Duration) {
    loop {
        ctx.probed_free.forget_stale();
        for cn in ctx.networks.state() {
            if cn.spec.conflict_probe.is_some() && ctx.duplicate_of(&cn).is_none() {
                ahead_on(&ctx, &cn).await;
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One pass over one ClusterNetwork: the next address of each probed pool and family.
async fn ahead_on(ctx: &Context, cn: &ClusterNetwork) {
    let Some(spec) = cn.spec.conflict_probe.as_ref() else {
        return;
    };
    let prober = match Prober::new(&spec.interface) {
        Ok(p) => p,
        // Reported on the Services that need an address (fail closed there).
        Err(e) => {
            tracing::debug!(network = %cn.spec.network, error = %e, "probe ahead: no prober");
            return;
        }
    };
    let timeout = Duration::from_millis(u64::from(
        spec.timeout_milliseconds
            .unwrap_or(ConflictProbeSpec::DEFAULT_TIMEOUT_MS),
    ));
    let attempts = spec.attempts.unwrap_or(ConflictProbeSpec::DEFAULT_ATTEMPTS);
    // Named pools, or what an unannotated Service gets (the store's auto-assign order).
    let pools: Vec<String> = if spec.pools.is_empty() {
        vec![String::new()]
    } else {
        spec.pools.clone()
    };
    for pool in &pools {
        for family in [pb::IpFamily::Ipv4, pb::IpFamily::Ipv6] {
            // Each answer records the address, so the next dry run names another one.
            for _ in 0..MAX_IN_USE_IN_A_ROW {
                let req = pb::AllocateRequest {
                    network: cn.spec.network.clone(),
                    owner: Some(crate::ipam::owner(
                        &ctx.cluster_id,
                        pb::OwnerKind::Service,
                        "kube-system",
                        AHEAD_OWNER,
                        "",
                    )),
                    pool: pool.clone(),
                    purpose: pb::PoolPurpose::Vip as i32,
                    families: vec![family as i32],
                    dry_run: true,
                    ..Default::default()
                };
                // No such family or pool, or full: nothing to probe ahead.
                let Ok(next) = ctx.ipam.allocate(req).await else {
                    break;
                };
                let Some(a) = next.allocation.filter(|_| next.created) else {
                    break;
                };
                if settings(cn, &a.pool).is_none() {
                    break;
                }
                let Some(ip) = a.addresses.first() else { break };
                if ctx.probed_free.fresh(&a.network, ip) {
                    break;
                }
                let Ok(addr) = ip.parse::<IpAddr>() else { break };
                let started = Instant::now();
                match prober.probe(addr, timeout, attempts).await {
                    Ok(None) => {
                        ctx.metrics.probed("free", started.elapsed());
                        ctx.probed_free.insert(&a.network, ip);
                        break;
                    }
                    Ok(Some(answer)) => {
                        ctx.metrics.probed("in_use", started.elapsed());
                        let mac = answer.mac_string();
                        if let Err(e) = ctx
                            .ipam
                            .report_conflict(&a.network, ip, &mac, &ctx.cluster_id, None)
                            .await
                        {
                            tracing::warn!(address = %ip, %mac, error = %e, "probe ahead: report refused");
                            break;
                        }
                        ctx.metrics.conflict(&a.network, &a.pool, ip, &mac);
                        ctx.event(
                            cn,
                            EventType::Warning,
                            "AddressInUse",
                            "Probe",
                            format!(
                                "{ip} from {}/{} is answered by {mac} on {}: recorded in the store as in use by an unknown host before anyone was given it",
                                a.network, a.pool, spec.interface
                            ),
                        )
                        .await;
                    }
                    Err(e) => {
                        ctx.metrics.probed("error", started.elapsed());
                        tracing::warn!(network = %cn.name_any(), error = %e, "probe ahead failed");
                        return;
                    }
                }
            }
        }
    }
}
