//! LoadBalancer Services and ClusterNetworks on a real kube-apiserver + etcd, with a real
//! `cairn-ipam` and `cairn-ccm` process.

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
            let ready = st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            if ready && st.observed_generation == cn.metadata.generation { Ok(cn) } else { Err(format!("status {st:?}")) }
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
    assert_eq!(st.api_server_vip.as_deref(), Some("10.20.1.1"), "first VIP of the pool");
    assert_eq!(st.vip_usage.as_deref(), Some("1/14"));
    assert_eq!(st.node_usage.as_deref(), Some("0/254"));
    assert!(st.conditions.iter().any(|c| c.type_ == "Conflict" && c.status == "False"));

    // A LoadBalancer Service gets a VIP, an event, the result annotation and the finalizer.
    create_lb(&client, "default", "web", 80, json!({})).await;
    let ips = wait_ingress(&client, "default", "web", 1).await;
    assert_eq!(ips, vec!["10.20.1.2"]);
    wait_event(&client, "default", "web", "Allocated", "10.20.1.2").await;
    let svc: Service = Api::namespaced(client.clone(), "default").get("web").await.unwrap();
    assert_eq!(svc.metadata.annotations.unwrap().get("cairn.dev/allocated-from").map(String::as_str), Some("net-a/vip"));
    assert!(svc.metadata.finalizers.unwrap().contains(&"cairn.dev/vip-release".to_string()));
    let held = store.allocations("cluster-a").await;
    assert!(held.iter().any(|a| a.addresses == vec!["10.20.1.2"] && a.owner.as_ref().unwrap().name == "web"));

    // Usage reflects it.
    let api: Api<ClusterNetwork> = Api::all(client.clone());
    eventually("usage 2/14", ACT, || {
        let api = api.clone();
        async move {
            let u = api.get("net-a").await.map_err(|e| e.to_string())?.status.and_then(|s| s.vip_usage);
            if u.as_deref() == Some("2/14") { Ok(()) } else { Err(format!("{u:?}")) }
        }
    })
    .await
    .unwrap();

    // Delete → Release → finalizer removed → the store no longer holds it.
    delete_and_wait_gone(&client, "default", "web").await;
    let held = store.allocations("cluster-a").await;
    assert!(!held.iter().any(|a| a.owner.as_ref().unwrap().name == "web"), "{held:?}");

    // Type change releases too.
    create_lb(&client, "default", "typed", 80, json!({})).await;
    wait_ingress(&client, "default", "typed", 1).await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    svcs.patch("typed", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "type": "ClusterIP" } }))).await.unwrap();
    wait_ingress(&client, "default", "typed", 0).await;
    eventually("finalizer dropped after type change", ACT, || {
        let svcs = svcs.clone();
        async move {
            let s = svcs.get("typed").await.map_err(|e| e.to_string())?;
            if s.metadata.finalizers.unwrap_or_default().is_empty() { Ok(()) } else { Err("finalizer still there".to_string()) }
        }
    })
    .await
    .unwrap();
    assert!(!store.allocations("cluster-a").await.iter().any(|a| a.owner.as_ref().unwrap().name == "typed"));
}
