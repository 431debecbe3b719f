//! Regressions found by the integration tests, kept as tests.
#![allow(clippy::unwrap_used)]

mod common;

use cairn_proto::v1 as pb;
use common::*;
use tonic::Code;

/// Invariant 5 hole: releasing an allocation whose address a pool shrink left OUT_OF_RANGE
/// skips the reuse grace (State::unhold returns before quarantining when no pool spans the
/// address), so re-growing the pool hands the address to another cluster at once.
#[tokio::test]
async fn releasing_an_out_of_range_address_still_observes_the_reuse_grace() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let mut n = net_a("net-a");
    n.reuse_grace_seconds = Some(600);
    upsert(&mut c, n.clone()).await;
    let mut r = alloc_req("net-a", svc("a", "old"));
    r.requested_addresses = vec!["10.20.1.200".into()];
    allocate(&mut c, r).await;
    let mut shrunk = n.clone();
    shrunk.pools[0].ranges[0] = "10.20.1.0/25".into();
    upsert(&mut c, shrunk).await; // 10.20.1.200 is now OUT_OF_RANGE
    let rel = c
        .release(pb::ReleaseRequest {
            network: "net-a".into(),
            owner: Some(svc("a", "old")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rel.released);
    upsert(&mut c, n).await; // grow the pool back
    let mut r = alloc_req("net-a", svc("b", "new"));
    r.requested_addresses = vec!["10.20.1.200".into()];
    // Today: Ok(["10.20.1.200"]) to cluster b, seconds after cluster a released it.
    assert_status(c.allocate(r).await, Code::FailedPrecondition, &["reuse grace"]);
}
