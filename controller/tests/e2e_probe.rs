//! Conflict probing end to end: a real kube-apiserver + etcd, a real `cairn-ipam` and a real
//! `cairn-ccm` probing on one end of a veth pair whose other end, in a network namespace the
//! test makes, is a "squatter" holding addresses of the VIP pool (documentation addresses
//! only; nothing leaves the pair).
//!
//! Needs root (namespaces, veth, packet sockets); fails saying so otherwise, as CI runs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cairn_e2e::{eventually, netns::Squatter};
use cairn_proto::v1 as pb;
use common::*;
use kube::Api;
use serde_json::json;

/// Allocations of `cluster` held by unknown-host records.
async fn unknown_hosts(store: &Store, cluster: &str) -> Vec<pb::Allocation> {
    store
        .allocations(cluster)
        .await
        .into_iter()
        .filter(|a| a.owner.as_ref().unwrap().kind == pb::OwnerKind::UnknownHost as i32)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vip_a_host_already_answers_for_is_reported_and_the_service_gets_the_next() {
    let sq = Squatter::new(&["192.0.2.1/24", "192.0.2.3/24", "2001:db8::1/64"]);
    let mac = sq.far_mac();
    let Env { cp, client, store } = Env::start(
        "net-p",
        json!({
            "network": "net-p",
            "reuseGraceSeconds": 0,
            "pools": [ { "name": "vip", "purpose": "VIP",
                         "ranges": ["192.0.2.1-192.0.2.6", "2001:db8::1-2001:db8::4"] } ],
            "apiServerVIP": {},
            "conflictProbe": { "interface": sq.near(), "timeoutMilliseconds": 300 },
        }),
    )
    .await;
    // Inline probing only: nothing probes ahead of the Services here.
    start_ccm(
        &cp,
        "ccm",
        "cluster-a",
        &store.endpoint,
        &["--probe-ahead-interval", "0"],
    );

    // The API-server VIP: the squatter answers for .1, so the ClusterNetwork shows .2.
    let api: Api<ClusterNetwork> = Api::all(client.clone());
    eventually("the API-server VIP", ACT, || {
        let api = api.clone();
        async move {
            let cn = api.get("net-p").await.map_err(|e| e.to_string())?;
            match cn.status.and_then(|s| s.api_server_vip) {
                Some(v) if v == "192.0.2.2" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    let note = wait_event(&client, "default", "net-p", "AddressInUse", "192.0.2.1").await;
    assert!(note.contains(&mac), "the event names the MAC {mac}: {note}");

    // IPv4: the squatter answers for .3, so the Service is published with .4.
    create_lb(&client, "default", "web", 80, json!({})).await;
    assert_eq!(
        wait_ingress(&client, "default", "web", 1).await,
        vec!["192.0.2.4"]
    );
    let note = wait_event(&client, "default", "web", "AddressInUse", "192.0.2.3").await;
    assert!(note.contains(&mac), "the event names the MAC {mac}: {note}");

    // IPv6 likewise.
    create_lb(
        &client,
        "default",
        "web6",
        80,
        json!({ "spec": { "ipFamilies": ["IPv6"] } }),
    )
    .await;
    assert_eq!(
        wait_ingress(&client, "default", "web6", 1).await,
        vec!["2001:db8::2"]
    );
    let note = wait_event(&client, "default", "web6", "AddressInUse", "2001:db8::1").await;
    assert!(note.contains(&mac), "the event names the MAC {mac}: {note}");

    // The store holds both as in use by an unknown host, with the MAC and the reporter.
    let recs = unknown_hosts(&store, "cluster-a").await;
    let mut held: Vec<(String, String)> = recs
        .iter()
        .map(|a| (a.addresses.join(","), a.owner.as_ref().unwrap().uid.clone()))
        .collect();
    held.sort();
    assert_eq!(
        held,
        vec![
            ("192.0.2.1".to_string(), mac.clone()),
            ("192.0.2.3".to_string(), mac.clone()),
            ("2001:db8::1".to_string(), mac.clone())
        ]
    );

    // Another cluster asking for the squatted address is refused, naming the record.
    let mut c = store.client().await;
    let e = c
        .allocate(pb::AllocateRequest {
            network: "net-p".into(),
            owner: Some(pb::Owner {
                cluster_id: "cluster-b".into(),
                kind: pb::OwnerKind::Service as i32,
                namespace: "default".into(),
                name: "x".into(),
                uid: String::new(),
            }),
            requested_addresses: vec!["192.0.2.1".into()],
            ..Default::default()
        })
        .await
        .expect_err("a squatted address was handed out");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("unknown-host"), "{}", e.message());

    // A free address is probed, nobody answers, it is published.
    create_lb(&client, "default", "api", 80, json!({})).await;
    assert_eq!(
        wait_ingress(&client, "default", "api", 1).await,
        vec!["192.0.2.5"]
    );

    // Usage counts them, in the ClusterNetwork's status too (refreshed on its next reconcile,
    // which a touch triggers now instead of at the periodic resync); metrics name address and
    // MAC.
    api.patch(
        "net-p",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({ "metadata": { "annotations": { "test/touch": "1" } } })),
    )
    .await
    .unwrap();
    eventually("status.usage shows the unknown hosts", ACT, || {
        let api = api.clone();
        async move {
            let cn = api.get("net-p").await.map_err(|e| e.to_string())?;
            let usage = cn.status.unwrap_or_default().usage;
            let unknown: Vec<&str> = usage.iter().map(|u| u.unknown_hosts.as_str()).collect();
            if unknown == ["2", "1"] {
                Ok(())
            } else {
                Err(format!("{usage:?}"))
            }
        }
    })
    .await
    .expect("usage");
    let addr = ccm_metrics_addr(&cp, "ccm").await;
    let (_, body) = http_get(&addr, "/metrics").await.unwrap();
    for a in ["192.0.2.1", "192.0.2.3", "2001:db8::1"] {
        let line = format!(
            "cairn_ccm_address_conflicts_total{{network=\"net-p\",pool=\"vip\",address=\"{a}\",mac=\"{mac}\"}} 1"
        );
        assert!(body.contains(&line), "no {line} in\n{body}");
    }
    assert!(
        body.contains("cairn_ccm_conflict_probes_total{result=\"free\"}"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_probe_that_cannot_run_publishes_nothing_and_says_why() {
    cairn_e2e::netns::require_root("this test");
    let Env { cp, client, store } = Env::start(
        "net-q",
        json!({
            "network": "net-q",
            "reuseGraceSeconds": 0,
            "pools": [ { "name": "vip", "purpose": "VIP", "ranges": ["192.0.2.1-192.0.2.4"] } ],
            "conflictProbe": { "interface": "cairn-nope0" },
        }),
    )
    .await;
    start_ccm(&cp, "ccm", "cluster-a", &store.endpoint, &[]);
    create_lb(&client, "default", "web", 80, json!({})).await;
    let note = wait_event(&client, "default", "web", "ProbeFailed", "cairn-nope0").await;
    assert!(note.contains("spec.conflictProbe"), "{note}");
    // Seen after the failure was reported, so the reconcile that would publish has run.
    let svc: k8s_openapi::api::core::v1::Service = Api::namespaced(client.clone(), "default")
        .get("web")
        .await
        .unwrap();
    assert!(
        ingress(&svc).is_empty(),
        "published unprobed: {:?}",
        ingress(&svc)
    );
}

/// Probing ahead of need: with no Service at all, the squatted addresses are found and
/// recorded (a Warning on the ClusterNetwork names address and MAC), the next addresses are
/// probed free, and a Service then gets one without waiting for a probe.
#[tokio::test(flavor = "multi_thread")]
async fn probing_ahead_records_a_squatter_before_any_service_asks() {
    let sq = Squatter::new(&["192.0.2.1/24", "2001:db8::1/64"]);
    let mac = sq.far_mac();
    let Env { cp, client, store } = Env::start(
        "net-r",
        json!({
            "network": "net-r",
            "reuseGraceSeconds": 0,
            "pools": [ { "name": "vip", "purpose": "VIP",
                         "ranges": ["192.0.2.1-192.0.2.4", "2001:db8::1-2001:db8::4"] } ],
            "conflictProbe": { "interface": sq.near(), "timeoutMilliseconds": 300 },
        }),
    )
    .await;
    start_ccm(
        &cp,
        "ccm",
        "cluster-a",
        &store.endpoint,
        &["--probe-ahead-interval", "1"],
    );
    let recorded = eventually("both squatted addresses recorded", ACT, || {
        let store = &store;
        async move {
            let mut held: Vec<String> = unknown_hosts(store, "cluster-a")
                .await
                .iter()
                .map(|a| format!("{} {}", a.addresses.join(","), a.owner.as_ref().unwrap().uid))
                .collect();
            held.sort();
            if held.len() == 2 {
                Ok(held)
            } else {
                Err(format!("{held:?}"))
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        recorded,
        vec![format!("192.0.2.1 {mac}"), format!("2001:db8::1 {mac}")]
    );
    // Events of one reason on one object form a series (the newest note shows), so this
    // names the MAC and one of the two addresses; the store and the metrics keep each.
    wait_event(&client, "default", "net-r", "AddressInUse", &mac).await;

    // The next address was probed free ahead: the Service gets it without another probe.
    let addr = ccm_metrics_addr(&cp, "ccm").await;
    eventually("the next address probed free ahead", ACT, || {
        let addr = addr.clone();
        async move {
            let (_, body) = http_get(&addr, "/metrics").await.map_err(|e| e.to_string())?;
            let free = body
                .lines()
                .find(|l| l.starts_with("cairn_ccm_conflict_probes_total{result=\"free\"}"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if free >= 2.0 {
                Ok(())
            } else {
                Err(format!("free probes {free}"))
            }
        }
    })
    .await
    .unwrap();
    create_lb(&client, "default", "web", 80, json!({})).await;
    assert_eq!(
        wait_ingress(&client, "default", "web", 1).await,
        vec!["192.0.2.2"]
    );
    let (_, body) = http_get(&addr, "/metrics").await.unwrap();
    assert!(
        body.contains("cairn_ccm_conflict_probes_total{result=\"fresh\"} 1"),
        "the Service's address was probed again:\n{body}"
    );
}
