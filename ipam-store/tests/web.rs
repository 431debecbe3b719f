//! The web view's HTTP contract against a real `cairn-ipam serve` process: the JSON endpoints'
//! figures, address lookups (held, in grace, free, outside), filters and paging, field-named
//! errors, escaping, security headers, read-only routes, the live event stream, and
//! `--web-view=false`. The page in a real browser: `web_browser.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, time::Duration};

use cairn_proto::v1 as pb;
use common::*;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One HTTP/1.1 request with `Connection: close`; the whole reply.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("reply within 30 s")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path).await
}

/// net_a with three clusters' worth of allocations:
/// c1: api-server, node n1, Services ns1/web and ns2/db; c2: Service ns1/web.
async fn seeded(extra: &[&str]) -> (Server, Client, Vec<pb::Allocation>) {
    let s = Server::start_with(extra).await;
    let mut c = s.client().await;
    upsert(&mut c, net_a("lab")).await;
    let mut out = Vec::new();
    for o in [
        owner("c1", pb::OwnerKind::ApiServer, "", "api"),
        node("c1", "n1"),
        owner("c1", pb::OwnerKind::Service, "ns1", "web"),
        owner("c1", pb::OwnerKind::Service, "ns2", "db"),
        owner("c2", pb::OwnerKind::Service, "ns1", "web"),
    ] {
        out.push(allocate(&mut c, alloc_req("lab", o)).await);
    }
    (s, c, out)
}

fn v4(a: &pb::Allocation) -> String {
    a.addresses.iter().find(|x| !x.contains(':')).unwrap().clone()
}

#[tokio::test]
async fn networks_json_carries_definition_and_usage() {
    let (s, _c, _) = seeded(&["--default-reuse-grace", "0s"]).await;
    let m = s.metrics.unwrap();
    let r = get(m, "/api/v1/networks").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("content-type").unwrap().starts_with("application/json"));
    let j = r.json();
    let n = &j["networks"][0];
    assert_eq!(n["name"], "lab");
    assert_eq!(n["prefixes"], serde_json::json!(["10.20.0.0/16", "fd00:20::/64"]));
    assert_eq!(n["gateways"], serde_json::json!(["10.20.0.1"]));
    assert_eq!(n["dns_servers"], serde_json::json!(["10.20.0.2"]));
    assert_eq!(n["vlan"], 20);
    let vip = n["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "vip")
        .unwrap();
    assert_eq!(vip["purpose"], "VIP");
    let v4u = vip["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["family"] == "IPv4")
        .unwrap();
    // api + 3 Services hold one IPv4 VIP each (the network's first pool family).
    assert_eq!(v4u["used"], "4");
    // A CIDR range leaves out its own network and broadcast addresses.
    assert_eq!(v4u["total"], "254");
    let nodes = n["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "nodes")
        .unwrap();
    assert_eq!(nodes["usage"][0]["used"], "1");

    let one = get(m, "/api/v1/networks/lab").await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["name"], "lab");
    let missing = get(m, "/api/v1/networks/nope").await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(missing.json()["error"].as_str().unwrap().contains("nope"));
}

#[tokio::test]
async fn an_address_lookup_says_who_holds_it_or_why_not() {
    let (s, mut c, allocs) = seeded(&["--default-reuse-grace", "1h"]).await;
    let m = s.metrics.unwrap();
    let web = &allocs[2];
    let r = get(m, &format!("/api/v1/addresses/{}", v4(web))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["state"], "held");
    assert_eq!(j["network"], "lab");
    assert_eq!(j["pool"], "vip");
    assert_eq!(j["holders"].as_array().unwrap().len(), 1);
    assert_eq!(j["holders"][0]["owner"]["cluster"], "c1");
    assert_eq!(j["holders"][0]["owner"]["namespace"], "ns1");
    assert_eq!(j["holders"][0]["owner"]["name"], "web");

    // The IPv4-mapped form names the same address.
    let mapped = get(m, &format!("/api/v1/addresses/::ffff:{}", v4(web)))
        .await
        .json();
    assert_eq!(mapped["address"], j["address"]);
    assert_eq!(mapped["state"], "held");

    // Released: in its reuse grace, naming who released it.
    let db = &allocs[3];
    c.release(pb::ReleaseRequest {
        network: "lab".into(),
        owner: db.owner.clone(),
    })
    .await
    .unwrap();
    let g = get(m, &format!("/api/v1/addresses/{}", v4(db))).await.json();
    assert_eq!(g["state"], "in-grace", "{g}");
    assert_eq!(g["grace"]["previous_owner"]["name"], "db");
    assert!(g["holders"].as_array().unwrap().is_empty());

    let free = get(m, "/api/v1/addresses/10.20.1.200").await.json();
    assert_eq!(
        (free["state"].as_str(), free["pool"].as_str()),
        (Some("not-held"), Some("vip"))
    );
    let gap = get(m, "/api/v1/addresses/10.20.9.9").await.json();
    assert_eq!(
        (gap["network"].as_str(), gap["pool"].as_str()),
        (Some("lab"), None)
    );
    let outside = get(m, "/api/v1/addresses/192.0.2.1").await.json();
    assert!(outside["network"].is_null());

    let bad = get(m, "/api/v1/addresses/10.20.1").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"].as_str().unwrap().starts_with("address: "),
        "{}",
        bad.body
    );
}

