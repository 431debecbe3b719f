//! The store client: one lazily connected channel, per-call deadlines, and a short in-call
//! retry of transient failures (every call the controller makes is idempotent: Allocate and
//! UpsertNetwork per owner/definition, Release when nothing is held). Longer outages surface as
//! `Error::StoreUnavailable` and the reconcilers back off.

use std::time::Duration;

use cairn_proto::v1::{self as pb, ipam_service_client::IpamServiceClient};
use tonic::{Code, Status, transport::Channel};

use crate::{Error, Result};

/// Per-call deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// In-call attempts for transient failures.
const ATTEMPTS: u32 = 3;

/// The store client.
#[derive(Clone)]
pub struct Ipam {
    client: IpamServiceClient<Channel>,
}

fn map(s: Status) -> Error {
    match s.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Aborted
        | Code::Internal
        | Code::Cancelled => Error::StoreUnavailable(format!("{:?}: {}", s.code(), s.message())),
        code => Error::Store {
            code,
            message: s.message().to_string(),
        },
    }
}

macro_rules! call {
    ($self:ident, $method:ident, $req:expr) => {{
        let mut attempt = 0;
        loop {
            let mut c = $self.client.clone();
            let mut r = tonic::Request::new($req.clone());
            r.set_timeout(CALL_TIMEOUT);
            match c.$method(r).await {
                Ok(resp) => break Ok(resp.into_inner()),
                Err(s) => {
                    let e = map(s);
                    attempt += 1;
                    if !matches!(e, Error::StoreUnavailable(_)) || attempt >= ATTEMPTS {
                        break Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(100 * 4u64.pow(attempt - 1))).await;
                }
            }
        }
    }};
}

impl Ipam {
    /// A client of the store at `endpoint` (e.g. `http://cairn-ipam:50051`); connects lazily,
    /// so a store that is down at start-up delays work instead of failing it.
    pub fn new(endpoint: &str) -> Result<Self> {
        let ch = Channel::from_shared(endpoint.to_string())
            .map_err(|e| Error::Invalid {
                field: "--ipam-endpoint".into(),
                message: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(Ipam {
            client: IpamServiceClient::new(ch),
        })
    }

    /// UpsertNetwork.
    pub async fn upsert_network(&self, req: pb::UpsertNetworkRequest) -> Result<pb::UpsertNetworkResponse> {
        call!(self, upsert_network, req)
    }

    /// Allocate.
    pub async fn allocate(&self, req: pb::AllocateRequest) -> Result<pb::AllocateResponse> {
        call!(self, allocate, req)
    }

    /// Release.
    pub async fn release(&self, network: &str, owner: pb::Owner) -> Result<pb::ReleaseResponse> {
        let req = pb::ReleaseRequest {
            network: network.to_string(),
            owner: Some(owner),
        };
        call!(self, release, req)
    }

    /// GetAllocation; `None` when the owner holds nothing.
    pub async fn get_allocation(&self, network: &str, owner: pb::Owner) -> Result<Option<pb::Allocation>> {
        let req = pb::GetAllocationRequest {
            network: network.to_string(),
            owner: Some(owner),
        };
        match call!(self, get_allocation, req) {
            Ok(a) => Ok(Some(a)),
            Err(Error::Store {
                code: Code::NotFound, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every allocation of a cluster (all pages).
    pub async fn list_cluster(&self, cluster_id: &str) -> Result<Vec<pb::Allocation>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListAllocationsRequest {
                cluster_id: cluster_id.to_string(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            };
            let page = call!(self, list_allocations, req)?;
            out.extend(page.allocations);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    /// Usage of one network.
    pub async fn usage(&self, network: &str) -> Result<Vec<pb::PoolUsage>> {
        let req = pb::GetUsageRequest {
            network: network.to_string(),
        };
        Ok(call!(self, get_usage, req)?.pools)
    }

    /// A watch of every allocation change (all networks, all clusters).
    pub async fn watch(&self) -> Result<tonic::Streaming<pb::WatchAllocationsResponse>> {
        let mut c = self.client.clone();
        c.watch_allocations(pb::WatchAllocationsRequest::default())
            .await
            .map(|r| r.into_inner())
            .map_err(map)
    }
}

/// The store owner of a cluster object.
pub fn owner(cluster_id: &str, kind: pb::OwnerKind, namespace: &str, name: &str, uid: &str) -> pb::Owner {
    pb::Owner {
        cluster_id: cluster_id.to_string(),
        kind: kind as i32,
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: uid.to_string(),
    }
}
