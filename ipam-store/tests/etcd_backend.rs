//! `cairn-ipam serve --backend etcd` as a real process against a real etcd on loopback: what
//! was acknowledged lives in etcd — it survives `kill -9` of the store unchanged, and another
//! store process with a different (empty) data directory serves it too. A misconfigured etcd
//! (default `--max-txn-ops`) or a missing endpoint list stops start-up with a clear error.
//! Mutual TLS to etcd uses certificates made with the openssl CLI.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../src/store/etcd_cluster.rs"]
mod etcd_cluster;

use std::{path::Path, process::Command};

use cairn_ipam::store::etcd::server_flags;
use cairn_proto::v1 as pb;
use common::*;
use etcd_cluster::{EtcdCluster, ServerTls};

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
        // A killed store's successor waits out this lease before it leads.
        "--leader-lease".into(),
        "2s".into(),
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

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and `<name>.crt`/`<name>.key` signed by it with extended key usage `eku`.
fn pki(dir: &Path, leaves: &[(&str, &str)]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=cairn-test-ca"];
    ca.extend(ec);
    ca.extend([
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(dir, &ca);
    for (name, eku) in leaves {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={eku}\nkeyUsage=digitalSignature\n"),
        )
        .unwrap();
        let subj = format!("/CN={name}");
        let mut req = vec!["req", "-subj", subj.as_str()];
        req.extend(ec);
        req.extend(["-keyout", key.as_str(), "-out", csr.as_str()]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
    }
}

#[tokio::test]
async fn the_store_reaches_etcd_over_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    pki(d, &[("server", "serverAuth"), ("client", "clientAuth")]);
    let tls = ServerTls {
        ca: &d.join("ca.crt"),
        cert: &d.join("server.crt"),
        key: &d.join("server.key"),
    };
    let etcd = EtcdCluster::start_tls(1, &server_flags(), &tls);
    assert!(etcd.endpoints()[0].starts_with("https://"));
    let path = |f: &str| d.join(f).display().to_string();

    // Without a client certificate etcd refuses the connection, and the store does not start.
    let mut flags = etcd_flags(&etcd);
    flags.extend(["--etcd-ca".into(), path("ca.crt")]);
    let err = serve_fails(&flags);
    assert!(
        err.contains("storage failure: etcd start-up probe of https://127.0.0.1:"),
        "{err}"
    );

    flags.extend([
        "--etcd-cert".into(),
        path("client.crt"),
        "--etcd-key".into(),
        path("client.key"),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let srv = Server::start_with(&flags).await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let a = allocate(&mut c, alloc_req("net-a", svc("a", "tls"))).await;
    assert_eq!(get(&mut c, "tls").await, a);
}

/// `cairn-ipam export` of one store piped into `cairn-ipam import` of another.
async fn pipe(from: &Server, to: &Server) {
    let mut export = std::process::Command::new(bin())
        .args(["--endpoint", &from.endpoint(), "export"])
        .env_remove("CAIRN_IPAM_ENDPOINT")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let import = tokio::process::Command::new(bin())
        .args(["--endpoint", &to.endpoint(), "import", "-f", "-"])
        .env_remove("CAIRN_IPAM_ENDPOINT")
        .stdin(std::process::Stdio::from(export.stdout.take().unwrap()))
        .output()
        .await
        .unwrap();
    assert!(export.wait().unwrap().success(), "export failed");
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
}

async fn everything(s: &Server) -> (Vec<pb::Network>, Vec<pb::Allocation>) {
    let mut c = s.client().await;
    let nets = c
        .list_networks(pb::ListNetworksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .networks;
    let allocs = list_all(&mut c, pb::ListAllocationsRequest::default()).await;
    (nets, allocs)
}

/// The migration docs/etcd.md describes: sled → etcd → sled through streamed export/import,
/// every network and allocation unchanged (addresses, owners, revisions, times), and the
/// reuse grace carried over.
#[tokio::test]
async fn a_ledger_moves_from_sled_to_etcd_and_back_through_export_and_import() {
    let sled = Server::start_with(&["--default-reuse-grace", "1h"]).await;
    let mut c = sled.client().await;
    upsert(&mut c, net_a("net-a")).await;
    for i in 0..50 {
        allocate(&mut c, alloc_req("net-a", svc("a", &format!("s{i}")))).await;
    }
    let gone = allocate(&mut c, alloc_req("net-a", svc("a", "gone"))).await;
    c.release(pb::ReleaseRequest {
        network: "net-a".into(),
        owner: Some(svc("a", "gone")),
    })
    .await
    .unwrap();
    let before = everything(&sled).await;

    let etcd = EtcdCluster::start(1, &server_flags());
    let flags = etcd_flags(&etcd);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let on_etcd = Server::start_with(&flags).await;
    pipe(&sled, &on_etcd).await;
    assert_eq!(everything(&on_etcd).await, before);
    // The released address is still in its grace on etcd: another owner does not get it.
    let mut e = on_etcd.client().await;
    let mut r = alloc_req("net-a", svc("b", "thief"));
    r.requested_addresses = gone.addresses.clone();
    assert_status(e.allocate(r).await, tonic::Code::FailedPrecondition, &["grace"]);

    let back = Server::start_with(&["--default-reuse-grace", "1h"]).await;
    pipe(&on_etcd, &back).await;
    assert_eq!(everything(&back).await, before);
}