#[tokio::test]
async fn allocation_filters_and_pages_cover_everything_once() {
    let (s, _c, allocs) = seeded(&["--default-reuse-grace", "0s"]).await;
    let m = s.metrics.unwrap();
    let keys = |j: &Value| -> Vec<String> {
        j["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["key"].as_str().unwrap().to_string())
            .collect()
    };
    // A namespace across the fleet, then a Service of one cluster.
    let ns1 = get(m, "/api/v1/allocations?namespace=ns1").await.json();
    assert_eq!(keys(&ns1), ["lab/c1/service/ns1/web", "lab/c2/service/ns1/web"]);
    let one = get(m, "/api/v1/allocations?cluster=c1&namespace=ns1&name=web")
        .await
        .json();
    assert_eq!(keys(&one), ["lab/c1/service/ns1/web"]);
    let nodes = get(m, "/api/v1/allocations?kind=node").await.json();
    assert_eq!(keys(&nodes), ["lab/c1/node//n1"]);
    let by_ip = get(m, &format!("/api/v1/allocations?address={}", v4(&allocs[4])))
        .await
        .json();
    assert_eq!(keys(&by_ip), ["lab/c2/service/ns1/web"]);

    // Pages of 2 chain through all 5, each once, in key order.
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let j = get(m, &format!("/api/v1/allocations?page_size=2&page_token={token}"))
            .await
            .json();
        seen.extend(keys(&j));
        token = j["next_page_token"].as_str().unwrap().replace('/', "%2F");
        if token.is_empty() {
            break;
        }
    }
    let mut all: Vec<String> = allocs
        .iter()
        .map(|a| {
            let o = a.owner.as_ref().unwrap();
            let kind = match o.kind() {
                pb::OwnerKind::ApiServer => "api-server",
                pb::OwnerKind::Node => "node",
                _ => "service",
            };
            format!("lab/{}/{kind}/{}/{}", o.cluster_id, o.namespace, o.name)
        })
        .collect();
    all.sort();
    assert_eq!(seen, all);

    for (query, field) in [
        ("kind=pod", "kind: "),
        ("page_size=0", "page_size: "),
        ("page_size=100000", "page_size: "),
        ("address=nope", "address: "),
    ] {
        let r = get(m, &format!("/api/v1/allocations?{query}")).await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.starts_with(field), "{query}: {e}");
    }
    let r = get(m, "/api/v1/allocations?network=nope").await;
    assert_eq!(r.status, 404, "{}", r.body);
}

#[tokio::test]
async fn pages_escape_input_set_security_headers_and_are_read_only() {
    let (s, _c, allocs) = seeded(&["--default-reuse-grace", "0s"]).await;
    let m = s.metrics.unwrap();
    let home = get(m, "/ui/").await;
    assert_eq!(home.status, 200, "{}", home.body);
    assert!(home.header("content-type").unwrap().starts_with("text/html"));
    assert!(
        home.body.contains("10.20.0.0/16") && home.body.contains(">lab<"),
        "{}",
        home.body
    );
    let csp = home.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(home.header("x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(get(m, "/").await.status, 303);

    // A search for an address shows its holder; for a cluster, redirects to its table.
    let hit = get(m, &format!("/ui/search?q={}", v4(&allocs[2]))).await;
    assert_eq!(hit.status, 200);
    assert!(
        hit.body.contains("Held by 1 owner") && hit.body.contains("ns1/web"),
        "{}",
        hit.body
    );
    let ns = get(m, "/ui/search?q=c1%2Fns2").await;
    assert_eq!(ns.status, 303);
    assert_eq!(
        ns.header("location").as_deref(),
        Some("/ui/allocations?cluster=c1&namespace=ns2")
    );

    // Markup in the input comes back escaped, and bounded.
    let long = "x".repeat(5000);
    let evil = get(
        m,
        &format!("/ui/search?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E%2F%2F{long}"),
    )
    .await;
    assert_eq!(evil.status, 400);
    assert!(!evil.body.contains("<script>alert"), "{}", evil.body);
    assert!(evil.body.contains("&lt;script&gt;alert(1)"), "{}", evil.body);
    assert!(
        evil.body.len() < 5000,
        "the error echoes the whole input: {} bytes",
        evil.body.len()
    );

    let bad = get(m, "/ui/allocations?kind=pod").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body.contains("kind: &quot;pod&quot; is not one of"),
        "{}",
        bad.body
    );

    for method in ["POST", "PUT", "DELETE"] {
        for path in ["/ui/", "/api/v1/networks", "/api/v1/allocations"] {
            assert_eq!(request(m, method, path).await.status, 405, "{method} {path}");
        }
    }
    // The probes are still there.
    assert_eq!(get(m, "/readyz").await.status, 200);
}

/// Reads SSE lines until a `data:` line contains every needle.
async fn next_event_with(lines: &mut tokio::io::Lines<BufReader<TcpStream>>, needles: &[&str]) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no event with {needles:?} within 30 s"))
            .unwrap()
            .expect("stream ended");
        if let Some(d) = line.strip_prefix("data:")
            && needles.iter().all(|n| d.contains(n))
        {
            return serde_json::from_str(d.trim()).unwrap();
        }
    }
}

