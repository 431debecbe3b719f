//! `cairn-ccm haproxy-agent` end to end: a real kube-apiserver, a real `cairn-ipam`, a real
//! `cairn-ccm` handing out VIPs from 127.0.100.0/24, and a real HAProxy run by the agent.
//! Traffic really flows: HTTP requests to `VIP:port` go through HAProxy to small HTTP servers
//! standing in for nodes (`127.0.x.y:nodePort`, registered as Ready Node objects).
//!
//! Each test uses its own addresses so they can run at once: VIP pools 127.0.100.0/28,
//! .16/28, .32/28; node addresses 127.0.101.x, 127.0.102.x, 127.0.104.x.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use cairn_e2e::{ControlPlane, eventually};
use common::*;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

// ---------------------------------------------------------------------------------------------
// Test backends and a client.

/// A "node": an HTTP server on `ip:port` answering every request with its name.
struct Backend {
    task: tokio::task::JoinHandle<()>,
    hits: Arc<AtomicU64>,
}

impl Backend {
    async fn start(ip: &str, port: u16, body: &str) -> Backend {
        let l = TcpListener::bind((ip, port))
            .await
            .unwrap_or_else(|e| panic!("backend {ip}:{port}: {e}"));
        let hits = Arc::new(AtomicU64::new(0));
        let body: Arc<str> = body.into();
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { continue };
                let (body, h) = (body.clone(), h.clone());
                tokio::spawn(async move {
                    let _ = serve(s, &body, &h).await;
                });
            }
        });
        Backend { task, hits }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, body: &str, hits: &AtomicU64) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    // HAProxy's TCP checks connect and close: nothing to answer then.
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("slow request"))??;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    hits.fetch_add(1, Ordering::Relaxed);
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// One HTTP request on a fresh connection: the body of a 200 answer, else an error.
async fn get(addr: SocketAddr) -> Result<String, String> {
    let run = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write {addr}: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&buf);
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(format!("{addr}: bad answer {text:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap_or_else(|_| Err(format!("{addr}: no answer within 5s")))
}

/// Waits until `addr` answers and every one of `names` has answered (round robin); fails at
/// once if anything else answers.
async fn wait_all_answer(addr: SocketAddr, names: &[&str]) {
    let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
    let seen = std::sync::Mutex::new(BTreeSet::new());
    let (want, seen) = (&want, &seen);
    eventually(&format!("{addr} answered by {want:?}"), ACT, || async move {
        let r = get(addr).await;
        let mut seen = seen.lock().unwrap();
        if let Ok(b) = &r {
            assert!(want.contains(b), "{addr} answered by a foreign backend: {b}");
            seen.insert(b.clone());
        }
        if want.is_subset(&seen) {
            Ok(())
        } else {
            Err(format!("seen {seen:?}, last {r:?}"))
        }
    })
    .await
    .unwrap();
}

/// Waits until `n` consecutive requests to `addr` are all answered by `only`.
async fn wait_only(addr: SocketAddr, only: &str, n: usize) {
    eventually(&format!("{addr} answered only by {only}"), ACT, || async move {
        for _ in 0..n {
            let b = get(addr).await?;
            if b != only {
                return Err(format!("answered by {b}"));
            }
        }
        Ok(())
    })
    .await
    .unwrap();
}

async fn wait_refused(addr: SocketAddr) {
    eventually(&format!("{addr} stops answering"), ACT, || async move {
        match get(addr).await {
            Ok(b) => Err(format!("still answered by {b}")),
            Err(_) => Ok(()),
        }
    })
    .await
    .unwrap();
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Cluster objects.

/// A Node as a kubelet would have registered and reported it: Ready, one InternalIP.
async fn ready_node(client: &Client, name: &str, ip: &str, labels: serde_json::Value) {
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": labels },
    }))
    .unwrap();
    api.create(&PostParams::default(), &node).await.unwrap();
    set_ready(client, name, ip, true).await;
}

