//! The store client: one lazily connected channel per store replica, per-call deadlines, and a
//! short in-call retry of transient failures (every call the controller makes is idempotent: Allocate and
//! UpsertNetwork per owner/definition, Release when nothing is held). Longer outages surface as
//! `Error::StoreUnavailable` and the reconcilers back off.
//!
//! Several replicas (an HA store on etcd, `--ipam-endpoint a,b,c`): calls go to the one that
//! answered last; an UNAVAILABLE answer moves them to the leader the follower named
//! (`cairn-leader` metadata) when it is in the list, otherwise to the next replica, so a
//! failover needs no operator action.
//!
//! This is the only module that sees gRPC: a status the store answers with is decoded here,
//! once, into [`StoreRefusal`] (the store's own error kinds) or `Error::StoreUnavailable`, so
//! reconcilers decide on what the store meant, not on transport codes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use cairn_proto::{
    tls::ClientTlsFiles,
    v1::{self as pb, ipam_service_client::IpamServiceClient},
};
use tonic::{Code, Status, transport::Channel};

use crate::{Error, Result};

/// Per-call deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// In-call attempts for transient failures.
const ATTEMPTS: u32 = 3;

/// The store client.
#[derive(Clone)]
pub struct Ipam {
    /// One per replica, with the authority (`host:port`) it was given as.
    replicas: Arc<Vec<(String, IpamServiceClient<Channel>)>>,
    /// The replica calls go to.
    current: Arc<AtomicUsize>,
}

/// Why the store refused a request, mirroring the store's error kinds. Each carries the store's
/// message, which names the field or the conflicting holder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreRefusal {
    /// The request is malformed or outside the network's pools.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The network, pool or allocation does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The network overlaps another network.
    #[error("overlap: {0}")]
    Overlap(String),
    /// Held elsewhere: the address by another owner, the network by another manager.
    #[error("conflict: {0}")]
    Conflict(String),
    /// No free address in the pool.
    #[error("pool exhausted: {0}")]
    Exhausted(String),
    /// This client may not do that.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// This client is not known to the store.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A refusal the store does not document (e.g. an older or newer store).
    #[error("refused ({code}): {message}")]
    Other {
        /// The gRPC code, for the log.
        code: String,
        /// The store's message.
        message: String,
    },
}

/// Decodes a store status: transient failures become `StoreUnavailable` (retried), the rest a
/// [`StoreRefusal`].
fn decode(s: Status) -> Error {
    let message = s.message().to_string();
    let refusal = match s.code() {
        Code::InvalidArgument => StoreRefusal::Invalid(message),
        Code::NotFound => StoreRefusal::NotFound(message),
        Code::AlreadyExists => StoreRefusal::Overlap(message),
        Code::FailedPrecondition => StoreRefusal::Conflict(message),
        Code::ResourceExhausted => StoreRefusal::Exhausted(message),
        Code::PermissionDenied => StoreRefusal::PermissionDenied(message),
        Code::Unauthenticated => StoreRefusal::Unauthenticated(message),
        // The store maps its storage failures to UNAVAILABLE; the rest are the transport's.
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Aborted
        | Code::Internal
        | Code::Cancelled => return Error::StoreUnavailable(format!("{:?}: {message}", s.code())),
        code => StoreRefusal::Other {
            code: format!("{code:?}"),
            message,
        },
    };
    Error::Store(refusal)
}

macro_rules! call {
    ($self:ident, $method:ident, $req:expr) => {{
        let mut attempt = 0;
        // Every replica once, and the usual retries.
        let attempts = ATTEMPTS + $self.replicas.len() as u32 - 1;
        loop {
            let (i, mut c) = $self.client();
            let mut r = tonic::Request::new($req.clone());
            r.set_timeout(CALL_TIMEOUT);
            match c.$method(r).await {
                Ok(resp) => break Ok(resp.into_inner()),
                Err(s) => {
                    let moved = $self.fail_over(i, &s);
                    let e = decode(s);
                    attempt += 1;
                    if !matches!(e, Error::StoreUnavailable(_)) || attempt >= attempts {
                        break Err(e);
                    }
                    if !moved {
                        tokio::time::sleep(Duration::from_millis(100 * 4u64.pow(attempt.min(3) - 1))).await;
                    }
                }
            }
        }
    }};
}

