//! Shared pieces of the controller's end-to-end tests: a real `cairn-ipam` process, a real
//! `cairn-ccm` process (run by the control plane harness, so it dies with it), and helpers to
//! install the CRD, create objects and poll for outcomes with deadlines.
#![allow(dead_code, unreachable_pub)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use cairn_e2e::{ControlPlane, eventually};
use k8s_openapi::{
    api::core::v1::{Event, Node, Service},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;

pub use cairn_ccm::crd::ClusterNetwork;

/// Default deadline for the controller to act.
pub const ACT: Duration = Duration::from_secs(60);

/// Path of a workspace binary of another package, built once per test process (cargo builds
/// only what changed; tests run after the build lock is released).
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
    let root = cairn_e2e::workspace_root();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.insert((package.to_string(), bin.to_string())) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", package, "--bin", bin])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(st.success(), "cargo build -p {package} --bin {bin} failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    target.join("debug").join(bin)
}

/// Certificates minted by `cairn-ipam certs` in a temporary directory: a CA, a server
/// certificate for 127.0.0.1, and client certificates for the cloud and each cluster.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new(clusters: &[&str]) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("cairn-pki-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_str().expect("utf-8 path").to_string();
        let certs = |args: &[&str]| {
            let out = Command::new(workspace_bin("cairn-ipam", "cairn-ipam"))
                .arg("certs")
                .args(args)
                .output()
                .expect("run cairn-ipam certs");
            assert!(
                out.status.success(),
                "cairn-ipam certs {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        certs(&["init", "--dir", &d, "--trust-domain", "cairn.local"]);
        certs(&["issue", "--dir", &d, "--server", "--ip", "127.0.0.1"]);
        certs(&["issue", "--dir", &d, "--cloud"]);
        for c in clusters {
            certs(&["issue", "--dir", &d, "--cluster", c]);
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir
            .path()
            .join(name)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    }

    /// The client files of `stem` (`cloud`, `cluster-<id>`).
    pub fn client(&self, stem: &str) -> cairn_proto::tls::ClientTlsFiles {
        cairn_proto::tls::ClientTlsFiles {
            ca: Some(self.path("ca.pem").into()),
            cert: Some(self.path(&format!("{stem}.pem")).into()),
            key: Some(self.path(&format!("{stem}-key.pem")).into()),
        }
    }

    /// `cairn-ccm`'s flags to reach the store as `cluster`.
    pub fn ccm_flags(&self, cluster: &str) -> Vec<String> {
        vec![
            "--tls-ca".into(),
            self.path("ca.pem"),
            "--tls-cert".into(),
            self.path(&format!("cluster-{cluster}.pem")),
            "--tls-key".into(),
            self.path(&format!("cluster-{cluster}-key.pem")),
        ]
    }
}

/// A `cairn-ipam serve` child on loopback, killed on drop.
pub struct Store {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    /// Set: the store serves mutual TLS only, and [`Store::client`] is the cloud.
    pub pki: Option<Pki>,
}

impl Store {
    pub async fn start() -> Store {
        Store::start_with(None).await
    }

    /// A store serving mutual TLS with `pki`'s CA and server certificate.
    pub async fn start_tls(pki: Pki) -> Store {
        Store::start_with(Some(pki)).await
    }

    async fn start_with(pki: Option<Pki>) -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Store {
            child: None,
            dir,
            endpoint: String::new(),
            pki,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let addr = self.dir.path().join("addr");
        let _ = std::fs::remove_file(&addr);
        // A restart listens where the first start did, so clients keep their endpoint.
        let listen = self
            .endpoint
            .strip_prefix("http://")
            .unwrap_or("127.0.0.1:0")
            .to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("ipam.log"))
            .expect("log");
        let tls: Vec<String> = match &self.pki {
            Some(p) => vec![
                "--tls-cert".into(),
                p.path("server.pem"),
                "--tls-key".into(),
                p.path("server-key.pem"),
                "--client-ca".into(),
                p.path("ca.pem"),
            ],
            None => Vec::new(),
        };
        let child = Command::new(workspace_bin("cairn-ipam", "cairn-ipam"))
            .args([
                "serve",
                "--listen",
                &listen,
                "--default-reuse-grace",
                "0s",
                "--data-dir",
            ])
            .arg(self.dir.path().join("data"))
            .arg("--addr-file")
            .arg(&addr)
            .args(&tls)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn cairn-ipam");
        self.child = Some(child);
        let text = eventually("cairn-ipam serving", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move { std::fs::read_to_string(&addr) }
        })
        .await
        .expect("cairn-ipam did not start");
        let grpc = text
            .lines()
            .find_map(|l| l.strip_prefix("grpc="))
            .expect("grpc= line");
        self.endpoint = format!("http://{grpc}");
    }

    /// SIGKILLs the store.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the store again on the same data and address.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ipam.log")).unwrap_or_default()
    }

    /// The store's own view, through its CLI-facing gRPC API (as the cloud, under mTLS).
    pub async fn client(
        &self,
    ) -> cairn_proto::v1::ipam_service_client::IpamServiceClient<tonic::transport::Channel> {
        let Some(pki) = &self.pki else {
            return cairn_proto::v1::ipam_service_client::IpamServiceClient::connect(self.endpoint.clone())
                .await
                .expect("connect store");
        };
        let ch = pki
            .client("cloud")
            .endpoint(&self.endpoint)
            .expect("TLS endpoint")
            .connect()
            .await
            .expect("connect store over mTLS");
        cairn_proto::v1::ipam_service_client::IpamServiceClient::new(ch)
    }

    /// Every allocation of a cluster.
    pub async fn allocations(&self, cluster: &str) -> Vec<cairn_proto::v1::Allocation> {
        cluster_allocations(self.client().await, cluster).await
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- cairn-ipam log ---\n{}", self.log());
        }
    }
}

