//! The service: one method per RPC, each parse → ledger call → metrics → status mapping.

use std::{net::IpAddr, sync::Arc, time::Instant};

use cairn_proto::v1 as pb;
use tonic::{Request, Response, Status, Streaming};

use super::{
    backup::{self, Collect, ExportStream},
    convert::*,
    status,
    watch::{self, WatchStream},
};
use crate::{
    error::Error,
    ledger::{AllocateReq, Ledger},
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
                purpose: purpose_from("purpose", req.purpose)?,
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
        let (f, snap, seq, rx) = self.done("WatchAllocations", t, r)?.into_inner();
        Ok(Response::new(watch::stream(
            self.ledger.clone(),
            self.stopping.clone(),
            f,
            snap,
            seq,
            rx,
        )))
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
            let (s, flags) = self.ledger.export_flagged().await?;
            Ok(export_to(&s, &flags))
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

    type ExportStreamStream = ExportStream;

    async fn export_stream(
        &self,
        _req: Request<pb::ExportRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let t = Instant::now();
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
        let t = Instant::now();
        let b = match backup::collect(req.into_inner()).await {
            Ok(b) => b,
            Err(Collect::Refused(e)) => return self.done("ImportStream", t, Err(e)),
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
        self.done("ImportStream", t, r)
    }
}
