//! Tests of [`super::build`] and its helpers; `pub(crate)` so `render`'s tests reuse the fixtures.

#![allow(clippy::unwrap_used)]

use super::*;
use serde_json::json;

pub(crate) fn node(name: &str, ip: &str, ready: bool, labels: serde_json::Value) -> Arc<Node> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": { "name": name, "labels": labels },
            "spec": {},
            "status": {
                "addresses": [ { "type": "Hostname", "address": name }, { "type": "InternalIP", "address": ip } ],
                "conditions": [ { "type": "Ready", "status": if ready { "True" } else { "False" } } ],
            },
        }))
        .unwrap(),
    )
}

pub(crate) fn lb(
    ns: &str,
    name: &str,
    created: &str,
    ips: &[&str],
    ports: serde_json::Value,
    extra: serde_json::Value,
) -> Arc<Service> {
    let mut v = json!({
        "metadata": { "name": name, "namespace": ns, "creationTimestamp": created },
        "spec": { "type": "LoadBalancer", "ports": ports },
        "status": { "loadBalancer": { "ingress": ips.iter().map(|ip| json!({ "ip": ip })).collect::<Vec<_>>() } },
    });
    if let (Some(spec), Some(e)) = (v["spec"].as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            spec.insert(k.clone(), x.clone());
        }
    }
    Arc::new(serde_json::from_value(v).unwrap())
}

pub(crate) fn slice(ns: &str, svc: &str, eps: &[(&str, Option<bool>)]) -> Arc<EndpointSlice> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": { "name": format!("{svc}-x"), "namespace": ns, "labels": { SERVICE_NAME_LABEL: svc } },
            "addressType": "IPv4",
            "endpoints": eps.iter().map(|(n, ready)| json!({
                "addresses": ["10.244.0.9"],
                "nodeName": n,
                "conditions": { "ready": ready },
            })).collect::<Vec<_>>(),
        }))
        .unwrap(),
    )
}

fn run(
    services: &[Arc<Service>],
    nodes: &[Arc<Node>],
    slices: &[Arc<EndpointSlice>],
    api: &ApiServer,
) -> (LbConfig, Vec<Warning>) {
    build(
        &Inputs {
            services,
            nodes,
            slices,
            class: None,
            api_server: api,
        },
        Settings::default(),
    )
}

fn no_api() -> ApiServer {
    ApiServer {
        vips: vec![],
        port: 6443,
        backend_port: 6443,
    }
}

#[test]
fn node_eligibility() {
    assert!(lb_eligible(&node("a", "10.0.0.1", true, json!({}))));
    assert!(!lb_eligible(&node("a", "10.0.0.1", false, json!({}))));
    assert!(!lb_eligible(&node(
        "a",
        "10.0.0.1",
        true,
        json!({ EXCLUDE_LABEL: "" })
    )));
    let mut n = (*node("a", "10.0.0.1", true, json!({}))).clone();
    n.spec.as_mut().unwrap().unschedulable = Some(true);
    assert!(!lb_eligible(&n));
    let mut n = (*node("a", "10.0.0.1", true, json!({}))).clone();
    n.spec.as_mut().unwrap().taints = Some(vec![k8s_openapi::api::core::v1::Taint {
        key: UNINITIALIZED_TAINT.into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    }]);
    assert!(!lb_eligible(&n));
    assert!(api_server_eligible(&node(
        "cp",
        "10.0.0.1",
        true,
        json!({ CONTROL_PLANE_LABEL: "" })
    )));
    assert!(!api_server_eligible(&node("w", "10.0.0.1", true, json!({}))));
}

#[test]
fn ports_protocols_and_conflicts() {
    let services = vec![
        lb(
            "default",
            "web",
            "2024-01-01T00:00:00Z",
            &["10.20.1.2"],
            json!([
                { "port": 80, "protocol": "TCP", "nodePort": 30080 },
                { "port": 53, "protocol": "UDP", "nodePort": 30053 },
                { "port": 81, "protocol": "TCP" },
            ]),
            json!({}),
        ),
        // Younger, same VIP:port (a stale status): loses.
        lb(
            "default",
            "copy",
            "2024-02-01T00:00:00Z",
            &["10.20.1.2"],
            json!([{ "port": 80, "nodePort": 30081 }]),
            json!({}),
        ),
        // Another class: not ours.
        lb(
            "default",
            "other",
            "2024-01-01T00:00:00Z",
            &["10.20.1.9"],
            json!([{ "port": 80, "nodePort": 30082 }]),
            json!({ "loadBalancerClass": "x" }),
        ),
    ];
    let nodes = vec![node("n1", "10.20.2.1", true, json!({}))];
    let (cfg, warnings) = run(&services, &nodes, &[], &no_api());
    let names: Vec<_> = cfg.proxies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, vec!["svc:default:web:80"]);
    let reasons: Vec<_> = warnings
        .iter()
        .map(|w| (w.owner.as_ref().unwrap().name.as_str(), w.reason))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("copy", "VIPConflict"),
            ("web", "NoNodePort"),
            ("web", "UnsupportedProtocol")
        ]
    );
}

