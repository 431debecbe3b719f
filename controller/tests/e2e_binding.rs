//! The on-prem cloud workflow, on two real control planes with one real store: the cloud
//! operator defines a network once in the store (as the cloud service does over gRPC) and
//! allocates each cluster's API-server VIP at cluster creation; each cluster then only *binds*
//! to that network with a pool-less ClusterNetwork, and gets its API-server VIP (the one the
//! cloud allocated), node IPs and Service VIPs from it — never the same address twice, and
//! never able to change the cloud's definition.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use cairn_ccm::crd::{ClusterNetwork, NetworkMode};
use cairn_e2e::{ControlPlane, eventually};
use cairn_proto::v1 as pb;
use common::*;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};
use serde_json::json;

const NET: &str = "dc1-vlan20";

/// The cloud's definition: what the seed's cloud service creates once per shared network.
fn cloud_network() -> pb::Network {
    pb::Network {
        name: NET.into(),
        prefixes: vec!["10.30.0.0/16".into()],
        gateways: vec!["10.30.0.1".into()],
        dns_servers: vec!["10.30.0.2".into(), "10.30.0.3".into()],
        vlan: 20,
        reuse_grace_seconds: Some(0),
        pools: vec![
            pb::Pool {
                name: "vip".into(),
                purpose: pb::PoolPurpose::Vip as i32,
                ranges: vec!["10.30.1.0-10.30.1.15".into()],
                ..Default::default()
            },
            pb::Pool {
                name: "nodes".into(),
                purpose: pb::PoolPurpose::Node as i32,
                ranges: vec!["10.30.2.0/28".into()],
                ..Default::default()
            },
        ],
        managed_by: "cloud".into(),
        ..Default::default()
    }
}

async fn status_of(client: &Client, name: &str) -> Result<ClusterNetwork, String> {
    let api: Api<ClusterNetwork> = Api::all(client.clone());
    let cn = api.get(name).await.map_err(|e| e.to_string())?;
    let ready = cn.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    if ready {
        Ok(cn)
    } else {
        Err(format!("not Ready: {:?}", cn.status))
    }
}

