//! The edges where an address leaked, a finalizer stalled or a foreign address failed open —
//! each on a real kube-apiserver with a real store and `cairn-ccm`, each failing before its fix:
//! a Service moved to another network by its `cairn.dev/network` annotation, a Node deleted
//! after its ClusterNetwork, two ClusterNetworks naming one store network, and an adoption the
//! store refuses while the pool is full.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use cairn_e2e::eventually;
use cairn_proto::v1 as pb;
use common::*;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

/// The store's allocations of `cluster` owned by `name`, as (network, addresses).
async fn held_by(store: &Store, cluster: &str, name: &str) -> Vec<(String, Vec<String>)> {
    store
        .allocations(cluster)
        .await
        .into_iter()
        .filter(|a| a.owner.as_ref().is_some_and(|o| o.name == name))
        .map(|a| (a.network, a.addresses))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_moved_to_another_network_gives_its_old_vip_back() {
    let Env { cp, client, store } =
        Env::start("net-a", vip_network("net-a", "10.81.1.0/28", "10.81.2.0/24")).await;
    create_network(
        &client,
        "net-b",
        vip_network("net-b", "10.82.1.0/28", "10.82.2.0/24"),
    )
    .await;
    // The default orphan grace (5 min): only the reconciler can give the old VIP back in time.
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);
    create_lb(
        &client,
        "default",
        "web",
        80,
        json!({ "metadata": { "annotations": { "cairn.dev/network": "net-a" } } }),
    )
    .await;
    let before = wait_ingress(&client, "default", "web", 1).await;
    assert!(before[0].starts_with("10.81.1."), "{before:?}");

    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "annotations": { "cairn.dev/network": "net-b" } } })),
    )
    .await
    .unwrap();
    eventually("web moved to net-b, nothing left held on net-a", ACT, || async {
        let svc = api.get("web").await.map_err(|e| e.to_string())?;
        let ips = ingress(&svc);
        let held = held_by(&store, "cluster-a", "web").await;
        if ips.len() == 1 && ips[0].starts_with("10.82.1.") && held == vec![("net-b".to_string(), ips)] {
            Ok(())
        } else {
            Err(format!("ingress {:?}, held {held:?}", ingress(&svc)))
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_deleted_after_its_cluster_network_is_released_and_not_stuck() {
    let Env { cp, client, store } = Env::start(
        "net-n",
        vip_network("net-n", "10.83.1.0/28", "10.83.2.10-10.83.2.20"),
    )
    .await;
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);
    create_node(&client, "worker-1", BTreeMap::new()).await;
    let nodes: Api<Node> = Api::all(client.clone());
    eventually("worker-1 has its address and finalizer", ACT, || async {
        let held = held_by(&store, "cluster-a", "worker-1").await;
        let n = nodes.get("worker-1").await.map_err(|e| e.to_string())?;
        let fin = n.metadata.finalizers.unwrap_or_default();
        if !held.is_empty() && fin.contains(&"cairn.dev/node-ip-release".to_string()) {
            Ok(())
        } else {
            Err(format!("held {held:?}, finalizers {fin:?}"))
        }
    })
    .await
    .unwrap();

    // The ClusterNetwork goes; the controller has seen it go once a Service finds no network.
    let cns: Api<ClusterNetwork> = Api::all(client.clone());
    cns.delete("net-n", &DeleteParams::default()).await.unwrap();
    create_lb(&client, "default", "probe", 80, json!({})).await;
    wait_event(
        &client,
        "default",
        "probe",
        "AllocationFailed",
        "no ClusterNetwork has a Vip pool",
    )
    .await;

    nodes.delete("worker-1", &DeleteParams::default()).await.unwrap();
    eventually("worker-1 gone and its address released", ACT, || async {
        let gone = nodes
            .get_opt("worker-1")
            .await
            .map_err(|e| e.to_string())?
            .is_none();
        let held = held_by(&store, "cluster-a", "worker-1").await;
        if gone && held.is_empty() {
            Ok(())
        } else {
            Err(format!("gone {gone}, held {held:?}"))
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_cluster_networks_naming_one_network_do_not_overwrite_each_other() {
    let mut first = vip_network("shared", "10.84.1.0/28", "10.84.2.0/24");
    first["prefixes"] = json!(["10.84.0.0/16"]);
    let Env { cp, client, store } = Env::start("first", first).await;
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);
    let cns: Api<ClusterNetwork> = Api::all(client.clone());
    let ready = |name: &'static str| {
        let cns = cns.clone();
        async move {
            let cn = cns.get(name).await.map_err(|e| e.to_string())?;
            let st = cn.status.clone().unwrap_or_default();
            if st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
            {
                Ok(st)
            } else {
                Err(format!("{st:?}"))
            }
        }
    };
    let st = eventually("first Ready", ACT, || ready("first")).await.unwrap();
    let version = st.store_version.expect("store version");

    // A second ClusterNetwork for the same store network, with another definition.
    let mut second = vip_network("shared", "10.84.3.0/28", "10.84.4.0/24");
    second["prefixes"] = json!(["10.84.0.0/16"]);
    create_network(&client, "second", second).await;
    let st = eventually("second shows DuplicateNetwork", ACT, || async {
        let cn = cns.get("second").await.map_err(|e| e.to_string())?;
        let st = cn.status.clone().unwrap_or_default();
        if st.conditions.iter().any(|c| {
            c.type_ == "Conflict"
                && c.status == "True"
                && c.reason == "DuplicateNetwork"
                && c.message.contains("\"first\"")
        }) {
            Ok(st)
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await
    .unwrap();
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "DuplicateNetwork"),
        "{st:?}"
    );
    wait_event(&client, "default", "second", "DuplicateNetwork", "first").await;

    // The store still holds the first definition, unchanged, after the second was reconciled.
    let n = store
        .client()
        .await
        .get_network(pb::GetNetworkRequest {
            name: "shared".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.version, version, "the store's network was rewritten: {n:?}");
    assert_eq!(n.pools[0].ranges, ["10.84.1.0/28"]);
    let st = ready("first").await.expect("first stays Ready");
    assert_eq!(st.store_version, Some(version));

    // Deleting the first hands the network to the second.
    cns.delete("first", &DeleteParams::default()).await.unwrap();
    eventually("second Ready once it is the only one", ACT, || ready("second"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_adoption_with_a_full_pool_leaves_no_foreign_address_in_status() {
    // A one-address VIP pool, held by another cluster before this one's controller starts.
    let Env { cp, client, store } = Env::start(
        "net-d",
        vip_network("net-d", "10.85.1.5-10.85.1.5", "10.85.2.0/24"),
    )
    .await;
    let mut c = store.client().await;
    c.upsert_network(pb::UpsertNetworkRequest {
        network: Some(pb::Network {
            name: "net-d".into(),
            reuse_grace_seconds: Some(0),
            pools: vec![
                pb::Pool {
                    name: "vip".into(),
                    purpose: pb::PoolPurpose::Vip as i32,
                    ranges: vec!["10.85.1.5-10.85.1.5".into()],
                    ..Default::default()
                },
                pb::Pool {
                    name: "nodes".into(),
                    purpose: pb::PoolPurpose::Node as i32,
                    ranges: vec!["10.85.2.0/24".into()],
                    ..Default::default()
                },
            ],
            managed_by: "cluster/cluster-a".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("define net-d as cluster-a's controller would");
    c.allocate(pb::AllocateRequest {
        network: "net-d".into(),
        owner: Some(pb::Owner {
            cluster_id: "cluster-x".into(),
            kind: pb::OwnerKind::Service as i32,
            namespace: "default".into(),
            name: "theirs".into(),
            uid: "u-x".into(),
        }),
        ..Default::default()
    })
    .await
    .expect("cluster-x takes the only VIP");

    // A Service migrated from another load balancer shows that very address.
    let svc = create_lb(&client, "default", "migrant", 80, json!({})).await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    api.patch_status(
        "migrant",
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "loadBalancer": { "ingress": [ { "ip": "10.85.1.5" } ] } } })),
    )
    .await
    .unwrap();
    assert_eq!(ingress(&api.get("migrant").await.unwrap()), ["10.85.1.5"]);
    drop(svc);

    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);
    wait_event(&client, "default", "migrant", "AdoptionRefused", "10.85.1.5").await;
    eventually("the foreign address is out of migrant's status", ACT, || async {
        let s = api.get("migrant").await.map_err(|e| e.to_string())?;
        let ips = ingress(&s);
        if ips.is_empty() {
            Ok(())
        } else {
            Err(format!("ingress {ips:?}"))
        }
    })
    .await
    .unwrap();
    wait_event(&client, "default", "migrant", "AllocationFailed", "").await;
    let theirs = held_by(&store, "cluster-x", "theirs").await;
    assert_eq!(theirs, [("net-d".to_string(), vec!["10.85.1.5".to_string()])]);
    assert!(held_by(&store, "cluster-a", "migrant").await.is_empty());
}
