//! The service: one method per RPC, each authorize → parse → ledger call → metrics → status
//! mapping.
//!
//! Authorization happens here, once, before the ledger is touched: with TLS on
//! ([`IpamService::with_auth`]) every RPC derives the caller's identity from its client
//! certificate and asks [`auth::authorize`] about one [`Call`]; without TLS nothing is checked
//! (the server warns at startup). Each mutating call is audited once (a structured log line and
//! `cairn_ipam_audit_total{method,role,code}`), allowed or not.

use std::{net::IpAddr, sync::Arc, time::Instant};

use cairn_proto::v1 as pb;
use futures::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use super::{
    backup::{self, Collect, ExportStream},
    convert::*,
    status,
    watch::{self, WatchStream},
};
use crate::{
    auth::{self, Call, Existing, Identity, TrustDomain},
    error::Error,
    ledger::{AllocateReq, ConflictReq, Ledger},
    metrics::Metrics,
    model,
};

/// The gRPC service.
pub struct IpamService {
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    default_grace_secs: u32,
    /// Becomes true when the server starts shutting down: open watches end then, since a
    /// graceful shutdown waits for every stream to finish.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The trust domain of client identities when the server speaks mTLS; `None` = plaintext,
    /// no authorization.
    trust_domain: Option<TrustDomain>,
    /// Open watches against `serve --max-watchers`.
    watchers: Arc<watch::WatchSlots>,
}

/// Who is calling, as far as authorization is concerned.
#[derive(Clone, Debug)]
enum Caller {
    /// Plaintext server: nobody is checked.
    Open,
    /// mTLS server: the identity in the client certificate (`None` = none presented).
    Tls(Option<Identity>),
}

impl Caller {
    fn identity(&self) -> Option<&Identity> {
        match self {
            Caller::Open => None,
            Caller::Tls(i) => i.as_ref(),
        }
    }

    /// The metric label: `cluster`, `cloud`, `reader`, `none` (TLS without identity) or
    /// `plaintext`.
    fn role(&self) -> &'static str {
        match self {
            Caller::Open => "plaintext",
            Caller::Tls(None) => "none",
            Caller::Tls(Some(Identity::Cluster(_))) => "cluster",
            Caller::Tls(Some(Identity::Cloud)) => "cloud",
            Caller::Tls(Some(Identity::Reader)) => "reader",
        }
    }

    /// For logs: `cluster/<id>`, `cloud`, `reader`, `-`.
    fn name(&self) -> String {
        self.identity()
            .map_or_else(|| "-".to_string(), ToString::to_string)
    }
}

impl IpamService {
    /// A service over `ledger`.
    pub fn new(ledger: Arc<Ledger>, metrics: Arc<Metrics>, default_grace_secs: u32) -> Self {
        IpamService {
            ledger,
            metrics,
            default_grace_secs,
            stopping: tokio::sync::watch::channel(false).1,
            trust_domain: None,
            watchers: watch::WatchSlots::new(watch::DEFAULT_MAX_WATCHERS),
        }
    }

    /// At most `max` watches open at once; one more is refused with RESOURCE_EXHAUSTED naming
    /// the limit.
    pub fn with_max_watchers(mut self, max: usize) -> Self {
        self.watchers = watch::WatchSlots::new(max);
        self
    }

    /// Authorizes every call by the client certificate's identity in `trust_domain` (the server
    /// speaks mTLS).
    pub fn with_auth(mut self, trust_domain: TrustDomain) -> Self {
        self.trust_domain = Some(trust_domain);
        self
    }

    /// The caller of `req`. A certificate without a usable identity is `UNAUTHENTICATED`.
    fn caller<T>(&self, method: &'static str, started: Instant, req: &Request<T>) -> Result<Caller, Status> {
        let Some(td) = &self.trust_domain else {
            return Ok(Caller::Open);
        };
        match auth::identity_of(req, td) {
            Ok(id) => Ok(Caller::Tls(id)),
            Err(e) => {
                self.metrics
                    .observe_rpc(method, "unauthenticated", started.elapsed());
                Err(Status::unauthenticated(format!("{method}: {e}")))
            }
        }
    }

