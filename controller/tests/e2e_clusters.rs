//! The scenarios Cairn exists for, on real apiservers with a real store: two clusters sharing
//! one network never get the same VIP; a controller killed with SIGKILL mid-burst loses and
//! changes nothing; two replicas hand over leadership.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use cairn_e2e::{ControlPlane, eventually};
use common::*;
use futures::{StreamExt, stream};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Service};
use kube::{Api, Client, api::ListParams};
use serde_json::json;

fn in_range(ip: &str, lo: u8, hi: u8) -> bool {
    ip.strip_prefix("10.20.1.")
        .and_then(|x| x.parse::<u8>().ok())
        .is_some_and(|x| (lo..=hi).contains(&x))
}

async fn ingress_map(client: &Client) -> BTreeMap<String, Vec<String>> {
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer"))
        .map(|s| (key(&s), ingress(&s)))
        .collect()
}

/// The seed's failure, reproduced and refuted: two clusters, one network object, one VIP pool
/// of 16 addresses, workloads on different ports.
/// Where the two clusters' controllers find the store.
enum AnyStore {
    One(Store),
    /// Three replicas on etcd; the leader is killed -9 between the two clusters' bursts.
    Ha(HaStore),
}

impl AnyStore {
    fn endpoint(&self) -> String {
        match self {
            AnyStore::One(s) => s.endpoint.clone(),
            AnyStore::Ha(s) => s.endpoint(),
        }
    }
    fn pki(&self) -> Option<&Pki> {
        match self {
            AnyStore::One(s) => s.pki.as_ref(),
            AnyStore::Ha(_) => None,
        }
    }
    async fn allocations(&self, cluster: &str) -> Vec<cairn_proto::v1::Allocation> {
        match self {
            AnyStore::One(s) => s.allocations(cluster).await,
            AnyStore::Ha(s) => s.allocations(cluster).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_on_one_network_never_share_a_vip() {
    two_clusters(AnyStore::One(Store::start().await)).await;
}

/// The seed scenario on an HA store, with the leading replica killed -9 between the two
/// clusters' bursts: the controllers, given all three replicas, follow the new leader on their
/// own and nothing assigned before the kill moves.
#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_on_an_ha_store_through_a_leader_kill() {
    two_clusters(AnyStore::Ha(HaStore::start().await)).await;
}

/// The same, with the store serving mutual TLS only and each controller presenting its own
/// cluster's certificate (`spiffe://cairn.local/cluster/<id>`), as the manifests deploy it.
#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_over_mtls_each_with_its_own_identity() {
    let store = Store::start_tls(Pki::new(&["cluster-a", "cluster-b"])).await;
    two_clusters(AnyStore::One(store)).await;
}

async fn two_clusters(mut store: AnyStore) {
    let planes = ControlPlane::start_many(2).await.expect("two control planes");
    let spec = vip_network("net-a", "10.20.1.0-10.20.1.15", "10.20.2.0/24");
    let clients: Vec<Client> = planes.iter().map(|p| p.client().unwrap()).collect();
    for (i, (cp, c)) in planes.iter().zip(&clients).enumerate() {
        install_crd(c).await;
        create_network(c, "net-a", spec.clone()).await;
        let cluster = format!("cluster-{}", ["a", "b"][i]);
        let tls = store.pki().map(|p| p.ccm_flags(&cluster)).unwrap_or_default();
        let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
        start_ccm(cp, "ccm", &cluster, &store.endpoint(), &tls);
    }
    // A fills ten, then B asks for ten more: 16 addresses for 20 Services.
    for i in 0..10 {
        create_lb(&clients[0], "default", &format!("a-{i}"), 80, json!({})).await;
    }
    for i in 0..10 {
        wait_ingress(&clients[0], "default", &format!("a-{i}"), 1).await;
    }
    if let AnyStore::Ha(ha) = &mut store {
        ha.kill_leader().await;
    }
    for i in 0..10 {
        create_lb(&clients[1], "default", &format!("b-{i}"), 8080, json!({})).await;
    }
    let (a, b) = eventually("16 VIPs handed out, 4 Services pending", ACT, || async {
        let a = ingress_map(&clients[0]).await;
        let b = ingress_map(&clients[1]).await;
        let given = a.values().chain(b.values()).filter(|v| !v.is_empty()).count();
        if given == 16 {
            Ok((a, b))
        } else {
            Err(format!("{given} assigned"))
        }
    })
    .await
    .unwrap();
    let all: Vec<&String> = a.values().chain(b.values()).flatten().collect();
    let unique: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        unique.len(),
        "a VIP was handed to two Services: A {a:?} B {b:?}"
    );
    assert!(
        all.iter().all(|ip| in_range(ip, 0, 15)),
        "outside the pool: {all:?}"
    );
    let pending: Vec<&String> = b.iter().filter(|(_, v)| v.is_empty()).map(|(k, _)| k).collect();
    assert_eq!(pending.len(), 4, "{b:?}");
    for p in &pending {
        let name = p.trim_start_matches("default/");
        wait_event(&clients[1], "default", name, "AllocationFailed", "pool exhausted").await;
    }
    // The store agrees: every address has exactly one owner cluster.
    let held_a = store.allocations("cluster-a").await;
    let held_b = store.allocations("cluster-b").await;
    let ips_a: BTreeSet<String> = held_a.iter().flat_map(|x| x.addresses.clone()).collect();
    let ips_b: BTreeSet<String> = held_b.iter().flat_map(|x| x.addresses.clone()).collect();
    assert!(ips_a.is_disjoint(&ips_b), "A {ips_a:?} B {ips_b:?}");
    assert_eq!(ips_a.len() + ips_b.len(), 16);

