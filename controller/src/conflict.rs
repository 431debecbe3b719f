//! Conflict probing of new VIPs (`ClusterNetwork.spec.conflictProbe`): before the Service
//! reconciler publishes an address the store just handed out, the network is asked whether a
//! host already answers for it ([`crate::probe`]: RFC 5227 ARP probe, IPv6 DAD).
//!
//! Contract of [`vet`]:
//! - Only addresses the Service does not show yet are probed: a shown address is live, and
//!   this cluster's load balancer answers for it.
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

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use cairn_proto::v1 as pb;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::events::EventType;

use crate::{
    Error, Result, StoreRefusal, context::Context, crd::ClusterNetwork, crd::ConflictProbeSpec, probe::Prober,
};

/// Addresses found in use in a row before the Service waits instead of asking again.
pub const MAX_IN_USE_IN_A_ROW: usize = 8;

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

/// Probes the addresses of `a` that `svc` does not show yet (see the module contract).
pub async fn vet(
    ctx: &Context,
    cn: &ClusterNetwork,
    svc: &Service,
    a: &pb::Allocation,
    shown: &[String],
) -> Result<Vetted> {
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

async fn probe_failed(ctx: &Context, svc: &Service, e: Error) -> Error {
    ctx.event(svc, EventType::Warning, "ProbeFailed", "Probe", e.to_string())
        .await;
    e
}
