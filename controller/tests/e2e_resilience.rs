//! Repair of orphaned allocations, and a store outage: retries with backoff, a `Degraded`
//! condition, no crash and no lost finalizer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use cairn_e2e::eventually;
use cairn_proto::v1 as pb;
use common::*;
use k8s_openapi::api::core::v1::Service;
use kube::{Api, ResourceExt, api::DeleteParams};
use serde_json::json;

fn owner(cluster: &str, name: &str) -> pb::Owner {
    pb::Owner {
        cluster_id: cluster.into(),
        kind: pb::OwnerKind::Service as i32,
        namespace: "default".into(),
        name: name.into(),
        uid: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn repair_releases_only_this_clusters_orphans_after_the_grace() {
    let Env { cp, client, store } =
        Env::start("net-r", vip_network("net-r", "10.95.1.0/28", "10.95.2.0/24")).await;
    // The network must exist in the store before the stray allocations are made.
    let mut c = store.client().await;
    c.upsert_network(pb::UpsertNetworkRequest {
        network: Some(pb::Network {
            name: "net-r".into(),
            managed_by: "cluster/cluster-r".into(),
            reuse_grace_seconds: Some(0),
            pools: vec![
                pb::Pool {
                    name: "vip".into(),
                    purpose: pb::PoolPurpose::Vip as i32,
                    ranges: vec!["10.95.1.0/28".into()],
                    ..Default::default()
                },
                pb::Pool {
                    name: "nodes".into(),
                    purpose: pb::PoolPurpose::Node as i32,
                    ranges: vec!["10.95.2.0/24".into()],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    start_ccm(
        &cp,
        "ccm",
        "cluster-r",
        &store.endpoint,
        &["--repair-interval", "1", "--orphan-grace", "3"],
    );
    // Once a Service is served the controller leads and its repair loop runs; only then are
    // the orphans made, so the grace is timed from the first moment repair could see them.
    create_lb(&client, "default", "alive", 80, json!({})).await;
    wait_ingress(&client, "default", "alive", 1).await;
    let orphaned = Instant::now();
    for o in [owner("cluster-r", "ghost"), owner("cluster-other", "ghost")] {
        c.allocate(pb::AllocateRequest {
            network: "net-r".into(),
            owner: Some(o),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    eventually("ghost released", ACT, || async {
        let held = store.allocations("cluster-r").await;
        if held.iter().any(|a| a.owner.as_ref().unwrap().name == "ghost") {
            Err("still held")
        } else {
            Ok(())
        }
    })
    .await
    .unwrap();
    let after = orphaned.elapsed();
    assert!(
        after >= Duration::from_secs(3),
        "released {after:?} after the orphan appeared, before the 3 s orphan grace"
    );
    // Live owners and other clusters are never touched.
    assert!(
        store
            .allocations("cluster-r")
            .await
            .iter()
            .any(|a| a.owner.as_ref().unwrap().name == "alive")
    );
    assert_eq!(store.allocations("cluster-other").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn store_outage_degrades_and_keeps_finalizers() {
    let Env {
        cp,
        client,
        mut store,
    } = Env::start("net-o", vip_network("net-o", "10.96.200.0/28", "10.96.201.0/24")).await;
    start_ccm(&cp, "ccm", "cluster-o", &store.endpoint, &[]);
    create_lb(&client, "default", "web", 80, json!({})).await;
    let ip = wait_ingress(&client, "default", "web", 1).await;

    store.kill();
    let nets: Api<ClusterNetwork> = Api::all(client.clone());
    let cond = |t: &'static str, want: &'static str| {
        let nets = nets.clone();
        async move {
            let cn = nets.get("net-o").await.map_err(|e| e.to_string())?;
            let conds = cn.status.unwrap_or_default().conditions;
            if conds.iter().any(|c| c.type_ == t && c.status == want) {
                Ok(())
            } else {
                Err(format!("{conds:?}"))
            }
        }
    };
    eventually("Degraded=True while the store is down", ACT, || {
        cond("Degraded", "True")
    })
    .await
    .unwrap();
    // Deleting a Service now cannot release its VIP: the finalizer must hold it through
    // repeated failed attempts, not just until the controller first acts.
    let metrics = ccm_metrics_addr(&cp, "ccm").await;
    let before = service_reconcile_errors(&metrics).await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    svcs.delete("web", &DeleteParams::default()).await.unwrap();
    const ATTEMPTS: u64 = 4;
    let deadline = Instant::now() + ACT;
    loop {
        // Counted first, so the Service read below is the state after those failures.
        let failed = service_reconcile_errors(&metrics).await - before;
        let s = svcs
            .get_opt("web")
            .await
            .unwrap()
            .expect("web was deleted while the store was down: its finalizer did not hold");
        assert!(s.metadata.deletion_timestamp.is_some());
        assert!(
            s.finalizers().iter().any(|f| f == "cairn.dev/vip-release"),
            "the finalizer was dropped while the store was down"
        );
        if failed >= ATTEMPTS {
            // The VIP is still shown: nothing was cleared without a release.
            assert_eq!(ingress(&s), ip, "the VIP was cleared without a release");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {failed} failed Service reconcile(s) within {ACT:?} of the delete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cp.is_running("ccm"),
        "the controller must not crash while the store is down"
    );

    store.restart().await;
    // The store still held the VIP after the outage: the controller releases it now.
    wait_event(&client, "default", "web", "Released", &ip[0]).await;
    delete_and_wait_gone_already_deleting(&svcs, "web").await;
    assert!(
        store
            .allocations("cluster-o")
            .await
            .iter()
            .all(|a| a.addresses != ip),
        "released after the outage"
    );
    eventually("Degraded=False once the store is back", ACT, || {
        cond("Degraded", "False")
    })
    .await
    .unwrap();
}

/// Failed Service reconciles so far (every `cairn_ccm_reconciles_total` series of the service
/// controller whose result is not `ok`), from the controller's `/metrics`.
async fn service_reconcile_errors(addr: &str) -> u64 {
    let (code, text) = http_get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200, "{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix(r#"cairn_ccm_reconciles_total{controller="service",result=""#))
        .filter(|rest| !rest.starts_with("ok\""))
        .map(|rest| {
            let v = rest.rsplit(' ').next().unwrap_or_default();
            v.parse::<f64>()
                .unwrap_or_else(|e| panic!("bad sample {rest:?}: {e}")) as u64
        })
        .sum()
}

async fn delete_and_wait_gone_already_deleting(svcs: &Api<Service>, name: &str) {
    eventually(&format!("{name} gone"), ACT, || async {
        match svcs.get_opt(name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(s) => Err(format!("finalizers {:?}", s.metadata.finalizers)),
        }
    })
    .await
    .unwrap();
}
