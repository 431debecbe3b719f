//! The `cairn.ipam.v1.IpamService` edge: parses requests into domain types (naming each bad
//! field), calls the ledger, and maps `Error` to `tonic::Status` — nothing else lives here.

use std::{net::IpAddr, pin::Pin, sync::Arc, time::Instant};

use cairn_proto::v1 as pb;
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::{
    alloc::addr::Family,
    error::Error,
    ledger::{AllocateReq, Change, Ledger, ListFilter, Snapshot, Usage},
    metrics::Metrics,
    model::{
        self, Allocation, NetworkDef, NetworkRecord, Owner, OwnerKind, PoolDef, Port, Protocol, Purpose,
        Quarantined,
    },
};

/// Maps a ledger error to its one gRPC code.
pub fn status(e: Error) -> Status {
    match e {
        Error::Invalid { .. } => Status::invalid_argument(e.to_string()),
        Error::NotFound(m) => Status::not_found(m),
        Error::Overlap(m) => Status::already_exists(m),
        Error::Conflict(m) => Status::failed_precondition(m),
        Error::Exhausted(m) => Status::resource_exhausted(m),
        Error::Storage(m) => Status::unavailable(format!("storage failure: {m}")),
    }
}

// === proto -> domain ===

fn ts(ms: u64) -> cairn_proto::Timestamp {
    cairn_proto::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn ms(t: Option<&cairn_proto::Timestamp>) -> u64 {
    t.map_or(0, |t| {
        (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
    })
}

fn purpose_from(field: &str, v: i32, required: bool) -> Result<Option<Purpose>, Error> {
    match pb::PoolPurpose::try_from(v) {
        Ok(pb::PoolPurpose::Vip) => Ok(Some(Purpose::Vip)),
        Ok(pb::PoolPurpose::Node) => Ok(Some(Purpose::Node)),
        Ok(pb::PoolPurpose::Unspecified) if !required => Ok(None),
        Ok(pb::PoolPurpose::Unspecified) => Err(Error::invalid(
            field,
            "is required (POOL_PURPOSE_VIP or POOL_PURPOSE_NODE)",
        )),
        Err(_) => Err(Error::invalid(field, format!("unknown value {v}"))),
    }
}

fn purpose_to(p: Purpose) -> pb::PoolPurpose {
    match p {
        Purpose::Vip => pb::PoolPurpose::Vip,
        Purpose::Node => pb::PoolPurpose::Node,
    }
}

fn kind_from(field: &str, v: i32) -> Result<OwnerKind, Error> {
    match pb::OwnerKind::try_from(v) {
        Ok(pb::OwnerKind::ApiServer) => Ok(OwnerKind::ApiServer),
        Ok(pb::OwnerKind::Node) => Ok(OwnerKind::Node),
        Ok(pb::OwnerKind::Service) => Ok(OwnerKind::Service),
        Ok(pb::OwnerKind::Unspecified) => Err(Error::invalid(
            field,
            "is required (OWNER_KIND_API_SERVER, _NODE or _SERVICE)",
        )),
        Err(_) => Err(Error::invalid(field, format!("unknown value {v}"))),
    }
}

fn kind_to(k: OwnerKind) -> pb::OwnerKind {
    match k {
        OwnerKind::ApiServer => pb::OwnerKind::ApiServer,
        OwnerKind::Node => pb::OwnerKind::Node,
        OwnerKind::Service => pb::OwnerKind::Service,
    }
}

fn family_from(field: &str, v: i32) -> Result<Family, Error> {
    match pb::IpFamily::try_from(v) {
        Ok(pb::IpFamily::Ipv4) => Ok(Family::V4),
        Ok(pb::IpFamily::Ipv6) => Ok(Family::V6),
        Ok(pb::IpFamily::Unspecified) => Err(Error::invalid(field, "IP_FAMILY_UNSPECIFIED is not a family")),
        Err(_) => Err(Error::invalid(field, format!("unknown value {v}"))),
    }
}

fn family_to(f: Family) -> pb::IpFamily {
    match f {
        Family::V4 => pb::IpFamily::Ipv4,
        Family::V6 => pb::IpFamily::Ipv6,
    }
}

fn protocol_from(field: &str, v: i32) -> Result<Protocol, Error> {
    match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(pb::Protocol::Sctp) => Ok(Protocol::Sctp),
        Ok(pb::Protocol::Unspecified) => {
            Err(Error::invalid(field, "is required (PROTOCOL_TCP, _UDP or _SCTP)"))
        }
        Err(_) => Err(Error::invalid(field, format!("unknown value {v}"))),
    }
}

fn protocol_to(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Sctp => pb::Protocol::Sctp,
    }
}

