//! The admin CLI (`cairn-ipam network|alloc|usage|export|import`) against a real server.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "CLI failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("-o json output is not JSON ({e}):\n{}", self.stdout))
    }
}

async fn cli(srv: &Server, args: &[&str]) -> Run {
    cli_at(&srv.endpoint(), args).await
}

async fn cli_at(endpoint: &str, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(bin())
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .env_remove("CAIRN_IPAM_ENDPOINT")
        .output()
        .await
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const NETWORKS: &str = "\
name: net-a
prefixes: [10.20.0.0/16, 'fd00:20::/64']
gateways: [10.20.0.1]
dnsServers: [10.20.0.2]
vlan: 20
pools:
  - name: vip
    purpose: VIP
    ranges: [10.20.1.0/24, 'fd00:20::1:0/112']
    exclusions: [10.20.1.1]
  - name: nodes
    purpose: NODE
    ranges: [10.20.2.10-10.20.2.200]
---
name: net-b
prefixes: [10.21.0.0/16]
reuseGraceSeconds: 60
managedBy: cloud
pools:
  - name: vip
    purpose: VIP
    ranges: [10.21.1.0/24]
    autoAssign: true
";

/// The row of a table output whose first column is `first`.
fn row<'a>(table: &'a str, first: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row starting with {first:?} in:\n{table}"))
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    write(&p, text);
    p.to_str().unwrap().to_string()
}

