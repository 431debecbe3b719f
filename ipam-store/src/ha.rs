//! Several `cairn-ipam` replicas on one etcd prefix: one writer, the others standing by.
//!
//! Contract:
//! - Every replica serves its gRPC and metrics listeners from the start. Until it leads, the
//!   IpamService answers every call `UNAVAILABLE` ("this replica follows; the leader is URL"),
//!   with the leader's advertised URL in the `cairn-leader` response metadata; gRPC health says
//!   NOT_SERVING for `cairn.ipam.v1.IpamService`, `/readyz` answers 503 and
//!   `cairn_ipam_leader` is 0. A Kubernetes Service over the replicas therefore routes to the
//!   leader alone (readiness), and failover-aware clients pick the replica whose health says
//!   SERVING.
//! - A follower polls the leader key ([`POLL`]); when it is gone (the leader's lease expired
//!   or was revoked) it campaigns ([`EtcdEngine::try_lead`]). The winner loads the ledger from
//!   etcd and only then serves: [`Gate`] forwards to the real service from that moment.
//! - Writes are safe whatever the timing: every commit is fenced on the leader key's create
//!   revision, so a paused or partitioned former leader's commits fail in etcd. A leader that
//!   loses its lease (or whose commit is fenced) stops the process with an error; restarted,
//!   it comes back as a follower. It never turns back into a follower in place, so no state
//!   from its time as leader can leak into a later term.

use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tonic::{Status, body::Body, server::NamedService};
use tower::{Service, ServiceExt as _};

use crate::{
    error::Result,
    store::etcd::{Campaign, EtcdEngine, Leadership},
};

/// How often a follower checks whether the leader key still exists.
pub const POLL: Duration = Duration::from_millis(250);
/// The response metadata naming the leader's URL.
pub const LEADER_METADATA: &str = "cairn-leader";

/// A gRPC service that answers `UNAVAILABLE` naming the leader until [`Gate::open`] hands it
/// the real service.
pub struct Gate<S> {
    inner: Arc<OnceLock<S>>,
    leader: watch::Receiver<String>,
}

impl<S> Clone for Gate<S> {
    fn clone(&self) -> Self {
        Gate {
            inner: self.inner.clone(),
            leader: self.leader.clone(),
        }
    }
}

impl<S> Gate<S> {
    /// A closed gate; `leader` carries the current leader's URL (empty = unknown).
    pub fn new(leader: watch::Receiver<String>) -> Self {
        Gate {
            inner: Arc::new(OnceLock::new()),
            leader,
        }
    }

    /// Serves `svc` from now on (once; a second call is ignored).
    pub fn open(&self, svc: S) {
        let _ = self.inner.set(svc);
    }

    /// The refusal a follower answers with.
    pub fn follower_status(leader: &str) -> Status {
        let msg = if leader.is_empty() {
            "this cairn-ipam replica is not the leader and no leader is elected yet; retry shortly"
                .to_string()
        } else {
            format!("this cairn-ipam replica is not the leader; the leader is {leader}")
        };
        let mut st = Status::unavailable(msg);
        if let Ok(v) = leader.parse() {
            st.metadata_mut().insert(LEADER_METADATA, v);
        }
        st
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, std::result::Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        // Readiness is checked per call on the inner service (oneshot).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match self.inner.get() {
            Some(svc) => Box::pin(svc.clone().oneshot(req)),
            None => {
                let st = Self::follower_status(&self.leader.borrow());
                Box::pin(std::future::ready(Ok(st.into_http())))
            }
        }
    }
}

/// Campaigns until this replica leads: polls the leader key every [`POLL`], publishes the
/// current leader's URL on `leader`, and tries to take the key when it is free. Errors
/// reaching etcd are logged and retried. Returns the won leadership (the engine is fenced).
pub async fn campaign(
    engine: Arc<EtcdEngine>,
    id: String,
    ttl_secs: i64,
    leader: watch::Sender<String>,
) -> Leadership {
    let mut last_error = String::new();
    loop {
        let (e, me) = (engine.clone(), id.clone());
        let attempt = tokio::task::spawn_blocking(move || -> Result<Option<Campaign>> {
            match e.leader()? {
                Some(by) if by != me => Ok(Some(Campaign::Held { by })),
                // Absent, or our own key from a previous life of this replica (same URL)
                // that has not expired yet: campaign (the latter waits for its expiry).
                _ => e.try_lead(&me, ttl_secs).map(Some),
            }
        })
        .await;
        match attempt {
            Ok(Ok(Some(Campaign::Won(l)))) => {
                tracing::info!(id = %id, lease = l.lease, "won the election: this replica is the writer");
                leader.send_replace(id.clone());
                return l;
            }
            Ok(Ok(Some(Campaign::Held { by }))) => {
                // Our own key from a previous life: no one serves it; wait for its expiry.
                let by = if by == id { String::new() } else { by };
                if *leader.borrow() != by {
                    tracing::info!(leader = %by, "following");
                    leader.send_replace(by);
                }
                last_error.clear();
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(error = %e, "campaign: etcd unreachable; retrying");
                    last_error = e;
                }
            }
            Err(e) => tracing::error!(error = %e, "campaign task failed; retrying"),
        }
        tokio::time::sleep(POLL).await;
    }
}
