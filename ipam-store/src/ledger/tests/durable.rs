//! The durable ledger over a fault-injecting engine: a failed commit is never acknowledged,
//! stops the ledger for every later call, and a restart serves exactly what the engine holds.

use std::sync::Arc;

use super::*;
use crate::store::{
    Engine,
    failing::{FailingEngine, Failure},
    memory::MemoryEngine,
};

async fn open(e: Arc<dyn Engine>) -> Arc<Ledger> {
    Ledger::open(e, 0, Arc::new(NoObserver)).unwrap()
}

/// Defines network `net-a` (VIP pool of 64 addresses).
async fn net_a(l: &Ledger) {
    l.upsert_network(
        net("net-a", vec![pool("vip", Purpose::Vip, &["10.0.1.0-10.0.1.63"])]),
        None,
        false,
    )
    .await
    .unwrap();
}

/// A ledger with network `net-a` over a failing engine.
async fn ledger() -> (Arc<FailingEngine<MemoryEngine>>, Arc<Ledger>) {
    let fe = FailingEngine::new(MemoryEngine::new());
    let l = open(fe.clone()).await;
    net_a(&l).await;
    (fe, l)
}

fn is_storage<T: std::fmt::Debug>(r: &Result<T, Error>) -> bool {
    matches!(r, Err(Error::Storage(_)))
}

#[tokio::test]
async fn a_failed_commit_is_refused_and_stops_the_ledger() {
    let (fe, l) = ledger().await;
    let (kept, _) = l.allocate(req("net-a", svc("a", "kept"))).await.unwrap();
    fe.fail_after(0, Failure::Before);

    let r = l.allocate(req("net-a", svc("a", "lost"))).await;
    assert!(is_storage(&r), "{r:?}");
    // Every later call, write or read, is refused; the failure is reported once for the
    // server to exit on.
    assert!(is_storage(&l.allocate(req("net-a", svc("a", "after"))).await));
    assert!(is_storage(&l.get_allocation("net-a", &svc("a", "kept")).await));
    assert!(is_storage(&l.networks().await));
    assert!(l.failure().await.contains("injected"));

    // A restart serves what the engine holds: the acknowledged allocation, not the refused one.
    let again = open(Arc::new(fe.inner().clone())).await;
    assert_eq!(
        again.get_allocation("net-a", &svc("a", "kept")).await.unwrap(),
        kept
    );
    assert!(matches!(
        again.get_allocation("net-a", &svc("a", "lost")).await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test]
async fn every_call_waiting_on_a_failed_batch_is_refused() {
    let (fe, l) = ledger().await;
    fe.fail_after(0, Failure::Before);
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let l = l.clone();
            tokio::spawn(async move { l.allocate(req("net-a", svc("a", &format!("s{i}")))).await })
        })
        .collect();
    for c in calls {
        let r = c.await.unwrap();
        assert!(is_storage(&r), "acknowledged without a durable commit: {r:?}");
    }
    let held = open(Arc::new(fe.inner().clone()))
        .await
        .list(&ListFilter::default(), 0, "")
        .await
        .unwrap()
        .0;
    assert!(held.is_empty(), "{held:?}");
}

#[tokio::test]
async fn a_torn_batch_is_refused_and_reloads_consistently() {
    let (fe, l) = ledger().await;
    let mut acked = Vec::new();
    for i in 0..8 {
        acked.push(
            l.allocate(req("net-a", svc("a", &format!("s{i}"))))
                .await
                .unwrap()
                .0,
        );
    }
    // Force-deleting the network is one batch of nine ops; half of it lands.
    fe.fail_after(0, Failure::Partial);
    let r = l.delete_network("net-a", true).await;
    assert!(is_storage(&r), "{r:?}");

    // The restart keeps every record the engine holds and no address has two owners; the
    // client, told the delete failed, retries it on the restarted store.
    let again = open(Arc::new(fe.inner().clone())).await;
    let (held, _) = again.list(&ListFilter::default(), 0, "").await.unwrap();
    assert!(held.len() < acked.len(), "half of the deletes landed: {held:?}");
    for a in &held {
        assert!(acked.contains(a), "{a:?} was never acknowledged");
    }
    again.delete_network("net-a", true).await.unwrap();
    assert!(again.networks().await.unwrap().is_empty());
}

#[tokio::test]
async fn written_but_unacknowledged_is_found_again_by_the_retry() {
    let (fe, l) = ledger().await;
    // The write lands, then the engine reports a failure (say, fsync): the client is told it
    // failed and retries; Allocate being idempotent per owner, the retry gets that address.
    fe.fail_after(0, Failure::After);
    assert!(is_storage(&l.allocate(req("net-a", svc("a", "web"))).await));
    let again = open(Arc::new(fe.inner().clone())).await;
    let held = again.get_allocation("net-a", &svc("a", "web")).await.unwrap();
    let (retried, created) = again.allocate(req("net-a", svc("a", "web"))).await.unwrap();
    assert!(!created);
    assert_eq!(retried.addresses, held.addresses);
}

/// An engine whose streamed read fails after part of the allocations: opening the ledger
/// fails with that error instead of serving the part it read.
struct ReadFailsMidway(MemoryEngine);

impl Engine for ReadFailsMidway {
    fn load(&self) -> crate::error::Result<crate::store::Snapshot> {
        self.0.load()
    }
    fn load_streamed(
        &self,
        head: &mut dyn FnMut(crate::store::Snapshot) -> crate::error::Result<()>,
        chunk: &mut dyn FnMut(Vec<crate::model::Allocation>) -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        let mut s = self.0.load()?;
        let mut all = std::mem::take(&mut s.allocations);
        head(s)?;
        let rest = all.split_off(all.len() / 2);
        chunk(all)?;
        drop(rest);
        Err(Error::Storage("disk read error at record 2".into()))
    }
    fn commit(&self, ops: &[Op], seq: u64) -> crate::error::Result<()> {
        self.0.commit(ops, seq)
    }
    fn name(&self) -> &'static str {
        "read-fails-midway"
    }
}

#[tokio::test]
async fn a_read_failing_midway_fails_the_open() {
    let mem = MemoryEngine::new();
    {
        let l = open(Arc::new(mem.clone())).await;
        net_a(&l).await;
        for i in 0..4 {
            l.allocate(req("net-a", svc("a", &format!("s{i}"))))
                .await
                .unwrap();
        }
    }
    // The intact engine opens with all four.
    let whole = open(Arc::new(mem.clone())).await;
    assert_eq!(whole.export().await.unwrap().allocations.len(), 4);
    let e = Ledger::open(Arc::new(ReadFailsMidway(mem)), 0, Arc::new(NoObserver))
        .err()
        .expect("opened on half a store");
    assert!(e.to_string().contains("disk read error at record 2"), "{e}");
}
