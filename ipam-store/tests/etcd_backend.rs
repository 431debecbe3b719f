//! `cairn-ipam serve --backend etcd` as a real process against a real etcd on loopback: what
//! was acknowledged lives in etcd — it survives `kill -9` of the store unchanged, and another
//! store process with a different (empty) data directory serves it too. A misconfigured etcd
//! (default `--max-txn-ops`) or a missing endpoint list stops start-up with a clear error.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../src/store/etcd_cluster.rs"]
mod etcd_cluster;

use std::process::Command;

use cairn_ipam::store::etcd::server_flags;
use cairn_proto::v1 as pb;
use common::*;
use etcd_cluster::EtcdCluster;

fn etcd_flags(etcd: &EtcdCluster) -> Vec<String> {
    vec![
        "--default-reuse-grace".into(),
        "0s".into(),
        "--backend".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.endpoints().join(","),
        "--etcd-prefix".into(),
        "/test".into(),
    ]
}

async fn get(c: &mut Client, name: &str) -> pb::Allocation {
    c.get_allocation(pb::GetAllocationRequest {
        network: "net-a".into(),
        owner: Some(svc("a", name)),
    })
    .await
    .unwrap_or_else(|e| panic!("acknowledged {name} lost: {e}"))
    .into_inner()
}

#[tokio::test]
async fn an_allocation_survives_kill_9_of_the_store_and_lives_in_etcd() {
    let etcd = EtcdCluster::start(1, &server_flags());
    let flags = etcd_flags(&etcd);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut srv = Server::start_with(&flags).await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let acked = allocate(&mut c, alloc_req("net-a", svc("a", "web"))).await;

    srv.kill();
    srv.restart().await;
    let mut c = srv.client().await;
    assert_eq!(get(&mut c, "web").await, acked, "changed across kill -9");
    // The store takes new work, and does not hand out the held address again.
    let next = allocate(&mut c, alloc_req("net-a", svc("a", "db"))).await;
    assert_ne!(next.addresses, acked.addresses);
    srv.kill();

    // A second store process, nothing on its own disk, serves the same ledger.
    let other = Server::start_with(&flags).await;
    assert!(
        std::fs::read_dir(other.data_dir()).map_or(true, |mut d| d.next().is_none()),
        "the etcd backend wrote to --data-dir"
    );
    let mut c = other.client().await;
    assert_eq!(get(&mut c, "web").await, acked);
    assert_eq!(get(&mut c, "db").await, next);
}

fn serve_fails(args: &[String]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .env_remove("CAIRN_IPAM_DATA_DIR")
        .env_remove("CAIRN_IPAM_ETCD_ENDPOINTS")
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_etcd_with_the_default_txn_limit_is_refused_naming_the_flag() {
    let etcd = EtcdCluster::start(1, &[]);
    let err = serve_fails(&etcd_flags(&etcd));
    assert!(err.contains("--max-txn-ops=16384"), "{err}");
}

#[test]
fn the_etcd_backend_without_endpoints_is_refused_naming_the_flag() {
    let err = serve_fails(&["--backend".into(), "etcd".into()]);
    assert!(err.contains("etcd-endpoints"), "{err}");
}
