//! LoadBalancer Services and ClusterNetworks on a real kube-apiserver + etcd, with a real
//! `cairn-ipam` and `cairn-ccm` process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cairn_e2e::{ControlPlane, eventually};
use common::*;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

async fn network_ready(client: &kube::Client, name: &str) -> ClusterNetwork {
    let api: Api<ClusterNetwork> = Api::all(client.clone());
    eventually(&format!("ClusterNetwork {name} Ready"), ACT, || {
        let api = api.clone();
        async move {
            let cn = api.get(name).await.map_err(|e| e.to_string())?;
            let st = cn.status.clone().unwrap_or_default();
            let ready = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready && st.observed_generation == cn.metadata.generation {
                Ok(cn)
            } else {
                Err(format!("status {st:?}"))
            }
        }
    })
    .await
    .expect("network ready")
}

#[tokio::test(flavor = "multi_thread")]
async fn network_status_and_service_lifecycle() {
    let cp = ControlPlane::start().await.expect("control plane");
    let client = cp.client().unwrap();
    install_crd(&client).await;
    let store = Store::start().await;
    let mut spec = vip_network("net-a", "10.20.1.0/28", "10.20.2.0/24");
    spec["apiServerVIP"] = json!({});
    spec["prefixes"] = json!(["10.20.0.0/16"]);
    spec["gateways"] = json!(["10.20.0.1"]);
    create_network(&client, "net-a", spec).await;
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);

    // Network status: Ready, API-server VIP, usage.
    let cn = network_ready(&client, "net-a").await;
    let st = cn.status.unwrap();
    assert_eq!(
        st.api_server_vip.as_deref(),
        Some("10.20.1.1"),
        "first VIP of the pool"
    );
    assert_eq!(st.vip_usage.as_deref(), Some("1/14"));
    assert_eq!(st.node_usage.as_deref(), Some("0/254"));
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Conflict" && c.status == "False")
    );

    // A LoadBalancer Service gets a VIP, an event, the result annotation and the finalizer.
    create_lb(&client, "default", "web", 80, json!({})).await;
    let ips = wait_ingress(&client, "default", "web", 1).await;
    assert_eq!(ips, vec!["10.20.1.2"]);
    wait_event(&client, "default", "web", "Allocated", "10.20.1.2").await;
    let svc: Service = Api::namespaced(client.clone(), "default")
        .get("web")
        .await
        .unwrap();
    assert_eq!(
        svc.metadata
            .annotations
            .unwrap()
            .get("cairn.dev/allocated-from")
            .map(String::as_str),
        Some("net-a/vip")
    );
    assert!(
        svc.metadata
            .finalizers
            .unwrap()
            .contains(&"cairn.dev/vip-release".to_string())
    );
    let held = store.allocations("cluster-a").await;
    assert!(
        held.iter()
            .any(|a| a.addresses == vec!["10.20.1.2"] && a.owner.as_ref().unwrap().name == "web")
    );

    // Usage reflects it.
    let api: Api<ClusterNetwork> = Api::all(client.clone());
    eventually("usage 2/14", ACT, || {
        let api = api.clone();
        async move {
            let u = api
                .get("net-a")
                .await
                .map_err(|e| e.to_string())?
                .status
                .and_then(|s| s.vip_usage);
            if u.as_deref() == Some("2/14") {
                Ok(())
            } else {
                Err(format!("{u:?}"))
            }
        }
    })
    .await
    .unwrap();

    // Operation endpoints.
    let addr = ccm_metrics_addr(&cp, "ccm").await;
    assert_eq!(http_get(&addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(&addr, "/readyz").await.unwrap().0, 200);
    let (code, metrics) = http_get(&addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains(r#"cairn_ccm_reconciles_total{controller="service",result="ok"}"#),
        "{metrics}"
    );
    assert!(metrics.contains("cairn_ccm_leader 1"), "{metrics}");

    // Delete → Release → finalizer removed → the store no longer holds it.
    delete_and_wait_gone(&client, "default", "web").await;
    let held = store.allocations("cluster-a").await;
    assert!(
        !held.iter().any(|a| a.owner.as_ref().unwrap().name == "web"),
        "{held:?}"
    );

    // Type change releases too.
    create_lb(&client, "default", "typed", 80, json!({})).await;
    wait_ingress(&client, "default", "typed", 1).await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    svcs.patch(
        "typed",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "type": "ClusterIP" } })),
    )
    .await
    .unwrap();
    wait_ingress(&client, "default", "typed", 0).await;
    eventually("finalizer dropped after type change", ACT, || {
        let svcs = svcs.clone();
        async move {
            let s = svcs.get("typed").await.map_err(|e| e.to_string())?;
            if s.metadata.finalizers.unwrap_or_default().is_empty() {
                Ok(())
            } else {
                Err("finalizer still there".to_string())
            }
        }
    })
    .await
    .unwrap();
    assert!(
        !store
            .allocations("cluster-a")
            .await
            .iter()
            .any(|a| a.owner.as_ref().unwrap().name == "typed")
    );
}