async fn node_ip(client: &Client, name: String) -> Result<String, String> {
    let api: Api<Node> = Api::all(client.clone());
    let n = api.get(&name).await.map_err(|e| e.to_string())?;
    n.status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .ok_or_else(|| "no InternalIP yet".to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn clusters_bind_to_a_cloud_defined_network_and_never_share_an_address() {
    let planes = ControlPlane::start_many(2).await.expect("two control planes");
    let store = Store::start().await;
    let mut cloud = store.client().await;

    // A ClusterNetwork bound before the cloud defined the network waits, saying why.
    let clients: Vec<Client> = planes.iter().map(|p| p.client().unwrap()).collect();
    let ids = ["cluster-a", "cluster-b"];
    for c in &clients {
        install_crd(c).await;
    }
    create_network(
        &clients[0],
        "shared",
        json!({ "network": NET, "apiServerVIP": {} }),
    )
    .await;
    start_ccm(&planes[0], "ccm", ids[0], &store.endpoint, &[]);
    eventually(
        "NetworkNotFound while the cloud has not defined it",
        ACT,
        || async {
            let api: Api<ClusterNetwork> = Api::all(clients[0].clone());
            let cn = api.get("shared").await.map_err(|e| e.to_string())?;
            let st = cn.status.unwrap_or_default();
            if st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "NetworkNotFound")
                && st.mode == Some(NetworkMode::Bound)
            {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            }
        },
    )
    .await
    .unwrap();
    wait_event(&clients[0], "default", "shared", "NetworkNotFound", NET).await;

    // The cloud operator defines the network, and allocates cluster-b's API-server VIP at
    // cluster creation (before cluster-b's controller exists).
    let created = cloud
        .upsert_network(pb::UpsertNetworkRequest {
            network: Some(cloud_network()),
            ..Default::default()
        })
        .await
        .expect("cloud defines the network")
        .into_inner()
        .network
        .unwrap();
    let b_vip = cloud
        .allocate(pb::AllocateRequest {
            network: NET.into(),
            owner: Some(pb::Owner {
                cluster_id: ids[1].into(),
                kind: pb::OwnerKind::ApiServer as i32,
                name: cairn_ccm::API_SERVER_OWNER.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("cloud allocates cluster-b's API-server VIP")
        .into_inner()
        .allocation
        .unwrap()
        .addresses[0]
        .clone();

    create_network(
        &clients[1],
        "shared",
        json!({ "network": NET, "apiServerVIP": {} }),
    )
    .await;
    start_ccm(&planes[1], "ccm", ids[1], &store.endpoint, &[]);

    // Both bind: status mirrors the cloud's definition; each has an API-server VIP.
    let mut api_vips = Vec::new();
    for c in &clients {
        let cn = eventually("bound and Ready", ACT, || status_of(c, "shared"))
            .await
            .unwrap();
        let st = cn.status.unwrap();
        assert_eq!(st.mode, Some(NetworkMode::Bound));
        let d = st.definition.expect("the store's definition in status");
        assert_eq!(d.prefixes, ["10.30.0.0/16"]);
        assert_eq!(d.gateways, ["10.30.0.1"]);
        assert_eq!(d.dns_servers, ["10.30.0.2", "10.30.0.3"]);
        assert_eq!(d.vlan, 20);
        assert_eq!(d.managed_by, "cloud");
        assert_eq!(
            d.pools
                .iter()
                .map(|p| (p.name.as_str(), p.purpose.as_str()))
                .collect::<Vec<_>>(),
            [("vip", "VIP"), ("nodes", "NODE")]
        );
        assert_eq!(st.store_version, Some(created.version));
        assert!(
            st.usage.iter().any(|u| u.pool == "vip" && u.total == "16"),
            "{:?}",
            st.usage
        );
        api_vips.push(st.api_server_vip.expect("API-server VIP"));
    }
    assert_eq!(
        api_vips[1], b_vip,
        "cluster-b found the VIP the cloud allocated for it"
    );
    assert_ne!(api_vips[0], api_vips[1]);

    // Nodes and Services on both clusters, drawn from the cloud's pools.
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut claim = |ip: String, who: String| {
        if let Some(prev) = seen.insert(ip.clone(), who.clone()) {
            panic!("{ip} handed to both {prev} and {who}");
        }
    };
    claim(api_vips[0].clone(), "cluster-a API server".into());
    claim(api_vips[1].clone(), "cluster-b API server".into());
    for (i, c) in clients.iter().enumerate() {
        for n in 0..3 {
            create_node(c, &format!("node-{n}"), BTreeMap::new()).await;
        }
        for s in 0..3 {
            create_lb(c, "default", &format!("svc-{s}"), 443, json!({})).await;
        }
        for n in 0..3 {
            let ip = eventually("node address", ACT, || node_ip(c, format!("node-{n}")))
                .await
                .unwrap();
            assert!(ip.starts_with("10.30.2."), "{ip}");
            claim(ip, format!("{} node-{n}", ids[i]));
        }
        for s in 0..3 {
            let ips = wait_ingress(c, "default", &format!("svc-{s}"), 1).await;
            assert!(ips[0].starts_with("10.30.1."), "{ips:?}");
            claim(ips[0].clone(), format!("{} svc-{s}", ids[i]));
        }
    }
    // The store agrees: each address has exactly the owner the cluster shows.
    let held: BTreeSet<String> = store
        .allocations(ids[0])
        .await
        .into_iter()
        .chain(store.allocations(ids[1]).await)
        .flat_map(|a| a.addresses)
        .collect();
    assert_eq!(held, seen.keys().cloned().collect::<BTreeSet<_>>());

    // A cluster cannot change the cloud's network: giving its ClusterNetwork pools (making it
    // managed) is a Conflict, and the store's definition stays as the cloud made it.
    let api: Api<ClusterNetwork> = Api::all(clients[0].clone());
    api.patch(
        "shared",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({ "spec": {
            "pools": [{ "name": "vip", "purpose": "VIP", "ranges": ["10.30.9.0/24"] }],
        } })),
    )
    .await
    .expect("add pools");
    eventually("the takeover is a Conflict", ACT, || async {
        let cn = api.get("shared").await.map_err(|e| e.to_string())?;
        let conds = cn.status.unwrap_or_default().conditions;
        if conds
            .iter()
            .any(|c| c.type_ == "Conflict" && c.status == "True" && c.reason == "ManagedElsewhere")
        {
            Ok(())
        } else {
            Err(format!("{conds:?}"))
        }
    })
    .await
    .unwrap();
    let now = cloud
        .get_network(pb::GetNetworkRequest { name: NET.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.version, created.version, "the cloud's definition changed");
    assert_eq!(now.pools, created.pools);
}