async fn set_ready(client: &Client, name: &str, ip: &str, ready: bool) {
    let api: Api<Node> = Api::all(client.clone());
    let status = json!({ "status": {
        "addresses": [ { "type": "InternalIP", "address": ip }, { "type": "Hostname", "address": name } ],
        "conditions": [ {
            "type": "Ready",
            "status": if ready { "True" } else { "False" },
            "reason": "Test",
            "message": "set by the test",
        } ],
    } });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn svc(client: &Client, name: &str) -> Service {
    Api::<Service>::namespaced(client.clone(), "default")
        .get(name)
        .await
        .unwrap()
}

/// (nodePort, healthCheckNodePort) of a Service's `i`-th port.
async fn node_ports(client: &Client, name: &str, i: usize) -> (u16, Option<u16>) {
    let s = svc(client, name).await;
    let spec = s.spec.unwrap();
    let np = spec.ports.unwrap()[i].node_port.unwrap();
    (np as u16, spec.health_check_node_port.map(|p| p as u16))
}

/// A LoadBalancer Service with its VIP assigned: (`VIP:port`, nodePort).
async fn lb_service(client: &Client, name: &str, port: u16, extra: serde_json::Value) -> (SocketAddr, u16) {
    create_lb(client, "default", name, i32::from(port), extra).await;
    let ip = wait_ingress(client, "default", name, 1).await.remove(0);
    let (np, _) = node_ports(client, name, 0).await;
    (SocketAddr::new(ip.parse().unwrap(), port), np)
}

async fn endpoint_slice(client: &Client, svc: &str, node: &str) {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": { "name": format!("{svc}-1"), "labels": { "kubernetes.io/service-name": svc } },
        "addressType": "IPv4",
        "endpoints": [ { "addresses": ["10.244.9.9"], "nodeName": node, "conditions": { "ready": true } } ],
        "ports": [ { "port": 8080, "protocol": "TCP" } ],
    }))
    .unwrap();
    api.patch(
        &format!("{svc}-1"),
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(&slice),
    )
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The agent.

struct Agent {
    dir: tempfile::TempDir,
    metrics: SocketAddr,
    name: String,
}

impl Agent {
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("haproxy.cfg")
    }

    fn config(&self) -> String {
        std::fs::read_to_string(self.config_path()).unwrap_or_default()
    }

    async fn metrics_text(&self) -> String {
        http(self.metrics, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// A metric's value (first line starting with `name`).
    async fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics_text().await, name)
    }

    async fn wait_metric(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let ok = &ok;
        eventually(&format!("{} {name}", self.name), ACT, || async move {
            let v = self.metric(name).await;
            if ok(v) {
                Ok(v)
            } else {
                Err(format!("{name} = {v}"))
            }
        })
        .await
        .unwrap()
    }
}

impl Agent {
    fn master(&self) -> cairn_ccm::haproxy::master::Master {
        cairn_ccm::haproxy::master::Master::new(self.dir.path().join("master.sock"), Duration::from_secs(5))
    }

