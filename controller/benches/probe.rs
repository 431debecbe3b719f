//! What conflict probing costs a Service: create-returned → ingress shown, for Services created
//! one at a time, with probing off, inline only (`--probe-ahead-interval 0`: each new address
//! is probed when a Service gets it, so nobody answering costs the whole timeout), and ahead
//! of need (the default: the next address is probed before a Service asks). Real parts: a
//! kube-apiserver + etcd, `cairn-ipam`, `cairn-ccm`, and a squatter namespace on a veth pair
//! holding the pool's first address (documentation addresses; nothing leaves the pair).
//!
//! `cargo bench -p cairn-ccm --bench probe` (`-- --quick`: 5 Services per mode). Needs root.
//! Services are created `PACE` apart, the steady state of a cluster adding Services: a burst
//! faster than the ahead interval gets inline probes for all but the first.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cairn_e2e::netns::Squatter;
use common::*;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use serde_json::json;

/// Between two Service creates.
const PACE: Duration = Duration::from_millis(1500);
const TIMEOUT_MS: u32 = 300;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn run_mode(mode: &str, n: usize) -> Vec<Duration> {
    let sq = Squatter::new(&["192.0.2.1/24"]);
    let mut spec = json!({
        "network": "net-b",
        "reuseGraceSeconds": 0,
        "pools": [ { "name": "vip", "purpose": "VIP", "ranges": ["192.0.2.1-192.0.2.254"] } ],
    });
    if mode != "off" {
        spec["conflictProbe"] = json!({ "interface": sq.near(), "timeoutMilliseconds": TIMEOUT_MS });
    }
    let Env { cp, client, store } = Env::start("net-b", spec).await;
    let ahead = if mode == "ahead" { "1" } else { "0" };
    start_ccm(
        &cp,
        "ccm",
        "bench",
        &store.endpoint,
        &["--probe-ahead-interval", ahead],
    );
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    // Warm up (the controller's caches, the first connections), not measured.
    create_lb(&client, "default", "warm", 80, json!({})).await;
    wait_ingress(&client, "default", "warm", 1).await;
    tokio::time::sleep(PACE).await;
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("s{i}");
        create_lb(&client, "default", &name, 80, json!({})).await;
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(30);
        loop {
            let s = api.get(&name).await.unwrap();
            if !ingress(&s).is_empty() {
                took.push(t0.elapsed());
                break;
            }
            assert!(Instant::now() < deadline, "{name} got no address");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Pacing between creates (a workload's rhythm), not synchronisation.
        tokio::time::sleep(PACE).await;
    }
    let squatted = store
        .allocations("bench")
        .await
        .iter()
        .filter(|a| a.owner.as_ref().unwrap().kind == cairn_proto::v1::OwnerKind::UnknownHost as i32)
        .count();
    let shown: Vec<String> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .flat_map(ingress)
        .collect();
    let published_squatted = shown.iter().any(|ip| ip == "192.0.2.1");
    eprintln!("{mode}: squatter recorded {squatted}, squatted address published {published_squatted}");
    if mode != "off" {
        assert_eq!(squatted, 1, "{mode}: the squatter was not recorded");
        assert!(!published_squatted, "{mode}: published the squatted address");
    }
    took.sort();
    took
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 5 } else { 40 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "conflict probing: create-returned -> ingress, {n} Services one at a time, {} ms apart, probe timeout {TIMEOUT_MS} ms",
        PACE.as_millis()
    );
    println!("| probing | n | p50 ms | p90 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for mode in ["off", "inline", "ahead"] {
        let t = rt.block_on(run_mode(mode, n));
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        println!(
            "| {mode} | {} | {} | {} | {} |",
            t.len(),
            ms(pct(&t, 0.5)),
            ms(pct(&t, 0.9)),
            ms(t[t.len() - 1])
        );
    }
}