    // One of A's Services goes away: a pending one in B gets its address.
    let freed = a["default/a-3"][0].clone();
    delete_and_wait_gone(&clients[0], "default", "a-3").await;
    let b2 = eventually("a pending Service in B takes the freed VIP", ACT, || async {
        let b = ingress_map(&clients[1]).await;
        if b.values().any(|v| v == &vec![freed.clone()]) {
            Ok(b)
        } else {
            Err(format!("{b:?}"))
        }
    })
    .await
    .unwrap();
    assert_eq!(b2.values().filter(|v| v.is_empty()).count(), 3);
    // Nobody else moved.
    for (k, v) in &b {
        if !v.is_empty() {
            assert_eq!(&b2[k], v, "{k} moved");
        }
    }
    let a2 = ingress_map(&clients[0]).await;
    for (k, v) in &a2 {
        assert_eq!(&a[k], v, "{k} moved");
    }
}

/// SIGKILL of the controller in the middle of a burst of 200 Services: after a restart every
/// Service is assigned, nothing assigned before the kill changed, nothing leaked.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_burst_changes_and_leaks_nothing() {
    let Env { cp, client, store } =
        Env::start("net-k", vip_network("net-k", "10.80.0.0/23", "10.80.2.0/24")).await;
    let args = ["--leader-elect", "false", "--concurrency", "8"];
    start_ccm(&cp, "ccm", "cluster-k", &store.endpoint, &args);

    let creator = {
        let client = client.clone();
        tokio::spawn(async move {
            stream::iter(0..200)
                .for_each_concurrent(8, |i| {
                    let client = client.clone();
                    async move {
                        create_lb(&client, "default", &format!("burst-{i}"), 80, json!({})).await;
                    }
                })
                .await;
        })
    };
    // Kill once the controller is visibly mid-way.
    let before = eventually("some Services assigned", ACT, || async {
        let m = ingress_map(&client).await;
        let n = m.values().filter(|v| !v.is_empty()).count();
        if n >= 40 {
            Ok(())
        } else {
            Err(format!("{n} assigned"))
        }
    })
    .await;
    before.unwrap();
    assert!(cp.kill("ccm"));
    // What was visible at the kill must never change.
    let seen: BTreeMap<String, Vec<String>> = ingress_map(&client)
        .await
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    assert!(seen.len() < 200, "the kill came too late to test anything");
    creator.await.unwrap();
    start_ccm(&cp, "ccm-restarted", "cluster-k", &store.endpoint, &args);
    let done = eventually("all 200 assigned", Duration::from_secs(180), || async {
        let m = ingress_map(&client).await;
        let n = m.values().filter(|v| v.len() == 1).count();
        if n == 200 {
            Ok(m)
        } else {
            Err(format!("{n} assigned"))
        }
    })
    .await
    .unwrap();
    for (k, v) in &seen {
        assert_eq!(&done[k], v, "{k} changed across the kill");
    }
    let ips: BTreeSet<&String> = done.values().flatten().collect();
    assert_eq!(ips.len(), 200, "duplicates");
    // The store holds exactly one allocation per Service, with the same address.
    let held = store.allocations("cluster-k").await;
    assert_eq!(held.len(), 200, "leaked or missing allocations");
    for a in &held {
        let o = a.owner.as_ref().unwrap();
        assert_eq!(done[&format!("{}/{}", o.namespace, o.name)], a.addresses);
    }
}