#[path = "../../../ipam-store/src/store/etcd_cluster.rs"]
pub mod etcd_cluster;

/// True when the store at `endpoint` (plaintext) says through gRPC health that it serves
/// `cairn.ipam.v1.IpamService`, i.e. it is the leading replica.
pub async fn ipam_serving(endpoint: &str) -> bool {
    let Ok(ch) = tonic::transport::Channel::from_shared(endpoint.to_string())
        .expect("uri")
        .connect()
        .await
    else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "cairn.ipam.v1.IpamService".into(),
        })
        .await
        .is_ok_and(|r| {
            r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
}

/// Every allocation of `cluster` (up to 10,000), through `c`.
pub async fn cluster_allocations(
    mut c: cairn_proto::v1::ipam_service_client::IpamServiceClient<tonic::transport::Channel>,
    cluster: &str,
) -> Vec<cairn_proto::v1::Allocation> {
    c.list_allocations(cairn_proto::v1::ListAllocationsRequest {
        cluster_id: cluster.into(),
        page_size: 10_000,
        ..Default::default()
    })
    .await
    .expect("list")
    .into_inner()
    .allocations
}

/// An HA store: three `cairn-ipam serve --backend etcd` replicas on a 3-member etcd cluster on
/// loopback (lease 2 s), killed on drop. [`HaStore::endpoint`] lists all three, as a
/// controller is configured for an HA store.
pub struct HaStore {
    etcd: etcd_cluster::EtcdCluster,
    dir: tempfile::TempDir,
    replicas: Vec<Option<Child>>,
    endpoints: Vec<String>,
}

impl HaStore {
    pub async fn start() -> HaStore {
        let etcd = etcd_cluster::EtcdCluster::start(3, &cairn_ipam::store::etcd::server_flags());
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = HaStore {
            etcd,
            dir,
            replicas: Vec::new(),
            endpoints: Vec::new(),
        };
        for i in 0..3 {
            let addr = s.dir.path().join(format!("addr-{i}"));
            let log = std::fs::File::create(s.dir.path().join(format!("ipam-{i}.log"))).expect("log");
            let child = Command::new(workspace_bin("cairn-ipam", "cairn-ipam"))
                .args(["serve", "--listen", "127.0.0.1:0", "--default-reuse-grace", "0s"])
                .args([
                    "--backend",
                    "etcd",
                    "--etcd-prefix",
                    "/ccm-ha",
                    "--leader-lease",
                    "2s",
                ])
                .arg("--etcd-endpoints")
                .arg(s.etcd.endpoints().join(","))
                .arg("--addr-file")
                .arg(&addr)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn cairn-ipam");
            s.replicas.push(Some(child));
            let text = eventually("cairn-ipam replica serving", Duration::from_secs(30), || {
                let addr = addr.clone();
                async move { std::fs::read_to_string(&addr) }
            })
            .await
            .expect("cairn-ipam replica did not start");
            let grpc = text
                .lines()
                .find_map(|l| l.strip_prefix("grpc="))
                .expect("grpc= line");
            s.endpoints.push(format!("http://{grpc}"));
        }
        s.leader().await;
        s
    }

    /// Every replica, comma-separated (`--ipam-endpoint`).
    pub fn endpoint(&self) -> String {
        self.endpoints.join(",")
    }

    /// The index of the replica that leads (waits for one).
    pub async fn leader(&self) -> usize {
        eventually("a store replica leads", Duration::from_secs(60), || async {
            for (i, e) in self.endpoints.iter().enumerate() {
                if self.replicas[i].is_none() {
                    continue;
                }
                let Ok(ch) = tonic::transport::Channel::from_shared(e.clone())
                    .expect("uri")
                    .connect()
                    .await
                else {
                    continue;
                };
                let r = tonic_health::pb::health_client::HealthClient::new(ch)
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: "cairn.ipam.v1.IpamService".into(),
                    })
                    .await;
                if r.is_ok_and(|r| r.into_inner().status == 1) {
                    return Ok(i);
                }
            }
            Err("none serves".to_string())
        })
        .await
        .expect("no store replica leads")
    }

    /// SIGKILLs the leading replica; returns its index.
    pub async fn kill_leader(&mut self) -> usize {
        let i = self.leader().await;
        if let Some(mut c) = self.replicas[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        i
    }

    /// A client of the leader.
    pub async fn client(
        &self,
    ) -> cairn_proto::v1::ipam_service_client::IpamServiceClient<tonic::transport::Channel> {
        let i = self.leader().await;
        cairn_proto::v1::ipam_service_client::IpamServiceClient::connect(self.endpoints[i].clone())
            .await
            .expect("connect store leader")
    }

    /// Every allocation of a cluster.
    pub async fn allocations(&self, cluster: &str) -> Vec<cairn_proto::v1::Allocation> {
        cluster_allocations(self.client().await, cluster).await
    }

    pub fn logs(&self) -> String {
        (0..self.replicas.len())
            .map(|i| {
                let t = std::fs::read_to_string(self.dir.path().join(format!("ipam-{i}.log")))
                    .unwrap_or_default();
                format!("--- cairn-ipam replica {i} ---\n{t}")
            })
            .collect()
    }
}