/// Parses an owner; `field` is its path.
pub fn owner_from(field: &str, o: Option<pb::Owner>) -> Result<Owner, Error> {
    let o = o.ok_or_else(|| Error::invalid(field, "is required"))?;
    let owner = Owner {
        cluster_id: o.cluster_id,
        kind: kind_from(&format!("{field}.kind"), o.kind)?,
        namespace: o.namespace,
        name: o.name,
        uid: o.uid,
    };
    owner.validate(field)?;
    Ok(owner)
}

fn owner_to(o: &Owner) -> pb::Owner {
    pb::Owner {
        cluster_id: o.cluster_id.clone(),
        kind: kind_to(o.kind) as i32,
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        uid: o.uid.clone(),
    }
}

/// Parses a network definition; field paths start at `network`.
pub fn network_from(n: Option<pb::Network>) -> Result<NetworkDef, Error> {
    let n = n.ok_or_else(|| Error::invalid("network", "is required"))?;
    let prefixes = n
        .prefixes
        .iter()
        .enumerate()
        .map(|(i, p)| model::parse_prefix(&format!("network.prefixes[{i}]"), p))
        .collect::<Result<_, _>>()?;
    let gateways = n
        .gateways
        .iter()
        .enumerate()
        .map(|(i, g)| model::parse_addr(&format!("network.gateways[{i}]"), g))
        .collect::<Result<_, _>>()?;
    let dns_servers = n
        .dns_servers
        .iter()
        .enumerate()
        .map(|(i, g)| model::parse_addr(&format!("network.dns_servers[{i}]"), g))
        .collect::<Result<_, _>>()?;
    let vlan = u16::try_from(n.vlan)
        .map_err(|_| Error::invalid("network.vlan", format!("{} is not in 0..4094", n.vlan)))?;
    let pools = n
        .pools
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(PoolDef {
                purpose: purpose_from(&format!("network.pools[{i}].purpose"), p.purpose, true)?
                    .unwrap_or(Purpose::Vip),
                name: p.name,
                ranges: p.ranges.into_iter().map(|r| r.trim().to_string()).collect(),
                exclusions: p.exclusions.into_iter().map(|r| r.trim().to_string()).collect(),
                auto_assign: p.auto_assign.unwrap_or(true),
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(NetworkDef {
        name: n.name,
        prefixes,
        gateways,
        dns_servers,
        vlan,
        pools,
        reuse_grace_secs: n.reuse_grace_seconds,
        managed_by: n.managed_by,
    })
}

/// Renders a stored network.
pub fn network_to(r: &NetworkRecord) -> pb::Network {
    let d = &r.def;
    pb::Network {
        name: d.name.clone(),
        prefixes: d.prefixes.iter().map(ToString::to_string).collect(),
        gateways: d.gateways.iter().map(ToString::to_string).collect(),
        dns_servers: d.dns_servers.iter().map(ToString::to_string).collect(),
        vlan: u32::from(d.vlan),
        pools: d
            .pools
            .iter()
            .map(|p| pb::Pool {
                name: p.name.clone(),
                purpose: purpose_to(p.purpose) as i32,
                ranges: p.ranges.clone(),
                exclusions: p.exclusions.clone(),
                auto_assign: Some(p.auto_assign),
            })
            .collect(),
        reuse_grace_seconds: d.reuse_grace_secs,
        managed_by: d.managed_by.clone(),
        version: r.version,
        created_at: Some(ts(r.created_ms)),
        updated_at: Some(ts(r.updated_ms)),
    }
}

fn ports_from(ports: &[pb::PortSpec]) -> Result<Vec<Port>, Error> {
    let raw = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok((
                protocol_from(&format!("ports[{i}].protocol"), p.protocol)?,
                p.port,
            ))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    model::check_ports("ports", &raw)
}

fn allocation_to(a: &Allocation, out_of_range: bool) -> pb::Allocation {
    pb::Allocation {
        network: a.network.clone(),
        pool: a.pool.clone(),
        owner: Some(owner_to(&a.owner)),
        addresses: a.addresses.iter().map(ToString::to_string).collect(),
        sharing_key: a.sharing_key.clone(),
        ports: a
            .ports
            .iter()
            .map(|p| pb::PortSpec {
                protocol: protocol_to(p.protocol) as i32,
                port: u32::from(p.port),
            })
            .collect(),
        state: if out_of_range {
            pb::AllocationState::OutOfRange
        } else {
            pb::AllocationState::Active
        } as i32,
        created_at: Some(ts(a.created_ms)),
        updated_at: Some(ts(a.updated_ms)),
        revision: a.revision,
    }
}

fn allocation_from(i: usize, a: pb::Allocation) -> Result<Allocation, Error> {
    let f = format!("backup.allocations[{i}]");
    let ports = a
        .ports
        .iter()
        .enumerate()
        .map(|(j, p)| {
            Ok((
                protocol_from(&format!("{f}.ports[{j}].protocol"), p.protocol)?,
                p.port,
            ))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Allocation {
        owner: owner_from(&format!("{f}.owner"), a.owner)?,
        addresses: a
            .addresses
            .iter()
            .enumerate()
            .map(|(j, s)| model::parse_addr(&format!("{f}.addresses[{j}]"), s))
            .collect::<Result<_, _>>()?,
        ports: model::check_ports(&format!("{f}.ports"), &ports)?,
        created_ms: ms(a.created_at.as_ref()),
        updated_ms: ms(a.updated_at.as_ref()),
        network: a.network,
        pool: a.pool,
        sharing_key: a.sharing_key,
        revision: a.revision,
    })
}

fn usage_to(u: &Usage) -> pb::PoolUsage {
    pb::PoolUsage {
        network: u.network.clone(),
        pool: u.pool.clone(),
        purpose: purpose_to(u.purpose) as i32,
        family: family_to(u.family) as i32,
        total: u.total.to_string(),
        used: u.used.to_string(),
        free: u.free.to_string(),
        quarantined: u.quarantined.to_string(),
        out_of_range: u.out_of_range.to_string(),
    }
}

/// Builds an `ExportResponse` from a snapshot.
fn export_to(s: &Snapshot, ledger: &Ledger) -> pb::ExportResponse {
    pb::ExportResponse {
        networks: s.networks.iter().map(network_to).collect(),
        allocations: s
            .allocations
            .iter()
            .map(|a| allocation_to(a, ledger.is_out_of_range(a)))
            .collect(),
        quarantined: s
            .quarantined
            .iter()
            .map(|q| pb::QuarantinedAddress {
                network: q.network.clone(),
                pool: q.pool.clone(),
                address: q.address.to_string(),
                until: Some(ts(q.until_ms)),
                previous_owner: Some(owner_to(&q.previous_owner)),
            })
            .collect(),
        exported_at: Some(ts(crate::ledger::now_ms())),
    }
}

fn import_from(b: pb::ExportResponse) -> Result<Snapshot, Error> {
    let mut networks = Vec::new();
    for (i, n) in b.networks.into_iter().enumerate() {
        let (version, c, u) = (
            n.version.max(1),
            ms(n.created_at.as_ref()),
            ms(n.updated_at.as_ref()),
        );
        let def = network_from(Some(n)).map_err(|e| Error::invalid(format!("backup.networks[{i}]"), e))?;
        networks.push(NetworkRecord {
            def,
            version,
            created_ms: c,
            updated_ms: u,
        });
    }
    let allocations = b
        .allocations
        .into_iter()
        .enumerate()
        .map(|(i, a)| allocation_from(i, a))
        .collect::<Result<_, _>>()?;
    let quarantined = b
        .quarantined
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let f = format!("backup.quarantined[{i}]");
            Ok(Quarantined {
                address: model::parse_addr(&format!("{f}.address"), &q.address)?,
                until_ms: ms(q.until.as_ref()),
                previous_owner: owner_from(&format!("{f}.previous_owner"), q.previous_owner)?,
                network: q.network,
                pool: q.pool,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(Snapshot {
        networks,
        allocations,
        quarantined,
        seq: 0,
    })
}

/// The gRPC service.
pub struct IpamService {
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    default_grace_secs: u32,
    /// Becomes true when the server starts shutting down: open watches end then, since a
    /// graceful shutdown waits for every stream to finish.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl IpamService {
    /// A service over `ledger`.
    pub fn new(ledger: Arc<Ledger>, metrics: Arc<Metrics>, default_grace_secs: u32) -> Self {
        IpamService {
            ledger,
            metrics,
            default_grace_secs,
            stopping: tokio::sync::watch::channel(false).1,
        }
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

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchAllocationsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::ipam_service_server::IpamService for IpamService {
    async fn upsert_network(
        &self,
        req: Request<pb::UpsertNetworkRequest>,
    ) -> Result<Response<pb::UpsertNetworkResponse>, Status> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
            let def = network_from(req.network)?;
            let u = self
                .ledger
                .upsert_network(def, req.expected_version, req.dry_run)
                .await?;
            Ok(pb::UpsertNetworkResponse {
                network: Some(network_to(&u.network)),
                changed: u.changed,
                created: u.created,
                out_of_range: u.out_of_range.iter().map(|a| allocation_to(a, true)).collect(),
            })
        }
        .await;
        self.done("UpsertNetwork", t, r)
    }

    async fn get_network(
        &self,
        req: Request<pb::GetNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        let t = Instant::now();
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
        _req: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let t = Instant::now();
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
        let t = Instant::now();
        let req = req.into_inner();
        let r = async {
            model::check_dns_label("name", &req.name)?;
            Ok(pb::DeleteNetworkResponse {
                released: self.ledger.delete_network(&req.name, req.force).await?,
            })
        }
        .await;
        self.done("DeleteNetwork", t, r)
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
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
                purpose: purpose_from("purpose", req.purpose, false)?,
                families,
                optional_extra_families: req.optional_extra_families,
                requested,
                ports: ports_from(&req.ports)?,
                sharing_key: req.sharing_key,
                network: req.network,
            };
            let (a, created) = self.ledger.allocate(areq).await?;
            Ok(pb::AllocateResponse {
                allocation: Some(allocation_to(&a, self.ledger.is_out_of_range(&a))),
                created,
            })
        }
        .await;
        self.done("Allocate", t, r)
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
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
        self.done("Release", t, r)
    }

    async fn get_allocation(
        &self,
        req: Request<pb::GetAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let t = Instant::now();
        let r = async {
            let req = req.into_inner();
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
        let r = async {
            let req = req.into_inner();
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
        let req = req.into_inner();
        let r = async {
            let f = filter(&req.network, &req.cluster_id, "", 0, "")?;
            let (snap, seq, rx) = self.ledger.watch(&f).await?;
            Ok((f, snap, seq, rx))
        }
        .await;
        let (f, snap, seq, mut rx) = self.done("WatchAllocations", t, r)?.into_inner();
        let ledger = self.ledger.clone();
        let mut stopping = self.stopping.clone();
        let stream = async_stream(move |tx| async move {
            // Resolves when the server shuts down; never if nobody can signal it.
            let stopped = async move {
                if stopping.wait_for(|s| *s).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let feed_tx = tx.clone();
            let feed = async move {
                let tx = feed_tx;
                for a in snap {
                    let oor = ledger.is_out_of_range(&a);
                    let ev = pb::WatchAllocationsResponse {
                        r#type: pb::WatchEventType::Existing as i32,
                        allocation: Some(allocation_to(&a, oor)),
                        revision: a.revision,
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                let synced = pb::WatchAllocationsResponse {
                    r#type: pb::WatchEventType::Synced as i32,
                    allocation: None,
                    revision: seq,
                };
                if tx.send(Ok(synced)).await.is_err() {
                    return;
                }
                loop {
                    let batch = match rx.recv().await {
                        Ok(b) => b,
                        Err(RecvError::Lagged(n)) => {
                            let _ = tx
                                .send(Err(Status::aborted(format!(
                                    "watch fell {n} batches behind; watch again"
                                ))))
                                .await;
                            return;
                        }
                        Err(RecvError::Closed) => {
                            let _ = tx
                                .send(Err(Status::unavailable("the store is shutting down")))
                                .await;
                            return;
                        }
                    };
                    if batch.seq <= seq {
                        continue;
                    }
                    for c in batch.changes.iter().filter(|c| f.matches(c.allocation())) {
                        let (ty, a) = match c {
                            Change::Added(a) => (pb::WatchEventType::Added, a),
                            Change::Modified(a) => (pb::WatchEventType::Modified, a),
                            Change::Deleted(a) => (pb::WatchEventType::Deleted, a),
                        };
                        let oor = !matches!(c, Change::Deleted(_)) && ledger.is_out_of_range(a);
                        let ev = pb::WatchAllocationsResponse {
                            r#type: ty as i32,
                            allocation: Some(allocation_to(a, oor)),
                            revision: batch.seq,
                        };
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                }
            };
            // A graceful shutdown waits for every open stream, so a watch ends when it begins
            // (without waiting for a slow reader: try_send).
            tokio::select! {
                () = feed => {}
                () = stopped => {
                    let _ = tx.try_send(Err(Status::unavailable("the store is shutting down; watch again")));
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_usage(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let t = Instant::now();
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

    async fn export(&self, _req: Request<pb::ExportRequest>) -> Result<Response<pb::ExportResponse>, Status> {
        let t = Instant::now();
        let r = async {
            let s = self.ledger.export().await?;
            Ok(export_to(&s, &self.ledger))
        }
        .await;
        self.done("Export", t, r)
    }

    async fn import(&self, req: Request<pb::ImportRequest>) -> Result<Response<pb::ImportResponse>, Status> {
        let t = Instant::now();
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
        self.done("Import", t, r)
    }
}

fn filter(network: &str, cluster: &str, pool: &str, kind: i32, address: &str) -> Result<ListFilter, Error> {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(ListFilter {
        network: opt(network),
        pool: opt(pool),
        cluster_id: opt(cluster),
        kind: if kind == 0 {
            None
        } else {
            Some(kind_from("kind", kind)?)
        },
        address: if address.is_empty() {
            None
        } else {
            Some(model::parse_addr("address", address)?)
        },
    })
}

/// A stream fed by a task through a bounded channel; the task stops when the client goes.
fn async_stream<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::WatchAllocationsResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