/// Two replicas: one leads (holds the Lease); SIGKILL it and the other takes over.
#[tokio::test(flavor = "multi_thread")]
async fn leader_hand_over_between_two_replicas() {
    let Env { cp, client, store } =
        Env::start("net-l", vip_network("net-l", "10.90.1.0/28", "10.90.2.0/24")).await;
    let args = ["--lease-duration", "4"];
    start_ccm(&cp, "ccm-1", "cluster-l", &store.endpoint, &args);
    start_ccm(&cp, "ccm-2", "cluster-l", &store.endpoint, &args);
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = || async {
        let l = leases.get("cairn-ccm").await.map_err(|e| e.to_string())?;
        l.spec
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty())
            .ok_or_else(|| "no holder".to_string())
    };
    let first = eventually("a leader", ACT, holder).await.unwrap();
    create_lb(&client, "default", "one", 80, json!({})).await;
    let one = wait_ingress(&client, "default", "one", 1).await;
    assert!(cp.kill(&first));
    let other = if first == "ccm-1" { "ccm-2" } else { "ccm-1" };
    let second = eventually("the standby leads", ACT, || async {
        let h = holder().await?;
        if h == other {
            Ok(h)
        } else {
            Err(format!("holder {h}"))
        }
    })
    .await
    .unwrap();
    assert_eq!(second, other);
    create_lb(&client, "default", "two", 80, json!({})).await;
    let two = wait_ingress(&client, "default", "two", 1).await;
    assert_ne!(one, two);
    assert_eq!(
        wait_ingress(&client, "default", "one", 1).await,
        one,
        "hand-over moved nothing"
    );
}

/// A second cluster applying a different definition of a network the first one manages gets
/// `Conflict=True` and changes nothing in the store; so does a network overlapping another.
#[tokio::test(flavor = "multi_thread")]
async fn conflicting_definitions_are_reported_not_applied() {
    let planes = ControlPlane::start_many(2).await.expect("two control planes");
    let store = Store::start().await;
    let clients: Vec<Client> = planes.iter().map(|p| p.client().unwrap()).collect();
    for (i, (cp, c)) in planes.iter().zip(&clients).enumerate() {
        install_crd(c).await;
        start_ccm(
            cp,
            "ccm",
            &format!("cluster-{}", ["a", "b"][i]),
            &store.endpoint,
            &[],
        );
    }
    create_network(
        &clients[0],
        "net-c",
        vip_network("net-c", "10.21.1.0/28", "10.21.2.0/24"),
    )
    .await;
    let cond = |c: Client, name: &'static str, t: &'static str, want: &'static str| async move {
        let api: Api<ClusterNetwork> = Api::all(c);
        eventually(&format!("{name}: {t}={want}"), ACT, || {
            let api = api.clone();
            async move {
                let cn = api.get(name).await.map_err(|e| e.to_string())?;
                let conds = cn.status.unwrap_or_default().conditions;
                conds
                    .iter()
                    .find(|c| c.type_ == t && c.status == want)
                    .map(|c| c.message.clone())
                    .ok_or_else(|| format!("{conds:?}"))
            }
        })
        .await
        .unwrap()
    };
    cond(clients[0].clone(), "net-c", "Ready", "True").await;
    // B: same network name, another pool.
    create_network(
        &clients[1],
        "net-c",
        vip_network("net-c", "10.21.1.0/27", "10.21.2.0/24"),
    )
    .await;
    let msg = cond(clients[1].clone(), "net-c", "Conflict", "True").await;
    assert!(msg.contains("cluster/cluster-a"), "{msg}");
    cond(clients[1].clone(), "net-c", "Ready", "False").await;
    let mut c = store.client().await;
    let stored = c
        .get_network(cairn_proto::v1::GetNetworkRequest { name: "net-c".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stored.pools[0].ranges,
        vec!["10.21.1.0/28"],
        "A's definition stands"
    );
    // B: another network overlapping net-c.
    create_network(
        &clients[1],
        "net-d",
        vip_network("net-d", "10.21.1.8/29", "10.22.2.0/24"),
    )
    .await;
    let msg = cond(clients[1].clone(), "net-d", "Conflict", "True").await;
    assert!(msg.contains("net-c") && msg.contains("net-d"), "{msg}");
}