    /// Checks `call` for `caller` (nothing on a plaintext server). A refusal is counted, and
    /// audited when the call mutates.
    fn admit(&self, caller: &Caller, call: &Call<'_>, target: &str, started: Instant) -> Result<(), Status> {
        if matches!(caller, Caller::Open) {
            return Ok(());
        }
        match auth::authorize(caller.identity(), call) {
            Ok(()) => Ok(()),
            Err(denied) => {
                let status = Status::from(denied);
                let code = if status.code() == tonic::Code::Unauthenticated {
                    "unauthenticated"
                } else {
                    "permission_denied"
                };
                self.metrics.observe_rpc(call.method(), code, started.elapsed());
                if call.mutates() {
                    self.audit(caller, call.method(), target, code, Some(status.message()));
                }
                Err(status)
            }
        }
    }

    /// One audit record of a mutating call.
    fn audit(
        &self,
        caller: &Caller,
        method: &'static str,
        target: &str,
        code: &'static str,
        error: Option<&str>,
    ) {
        self.metrics.observe_audit(method, caller.role(), code);
        tracing::info!(
            target: "cairn_ipam::audit",
            identity = %caller.name(),
            role = caller.role(),
            method,
            target,
            outcome = code,
            error = error.unwrap_or(""),
            "audit"
        );
    }

    /// [`Self::done`] for a mutating call: also audited.
    fn done_audited<T>(
        &self,
        caller: &Caller,
        method: &'static str,
        target: &str,
        started: Instant,
        r: Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        let msg = r.as_ref().err().map(ToString::to_string);
        self.audit(caller, method, target, code, msg.as_deref());
        self.done(method, started, r)
    }

    /// Ends open watches (UNAVAILABLE, "shutting down") once `stopping` becomes true.
    pub fn with_shutdown(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = stopping;
        self
    }

    /// Records the outcome of one call and maps its error.
    fn done<T>(
        &self,
        method: &'static str,
        started: Instant,
        r: Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        self.metrics.observe_rpc(method, code, started.elapsed());
        r.map(Response::new).map_err(status)
    }
}

/// `network=<n> owner=<cluster>/<KIND>/<namespace>/<name>` for audit lines.
fn owner_target(network: &str, owner: Option<&pb::Owner>) -> String {
    match owner {
        Some(o) => format!(
            "network={network} owner={}/{}/{}/{}",
            o.cluster_id,
            pb::OwnerKind::try_from(o.kind).map_or("?", |k| k.as_str_name()),
            o.namespace,
            o.name
        ),
        None => format!("network={network}"),
    }
}

fn owner_cluster(owner: Option<&pb::Owner>) -> &str {
    owner.map_or("", |o| o.cluster_id.as_str())
}

#[tonic::async_trait]
impl pb::ipam_service_server::IpamService for IpamService {
    async fn upsert_network(
        &self,
        req: Request<pb::UpsertNetworkRequest>,
    ) -> Result<Response<pb::UpsertNetworkResponse>, Status> {
        const M: &str = "UpsertNetwork";
        let t = Instant::now();
        let caller = self.caller(M, t, &req)?;
        let req = req.into_inner();
        let name = req.network.as_ref().map_or("", |n| n.name.as_str()).to_string();
        let target = format!("network={name}");
        let def = match network_from(req.network) {
            Ok(d) => d,
            Err(e) => return self.done_audited(&caller, M, &target, t, Err(e)),
        };
        let mut expected_version = req.expected_version;
        if !matches!(caller, Caller::Open) {
            // Authorize against the network as it is now, and pin that version, so a change
            // between this check and the write makes the write fail instead of slipping through.
            let current = match self.ledger.network(&def.name).await {
                Ok(rec) => Some(rec),
                Err(Error::NotFound(_)) => None,
                Err(e) => return self.done_audited(&caller, M, &target, t, Err(e)),
            };
            let call = Call::UpsertNetwork {
                network: &def.name,
                requested_manager: &def.managed_by,
                existing: current.as_ref().map(|rec| Existing::of(rec, &def)),
            };
            self.admit(&caller, &call, &target, t)?;
            let version = current.as_ref().map_or(0, |rec| rec.version);
            match expected_version {
                Some(v) if v != version => {
                    let e = Error::Conflict(format!(
                        "network {:?} is at version {version}, not the expected {v}",
                        def.name
                    ));
                    return self.done_audited(&caller, M, &target, t, Err(e));
                }
                _ => expected_version = Some(version),
            }
        }
        let r = async {
            let u = self
                .ledger
                .upsert_network(def, expected_version, req.dry_run)
                .await?;
            Ok(pb::UpsertNetworkResponse {
                network: Some(network_to(&u.network)),
                changed: u.changed,
                created: u.created,
                out_of_range: u.out_of_range.iter().map(|a| allocation_to(a, true)).collect(),
            })
        }
        .await;
        self.done_audited(&caller, M, &target, t, r)
    }