#[tokio::test]
async fn cli_apply_list_alloc_usage_export_import() {
    let srv = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "nets.yaml", NETWORKS);

    // network apply -f: created, then unchanged; dry-run reports without writing.
    let r = cli(&srv, &["network", "apply", "-f", &file]).await.ok();
    assert!(r.stdout.contains("network/net-a created"), "{}", r.stdout);
    assert!(r.stdout.contains("network/net-b created"), "{}", r.stdout);
    let r = cli(&srv, &["network", "apply", "-f", &file]).await.ok();
    assert!(r.stdout.contains("network/net-a unchanged"), "{}", r.stdout);
    let changed = write_file(
        dir.path(),
        "changed.yaml",
        &NETWORKS.replace("vlan: 20", "vlan: 21"),
    );
    let r = cli(&srv, &["network", "apply", "-f", &changed, "--dry-run"])
        .await
        .ok();
    assert!(
        r.stdout.contains("network/net-a would be changed"),
        "{}",
        r.stdout
    );

    // network list: a table, and JSON.
    let r = cli(&srv, &["network", "list"]).await.ok();
    let a = row(&r.stdout, "net-a");
    for want in [
        "10.20.0.0/16",
        "10.20.0.1",
        "20",
        "vip(VIP)",
        "nodes(NODE):10.20.2.10-10.20.2.200",
    ] {
        assert!(a.contains(want), "{want:?} missing from {a:?}");
    }
    assert!(row(&r.stdout, "net-b").contains("cloud"));
    let j = cli(&srv, &["-o", "json", "network", "list"]).await.ok().json();
    let names: Vec<&str> = j["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["net-a", "net-b"]);
    assert_eq!(j["networks"][0]["vlan"], 20, "the dry run wrote: {j}");
    let j = cli(&srv, &["network", "get", "net-b", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(j["reuseGraceSeconds"], 60, "{j}");

    // alloc create: requested, shared, dual-stack, node; a conflict is an error.
    let r = cli(
        &srv,
        &[
            "alloc",
            "create",
            "--network",
            "net-a",
            "--cluster",
            "alpha",
            "--kind",
            "service",
            "--namespace",
            "default",
            "--name",
            "web",
            "--ip",
            "10.20.1.50",
            "--sharing-key",
            "web",
            "--port",
            "tcp/80,tcp/443",
        ],
    )
    .await
    .ok();
    assert!(
        row(&r.stdout, "10.20.1.50").contains("default/web"),
        "{}",
        r.stdout
    );
    let j = cli(
        &srv,
        &[
            "-o",
            "json",
            "alloc",
            "create",
            "--network",
            "net-a",
            "--cluster",
            "beta",
            "--kind",
            "service",
            "--namespace",
            "shop",
            "--name",
            "cart",
            "--family",
            "ipv4,ipv6",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(j["created"], true, "{j}");
    let cart: Vec<String> = j["allocation"]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(cart.len(), 2);
    assert_ne!(cart[0], "10.20.1.1", "the exclusion was handed out");
    let r = cli(
        &srv,
        &[
            "alloc",
            "create",
            "--network",
            "net-a",
            "--cluster",
            "beta",
            "--kind",
            "node",
            "--name",
            "node-1",
        ],
    )
    .await
    .ok();
    assert!(row(&r.stdout, "10.20.2.10").contains("node-1"), "{}", r.stdout);
    let r = cli(
        &srv,
        &[
            "alloc",
            "create",
            "--network",
            "net-a",
            "--cluster",
            "beta",
            "--kind",
            "service",
            "--namespace",
            "default",
            "--name",
            "grab",
            "--ip",
            "10.20.1.50",
        ],
    )
    .await;
    assert_ne!(r.code, 0, "another cluster took a held address: {}", r.stdout);
    assert!(
        r.stderr.contains("FailedPrecondition") && r.stderr.contains("another cluster"),
        "{}",
        r.stderr
    );

    // alloc list shows who holds each address.
    let r = cli(&srv, &["alloc", "list"]).await.ok();
    let header = r.stdout.lines().next().unwrap();
    for h in [
        "ADDRESS", "NETWORK", "POOL", "CLUSTER", "KIND", "OWNER", "SHARING", "STATE",
    ] {
        assert!(header.contains(h), "{h} missing from {header:?}");
    }
    let web = row(&r.stdout, "10.20.1.50");
    for want in ["net-a", "vip", "alpha", "service", "default/web", "web", "active"] {
        assert!(web.contains(want), "{want:?} missing from {web:?}");
    }
    let cart_row = row(&r.stdout, &cart.join(","));
    assert!(
        cart_row.contains("beta") && cart_row.contains("shop/cart"),
        "{cart_row:?}"
    );
    let node_row = row(&r.stdout, "10.20.2.10");
    assert!(node_row.contains("nodes") && node_row.contains("node") && node_row.contains("node-1"));
    let j = cli(&srv, &["alloc", "list", "--cluster", "beta", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(j.as_array().unwrap().len(), 2, "{j}");
    let j = cli(&srv, &["alloc", "list", "--address", "10.20.1.50", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(j[0]["owner"]["clusterId"], "alpha", "{j}");

    // usage: table and JSON agree with what was allocated.
    let r = cli(&srv, &["usage"]).await.ok();
    let lines: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("net-a"))
        .collect();
    let vip4 = lines
        .iter()
        .find(|l| l.contains(" vip ") && l.contains("IPV4"))
        .unwrap_or_else(|| panic!("no vip IPV4 row in:\n{}", r.stdout));
    // 254 minus the exclusion = 253 total; 2 used; 251 free.
    let cols: Vec<&str> = vip4.split_whitespace().collect();
    assert_eq!(&cols[4..9], &["253", "2", "251", "0", "0"], "{vip4:?}");
    let j = cli(&srv, &["usage", "--network", "net-a", "-o", "json"])
        .await
        .ok()
        .json();
    let pools = j["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 3, "{j}");
    let nodes = pools.iter().find(|p| p["pool"] == "nodes").unwrap();
    assert_eq!(
        (nodes["total"].as_str(), nodes["used"].as_str()),
        (Some("191"), Some("1")),
        "{nodes}"
    );

    // alloc get.
    let j = cli(
        &srv,
        &[
            "alloc",
            "get",
            "--network",
            "net-a",
            "--cluster",
            "beta",
            "--kind",
            "node",
            "--name",
            "node-1",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(j["addresses"][0], "10.20.2.10", "{j}");

    // alloc release, idempotent.
    let rel = [
        "alloc",
        "release",
        "--network",
        "net-a",
        "--cluster",
        "beta",
        "--kind",
        "node",
        "--name",
        "node-1",
    ];
    let r = cli(&srv, &rel).await.ok();
    assert!(r.stdout.contains("released 10.20.2.10"), "{}", r.stdout);
    let r = cli(&srv, &rel).await.ok();
    assert!(r.stdout.contains("nothing to release"), "{}", r.stdout);

    // export -f, then import -f into a fresh server: the same backup comes out.
    let backup = dir.path().join("backup.json");
    let r = cli(&srv, &["export", "-f", backup.to_str().unwrap()]).await.ok();
    assert!(
        r.stderr.contains("exported 2 network(s), 2 allocation(s)"),
        "{}",
        r.stderr
    );
    let exported: Value = serde_json::from_str(&std::fs::read_to_string(&backup).unwrap()).unwrap();
    let fresh = Server::start().await;
    let r = cli(&fresh, &["import", "-f", backup.to_str().unwrap()])
        .await
        .ok();
    assert!(
        r.stdout.contains("imported 2 network(s), 2 allocation(s)"),
        "{}",
        r.stdout
    );
    let mut again = cli(&fresh, &["export"]).await.ok().json();
    let mut exported = exported;
    exported.as_object_mut().unwrap().remove("exportedAt");
    again.as_object_mut().unwrap().remove("exportedAt");
    assert_eq!(again, exported, "export → import → export differs");
    // network delete: refused with allocations, done with --force.
    let r = cli(&fresh, &["network", "delete", "net-a"]).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("FailedPrecondition") && r.stderr.contains("net-a"),
        "{}",
        r.stderr
    );
    let r = cli(&fresh, &["network", "delete", "net-a", "--force"]).await.ok();
    assert!(
        r.stdout
            .contains("network/net-a deleted (2 allocation(s) released)"),
        "{}",
        r.stdout
    );
    // A second import into the now non-empty store is refused.
    let r = cli(&fresh, &["import", "-f", backup.to_str().unwrap()]).await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("not empty"), "{}", r.stderr);
}

#[tokio::test]
async fn cli_bad_input_fails_naming_the_field() {
    let srv = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // (file content, what the error must name)
        (NETWORKS.replace("vlan: 20", "vlna: 20"), vec!["vlna"]),
        (
            NETWORKS.replace("purpose: NODE", "purpose: NODES"),
            vec!["pools[1].purpose"],
        ),
        (NETWORKS.replace("vlan: 20", "vlan: twenty"), vec!["vlan"]),
        // Server-side validation: the field path of the API.
        (
            NETWORKS.replace("10.20.2.10-10.20.2.200", "10.20.2.200-10.20.2.10"),
            vec!["InvalidArgument", "network.pools[1].ranges[0]", "net-a"],
        ),
        (
            NETWORKS.replace("[10.20.0.1]", "[10.99.0.1]"),
            vec!["InvalidArgument", "network.gateways[0]"],
        ),
        ("".to_string(), vec!["no network"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let f = write_file(dir.path(), &format!("bad-{i}.yaml"), text);
        let r = cli(&srv, &["network", "apply", "-f", &f]).await;
        assert_ne!(r.code, 0, "case {i}: a bad file was accepted:\n{}", r.stdout);
        for n in needles {
            assert!(
                r.stderr.contains(n),
                "case {i}: error does not name {n:?}:\n{}",
                r.stderr
            );
        }
        assert!(
            r.stderr.contains(&f),
            "case {i}: error does not name the file:\n{}",
            r.stderr
        );
    }
    let j = cli(&srv, &["network", "list", "-o", "json"]).await.ok().json();
    assert!(
        j["networks"].as_array().is_none_or(|a| a.is_empty()),
        "a bad file wrote: {j}"
    );

    // Bad flags and a bad backup.
    let r = cli(
        &srv,
        &[
            "alloc",
            "create",
            "--network",
            "net-a",
            "--cluster",
            "a",
            "--kind",
            "node",
            "--name",
            "n",
            "--port",
            "tcp-80",
        ],
    )
    .await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--port[0]"), "{}", r.stderr);
    let f = write_file(dir.path(), "backup.json", "{\"networks\": 7}");
    let r = cli(&srv, &["import", "-f", &f]).await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("not a cairn-ipam backup"), "{}", r.stderr);
    let r = cli(&srv, &["network", "apply", "-f", "/nonexistent/nets.yaml"]).await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("/nonexistent/nets.yaml"), "{}", r.stderr);

    // No server: a clear error, non-zero.
    let mut srv = srv;
    let endpoint = srv.endpoint();
    srv.kill();
    let r = cli_at(&endpoint, &["network", "list"]).await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("connecting to the store"), "{}", r.stderr);
}

#[tokio::test]
async fn cli_apply_reads_standard_input() {
    use tokio::io::AsyncWriteExt as _;
    let srv = Server::start().await;
    let mut child = tokio::process::Command::new(bin())
        .args(["--endpoint", &srv.endpoint(), "network", "apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(NETWORKS.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("network/net-b created"), "{stdout}");
}