#[test]
fn local_policy_follows_ready_endpoints() {
    let services = vec![lb(
        "default",
        "loc",
        "2024-01-01T00:00:00Z",
        &["10.20.1.3"],
        json!([{ "port": 80, "nodePort": 30080 }]),
        json!({ "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000 }),
    )];
    let nodes = vec![
        node("n1", "10.20.2.1", true, json!({})),
        node("n2", "10.20.2.2", true, json!({})),
        node("n3", "10.20.2.3", false, json!({})),
    ];
    let slices = vec![slice(
        "default",
        "loc",
        &[("n2", Some(true)), ("n1", Some(false)), ("n3", None)],
    )];
    let (cfg, _) = run(&services, &nodes, &slices, &no_api());
    let p = &cfg.proxies[0];
    assert_eq!(
        p.check,
        Check::Http {
            path: "/healthz",
            port: 32000
        }
    );
    let names: Vec<_> = p.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["n2"], "n1 not ready endpoint, n3 node not ready");
}

#[test]
fn api_server_wins_and_family_is_preferred() {
    let api = ApiServer {
        vips: vec!["10.20.1.1".parse().unwrap()],
        port: 6443,
        backend_port: 6443,
    };
    let services = vec![lb(
        "default",
        "grab",
        "2024-01-01T00:00:00Z",
        &["10.20.1.1", "fd00::1"],
        json!([{ "port": 6443, "nodePort": 30443 }]),
        json!({}),
    )];
    let mut dual = (*node("cp", "10.20.2.9", true, json!({ CONTROL_PLANE_LABEL: "" }))).clone();
    dual.status
        .as_mut()
        .unwrap()
        .addresses
        .as_mut()
        .unwrap()
        .push(k8s_openapi::api::core::v1::NodeAddress {
            type_: "InternalIP".into(),
            address: "fd00:2::9".into(),
        });
    let nodes = vec![Arc::new(dual)];
    let (cfg, warnings) = run(&services, &nodes, &[], &api);
    assert_eq!(cfg.proxies[0].name, API_SERVER_PROXY);
    assert_eq!(cfg.proxies[0].servers[0].addr, "10.20.2.9:6443".parse().unwrap());
    // The Service keeps only its IPv6 VIP, which picks the node's IPv6 address.
    let svc = &cfg.proxies[1];
    assert_eq!(svc.binds, vec!["[fd00::1]:6443".parse().unwrap()]);
    assert_eq!(svc.servers[0].addr, "[fd00:2::9]:30443".parse().unwrap());
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].reason, "VIPConflict");
}

#[test]
fn source_ranges_are_an_allow_list() {
    let mk = |ranges: serde_json::Value| {
        let services = vec![lb(
            "default",
            "s",
            "2024-01-01T00:00:00Z",
            &["10.20.1.4"],
            json!([{ "port": 80, "nodePort": 30080 }]),
            json!({ "loadBalancerSourceRanges": ranges }),
        )];
        let (cfg, w) = run(&services, &[], &[], &no_api());
        (cfg.proxies[0].source_ranges.clone(), w.len())
    };
    assert_eq!(mk(json!([])), (None, 0));
    assert_eq!(
        mk(json!(["192.168.0.0/16", " 10.0.0.0/8", "fd00::/8", "10.0.0.0/8"])),
        (
            Some(vec![
                "10.0.0.0/8".to_string(),
                "192.168.0.0/16".into(),
                "fd00::/8".into()
            ]),
            0
        )
    );
    assert_eq!(mk(json!(["nope", "10.0.0.0/33"])), (Some(vec![]), 2));
}

#[test]
fn the_legacy_source_ranges_annotation_is_honoured_and_the_field_wins() {
    let mk = |annotation: &str, field: serde_json::Value| {
        let mut s = (*lb(
            "default",
            "s",
            "2024-01-01T00:00:00Z",
            &["10.20.1.4"],
            json!([{ "port": 80, "nodePort": 30080 }]),
            json!({ "loadBalancerSourceRanges": field }),
        ))
        .clone();
        s.metadata.annotations = Some(
            [(LEGACY_SOURCE_RANGES.to_string(), annotation.to_string())]
                .into_iter()
                .collect(),
        );
        let (cfg, w) = run(&[Arc::new(s)], &[], &[], &no_api());
        (cfg.proxies[0].source_ranges.clone(), w)
    };
    // Alone, the annotation restricts the Service (it used to be ignored: open to everyone).
    let (ranges, w) = mk("10.1.0.0/16, 192.168.7.0/24", json!([]));
    assert_eq!(
        ranges,
        Some(vec!["10.1.0.0/16".to_string(), "192.168.7.0/24".into()])
    );
    assert!(w.is_empty(), "{w:?}");
    // The field, when set, wins, as in Kubernetes.
    let (ranges, _) = mk("10.1.0.0/16", json!(["172.16.0.0/12"]));
    assert_eq!(ranges, Some(vec!["172.16.0.0/12".to_string()]));
    // A bad entry is dropped with a warning naming the annotation; none left: nobody allowed.
    let (ranges, w) = mk("everyone", json!([]));
    assert_eq!(ranges, Some(vec![]));
    assert_eq!(w.len(), 1);
    assert!(w[0].message.contains(LEGACY_SOURCE_RANGES), "{}", w[0].message);
    // Empty: not restricted.
    assert_eq!(mk(" ", json!([])).0, None);
}

#[test]
fn deleting_services_are_dropped() {
    let mut s = (*lb(
        "default",
        "bye",
        "2024-01-01T00:00:00Z",
        &["10.20.1.4"],
        json!([{ "port": 80, "nodePort": 30080 }]),
        json!({}),
    ))
    .clone();
    s.metadata.deletion_timestamp = s.metadata.creation_timestamp.clone();
    let (cfg, _) = run(&[Arc::new(s)], &[], &[], &no_api());
    assert!(cfg.proxies.is_empty());
}