impl Drop for HaStore {
    fn drop(&mut self) {
        for c in self.replicas.iter_mut().filter_map(Option::take) {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Starts `cairn-ccm` for `cluster` against `cp` (as a component of the control plane, so it
/// is killed with it and its log is printed on failure). `name` distinguishes replicas.
pub fn start_ccm(cp: &ControlPlane, name: &str, cluster: &str, store: &str, extra: &[&str]) -> u32 {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-ccm"));
    cmd.arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .args([
            "--cluster-id",
            cluster,
            "--ipam-endpoint",
            store,
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--lease-namespace", "default", "--identity", name])
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("CAIRN_CCM_LOG").unwrap_or_else(|_| "info,cairn_ccm=debug".into()),
        );
    cp.spawn(name, &cmd).expect("spawn cairn-ccm")
}

/// The usual ground of a test: a control plane with the CRD installed, a store, and one
/// ClusterNetwork.
pub struct Env {
    pub cp: ControlPlane,
    pub client: Client,
    pub store: Store,
}

impl Env {
    pub async fn start(network: &str, spec: serde_json::Value) -> Env {
        let cp = ControlPlane::start().await.expect("control plane");
        let client = cp.client().expect("client");
        install_crd(&client).await;
        let store = Store::start().await;
        create_network(&client, network, spec).await;
        Env { cp, client, store }
    }
}

/// Installs the committed CRD and waits until it is served.
pub async fn install_crd(client: &Client) {
    let path: &Path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/crds/clusternetworks.cairn.dev.yaml"
    ));
    let crd: CustomResourceDefinition =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("crd file")).expect("crd yaml");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    eventually("CRD established", ACT, || {
        let api = api.clone();
        async move {
            let c = api
                .get("clusternetworks.cairn.dev")
                .await
                .map_err(|e| e.to_string())?;
            let ok = c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if ok {
                Ok(())
            } else {
                Err("not established yet".to_string())
            }
        }
    })
    .await
    .expect("CRD established");
    // The API discovery of a new CRD lags its Established condition a little.
    let cn: Api<ClusterNetwork> = Api::all(client.clone());
    eventually("ClusterNetwork served", ACT, || {
        let cn = cn.clone();
        async move { cn.list(&ListParams::default()).await.map(|_| ()) }
    })
    .await
    .expect("ClusterNetwork served");
}

/// A ClusterNetwork from JSON (the spec part).
pub async fn create_network(client: &Client, name: &str, spec: serde_json::Value) -> ClusterNetwork {
    let api: Api<ClusterNetwork> = Api::all(client.clone());
    let obj: ClusterNetwork = serde_json::from_value(json!({
        "apiVersion": "cairn.dev/v1alpha1",
        "kind": "ClusterNetwork",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("ClusterNetwork json");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create ClusterNetwork")
}

/// A simple single-VIP-pool network spec.
pub fn vip_network(network: &str, vip_range: &str, node_range: &str) -> serde_json::Value {
    json!({
        "network": network,
        "reuseGraceSeconds": 0,
        "pools": [
            { "name": "vip", "purpose": "VIP", "ranges": [vip_range] },
            { "name": "nodes", "purpose": "NODE", "ranges": [node_range] },
        ],
    })
}

/// A `type: LoadBalancer` Service.
pub async fn create_lb(
    client: &Client,
    ns: &str,
    name: &str,
    port: i32,
    extra: serde_json::Value,
) -> Service {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let mut v = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "type": "LoadBalancer", "selector": { "app": name }, "ports": [ { "port": port, "protocol": "TCP" } ] },
    });
    merge(&mut v, extra);
    let svc: Service = serde_json::from_value(v).expect("service json");
    api.create(&PostParams::default(), &svc)
        .await
        .expect("create service")
}

/// JSON merge (objects merge, everything else replaces).
pub fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// The ingress IPs a Service shows.
pub fn ingress(svc: &Service) -> Vec<String> {
    cairn_ccm::service::ingress_ips(svc)
}

/// Waits until the Service shows `n` ingress IPs; returns them.
pub async fn wait_ingress(client: &Client, ns: &str, name: &str, n: usize) -> Vec<String> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    eventually(&format!("{ns}/{name} has {n} ingress IP(s)"), ACT, || {
        let api = api.clone();
        async move {
            let s = api.get(name).await.map_err(|e| e.to_string())?;
            let ips = ingress(&s);
            if ips.len() == n {
                Ok(ips)
            } else {
                Err(format!("ingress {ips:?}"))
            }
        }
    })
    .await
    .expect("ingress")
}

/// Events about an object (by involved name), newest last.
pub async fn events(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = api
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("events");
    let mut evs: Vec<_> = list
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect();
    // events.k8s.io objects written by the Recorder show up as core Events too.
    evs.dedup();
    evs
}

/// Waits for an event with `reason` whose message contains `needle`.
pub async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str, needle: &str) -> String {
    eventually(
        &format!("event {reason} ({needle}) on {ns}/{name}"),
        ACT,
        || async move {
            let evs = events(client, ns, name).await;
            evs.iter()
                .find(|(r, m)| r == reason && m.contains(needle))
                .map(|(_, m)| m.clone())
                .ok_or_else(|| format!("events so far: {evs:?}"))
        },
    )
    .await
    .expect("event")
}

