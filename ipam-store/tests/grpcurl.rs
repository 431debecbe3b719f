//! Smoke test through `grpcurl`, a client that knows nothing of Cairn but what server
//! reflection tells it: `list`, `describe`, JSON calls, errors and `grpc.health.v1`.
//!
//! grpcurl is found at `$CAIRN_BIN_DIR/grpcurl`, `$CAIRN_CACHE/bin/grpcurl` or
//! `<workspace>/.cache/bin/grpcurl`; `e2e/tools/build.sh grpcurl` builds it there.
#![allow(clippy::unwrap_used)]

mod common;

use cairn_proto::v1 as pb;
use common::*;
use serde_json::{Value, json};

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn grpcurl(srv: &Server, args: &[&str]) -> Out {
    let bin = grpcurl_bin();
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("-plaintext").arg("-max-time").arg("30");
    let (flags, rest): (Vec<&str>, Vec<&str>) = {
        // Flags (and -d's value) go before the address, the rest after it.
        let mut flags = Vec::new();
        let mut rest = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if *a == "-d" {
                flags.push(*a);
                flags.push(it.next().unwrap());
            } else if a.starts_with('-') {
                flags.push(*a);
            } else {
                rest.push(*a);
            }
        }
        (flags, rest)
    };
    cmd.args(&flags).arg(srv.host_port()).args(&rest);
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn call(srv: &Server, method: &str, body: Value) -> Value {
    let body = body.to_string();
    let o = grpcurl(srv, &["-d", &body, method]).await;
    assert!(o.ok, "grpcurl {method} failed:\n{}\n{}", o.stdout, o.stderr);
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{method}: {e}: {:?}", o.stdout))
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_through_reflection() {
    let srv = Server::start().await;

    let o = grpcurl(&srv, &["list"]).await;
    assert!(o.ok, "grpcurl list failed: {}", o.stderr);
    let services: Vec<&str> = o.stdout.lines().map(str::trim).collect();
    for s in ["cairn.ipam.v1.IpamService", "grpc.health.v1.Health"] {
        assert!(
            services.contains(&s),
            "{s} missing from `grpcurl list`: {services:?}"
        );
    }

    let o = grpcurl(&srv, &["describe", "cairn.ipam.v1.IpamService"]).await;
    assert!(o.ok, "grpcurl describe failed: {}", o.stderr);
    assert!(
        o.stdout.contains("cairn.ipam.v1.IpamService is a service"),
        "{}",
        o.stdout
    );
    for rpc in [
        "UpsertNetwork",
        "GetNetwork",
        "ListNetworks",
        "DeleteNetwork",
        "Allocate",
        "Release",
        "ReportConflict",
        "GetAllocation",
        "ListAllocations",
        "GetUsage",
        "Export",
        "Import",
    ] {
        assert!(
            o.stdout
                .contains(&format!("rpc {rpc} ( .cairn.ipam.v1.{rpc}Request )")),
            "{rpc} missing from describe:\n{}",
            o.stdout
        );
    }
    assert!(
        o.stdout
            .contains("rpc WatchAllocations ( .cairn.ipam.v1.WatchAllocationsRequest ) returns ( stream"),
        "WatchAllocations is not a server stream:\n{}",
        o.stdout
    );
    // Messages resolve too (the descriptor set is complete).
    let o = grpcurl(&srv, &["describe", "cairn.ipam.v1.Owner"]).await;
    assert!(
        o.ok && o.stdout.contains("cluster_id"),
        "{}{}",
        o.stdout,
        o.stderr
    );

    let r = call(
        &srv,
        "cairn.ipam.v1.IpamService/UpsertNetwork",
        json!({"network": {
            "name": "net-a",
            "prefixes": ["10.20.0.0/16"],
            "gateways": ["10.20.0.1"],
            "pools": [{"name": "vip", "purpose": "POOL_PURPOSE_VIP", "ranges": ["10.20.1.0/24"]}],
        }}),
    )
    .await;
    assert_eq!(r["created"], json!(true), "{r}");
    assert_eq!(
        r["network"]["version"],
        json!("1"),
        "uint64 is a JSON string: {r}"
    );

    let owner =
        json!({"clusterId": "a", "kind": "OWNER_KIND_SERVICE", "namespace": "default", "name": "web"});
    let r = call(
        &srv,
        "cairn.ipam.v1.IpamService/Allocate",
        json!({"network": "net-a", "owner": owner, "requestedAddresses": ["10.20.1.42"],
               "sharingKey": "web", "ports": [{"protocol": "PROTOCOL_TCP", "port": 443}]}),
    )
    .await;
    assert_eq!(r["created"], json!(true), "{r}");
    assert_eq!(r["allocation"]["addresses"], json!(["10.20.1.42"]), "{r}");
    assert_eq!(r["allocation"]["state"], json!("ALLOCATION_STATE_ACTIVE"), "{r}");

    // What grpcurl wrote, the typed client reads.
    let mut c = srv.client().await;
    let a = c
        .get_allocation(pb::GetAllocationRequest {
            network: "net-a".into(),
            owner: Some(svc("a", "web")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.addresses, vec!["10.20.1.42"]);
    assert_eq!(a.sharing_key, "web");

    // Errors come back with their gRPC code.
    let body = json!({"network": "net-nope", "owner": owner}).to_string();
    let o = grpcurl(&srv, &["-d", &body, "cairn.ipam.v1.IpamService/Allocate"]).await;
    assert!(!o.ok, "an unknown network succeeded: {}", o.stdout);
    assert!(
        o.stderr.contains("NotFound") && o.stderr.contains("net-nope"),
        "{}",
        o.stderr
    );
    let body = json!({"network": "net-a", "owner": owner, "ports": [{"protocol": "PROTOCOL_TCP", "port": 0}],
                      "sharingKey": "web"})
    .to_string();
    let o = grpcurl(&srv, &["-d", &body, "cairn.ipam.v1.IpamService/Allocate"]).await;
    assert!(!o.ok);
    assert!(
        o.stderr.contains("InvalidArgument") && o.stderr.contains("ports[0].port"),
        "{}",
        o.stderr
    );

    let r = call(
        &srv,
        "cairn.ipam.v1.IpamService/Release",
        json!({"network": "net-a", "owner": owner}),
    )
    .await;
    assert_eq!(r["released"], json!(true), "{r}");
    assert_eq!(r["allocation"]["addresses"], json!(["10.20.1.42"]), "{r}");
    let r = call(
        &srv,
        "cairn.ipam.v1.IpamService/Release",
        json!({"network": "net-a", "owner": owner}),
    )
    .await;
    assert_ne!(r["released"], json!(true), "a second release released: {r}");

    let r = call(&srv, "grpc.health.v1.Health/Check", json!({})).await;
    assert_eq!(r["status"], json!("SERVING"), "{r}");
    let r = call(
        &srv,
        "grpc.health.v1.Health/Check",
        json!({"service": "cairn.ipam.v1.IpamService"}),
    )
    .await;
    assert_eq!(r["status"], json!("SERVING"), "{r}");
}

/// ReportConflict through grpcurl: the address a probe found answered passes from its holder
/// to an unknown-host record (visible in listings and usage, kept across a kill -9), the
/// holder's next Allocate gets another address, and the typed client agrees.
#[tokio::test]
async fn grpcurl_reports_a_conflict_and_the_address_is_never_handed_out_again() {
    let mut srv = Server::start().await;
    call(
        &srv,
        "cairn.ipam.v1.IpamService/UpsertNetwork",
        json!({"network": {
            "name": "net-a",
            "prefixes": ["10.20.0.0/16"],
            "pools": [{"name": "vip", "purpose": "POOL_PURPOSE_VIP", "ranges": ["10.20.1.1-10.20.1.3"]}],
        }}),
    )
    .await;
    let owner =
        json!({"clusterId": "a", "kind": "OWNER_KIND_SERVICE", "namespace": "default", "name": "web"});
    let r = call(
        &srv,
        "cairn.ipam.v1.IpamService/Allocate",
        json!({"network": "net-a", "owner": owner}),
    )
    .await;
    assert_eq!(r["allocation"]["addresses"], json!(["10.20.1.1"]), "{r}");

    let r = call(
        &srv,
        "cairn.ipam.v1.IpamService/ReportConflict",
        json!({"network": "net-a", "address": "10.20.1.1", "mac": "52:54:00:AB:CD:EF",
               "clusterId": "a", "holder": owner}),
    )
    .await;
    assert_eq!(r["created"], json!(true), "{r}");
    assert_eq!(r["released"]["owner"]["name"], json!("web"), "{r}");
    assert_eq!(
        r["conflict"]["owner"]["kind"],
        json!("OWNER_KIND_UNKNOWN_HOST"),
        "{r}"
    );
    assert_eq!(r["conflict"]["owner"]["name"], json!("10.20.1.1"), "{r}");
    assert_eq!(r["conflict"]["owner"]["uid"], json!("52:54:00:ab:cd:ef"), "{r}");

    // A bad MAC names the field.
    let body =
        json!({"network": "net-a", "address": "10.20.1.2", "mac": "52:54:00", "clusterId": "a"}).to_string();
    let o = grpcurl(&srv, &["-d", &body, "cairn.ipam.v1.IpamService/ReportConflict"]).await;
    assert!(!o.ok, "a bad mac succeeded: {}", o.stdout);
    assert!(
        o.stderr.contains("InvalidArgument") && o.stderr.contains("mac:"),
        "{}",
        o.stderr
    );

    // Survives a kill -9; the holder then gets the next address.
    srv.kill();
    srv.restart().await;
    let r = call(
        &srv,
        "cairn.ipam.v1.IpamService/Allocate",
        json!({"network": "net-a", "owner": owner}),
    )
    .await;
    assert_eq!(r["allocation"]["addresses"], json!(["10.20.1.2"]), "{r}");
    let r = call(
        &srv,
        "cairn.ipam.v1.IpamService/GetUsage",
        json!({"network": "net-a"}),
    )
    .await;
    assert_eq!(r["pools"][0]["unknownHosts"], json!("1"), "{r}");
    assert_eq!(r["pools"][0]["used"], json!("2"), "{r}");

    let mut c = srv.client().await;
    let listed = list_all(
        &mut c,
        pb::ListAllocationsRequest {
            network: "net-a".into(),
            kind: pb::OwnerKind::UnknownHost.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].addresses, vec!["10.20.1.1"]);
    assert_eq!(listed[0].owner.as_ref().unwrap().cluster_id, "a");
}

/// grpcurl against a store serving mutual TLS, with certificates from `cairn-ipam certs`:
/// `-cacert/-cert/-key` of the cloud role list, describe and call; a cluster's certificate is
/// held to its own owners; plaintext and a missing client certificate are refused.
#[tokio::test]
async fn grpcurl_speaks_mutual_tls_with_cacert_cert_key() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path().to_str().unwrap();
    for args in [
        &["init", "--dir", d][..],
        &["issue", "--dir", d, "--server", "--ip", "127.0.0.1"],
        &["issue", "--dir", d, "--cloud"],
        &["issue", "--dir", d, "--cluster", "a"],
    ] {
        certs(args);
    }
    let p = |f: &str| format!("{d}/{f}");
    let (cert, key, ca) = (p("server.pem"), p("server-key.pem"), p("ca.pem"));
    let srv = Server::start_with(&["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &ca]).await;
    let run = |flags: Vec<String>, rest: Vec<&str>| {
        let mut cmd = std::process::Command::new(grpcurl_bin());
        cmd.arg("-max-time")
            .arg("30")
            .args(&flags)
            .arg(srv.host_port())
            .args(rest);
        let out = cmd.output().unwrap();
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let as_ = |who: &str| {
        vec![
            "-cacert".to_string(),
            p("ca.pem"),
            "-cert".into(),
            p(&format!("{who}.pem")),
            "-key".into(),
            p(&format!("{who}-key.pem")),
        ]
    };

    let o = run(as_("cloud"), vec!["list"]);
    assert!(o.ok, "grpcurl list over mTLS: {}", o.stderr);
    assert!(o.stdout.contains("cairn.ipam.v1.IpamService"), "{}", o.stdout);
    let mut flags = as_("cloud");
    flags.extend(["-d".into(), json!({ "network": { "name": "tls-net", "pools": [ { "name": "vip", "purpose": "POOL_PURPOSE_VIP", "ranges": ["10.9.0.0/28"] } ] } }).to_string()]);
    let o = run(flags, vec!["cairn.ipam.v1.IpamService/UpsertNetwork"]);
    assert!(o.ok, "UpsertNetwork as cloud: {}\n{}", o.stdout, o.stderr);

    // cluster/a may not allocate for cluster b.
    let mut flags = as_("cluster-a");
    flags.extend(["-d".into(), json!({ "network": "tls-net", "owner": { "clusterId": "b", "kind": "OWNER_KIND_SERVICE", "namespace": "ns", "name": "web", "uid": "u" } }).to_string()]);
    let o = run(flags, vec!["cairn.ipam.v1.IpamService/Allocate"]);
    assert!(!o.ok, "cluster a allocated for b: {}", o.stdout);
    assert!(o.stderr.contains("PermissionDenied"), "{}", o.stderr);

    // Plaintext, and TLS without a client certificate, are refused.
    let o = run(vec!["-plaintext".into()], vec!["list"]);
    assert!(!o.ok, "plaintext succeeded: {}", o.stdout);
    let o = run(vec!["-cacert".into(), p("ca.pem")], vec!["list"]);
    assert!(!o.ok, "no client certificate succeeded: {}", o.stdout);
}