fn svc_api(client: &kube::Client) -> Api<Service> {
    Api::namespaced(client.clone(), "default")
}

async fn has_finalizer(client: &kube::Client, name: &str) -> bool {
    svc_api(client)
        .get(name)
        .await
        .unwrap()
        .metadata
        .finalizers
        .unwrap_or_default()
        .iter()
        .any(|f| f == "cairn.dev/vip-release")
}

#[tokio::test(flavor = "multi_thread")]
async fn requested_ips_pools_classes_and_sharing() {
    let Env { cp, client, store } = Env::start("net-b", json!({
            "network": "net-b",
            "reuseGraceSeconds": 0,
            "pools": [
                { "name": "vip", "purpose": "VIP", "ranges": ["10.30.1.0/28"] },
                { "name": "special", "purpose": "VIP", "ranges": ["10.30.9.0-10.30.9.7"], "autoAssign": false },
            ],
        })).await;
    // A Service of another class exists before the controller starts.
    create_lb(
        &client,
        "default",
        "classy",
        80,
        json!({ "spec": { "loadBalancerClass": "example.com/other" } }),
    )
    .await;
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);

    // Requested IP honoured.
    create_lb(
        &client,
        "default",
        "want",
        80,
        json!({ "metadata": { "annotations": { "cairn.dev/load-balancer-ips": "10.30.1.9" } } }),
    )
    .await;
    assert_eq!(
        wait_ingress(&client, "default", "want", 1).await,
        vec!["10.30.1.9"]
    );
    // Both ways of asking at once: refused with an event naming the field.
    create_lb(
        &client,
        "default",
        "both",
        80,
        json!({ "metadata": { "annotations": { "cairn.dev/load-balancer-ips": "10.30.1.10" } }, "spec": { "loadBalancerIP": "10.30.1.10" } }),
    )
    .await;
    wait_event(
        &client,
        "default",
        "both",
        "AllocationFailed",
        "spec.loadBalancerIP",
    )
    .await;
    // An address another owner holds: refused, naming the holder.
    create_lb(
        &client,
        "default",
        "taken",
        81,
        json!({ "metadata": { "annotations": { "cairn.dev/load-balancer-ips": "10.30.1.9" } } }),
    )
    .await;
    wait_event(&client, "default", "taken", "AllocationFailed", "default/want").await;
    // Pool selection, including a pool that is never auto-assigned.
    create_lb(
        &client,
        "default",
        "pooled",
        80,
        json!({ "metadata": { "annotations": { "cairn.dev/pool": "special" } } }),
    )
    .await;
    let ip = wait_ingress(&client, "default", "pooled", 1).await;
    assert!(ip[0].starts_with("10.30.9."), "{ip:?}");
    // Sharing: same key + disjoint ports share one address; a clash gets its own.
    let share = |key: &str| json!({ "metadata": { "annotations": { "cairn.dev/sharing-key": key } } });
    create_lb(&client, "default", "dns-tcp", 53, share("dns")).await;
    let a = wait_ingress(&client, "default", "dns-tcp", 1).await;
    create_lb(&client, "default", "dns-web", 80, share("dns")).await;
    let b = wait_ingress(&client, "default", "dns-web", 1).await;
    assert_eq!(a, b, "same key, disjoint ports: shared");
    create_lb(&client, "default", "dns-clash", 53, share("dns")).await;
    let c = wait_ingress(&client, "default", "dns-clash", 1).await;
    assert_ne!(a, c, "same key, same port: not shared");
    let mut other = share("other");
    other["metadata"]["annotations"]["cairn.dev/load-balancer-ips"] = json!(a[0]);
    create_lb(&client, "default", "other-key", 8080, other).await;
    wait_event(
        &client,
        "default",
        "other-key",
        "AllocationFailed",
        "different sharing key",
    )
    .await;

    // Class filtering: every Service above was served, the other class was not touched ...
    assert!(!has_finalizer(&client, "classy").await);
    assert!(ingress(&svc_api(&client).get("classy").await.unwrap()).is_empty());
    // ... until a controller for that class runs (its own lease, same cluster).
    start_ccm(
        &cp,
        "ccm-other",
        "cluster-a",
        &store.endpoint,
        &[
            "--load-balancer-class",
            "example.com/other",
            "--lease-name",
            "cairn-ccm-other",
        ],
    );
    let ip = wait_ingress(&client, "default", "classy", 1).await;
    assert!(ip[0].starts_with("10.30.1."), "{ip:?}");
    // Changing the class hands the Service back: released and cleared.
    svc_api(&client)
        .patch(
            "classy",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "type": "ClusterIP", "loadBalancerClass": null } })),
        )
        .await
        .unwrap();
    wait_ingress(&client, "default", "classy", 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_stack_services_follow_family_policy() {
    let Env { cp, client, store } = Env::start("net-ds", json!({
            "network": "net-ds",
            "reuseGraceSeconds": 0,
            "pools": [ { "name": "vip", "purpose": "VIP", "ranges": ["10.60.1.0/28", "fd00:60::10-fd00:60::1f"] } ],
        })).await;
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);
    create_lb(&client, "default", "v4", 80, json!({})).await;
    let v4 = wait_ingress(&client, "default", "v4", 1).await;
    assert!(v4[0].starts_with("10.60.1."), "{v4:?}");
    create_lb(
        &client,
        "default",
        "v6",
        80,
        json!({ "spec": { "ipFamilies": ["IPv6"] } }),
    )
    .await;
    let v6 = wait_ingress(&client, "default", "v6", 1).await;
    assert!(v6[0].starts_with("fd00:60::"), "{v6:?}");
    create_lb(
        &client,
        "default",
        "both",
        80,
        json!({ "spec": { "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6", "IPv4"] } }),
    )
    .await;
    let both = wait_ingress(&client, "default", "both", 2).await;
    assert!(
        both[0].contains(':') && !both[1].contains(':'),
        "ipFamilies order kept: {both:?}"
    );
    create_lb(
        &client,
        "default",
        "prefer",
        80,
        json!({ "spec": { "ipFamilyPolicy": "PreferDualStack" } }),
    )
    .await;
    assert_eq!(wait_ingress(&client, "default", "prefer", 2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn exhausted_pool_leaves_services_pending_until_an_address_is_freed() {
    let Env { cp, client, store } = Env::start(
        "net-x",
        vip_network("net-x", "10.40.1.1-10.40.1.2", "10.40.2.0/24"),
    )
    .await;
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);
    create_lb(&client, "default", "s1", 80, json!({})).await;
    let first = wait_ingress(&client, "default", "s1", 1).await;
    create_lb(&client, "default", "s2", 80, json!({})).await;
    wait_ingress(&client, "default", "s2", 1).await;
    create_lb(&client, "default", "s3", 80, json!({})).await;
    wait_event(&client, "default", "s3", "AllocationFailed", "pool exhausted").await;
    assert!(ingress(&svc_api(&client).get("s3").await.unwrap()).is_empty());
    delete_and_wait_gone(&client, "default", "s1").await;
    // The freed address goes to the pending Service without any change to it.
    assert_eq!(wait_ingress(&client, "default", "s3", 1).await, first);
}

#[tokio::test(flavor = "multi_thread")]
async fn existing_ingress_ips_are_adopted_on_first_start() {
    let Env { cp, client, store } =
        Env::start("net-m", vip_network("net-m", "10.50.1.0/28", "10.50.2.0/24")).await;
    // Services a previous LB implementation served: one inside the pool, one outside.
    for (name, ip) in [("legacy", "10.50.1.7"), ("stray", "192.0.2.9")] {
        create_lb(&client, "default", name, 80, json!({})).await;
        svc_api(&client)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "loadBalancer": { "ingress": [ { "ip": ip } ] } } })),
            )
            .await
            .unwrap();
    }
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);
    eventually("legacy adopted", ACT, || async {
        let held = store.allocations("cluster-a").await;
        if held.iter().any(|a| a.owner.as_ref().unwrap().name == "legacy") {
            Ok(held)
        } else {
            Err("not yet")
        }
    })
    .await
    .unwrap();
    let held = store.allocations("cluster-a").await;
    let legacy = held
        .iter()
        .find(|a| a.owner.as_ref().unwrap().name == "legacy")
        .unwrap();
    assert_eq!(legacy.addresses, vec!["10.50.1.7"], "kept its address");
    assert_eq!(
        ingress(&svc_api(&client).get("legacy").await.unwrap()),
        vec!["10.50.1.7"]
    );
    // Outside the pool: cannot be kept; a pool address replaces it, with an event.
    wait_event(&client, "default", "stray", "AdoptionRefused", "192.0.2.9").await;
    eventually("stray re-addressed", ACT, || async {
        let ips = ingress(&svc_api(&client).get("stray").await.map_err(|e| e.to_string())?);
        if ips.len() == 1 && ips[0].starts_with("10.50.1.") {
            Ok(())
        } else {
            Err(format!("{ips:?}"))
        }
    })
    .await
    .unwrap();
}