/// `host:port` of an endpoint URL (`http://h:p/...` → `h:p`).
fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

impl Ipam {
    /// A client of the store at `endpoint` (e.g. `http://cairn-ipam:50051`), over mutual TLS
    /// when `tls` is set (`http://` then means `https://`); connects lazily, so a store that is
    /// down at start-up delays work instead of failing it. Bad TLS files fail here, naming the
    /// flag and file.
    ///
    /// `endpoint` may list several replicas, comma-separated.
    pub fn new(endpoint: &str, tls: &ClientTlsFiles) -> Result<Self> {
        let mut replicas = Vec::new();
        for e in endpoint.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let ch = tls
                .endpoint(e)
                .map_err(|err| Error::Invalid {
                    field: "--ipam-endpoint".into(),
                    message: format!("{e}: {err}"),
                })?
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
                .connect_lazy();
            let client = IpamServiceClient::new(ch)
                .max_decoding_message_size(cairn_proto::MAX_MESSAGE_SIZE)
                .max_encoding_message_size(cairn_proto::MAX_MESSAGE_SIZE);
            replicas.push((authority(e), client));
        }
        if replicas.is_empty() {
            return Err(Error::Invalid {
                field: "--ipam-endpoint".into(),
                message: "no endpoint given".into(),
            });
        }
        Ok(Ipam {
            replicas: Arc::new(replicas),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The replica calls go to now, and its index.
    fn client(&self) -> (usize, IpamServiceClient<Channel>) {
        let i = self.current.load(Ordering::Relaxed) % self.replicas.len();
        (i, self.replicas[i].1.clone())
    }

    /// After replica `i` failed with `s`: moves to the leader it named, or to the next replica
    /// when it was unreachable or unavailable. True when calls now go elsewhere.
    fn fail_over(&self, i: usize, s: &Status) -> bool {
        let n = self.replicas.len();
        if n == 1
            || !matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
            )
        {
            return false;
        }
        let named = s
            .metadata()
            .get("cairn-leader")
            .and_then(|v| v.to_str().ok())
            .map(authority)
            .and_then(|a| self.replicas.iter().position(|(r, _)| *r == a));
        let to = named.unwrap_or((i + 1) % n);
        if to == i {
            return false;
        }
        // Only the first caller to see replica i fail moves everyone on.
        let moved = self
            .current
            .compare_exchange(i, to, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if moved {
            tracing::info!(from = %self.replicas[i].0, to = %self.replicas[to].0, code = ?s.code(), "store replica failover");
        }
        moved || self.current.load(Ordering::Relaxed) != i
    }

    /// UpsertNetwork.
    pub async fn upsert_network(&self, req: pb::UpsertNetworkRequest) -> Result<pb::UpsertNetworkResponse> {
        call!(self, upsert_network, req)
    }

    /// GetNetwork; `None` when the store has no such network.
    pub async fn get_network(&self, name: &str) -> Result<Option<pb::Network>> {
        let req = pb::GetNetworkRequest {
            name: name.to_string(),
        };
        match call!(self, get_network, req) {
            Ok(n) => Ok(Some(n)),
            Err(Error::Store(StoreRefusal::NotFound(_))) => Ok(None),
            Err(e) => Err(e),
        }
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

    /// ReportConflict: `address` on `network` answered from `mac`; `holder` (if any) is the
    /// owner it was just allocated to, released in the same commit.
    pub async fn report_conflict(
        &self,
        network: &str,
        address: &str,
        mac: &str,
        cluster_id: &str,
        holder: Option<pb::Owner>,
    ) -> Result<pb::ReportConflictResponse> {
        let req = pb::ReportConflictRequest {
            network: network.to_string(),
            address: address.to_string(),
            mac: mac.to_string(),
            cluster_id: cluster_id.to_string(),
            holder,
        };
        call!(self, report_conflict, req)
    }

    /// GetAllocation; `None` when the owner holds nothing.
    pub async fn get_allocation(&self, network: &str, owner: pb::Owner) -> Result<Option<pb::Allocation>> {
        let req = pb::GetAllocationRequest {
            network: network.to_string(),
            owner: Some(owner),
        };
        match call!(self, get_allocation, req) {
            Ok(a) => Ok(Some(a)),
            Err(Error::Store(StoreRefusal::NotFound(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every allocation of a cluster (all pages).
    pub async fn list_cluster(&self, cluster_id: &str) -> Result<Vec<pb::Allocation>> {
        self.list_owned(cluster_id, pb::OwnerKind::Unspecified).await
    }

    /// Every allocation of a cluster held by owners of one kind (`Unspecified`: any kind), on
    /// any network (all pages).
    pub async fn list_owned(&self, cluster_id: &str, kind: pb::OwnerKind) -> Result<Vec<pb::Allocation>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListAllocationsRequest {
                cluster_id: cluster_id.to_string(),
                kind: kind as i32,
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

    /// A watch of every allocation change on one network (all clusters; under mTLS other
    /// clusters' events arrive redacted, with their network).
    pub async fn watch(&self, network: &str) -> Result<tonic::Streaming<pb::WatchAllocationsResponse>> {
        let (i, mut c) = self.client();
        c.watch_allocations(pb::WatchAllocationsRequest {
            network: network.to_string(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| {
            self.fail_over(i, &s);
            decode(s)
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_decoded_once_with_their_message() {
        type Variant = fn(String) -> StoreRefusal;
        let cases: [(Code, Variant); 7] = [
            (Code::InvalidArgument, StoreRefusal::Invalid),
            (Code::NotFound, StoreRefusal::NotFound),
            (Code::AlreadyExists, StoreRefusal::Overlap),
            (Code::FailedPrecondition, StoreRefusal::Conflict),
            (Code::ResourceExhausted, StoreRefusal::Exhausted),
            (Code::PermissionDenied, StoreRefusal::PermissionDenied),
            (Code::Unauthenticated, StoreRefusal::Unauthenticated),
        ];
        for (code, want) in cases {
            match decode(Status::new(code, "pool: web held by default/other")) {
                Error::Store(r) => assert_eq!(r, want("pool: web held by default/other".into()), "{code:?}"),
                e => panic!("{code:?} decoded as {e:?}"),
            }
        }
        match decode(Status::new(Code::Unimplemented, "no such method")) {
            Error::Store(StoreRefusal::Other { code, message }) => {
                assert_eq!(code, "Unimplemented");
                assert_eq!(message, "no such method");
            }
            e => panic!("Unimplemented decoded as {e:?}"),
        }
    }

    #[test]
    fn transient_failures_are_unavailable_not_refusals() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Unknown,
            Code::Aborted,
            Code::Internal,
            Code::Cancelled,
        ] {
            match decode(Status::new(code, "storage: disk full")) {
                Error::StoreUnavailable(m) => assert!(m.ends_with("storage: disk full"), "{m}"),
                e => panic!("{code:?} decoded as {e:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_unavailable_replica_hands_calls_to_the_leader_it_names_or_the_next() {
        let ipam = Ipam::new(
            "http://127.0.0.1:1, http://127.0.0.1:2,http://127.0.0.1:3",
            &ClientTlsFiles::default(),
        )
        .unwrap();
        assert_eq!(ipam.client().0, 0);
        // A follower naming the leader (as https://, under TLS): straight there.
        let mut st = Status::unavailable("not the leader");
        st.metadata_mut()
            .insert("cairn-leader", "https://127.0.0.1:3".parse().unwrap());
        assert!(ipam.fail_over(0, &st));
        assert_eq!(ipam.client().0, 2);
        // Unreachable, or a leader we were not given: the next one.
        assert!(ipam.fail_over(2, &Status::unavailable("connection refused")));
        assert_eq!(ipam.client().0, 0);
        let mut st = Status::unavailable("not the leader");
        st.metadata_mut()
            .insert("cairn-leader", "http://10.0.0.9:50051".parse().unwrap());
        assert!(ipam.fail_over(0, &st));
        assert_eq!(ipam.client().0, 1);
        // A failure seen late (calls already moved on) does not move them again.
        assert!(ipam.fail_over(0, &Status::unavailable("old news")));
        assert_eq!(ipam.client().0, 1);
        // A refusal is an answer, not a reason to change replicas.
        assert!(!ipam.fail_over(1, &Status::failed_precondition("held by another cluster")));
        assert_eq!(ipam.client().0, 1);
        // One replica: nothing to change.
        let one = Ipam::new("http://127.0.0.1:1", &ClientTlsFiles::default()).unwrap();
        assert!(!one.fail_over(0, &Status::unavailable("down")));
    }
}