#[tokio::test]
async fn the_event_stream_sends_each_durable_change_with_its_row() {
    let (s, mut c, _) = seeded(&["--default-reuse-grace", "0s"]).await;
    let m = s.metrics.unwrap();
    let mut sock = TcpStream::connect(m).await.unwrap();
    sock.write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut lines = BufReader::new(sock).lines();
    // The stream is open once its greeting comment arrives; only then allocate.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let l = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            !l.starts_with("HTTP/1.1 4") && !l.starts_with("HTTP/1.1 5"),
            "{l}"
        );
        if l.starts_with(":live") || l == ": live" {
            break;
        }
    }
    let a = allocate(&mut c, alloc_req("lab", svc("c3", "fresh"))).await;
    let ev = next_event_with(&mut lines, &["\"ADDED\"", "c3/service/default/fresh"]).await;
    assert_eq!(ev["allocation"]["addresses"][0], v4(&a));
    let row = ev["row"].as_str().unwrap();
    assert!(
        row.starts_with("<tr ") && row.contains("data-key=\"lab/c3/service/default/fresh\""),
        "{row}"
    );

    c.release(pb::ReleaseRequest {
        network: "lab".into(),
        owner: a.owner.clone(),
    })
    .await
    .unwrap();
    let gone = next_event_with(&mut lines, &["\"DELETED\"", "c3/service/default/fresh"]).await;
    assert!(gone["seq"].as_u64().unwrap() > ev["seq"].as_u64().unwrap());
}

#[tokio::test]
async fn web_view_false_serves_only_the_probes() {
    let s = Server::start_with(&["--default-reuse-grace", "0s", "--web-view=false"]).await;
    let m = s.metrics.unwrap();
    assert_eq!(get(m, "/ui/").await.status, 404);
    assert_eq!(get(m, "/api/v1/networks").await.status, 404);
    assert_eq!(get(m, "/metrics").await.status, 200);
}

/// An address recorded as in use by an unknown host (ReportConflict) shows in the usage JSON,
/// the network page's usage line and the allocations table (filtered by its kind), with the
/// MAC that answered.
#[tokio::test]
async fn an_unknown_host_shows_in_usage_and_the_allocations_table() {
    let (s, mut c, _) = seeded(&[]).await;
    let m = s.metrics.unwrap();
    let next = c
        .allocate(pb::AllocateRequest {
            dry_run: true,
            ..alloc_req("lab", svc("c1", "probe"))
        })
        .await
        .unwrap()
        .into_inner()
        .allocation
        .unwrap();
    let ip = v4(&next);
    c.report_conflict(pb::ReportConflictRequest {
        network: "lab".into(),
        address: ip.clone(),
        mac: "52:54:00:12:34:56".into(),
        cluster_id: "c1".into(),
        holder: None,
    })
    .await
    .unwrap();

    let j = get(m, "/api/v1/networks/lab").await.json();
    let vip = j["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "vip")
        .unwrap();
    let v4u = vip["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["family"] == "IPv4")
        .unwrap();
    assert_eq!(v4u["unknown_hosts"], "1", "{v4u}");
    assert_eq!(v4u["used"], "5", "{v4u}");

    let page = get(m, "/ui/networks/lab").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("1 in use by unknown hosts"), "{}", page.body);
    let table = get(m, "/ui/allocations?kind=unknown-host").await;
    assert_eq!(table.status, 200, "{}", table.body);
    assert!(
        table
            .body
            .contains("in use by an unknown host (52:54:00:12:34:56)")
            && table.body.contains(&ip),
        "{}",
        table.body
    );
    assert!(
        !table.body.contains("ns1"),
        "the kind filter let other owners through"
    );
}