    async fn get_network(
        &self,
        req: Request<pb::GetNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        let t = Instant::now();
        let caller = self.caller("GetNetwork", t, &req)?;
        self.admit(&caller, &Call::GetNetwork, "", t)?;
        let name = req.into_inner().name;
        let r = async {
            model::check_dns_label("name", &name)?;
            Ok(network_to(&self.ledger.network(&name).await?))
        }
        .await;
        self.done("GetNetwork", t, r)
    }

    async fn list_networks(
        &self,
        req: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let t = Instant::now();
        let caller = self.caller("ListNetworks", t, &req)?;
        self.admit(&caller, &Call::ListNetworks, "", t)?;
        let r = async {
            Ok(pb::ListNetworksResponse {
                networks: self.ledger.networks().await?.iter().map(network_to).collect(),
            })
        }
        .await;
        self.done("ListNetworks", t, r)
    }

    async fn delete_network(
        &self,
        req: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<pb::DeleteNetworkResponse>, Status> {
        const M: &str = "DeleteNetwork";
        let t = Instant::now();
        let caller = self.caller(M, t, &req)?;
        let req = req.into_inner();
        let target = format!("network={} force={}", req.name, req.force);
        self.admit(&caller, &Call::DeleteNetwork, &target, t)?;
        let r = async {
            model::check_dns_label("name", &req.name)?;
            Ok(pb::DeleteNetworkResponse {
                released: self.ledger.delete_network(&req.name, req.force).await?,
            })
        }
        .await;
        self.done_audited(&caller, M, &target, t, r)
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        const M: &str = "Allocate";
        let t = Instant::now();
        let caller = self.caller(M, t, &req)?;
        let req = req.into_inner();
        let target = owner_target(&req.network, req.owner.as_ref());
        let call = Call::Allocate {
            owner_cluster: owner_cluster(req.owner.as_ref()),
        };
        self.admit(&caller, &call, &target, t)?;
        let r = async {
            let families = req
                .families
                .iter()
                .enumerate()
                .map(|(i, f)| family_from(&format!("families[{i}]"), *f))
                .collect::<Result<_, _>>()?;
            let requested: Vec<IpAddr> = req
                .requested_addresses
                .iter()
                .enumerate()
                .map(|(i, s)| model::parse_addr(&format!("requested_addresses[{i}]"), s))
                .collect::<Result<_, _>>()?;
            if !req.pool.is_empty() {
                model::check_dns_label("pool", &req.pool)?;
            }
            let areq = AllocateReq {
                owner: Some(owner_from("owner", req.owner)?),
                pool: (!req.pool.is_empty()).then_some(req.pool),
                purpose: purpose_from("purpose", req.purpose)?,
                families,
                optional_extra_families: req.optional_extra_families,
                requested,
                ports: ports_from(&req.ports)?,
                sharing_key: req.sharing_key,
                network: req.network,
                dry_run: req.dry_run,
            };
            let (a, created) = self.ledger.allocate(areq).await?;
            Ok(pb::AllocateResponse {
                allocation: Some(allocation_to(&a, self.ledger.is_out_of_range(&a))),
                created,
            })
        }
        .await;
        self.done_audited(&caller, M, &target, t, r)
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        const M: &str = "Release";
        let t = Instant::now();
        let caller = self.caller(M, t, &req)?;
        let req = req.into_inner();
        let target = owner_target(&req.network, req.owner.as_ref());
        let call = Call::Release {
            owner_cluster: owner_cluster(req.owner.as_ref()),
        };
        self.admit(&caller, &call, &target, t)?;
        let r = async {
            if req.network.is_empty() {
                return Err(Error::invalid("network", "is required"));
            }
            let owner = owner_from("owner", req.owner)?;
            let released = self.ledger.release(&req.network, &owner).await?;
            Ok(pb::ReleaseResponse {
                released: released.is_some(),
                allocation: released.map(|a| allocation_to(&a, false)),
            })
        }
        .await;
        self.done_audited(&caller, M, &target, t, r)
    }

    async fn report_conflict(
        &self,
        req: Request<pb::ReportConflictRequest>,
    ) -> Result<Response<pb::ReportConflictResponse>, Status> {
        const M: &str = "ReportConflict";
        let t = Instant::now();
        let caller = self.caller(M, t, &req)?;
        let req = req.into_inner();
        let target = format!(
            "network={} address={} mac={} cluster={}",
            req.network, req.address, req.mac, req.cluster_id
        );
        let call = Call::ReportConflict {
            cluster: &req.cluster_id,
        };
        self.admit(&caller, &call, &target, t)?;
        let r = async {
            if req.network.is_empty() {
                return Err(Error::invalid("network", "is required"));
            }
            let creq = ConflictReq {
                address: model::parse_addr("address", &req.address)?,
                mac: model::parse_mac("mac", &req.mac)?,
                holder: req.holder.map(|o| owner_from("holder", Some(o))).transpose()?,
                cluster_id: req.cluster_id,
                network: req.network,
            };
            let r = self.ledger.report_conflict(creq).await?;
            Ok(pb::ReportConflictResponse {
                conflict: Some(allocation_to(&r.conflict, false)),
                created: r.created,
                released: r.released.map(|a| allocation_to(&a, false)),
            })
        }
        .await;
        self.done_audited(&caller, M, &target, t, r)
    }

    async fn get_allocation(
        &self,
        req: Request<pb::GetAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let t = Instant::now();
        let caller = self.caller("GetAllocation", t, &req)?;
        let req = req.into_inner();
        let call = Call::GetAllocation {
            owner_cluster: owner_cluster(req.owner.as_ref()),
        };
        self.admit(&caller, &call, "", t)?;
        let r = async {
            if req.network.is_empty() {
                return Err(Error::invalid("network", "is required"));
            }
            let owner = owner_from("owner", req.owner)?;
            let a = self.ledger.get_allocation(&req.network, &owner).await?;
            Ok(allocation_to(&a, self.ledger.is_out_of_range(&a)))
        }
        .await;
        self.done("GetAllocation", t, r)
    }

    async fn list_allocations(
        &self,
        req: Request<pb::ListAllocationsRequest>,
    ) -> Result<Response<pb::ListAllocationsResponse>, Status> {
        let t = Instant::now();
        let caller = self.caller("ListAllocations", t, &req)?;
        let req = req.into_inner();
        let call = Call::ListAllocations {
            cluster_filter: &req.cluster_id,
        };
        self.admit(&caller, &call, "", t)?;
        let r = async {
            let f = filter(&req.network, &req.cluster_id, &req.pool, req.kind, &req.address)?;
            let (page, next) = self
                .ledger
                .list(&f, req.page_size as usize, &req.page_token)
                .await?;
            Ok(pb::ListAllocationsResponse {
                allocations: page
                    .iter()
                    .map(|a| allocation_to(a, self.ledger.is_out_of_range(a)))
                    .collect(),
                next_page_token: next,
            })
        }
        .await;
        self.done("ListAllocations", t, r)
    }

    type WatchAllocationsStream = WatchStream;

    async fn watch_allocations(
        &self,
        req: Request<pb::WatchAllocationsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let t = Instant::now();
        let caller = self.caller("WatchAllocations", t, &req)?;
        let req = req.into_inner();
        let call = Call::WatchAllocations {
            cluster_filter: &req.cluster_id,
        };
        self.admit(&caller, &call, "", t)?;
        let r = async {
            let f = filter(&req.network, &req.cluster_id, "", 0, "")?;
            let slot = self.watchers.acquire()?;
            let (snap, seq, rx) = self.ledger.watch(&f).await?;
            Ok((f, snap, seq, rx, slot))
        }
        .await;
        let (f, snap, seq, rx, slot) = self.done("WatchAllocations", t, r)?.into_inner();
        let events = watch::stream(self.ledger.clone(), self.stopping.clone(), f, snap, seq, rx, slot);
        Ok(Response::new(match caller {
            Caller::Open => events,
            // Other clusters' events arrive with their owner and addresses stripped.
            Caller::Tls(identity) => Box::pin(events.map(move |ev| {
                ev.map(|mut ev| {
                    if let Some(a) = ev.allocation.as_mut() {
                        auth::redact(identity.as_ref(), a);
                    }
                    ev
                })
            })),
        }))
    }

    async fn get_usage(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let t = Instant::now();
        let caller = self.caller("GetUsage", t, &req)?;
        self.admit(&caller, &Call::GetUsage, "", t)?;
        let r = async {
            let n = req.into_inner().network;
            let net = if n.is_empty() { None } else { Some(n.as_str()) };
            Ok(pb::GetUsageResponse {
                pools: self.ledger.usage(net).await?.iter().map(usage_to).collect(),
            })
        }
        .await;
        self.done("GetUsage", t, r)
    }

    async fn export(&self, req: Request<pb::ExportRequest>) -> Result<Response<pb::ExportResponse>, Status> {
        let t = Instant::now();
        let caller = self.caller("Export", t, &req)?;
        self.admit(&caller, &Call::Export, "", t)?;
        let r = async {
            let (s, flags) = self.ledger.export_flagged().await?;
            Ok(export_to(&s, &flags))
        }
        .await;
        self.done("Export", t, r)
    }

    async fn import(&self, req: Request<pb::ImportRequest>) -> Result<Response<pb::ImportResponse>, Status> {
        const M: &str = "Import";
        let t = Instant::now();
        let caller = self.caller(M, t, &req)?;
        self.admit(&caller, &Call::Import, "backup", t)?;
        let r = async {
            let b = req
                .into_inner()
                .backup
                .ok_or_else(|| Error::invalid("backup", "is required"))?;
            let snap = import_from(b)?;
            let (networks, allocations) = self.ledger.import(snap, self.default_grace_secs).await?;
            Ok(pb::ImportResponse {
                networks,
                allocations,
            })
        }
        .await;
        self.done_audited(&caller, M, "backup", t, r)
    }

    type ExportStreamStream = ExportStream;

    async fn export_stream(&self, req: Request<pb::ExportRequest>) -> Result<Response<ExportStream>, Status> {
        let t = Instant::now();
        let caller = self.caller("ExportStream", t, &req)?;
        self.admit(&caller, &Call::Export, "", t)?;
        let r = self.ledger.export_flagged().await;
        let (snap, flags) = self.done("ExportStream", t, r)?.into_inner();
        tracing::info!(
            networks = snap.networks.len(),
            allocations = snap.allocations.len(),
            quarantined = snap.quarantined.len(),
            snapshot_ms = t.elapsed().as_millis() as u64,
            "export stream: snapshot taken, streaming without the ledger lock"
        );
        Ok(Response::new(backup::export_stream(snap, flags)))
    }

    async fn import_stream(
        &self,
        req: Request<Streaming<pb::ImportChunk>>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        const M: &str = "ImportStream";
        let t = Instant::now();
        let caller = self.caller(M, t, &req)?;
        self.admit(&caller, &Call::Import, "backup", t)?;
        let b = match backup::collect(req.into_inner()).await {
            Ok(b) => b,
            Err(Collect::Refused(e)) => return self.done_audited(&caller, M, "backup", t, Err(e)),
            Err(Collect::Stream(s)) => {
                tracing::warn!(status = %s.message(), "import stream broken off by the client; nothing written");
                self.metrics.observe_rpc("ImportStream", "aborted", t.elapsed());
                return Err(s);
            }
        };
        let r = async {
            let snap = import_from(b)?;
            let (networks, allocations) = self.ledger.import(snap, self.default_grace_secs).await?;
            Ok(pb::ImportResponse {
                networks,
                allocations,
            })
        }
        .await;
        self.done_audited(&caller, M, "backup", t, r)
    }
}
