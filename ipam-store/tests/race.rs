//! Two clusters racing for one network's addresses through separate connections: no address
//! is ever handed to both. `CAIRN_RACE_ALLOCS` sets the total (CI: 4,000; `make
//! reliability`: 100,000).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use cairn_proto::v1 as pb;
use common::*;
use futures::StreamExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_racing_on_one_network_never_share_an_address() {
    let total: usize = std::env::var("CAIRN_RACE_ALLOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000);
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(
        &mut c,
        network(
            "shared",
            &["10.64.0.0/14"],
            vec![pool("vip", pb::PoolPurpose::Vip, &["10.64.0.0/14"])],
        ),
    )
    .await;
    let race = |cluster: &'static str| {
        let srv = &srv;
        async move {
            // Its own connection, 32 requests in flight.
            let c = srv.client().await;
            futures::stream::iter(0..total / 2)
                .map(|i| {
                    let mut c = c.clone();
                    async move {
                        let a = allocate(&mut c, alloc_req("shared", svc(cluster, &format!("s{i}")))).await;
                        (a.addresses[0].clone(), format!("{cluster}/s{i}"))
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
        }
    };
    let (a, b) = tokio::join!(race("a"), race("b"));
    let mut by_ip: BTreeMap<String, String> = BTreeMap::new();
    for (ip, who) in a.into_iter().chain(b) {
        if let Some(first) = by_ip.insert(ip.clone(), who.clone()) {
            panic!("{ip} handed to {first} and to {who}");
        }
    }
    assert_eq!(by_ip.len(), total / 2 * 2);
    // The store's own view agrees: every allocation present once, addresses unique.
    let all = list_all(
        &mut c,
        pb::ListAllocationsRequest {
            network: "shared".into(),
            page_size: 10_000,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.len(), by_ip.len());
    let unique: BTreeSet<&String> = all.iter().flat_map(|a| &a.addresses).collect();
    assert_eq!(unique.len(), all.len(), "the store lists an address twice");
}
