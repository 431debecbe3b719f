//! The ClusterNetwork schema on a real apiserver: malformed objects are rejected there, with
//! a message naming the rule, before the controller ever sees them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cairn_e2e::ControlPlane;
use common::*;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn malformed_cluster_networks_are_rejected_by_the_apiserver() {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client().unwrap();
    install_crd(&client).await;
    let api: Api<ClusterNetwork> = Api::all(client.clone());
    // Untyped, so the apiserver (not serde on this side) is what refuses.
    let raw: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<ClusterNetwork>(&()));
    let good = vip_network("net-a", "10.20.1.10-10.20.1.20", "10.20.2.0/24");
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "bad range",
            json!({ "pools": [ { "name": "vip", "purpose": "VIP", "ranges": ["10.20.1.300/24"] } ] }),
            "each range must be",
        ),
        (
            "half a range",
            json!({ "pools": [ { "name": "vip", "purpose": "VIP", "ranges": ["10.20.1.1-"] } ] }),
            "each range must be",
        ),
        (
            "bad exclusion",
            json!({ "pools": [ { "name": "vip", "purpose": "VIP", "ranges": ["10.20.1.0/24"], "exclusions": ["x"] } ] }),
            "each exclusion",
        ),
        (
            "bad prefix",
            json!({ "prefixes": ["10.20.0.0"] }),
            "each prefix must be a CIDR",
        ),
        (
            "bad gateway",
            json!({ "gateways": ["gw"] }),
            "each gateway must be an IP",
        ),
        ("bad dns", json!({ "dnsServers": ["8.8.8"] }), "each DNS server"),
        (
            "policy for a missing pool",
            json!({ "policies": [ { "pool": "nope", "namespaces": ["a"] } ] }),
            "each policy must name a VIP pool",
        ),
        (
            "policy for a NODE pool",
            json!({ "policies": [ { "pool": "nodes", "namespaces": ["a"] } ] }),
            "each policy must name a VIP pool",
        ),
        (
            "empty policy",
            json!({ "policies": [ { "pool": "vip" } ] }),
            "a policy needs namespaces",
        ),
        ("vlan", json!({ "vlan": 5000 }), "spec.vlan"),
        (
            "purpose",
            json!({ "pools": [ { "name": "vip", "purpose": "LB", "ranges": ["10.20.1.0/24"] } ] }),
            "spec.pools[0].purpose",
        ),
        (
            "pool name",
            json!({ "pools": [ { "name": "Vip!", "purpose": "VIP", "ranges": ["10.20.1.0/24"] } ] }),
            "spec.pools[0].name",
        ),
        (
            "duplicate pools",
            json!({ "pools": [ { "name": "p", "purpose": "VIP", "ranges": ["10.20.1.0/25"] }, { "name": "p", "purpose": "NODE", "ranges": ["10.20.1.128/25"] } ] }),
            "pool names must be unique",
        ),
        (
            "api VIP without VIP pool",
            json!({ "pools": [ { "name": "n", "purpose": "NODE", "ranges": ["10.20.2.0/24"] } ], "apiServerVIP": {} }),
            "apiServerVIP needs a VIP pool",
        ),
        (
            "api VIP address",
            json!({ "apiServerVIP": { "address": "10.20.1" } }),
            "address must be an IP",
        ),
    ];
    for (what, patch, needle) in cases {
        let mut spec = good.clone();
        merge(&mut spec, patch);
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cairn.dev/v1alpha1", "kind": "ClusterNetwork",
            "metadata": { "name": "bad" }, "spec": spec,
        }))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        match raw.create(&PostParams::default(), &obj).await {
            Err(kube::Error::Api(s)) => assert!(
                s.message.contains(needle),
                "{what}: {:?} does not contain {needle:?}",
                s.message
            ),
            other => panic!("{what}: expected a rejection, got {other:?}"),
        }
    }
    // A good one is accepted; its network name cannot change afterwards.
    create_network(&client, "net-a", good).await;
    let r = api
        .patch(
            "net-a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "network": "net-b" } })),
        )
        .await;
    match r {
        Err(kube::Error::Api(s)) => assert!(s.message.contains("network is immutable"), "{}", s.message),
        other => panic!("expected immutability, got {other:?}"),
    }
}