    /// Waits until HAProxy's last health check of `proxy`/`server` says `status` (`L7OK`, …).
    async fn wait_check(&self, proxy: &str, server: &str, status: &str) {
        let m = self.master();
        eventually(&format!("{proxy}/{server} check {status}"), ACT, || {
            let m = m.clone();
            async move {
                let stats = m.show_stat().await.map_err(|e| e.to_string())?;
                let s = stats
                    .iter()
                    .find(|s| s.proxy == proxy && s.server == server)
                    .ok_or_else(|| format!("no {proxy}/{server}"))?;
                if s.check_status == status && s.is_up() {
                    Ok(())
                } else {
                    Err(format!("{s:?}"))
                }
            }
        })
        .await
        .unwrap();
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn http(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((
        code,
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

fn haproxy_bin() -> String {
    std::env::var("CAIRN_HAPROXY_BIN").unwrap_or_else(|_| {
        cairn_ccm::haproxy::apply::default_bin()
            .to_string_lossy()
            .into_owned()
    })
}

fn agent_command(cp: &ControlPlane, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-ccm"));
    cmd.arg("haproxy-agent")
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .arg("--config")
        .arg(dir.join("haproxy.cfg"))
        .arg("--master-socket")
        .arg(dir.join("master.sock"))
        .args(["--haproxy-bin", &haproxy_bin()])
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("CAIRN_CCM_LOG").unwrap_or_else(|_| "info,cairn_ccm=debug".into()),
        );
    cmd
}

/// Starts `cairn-ccm haproxy-agent --manage-haproxy` as a component of `cp` (killed with it,
/// HAProxy included: same process group).
async fn start_agent(cp: &ControlPlane, name: &str, extra: &[&str]) -> Agent {
    launch_agent(cp, name, tempfile::tempdir().unwrap(), true, free_port(), extra).await
}

/// Runs HAProxy the way a supervisor (systemd) would — `haproxy -W -S … -f …` with a minimal
/// configuration of its own — and an agent that only rewrites the file and reloads it.
async fn start_supervised_haproxy_and_agent(cp: &ControlPlane, name: &str, extra: &[&str]) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let stats = free_port();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
             frontend stats\n    bind 127.0.0.1:{stats}\n    http-request return status 200 if {{ always_true }}\n"
        ),
    )
    .unwrap();
    let sock = dir.path().join("master.sock");
    let mut cmd = Command::new(haproxy_bin());
    cmd.arg("-W")
        .arg("-S")
        .arg(format!("{},mode,600", sock.display()))
        .arg("-f")
        .arg(&cfg);
    cp.spawn(&format!("{name}-haproxy"), &cmd).expect("spawn haproxy");
    cairn_ccm::haproxy::master::Master::new(&sock, Duration::from_secs(5))
        .wait_running(ACT)
        .await
        .expect("supervised haproxy runs");
    launch_agent(cp, name, dir, false, stats, extra).await
}

async fn launch_agent(
    cp: &ControlPlane,
    name: &str,
    dir: tempfile::TempDir,
    manage: bool,
    stats: u16,
    extra: &[&str],
) -> Agent {
    let addr_file = dir.path().join("addr");
    let stats = format!("127.0.0.1:{stats}");
    let mut cmd = agent_command(cp, dir.path(), extra);
    if manage {
        cmd.arg("--manage-haproxy");
    }
    cmd.args(["--metrics-listen", "127.0.0.1:0", "--stats-listen", &stats])
        .arg("--addr-file")
        .arg(&addr_file)
        .args([
            "--min-reload-interval",
            "100ms",
            "--retry-interval",
            "1s",
            "--stats-interval",
            "500ms",
            "--hard-stop-after",
            "60s",
        ]);
    cp.spawn(name, &cmd).expect("spawn agent");
    let metrics = eventually(&format!("{name} metrics address"), ACT, || {
        let f = addr_file.clone();
        async move {
            let t = std::fs::read_to_string(&f).map_err(|e| e.to_string())?;
            t.lines()
                .find_map(|l| l.strip_prefix("metrics="))
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                .ok_or_else(|| format!("{t:?}"))
        }
    })
    .await
    .expect("agent metrics address");
    Agent {
        dir,
        metrics,
        name: name.into(),
    }
}

fn apiserver_port(cp: &ControlPlane) -> u16 {
    cp.server_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("apiserver port")
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// Traffic through HAProxy to both nodes; NotReady nodes leave; `Local` follows the endpoints;
/// `loadBalancerSourceRanges` is enforced; UDP ports are refused with an Event; the API-server VIP reaches the real apiserver; a
/// configuration HAProxy cannot load keeps the previous one serving; a deleted Service's VIP
/// stops answering; `--dry-run` prints the configuration.
#[tokio::test(flavor = "multi_thread")]
async fn traffic_flows_through_haproxy_and_follows_the_cluster() {
    let Env { cp, client, store } = Env::start("net-h1", {
        let mut s = vip_network("net-h1", "127.0.100.0/28", "10.91.2.0/24");
        s["apiServerVIP"] = json!({});
        s
    })
    .await;
    start_ccm(&cp, "ccm", "cluster-h1", &store.endpoint, &[]);
    ready_node(&client, "h1-a", "127.0.101.1", json!({})).await;
    ready_node(&client, "h1-b", "127.0.101.2", json!({})).await;
    // The control plane: the real apiserver on 127.0.0.1; kubeadm-style, it takes no
    // Service traffic.
    ready_node(
        &client,
        "h1-cp",
        "127.0.0.1",
        json!({ "node-role.kubernetes.io/control-plane": "", "node.kubernetes.io/exclude-from-external-load-balancers": "" }),
    )
    .await;

    let (web, np) = lb_service(&client, "web", 8080, json!({})).await;
    let _a = Backend::start("127.0.101.1", np, "h1-a").await;
    let _b = Backend::start("127.0.101.2", np, "h1-b").await;

    let port = apiserver_port(&cp).to_string();
    let agent = start_agent(&cp, "agent", &["--api-server-backend-port", &port]).await;

    // 1. Both nodes answer through the VIP.
    wait_all_answer(web, &["h1-a", "h1-b"]).await;
    assert_eq!(
        http(agent.metrics, "/readyz").await.unwrap().0,
        200,
        "ready once HAProxy runs the configuration"
    );
    agent
        .wait_metric("cairn_ccm_haproxy_backends_up", |v| v >= 3.0)
        .await;
    assert!(agent.metric("cairn_ccm_haproxy_reloads_total").await >= 1.0);
    assert!(agent.metric("cairn_ccm_haproxy_frontends").await >= 2.0);

    // 2. The API-server VIP reaches the real apiserver (TLS through HAProxy).
    let api_vip = eventually("apiServerVIP in status", ACT, || async {
        Api::<ClusterNetwork>::all(client.clone())
            .get("net-h1")
            .await
            .map_err(|e| e.to_string())?
            .status
            .and_then(|s| s.api_server_vip)
            .ok_or_else(|| "no apiServerVIP yet".to_string())
    })
    .await
    .unwrap();
    let mut via_vip = cp.config().unwrap();
    via_vip.cluster_url = format!("https://{api_vip}:6443").parse().unwrap();
    via_vip.tls_server_name = Some("localhost".into());
    let via_vip = Client::try_from(via_vip).unwrap();
    eventually("the apiserver answers through the API-server VIP", ACT, || {
        let c = via_vip.clone();
        async move {
            Api::<Namespace>::all(c)
                .list(&ListParams::default())
                .await
                .map(|l| l.items.len())
        }
    })
    .await
    .unwrap();
    // HAProxy's own health check of the apiserver (HTTPS GET /readyz) passes.
    agent.wait_check("api-server", "h1-cp", "L7OK").await;
    agent.wait_check("svc:default:web:8080", "h1-a", "L4OK").await;

    // 3. Changes that do not change the configuration reload nothing; a node going NotReady
    // leaves the backend set (one reload).
    let reloads = agent.metric("cairn_ccm_haproxy_reloads_total").await;
    Api::<Service>::namespaced(client.clone(), "default")
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { "example.com/note": "no-op" } } })),
        )
        .await
        .unwrap();
    Api::<Node>::all(client.clone())
        .patch(
            "h1-a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "example.com/rack": "r1" } } })),
        )
        .await
        .unwrap();
    set_ready(&client, "h1-b", "127.0.101.2", false).await;
    wait_only(web, "h1-a", 12).await;
    assert!(!agent.config().contains("server h1-b"), "{}", agent.config());
    // The counter moves once HAProxy confirms the new worker, a moment after traffic shifts.
    let after = agent
        .wait_metric("cairn_ccm_haproxy_reloads_total", |v| v > reloads)
        .await;
    assert_eq!(after, reloads + 1.0, "only the NotReady node caused a reload");
    set_ready(&client, "h1-b", "127.0.101.2", true).await;
    wait_all_answer(web, &["h1-a", "h1-b"]).await;
    // The agent handles changes in order: once the rejoin's reload is counted, a reload the
    // no-op patches might have caused would be counted too.
    let rejoined = agent
        .wait_metric("cairn_ccm_haproxy_reloads_total", |v| v > after)
        .await;
    assert_eq!(
        rejoined,
        reloads + 2.0,
        "only the NotReady node and its return caused reloads"
    );

    // 4. externalTrafficPolicy: Local — only nodes with a ready endpoint, health-checked on
    // healthCheckNodePort.
    create_lb(
        &client,
        "default",
        "loc",
        8081,
        json!({ "spec": { "externalTrafficPolicy": "Local" } }),
    )
    .await;
    let loc_ip = wait_ingress(&client, "default", "loc", 1).await.remove(0);
    let loc = SocketAddr::new(loc_ip.parse().unwrap(), 8081);
    let (lnp, hc) = node_ports(&client, "loc", 0).await;
    let hc = hc.expect("healthCheckNodePort allocated");
    let _la = Backend::start("127.0.101.1", lnp, "h1-a").await;
    let _lb = Backend::start("127.0.101.2", lnp, "h1-b").await;
    let _ha = Backend::start("127.0.101.1", hc, "healthy").await;
    let _hb = Backend::start("127.0.101.2", hc, "healthy").await;
    endpoint_slice(&client, "loc", "h1-b").await;
    wait_only(loc, "h1-b", 12).await;
    agent.wait_check("svc:default:loc:8081", "h1-b", "L7OK").await;
    assert!(
        agent.config().contains(&format!("check port {hc}")),
        "{}",
        agent.config()
    );
    endpoint_slice(&client, "loc", "h1-a").await;
    wait_only(loc, "h1-a", 12).await;

    // loadBalancerSourceRanges: an allow-list of client networks (the client is 127.0.0.1).
    let source_ranges = |r: &[&str]| {
        let client = client.clone();
        let r: Vec<String> = r.iter().map(|s| s.to_string()).collect();
        async move {
            Api::<Service>::namespaced(client, "default")
                .patch(
                    "loc",
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": { "loadBalancerSourceRanges": r } })),
                )
                .await
                .unwrap();
        }
    };
    source_ranges(&["10.0.0.0/8"]).await;
    wait_refused(loc).await;
    source_ranges(&["10.0.0.0/8", "127.0.0.0/8"]).await;
    wait_only(loc, "h1-a", 3).await;
    // The legacy annotation restricts the Service too when the field is empty (it used to be
    // ignored, leaving the Service open to everyone).
    let legacy = |ranges: &str| {
        let client = client.clone();
        let ranges = ranges.to_string();
        async move {
            Api::<Service>::namespaced(client, "default")
                .patch(
                    "loc",
                    &PatchParams::default(),
                    &Patch::Merge(json!({
                        "metadata": { "annotations": { "service.beta.kubernetes.io/load-balancer-source-ranges": ranges } },
                        "spec": { "loadBalancerSourceRanges": null },
                    })),
                )
                .await
                .unwrap();
        }
    };
    legacy("10.0.0.0/8").await;
    wait_refused(loc).await;
    legacy("10.0.0.0/8,127.0.0.0/8").await;
    wait_only(loc, "h1-a", 3).await;

    // 5. UDP ports are not served: an Event says so; the TCP port is.
    create_lb(
        &client,
        "default",
        "mixed",
        8082,
        json!({ "spec": { "ports": [
            { "name": "tcp", "port": 8082, "protocol": "TCP" },
            { "name": "udp", "port": 8083, "protocol": "UDP" },
        ] } }),
    )
    .await;
    wait_event(&client, "default", "mixed", "UnsupportedProtocol", "8083/UDP").await;
    eventually("mixed's TCP frontend", ACT, || async {
        let c = agent.config();
        if c.contains("frontend svc:default:mixed:8082") && !c.contains("mixed:8083") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await
    .unwrap();

    // 6. A Service HAProxy cannot serve (its VIP:port is taken by another process): its
    // frontend is left out — an Event on the Service, a failure metric, the isolation gauge —
    // while every other change still goes into service. Once the port is free, the retry
    // serves it too.
    let squatter = TcpListener::bind("127.0.100.13:8084").await.unwrap();
    let failures_before = agent
        .metric("cairn_ccm_haproxy_reload_failures_total{stage=\"reload\"}")
        .await;
    let (blocked, bnp) = lb_service(
        &client,
        "blocked",
        8084,
        json!({ "metadata": { "annotations": { "cairn.dev/load-balancer-ips": "127.0.100.13" } } }),
    )
    .await;
    let _blk = Backend::start("127.0.101.1", bnp, "h1-a").await;
    let msg = wait_event(&client, "default", "blocked", "FrontendIsolated", "cannot bind").await;
    assert!(msg.contains("127.0.100.13:8084"), "{msg}");
    agent
        .wait_metric("cairn_ccm_haproxy_reload_failures_total{stage=\"reload\"}", |v| {
            v > failures_before
        })
        .await;
    agent
        .wait_metric("cairn_ccm_haproxy_isolated_frontends", |v| v == 1.0)
        .await;
    // A change made while `blocked` cannot be served still goes into service.
    let (later, lnp) = lb_service(&client, "later", 8085, json!({})).await;
    let _lat = Backend::start("127.0.101.1", lnp, "h1-a").await;
    wait_only(later, "h1-a", 3).await;
    wait_all_answer(web, &["h1-a", "h1-b"]).await;
    assert!(
        !agent.config().contains("svc:default:blocked:"),
        "the refused frontend is left out of the file HAProxy runs"
    );
    drop(squatter);
    wait_only(blocked, "h1-a", 3).await;
    agent
        .wait_metric("cairn_ccm_haproxy_isolated_frontends", |v| v == 0.0)
        .await;

    // 7. A deleted Service's VIP stops answering; the others keep answering.
    delete_and_wait_gone(&client, "default", "web").await;
    wait_refused(web).await;
    wait_only(loc, "h1-a", 3).await;

    // 8. --dry-run prints the configuration it would apply.
    let out = agent_command(&cp, agent.dir.path(), &["--dry-run"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("frontend svc:default:loc:8081"), "{text}");
    assert!(text.contains(&format!("bind {api_vip}:6443")), "{text}");
    assert!(!text.contains("svc:default:web:"), "{text}");
}

/// A request loop (≥ 2000 requests, each on a new connection) runs across ≥ 20 reloads caused
/// by node and Service changes: not one request fails.
#[tokio::test(flavor = "multi_thread")]
async fn reloads_drop_no_request() {
    let Env { cp, client, store } =
        Env::start("net-h2", vip_network("net-h2", "127.0.100.16/28", "10.92.2.0/24")).await;
    start_ccm(&cp, "ccm", "cluster-h2", &store.endpoint, &[]);
    let nodes = [
        ("h2-a", "127.0.102.1"),
        ("h2-b", "127.0.102.2"),
        ("h2-c", "127.0.102.3"),
    ];
    for (n, ip) in nodes {
        ready_node(&client, n, ip, json!({})).await;
    }
    let (steady, np) = lb_service(&client, "steady", 8080, json!({})).await;
    let mut backends = Vec::new();
    for (n, ip) in nodes {
        backends.push(Backend::start(ip, np, n).await);
    }
    let agent = start_agent(&cp, "agent", &[]).await;
    wait_all_answer(steady, &["h2-a", "h2-b", "h2-c"]).await;

    const MIN_REQUESTS: u64 = 2000;
    const RELOADS: usize = 24;
    let done = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let done = done.clone();
        loaders.push(tokio::spawn(async move {
            let (mut n, mut failed) = (0u64, Vec::new());
            // At least MIN_REQUESTS / 4 each, and on until every reload is done (bounded).
            while (n < MIN_REQUESTS / 4 || !done.load(Ordering::Relaxed)) && n < 200_000 {
                match get(steady).await {
                    Ok(b) if b.starts_with("h2-") => {}
                    other => failed.push(format!("request {n}: {other:?}")),
                }
                n += 1;
            }
            (n, failed)
        }));
    }

    let started = std::time::Instant::now();
    let mut c_ready = true;
    let mut count = agent.metric("cairn_ccm_haproxy_reloads_total").await;
    let first = count;
    let mut extra = Vec::new();
    for i in 0..RELOADS {
        if i % 4 == 3 {
            // A new Service: a new frontend on a new VIP.
            let name = format!("extra-{i}");
            create_lb(&client, "default", &name, 9000 + i as i32, json!({})).await;
            extra.push(name);
        } else if i % 8 == 6 {
            let name = extra.remove(0);
            Api::<Service>::namespaced(client.clone(), "default")
                .delete(&name, &Default::default())
                .await
                .unwrap();
        } else {
            // h2-c leaves or rejoins the backend set of the Service under load.
            c_ready = !c_ready;
            set_ready(&client, "h2-c", "127.0.102.3", c_ready).await;
        }
        let before = count;
        count = agent
            .wait_metric("cairn_ccm_haproxy_reloads_total", |v| v > before)
            .await;
    }
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut failed = Vec::new();
    for l in loaders {
        let (n, f) = l.await.unwrap();
        total += n;
        failed.extend(f);
    }
    let reloads_done = count - first;
    eprintln!(
        "{total} requests across {reloads_done} reloads in {took:?}: {} failed",
        failed.len()
    );
    assert!(reloads_done >= 20.0, "{reloads_done} reloads");
    assert!(total >= MIN_REQUESTS, "{total} requests");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    assert_eq!(
        agent
            .metric("cairn_ccm_haproxy_reload_failures_total{stage=\"reload\"}")
            .await,
        0.0
    );
    let hits: u64 = backends.iter().map(|b| b.hits.load(Ordering::Relaxed)).sum();
    assert!(hits >= total, "every request reached a backend: {hits} < {total}");

    // The agent dies with SIGKILL: its HAProxy, orphaned, keeps serving. A new agent starts
    // its own HAProxy and soft-stops the orphan.
    let sock = agent.dir.path().join("master.sock");
    let master = cairn_ccm::haproxy::master::Master::new(&sock, Duration::from_secs(5));
    let orphan = master.show_proc().await.unwrap().master_pid;
    let agent_pid = cp.pid("agent").unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(agent_pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    eventually("agent gone", ACT, || async {
        if cairn_e2e::process_alive(agent_pid) {
            Err("alive")
        } else {
            Ok(())
        }
    })
    .await
    .unwrap();
    assert!(get(steady).await.unwrap().starts_with("h2-"), "the orphan serves");
    let Agent { dir, .. } = agent;
    let _agent = launch_agent(&cp, "agent-2", dir, true, free_port(), &[]).await;
    eventually("the orphaned HAProxy stops", ACT, || async {
        if cairn_e2e::process_alive(orphan) {
            Err("alive")
        } else {
            Ok(())
        }
    })
    .await
    .unwrap();
    let now = master.show_proc().await.unwrap();
    assert_ne!(now.master_pid, orphan);
    let serving: &[&str] = if c_ready {
        &["h2-a", "h2-b", "h2-c"]
    } else {
        &["h2-a", "h2-b"]
    };
    wait_all_answer(steady, serving).await;
}

/// The seed's scenario with real traffic: two clusters on one shared VIP pool (one store, two
/// control planes, two controllers), each with its own agent and HAProxy on this host. Their
/// Services get different VIPs, and each VIP is answered by its own cluster's nodes only.
#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_share_a_pool_and_never_collide() {
    let planes = ControlPlane::start_many(2).await.expect("two control planes");
    let store = Store::start().await;
    let spec = vip_network("net-shared", "127.0.100.32/28", "10.93.2.0/24");
    let clients: Vec<Client> = planes.iter().map(|p| p.client().unwrap()).collect();
    for (i, (cp, c)) in planes.iter().zip(&clients).enumerate() {
        install_crd(c).await;
        create_network(c, "net-shared", spec.clone()).await;
        start_ccm(
            cp,
            "ccm",
            &format!("cluster-{}", ["a", "b"][i]),
            &store.endpoint,
            &[],
        );
    }
    let node_sets = [
        [("a-1", "127.0.104.1"), ("a-2", "127.0.104.2")],
        [("b-1", "127.0.104.11"), ("b-2", "127.0.104.12")],
    ];
    for (c, nodes) in clients.iter().zip(&node_sets) {
        for (n, ip) in nodes {
            ready_node(c, n, ip, json!({})).await;
        }
    }
    // Workloads on different ports and on the same one, as in the seed's report.
    let services = [
        vec![("web", 8080u16), ("db", 15432)],
        vec![("web", 9090u16), ("api", 8080)],
    ];
    let mut vips = Vec::new();
    let mut backends = Vec::new();
    for (ci, c) in clients.iter().enumerate() {
        for (name, port) in &services[ci] {
            let (vip, np) = lb_service(c, name, *port, json!({})).await;
            for (n, ip) in &node_sets[ci] {
                backends.push(Backend::start(ip, np, n).await);
            }
            vips.push((ci, vip));
        }
    }
    let ips: BTreeSet<_> = vips.iter().map(|(_, v)| v.ip()).collect();
    assert_eq!(ips.len(), vips.len(), "a VIP was handed out twice: {vips:?}");
    for (_, v) in &vips {
        let last = match v.ip() {
            std::net::IpAddr::V4(ip) => ip.octets()[3],
            _ => unreachable!(),
        };
        assert!((33..=46).contains(&last), "{v} outside the pool");
    }

    // A runs HAProxy itself; B's HAProxy is run by a supervisor, its agent only reloads it.
    let agents = [
        start_agent(&planes[0], "agent", &[]).await,
        start_supervised_haproxy_and_agent(&planes[1], "agent", &[]).await,
    ];
    let own = |ci: usize| -> Vec<&str> { node_sets[ci].iter().map(|(n, _)| *n).collect() };
    for (ci, vip) in &vips {
        wait_all_answer(*vip, &own(*ci)).await;
    }
    // And then some more traffic: never a foreign backend.
    for (ci, vip) in &vips {
        for _ in 0..25 {
            let b = get(*vip).await.unwrap();
            assert!(
                own(*ci).contains(&b.as_str()),
                "{vip} of cluster {ci} answered by {b}"
            );
        }
    }
    for a in &agents {
        assert_eq!(http(a.metrics, "/readyz").await.unwrap().0, 200, "{}", a.name);
    }

    // A's HAProxy dies (SIGKILL to its master): A's agent starts it again; B never notices.
    let master = cairn_ccm::haproxy::master::Master::new(
        agents[0].dir.path().join("master.sock"),
        Duration::from_secs(5),
    );
    let pid = master.show_proc().await.unwrap().master_pid;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let b_vips: Vec<SocketAddr> = vips.iter().filter(|(ci, _)| *ci == 1).map(|(_, v)| *v).collect();
    // B's traffic runs until A serves again (at least 300 requests, bounded), so it spans the
    // whole restart rather than maybe ending before it.
    let a_back = Arc::new(AtomicBool::new(false));
    let b_traffic = tokio::spawn({
        let a_back = a_back.clone();
        async move {
            let mut failed = Vec::new();
            let mut i = 0;
            while (i < 300 || !a_back.load(Ordering::Relaxed)) && i < 100_000 {
                let v = b_vips[i % b_vips.len()];
                match get(v).await {
                    Ok(b) if b.starts_with("b-") => {}
                    other => failed.push(format!("{v}: {other:?}")),
                }
                i += 1;
            }
            (i, failed)
        }
    });
    eventually("A's HAProxy restarted", ACT, || async {
        match master.show_proc().await {
            Ok(p) if p.master_pid != pid && !p.workers.is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    for (ci, vip) in vips.iter().filter(|(ci, _)| *ci == 0) {
        wait_all_answer(*vip, &own(*ci)).await;
    }
    a_back.store(true, Ordering::Relaxed);
    let (sent, failed) = b_traffic.await.unwrap();
    assert!(sent < 100_000, "B's traffic hit its bound before A served again");
    assert!(
        failed.is_empty(),
        "B's traffic failed while A's HAProxy restarted ({sent} requests): {failed:?}"
    );
}
