//! Several `cairn-ipam` replicas on one etcd prefix: one writer, the others standing by.
//!
//! Contract:
//! - Every replica serves its gRPC and metrics listeners from the start. Until it leads, the
//!   IpamService answers the reads of [`FOLLOWER_METHODS`] from a replica of the ledger that
//!   [`follow`] keeps from an etcd watch (once loaded), and every other call `UNAVAILABLE`
//!   ("this replica follows; the leader is URL"), with the leader's advertised URL in the
//!   `cairn-leader` response metadata; gRPC health says NOT_SERVING for
//!   `cairn.ipam.v1.IpamService`, `/readyz` answers 503 and `cairn_ipam_leader` is 0. A
//!   Kubernetes Service over the replicas therefore routes to the leader alone (readiness),
//!   and failover-aware clients pick the replica whose health says SERVING.
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
    sync::{Arc, OnceLock, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tonic::{Status, body::Body, server::NamedService};
use tower::{Service, ServiceExt as _};

use crate::{
    error::Result,
    ledger::Ledger,
    metrics::Metrics,
    store::etcd::{Campaign, EtcdEngine, Leadership, Replicated},
};

/// How often a follower checks whether the leader key still exists.
pub const POLL: Duration = Duration::from_millis(250);
/// The response metadata naming the leader's URL.
pub const LEADER_METADATA: &str = "cairn-leader";

/// The IpamService methods a follower answers from its replica; every other one it refuses
/// naming the leader.
pub const FOLLOWER_METHODS: [&str; 8] = [
    "GetNetwork",
    "ListNetworks",
    "GetAllocation",
    "ListAllocations",
    "WatchAllocations",
    "GetUsage",
    "Export",
    "ExportStream",
];

/// A gRPC service that answers `UNAVAILABLE` naming the leader until [`Gate::open`] hands it
/// the real service; meanwhile the reads of [`FOLLOWER_METHODS`] go to the follower's
/// service over its replica, when one is set ([`Gate::follow`]).
pub struct Gate<S> {
    inner: Arc<OnceLock<S>>,
    follower: Arc<RwLock<Option<S>>>,
    leader: watch::Receiver<String>,
}

impl<S> Clone for Gate<S> {
    fn clone(&self) -> Self {
        Gate {
            inner: self.inner.clone(),
            follower: self.follower.clone(),
            leader: self.leader.clone(),
        }
    }
}

impl<S> Gate<S> {
    /// A closed gate; `leader` carries the current leader's URL (empty = unknown).
    pub fn new(leader: watch::Receiver<String>) -> Self {
        Gate {
            inner: Arc::new(OnceLock::new()),
            follower: Arc::new(RwLock::new(None)),
            leader,
        }
    }

    /// Serves `svc` from now on (once; a second call is ignored), and no follower's reads.
    pub fn open(&self, svc: S) {
        let _ = self.inner.set(svc);
        self.follow(None);
    }

    /// Answers the reads of [`FOLLOWER_METHODS`] with `svc` (over a replica) until the gate
    /// opens; `None` refuses them again.
    pub fn follow(&self, svc: Option<S>) {
        *self.follower.write().unwrap_or_else(|p| p.into_inner()) = svc;
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
        if let Some(svc) = self.inner.get() {
            return Box::pin(svc.clone().oneshot(req));
        }
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        if FOLLOWER_METHODS.contains(&method) {
            let follower = self.follower.read().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(svc) = follower {
                return Box::pin(svc.oneshot(req));
            }
        }
        let st = Self::follower_status(&self.leader.borrow());
        Box::pin(std::future::ready(Ok(st.into_http())))
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

/// Keeps a read-only replica of the ledger while this replica follows: loads it from etcd at
/// one revision, publishes it on `out`, then applies every later commit transaction from an
/// etcd watch, in revision order (one transaction = one commit batch). After a compaction
/// past what it applied, a lost watch or a record it cannot apply, it loads a new replica
/// (watchers of the old one are ended and watch again). Runs until aborted (on winning the
/// election).
pub async fn follow(
    engine: Arc<EtcdEngine>,
    default_grace_secs: u32,
    watch_buffer: usize,
    out: watch::Sender<Option<Arc<Ledger>>>,
    metrics: Arc<Metrics>,
) {
    let mut last_error = String::new();
    loop {
        let e = engine.clone();
        let loaded = tokio::task::spawn_blocking(move || e.load_at()).await;
        let replica = match loaded {
            Ok(Ok((snap, rev))) => Ledger::replica(snap, default_grace_secs, watch_buffer).map(|l| (l, rev)),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(crate::error::Error::Storage(format!(
                "the loading task failed: {e}"
            ))),
        };
        let (replica, rev) = match replica {
            Ok(r) => r,
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(error = %e, "follower: loading the replica failed; retrying");
                    last_error = e;
                }
                tokio::time::sleep(POLL * 4).await;
                continue;
            }
        };
        last_error.clear();
        metrics.follower_loaded();
        tracing::info!(
            allocations = replica.allocation_count(),
            revision = rev,
            "follower: replica loaded; serving reads and watches from it"
        );
        out.send_replace(Some(replica.clone()));
        let why = replicate(&engine, &replica, rev, &metrics).await;
        tracing::warn!(reason = %why, "follower: the replica stopped following; loading it again");
        tokio::time::sleep(POLL).await;
    }
}

/// Applies the commits after revision `rev` to `replica` until something stops it; returns
/// why.
async fn replicate(engine: &EtcdEngine, replica: &Ledger, rev: i64, metrics: &Metrics) -> String {
    let (key, opts) = engine.watch_from(rev + 1);
    let mut stream = match engine.client().watch(key, Some(opts)).await {
        Ok(s) => s,
        Err(e) => return format!("starting the etcd watch: {e}"),
    };
    let mut applied = rev;
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return "the etcd watch ended".into(),
            Err(e) => return format!("the etcd watch failed: {e}"),
        };
        if resp.compact_revision() > 0 {
            return format!(
                "etcd compacted its history to revision {}, past the {applied} this replica applied",
                resp.compact_revision()
            );
        }
        if resp.canceled() {
            return format!("etcd canceled the watch: {}", resp.cancel_reason());
        }
        // One etcd revision is one commit transaction; a response never splits one.
        let evs = resp.events();
        let mut i = 0;
        while i < evs.len() {
            let revision = evs[i].kv().map_or(0, |kv| kv.mod_revision());
            let (mut ops, mut seq) = (Vec::new(), None);
            while i < evs.len() && evs[i].kv().map_or(0, |kv| kv.mod_revision()) == revision {
                match engine.replicated(&evs[i]) {
                    Ok(Some(Replicated::Op(op))) => ops.push(*op),
                    Ok(Some(Replicated::Seq(s))) => seq = Some(s),
                    Ok(None) => {}
                    Err(e) => return e.to_string(),
                }
                i += 1;
            }
            if !ops.is_empty() || seq.is_some() {
                let seq = seq.unwrap_or_else(|| replica.seq());
                if let Err(e) = replica.apply(ops, seq) {
                    return e.to_string();
                }
            }
            applied = applied.max(revision);
        }
        if let Some(h) = resp.header() {
            // A response without events (progress) means nothing of ours happened up to it.
            if evs.is_empty() {
                applied = applied.max(h.revision());
            }
            metrics.follower_lag((h.revision() - applied).max(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        ledger::{AllocateReq, NoObserver},
        model::{NetworkDef, Owner, OwnerKind, PoolDef, Purpose},
        store::{
            etcd::{EtcdOptions, server_flags},
            etcd_cluster::EtcdCluster,
        },
    };

    fn engine(c: &EtcdCluster) -> Arc<EtcdEngine> {
        let mut o = EtcdOptions::new(c.endpoints());
        o.prefix = "/follow".into();
        Arc::new(EtcdEngine::connect(&o).unwrap())
    }

    fn owner(name: &str) -> Owner {
        Owner {
            cluster_id: "a".into(),
            kind: OwnerKind::Service,
            namespace: "default".into(),
            name: name.into(),
            uid: String::new(),
        }
    }

    async fn allocate(l: &Ledger, name: &str) {
        l.allocate(AllocateReq {
            network: "n".into(),
            owner: Some(owner(name)),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_replica_follows_the_writers_commits_and_a_compaction_past_it_is_reported() {
        let etcd = EtcdCluster::start(1, &server_flags());
        let writer = Ledger::open(engine(&etcd), 0, Arc::new(NoObserver)).unwrap();
        writer
            .upsert_network(
                NetworkDef {
                    name: "n".into(),
                    prefixes: vec![],
                    gateways: vec![],
                    dns_servers: vec![],
                    vlan: 0,
                    pools: vec![PoolDef {
                        name: "vip".into(),
                        purpose: Purpose::Vip,
                        ranges: vec!["10.9.0.1-10.9.0.50".into()],
                        exclusions: vec![],
                        auto_assign: true,
                    }],
                    reuse_grace_secs: Some(0),
                    managed_by: String::new(),
                },
                None,
                false,
            )
            .await
            .unwrap();
        allocate(&writer, "before").await;

        let follower = engine(&etcd);
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = watch::channel(None);
        let task = tokio::spawn(follow(follower.clone(), 0, 64, tx, metrics.clone()));
        let replica = rx.wait_for(Option::is_some).await.unwrap().clone().unwrap();
        assert!(replica.get_allocation("n", &owner("before")).await.is_ok());
        allocate(&writer, "after").await;
        writer.release("n", &owner("before")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while replica.get_allocation("n", &owner("before")).await.is_ok()
            || replica.get_allocation("n", &owner("after")).await.is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the replica did not follow within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            replica.seq(),
            writer.seq(),
            "the replica is at the writer's sequence"
        );
        assert!(
            replica.allocate(AllocateReq::default()).await.is_err(),
            "a replica never writes"
        );
        task.abort();

        // A watch from a revision etcd has compacted away is reported, and `follow` then
        // loads a fresh replica instead of serving one with a gap.
        let (snap, rev) = follower.load_at().unwrap();
        let stale = Ledger::replica(snap, 0, 64).unwrap();
        allocate(&writer, "later").await;
        allocate(&writer, "later-still").await;
        // History before `now` goes: the watch from `rev + 1 < now` cannot be served.
        let now = follower.load_at().unwrap().1;
        follower.client().compact(now, None).await.unwrap();
        let why = tokio::time::timeout(
            Duration::from_secs(10),
            replicate(&follower, &stale, rev, &metrics),
        )
        .await
        .expect("the compaction is reported within 10 s");
        assert!(why.contains("compacted"), "{why}");
    }
}
