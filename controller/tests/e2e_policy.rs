//! Pool policies on a real kube-apiserver with a real store and `cairn-ccm`: a restricted VIP
//! pool serves only the namespaces (by name or label) and Services (by label) its policies
//! admit — for auto-assignment, a named pool and requested addresses — and every refusal is a
//! Warning event naming the policy, with nothing allocated.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, api::PostParams};
use serde_json::json;

async fn namespace(client: &kube::Client, name: &str, labels: serde_json::Value) {
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restricted_pool_serves_only_what_its_policies_admit() {
    let spec = json!({
        "network": "net-p",
        "reuseGraceSeconds": 0,
        "pools": [
            { "name": "public", "purpose": "VIP", "ranges": ["10.86.1.0/28"] },
            { "name": "internal", "purpose": "VIP", "ranges": ["10.86.2.0/28"] },
            { "name": "nodes", "purpose": "NODE", "ranges": ["10.86.3.0/24"] },
        ],
        "policies": [
            { "pool": "public", "namespaces": ["edge"] },
            {
                "pool": "public",
                "namespaceSelector": { "matchLabels": { "tier": "public" } },
                "serviceSelector": { "matchLabels": { "expose": "internet" } },
            },
        ],
    });
    let Env { cp, client, store } = Env::start("net-p", spec).await;
    namespace(&client, "edge", json!({})).await;
    namespace(&client, "shop", json!({ "tier": "public" })).await;
    namespace(&client, "other", json!({})).await;
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);

    let pool_ann = |pool: &str| json!({ "metadata": { "annotations": { "cairn.dev/pool": pool } } });

    // Admitted by name, and by namespace label + Service label: the public pool.
    create_lb(&client, "edge", "gw", 80, pool_ann("public")).await;
    let ip = wait_ingress(&client, "edge", "gw", 1).await;
    assert!(ip[0].starts_with("10.86.1."), "{ip:?}");
    let mut shop = pool_ann("public");
    merge(
        &mut shop,
        json!({ "metadata": { "labels": { "expose": "internet" } } }),
    );
    create_lb(&client, "shop", "front", 80, shop).await;
    let ip = wait_ingress(&client, "shop", "front", 1).await;
    assert!(ip[0].starts_with("10.86.1."), "{ip:?}");

    // Not admitted: auto-assignment skips the public pool.
    create_lb(&client, "other", "app", 80, json!({})).await;
    let ip = wait_ingress(&client, "other", "app", 1).await;
    assert!(ip[0].starts_with("10.86.2."), "{ip:?}");

    // Not admitted: naming the pool, or the right namespace without the Service label.
    create_lb(&client, "other", "sneaky", 80, pool_ann("public")).await;
    let msg = wait_event(&client, "other", "sneaky", "PolicyDenied", "spec.policies[0,1]").await;
    assert!(
        msg.contains("\"public\"") && msg.contains("other/sneaky"),
        "{msg}"
    );
    create_lb(&client, "shop", "unlabelled", 80, pool_ann("public")).await;
    wait_event(&client, "shop", "unlabelled", "PolicyDenied", "shop/unlabelled").await;

    // Not admitted: requesting an address of the public pool.
    create_lb(
        &client,
        "other",
        "squatter",
        80,
        json!({ "metadata": { "annotations": { "cairn.dev/load-balancer-ips": "10.86.1.9" } } }),
    )
    .await;
    wait_event(&client, "other", "squatter", "PolicyDenied", "10.86.1.9").await;

    // The refused Services hold nothing, and show nothing.
    let held = store.allocations("cluster-a").await;
    for name in ["sneaky", "unlabelled", "squatter"] {
        assert!(
            !held.iter().any(|a| a.owner.as_ref().unwrap().name == name),
            "{name} got an allocation: {held:?}"
        );
    }
    for (ns, name) in [("other", "sneaky"), ("shop", "unlabelled"), ("other", "squatter")] {
        let s = Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .unwrap();
        assert!(ingress(&s).is_empty(), "{ns}/{name}: {:?}", ingress(&s));
    }
    assert!(
        !held
            .iter()
            .any(|a| a.addresses.iter().any(|ip| ip == "10.86.1.9")),
        "{held:?}"
    );
}
