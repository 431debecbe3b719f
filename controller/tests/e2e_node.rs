//! Cloud node initialisation on a real apiserver: node-pool address, providerID, addresses,
//! taint removal; release on deletion.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use cairn_e2e::eventually;
use common::*;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::DeleteParams};

#[tokio::test(flavor = "multi_thread")]
async fn tainted_nodes_are_initialised_and_released_on_delete() {
    let Env { cp, client, store } = Env::start(
        "net-n",
        vip_network("net-n", "10.70.1.0/28", "10.70.2.10-10.70.2.20"),
    )
    .await;
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);
    create_node(&client, "worker-1", BTreeMap::new()).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = eventually("worker-1 initialised", ACT, || {
        let nodes = nodes.clone();
        async move {
            let n = nodes.get("worker-1").await.map_err(|e| e.to_string())?;
            // Only the cloud taint: admission adds node.kubernetes.io/not-ready on its own.
            let tainted = n.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| {
                t.iter()
                    .any(|t| t.key == "node.cloudprovider.kubernetes.io/uninitialized")
            });
            if tainted {
                Err("still tainted".to_string())
            } else {
                Ok(n)
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        node.spec.as_ref().unwrap().provider_id.as_deref(),
        Some("cairn://cluster-a/worker-1")
    );
    let addrs = node.status.as_ref().unwrap().addresses.clone().unwrap();
    assert!(
        addrs
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "10.70.2.10"),
        "{addrs:?}"
    );
    assert!(
        addrs
            .iter()
            .any(|a| a.type_ == "Hostname" && a.address == "worker-1")
    );
    assert!(
        node.metadata
            .finalizers
            .clone()
            .unwrap()
            .contains(&"cairn.dev/node-ip-release".to_string())
    );
    let held = store.allocations("cluster-a").await;
    assert!(
        held.iter()
            .any(|a| a.addresses == vec!["10.70.2.10"] && a.pool == "nodes")
    );

    // A Node without the taint is not ours.
    let mut plain: Node =
        serde_json::from_value(serde_json::json!({ "metadata": { "name": "plain" } })).unwrap();
    plain.spec = None;
    nodes.create(&Default::default(), &plain).await.unwrap();

    nodes.delete("worker-1", &DeleteParams::default()).await.unwrap();
    eventually("worker-1 gone", ACT, || {
        let nodes = nodes.clone();
        async move {
            match nodes.get_opt("worker-1").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        }
    })
    .await
    .unwrap();
    let held = store.allocations("cluster-a").await;
    assert!(
        !held.iter().any(|a| a.addresses == vec!["10.70.2.10"]),
        "released: {held:?}"
    );
    assert!(
        nodes
            .get("plain")
            .await
            .unwrap()
            .metadata
            .finalizers
            .unwrap_or_default()
            .is_empty()
    );
}