/// Deletes a Service and waits until it is gone (finalizer removed).
pub async fn delete_and_wait_gone(client: &Client, ns: &str, name: &str) {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    api.delete(name, &DeleteParams::default()).await.expect("delete");
    eventually(&format!("{ns}/{name} gone"), ACT, || {
        let api = api.clone();
        async move {
            match api.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(s)) => Err(format!("still there, finalizers {:?}", s.finalizers())),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .expect("service deleted");
}

/// A Node object like a kubelet with `--cloud-provider=external` registers.
pub async fn create_node(client: &Client, name: &str, labels: BTreeMap<String, String>) -> Node {
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": labels },
        "spec": { "taints": [ { "key": "node.cloudprovider.kubernetes.io/uninitialized", "value": "true", "effect": "NoSchedule" } ] },
    }))
    .expect("node json");
    api.create(&PostParams::default(), &node)
        .await
        .expect("create node")
}

/// `namespace/name` of a Service.
pub fn key(s: &Service) -> String {
    format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any())
}

/// A plain HTTP/1.0 GET on loopback: (status code, body).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The metrics address a `cairn-ccm` component logged.
pub async fn ccm_metrics_addr(cp: &ControlPlane, name: &str) -> String {
    let log = cp.log_path(name);
    eventually("cairn-ccm metrics address in its log", ACT, || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
            text.lines()
                .find(|l| l.contains("serving /metrics"))
                .and_then(|l| l.split("addr=").nth(1))
                .map(|a| a.split_whitespace().next().unwrap_or_default().to_string())
                .ok_or_else(|| "not yet".to_string())
        }
    })
    .await
    .expect("metrics address")
}
