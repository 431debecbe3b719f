//! Test harness: a real `cairn-ipam serve` child process on loopback.
//!
//! [`Server::start`] runs the binary Cargo built for this package on port 0 in a fresh temporary
//! directory and waits (with a deadline) for its `--addr-file`. The server can be stopped with
//! SIGTERM ([`Server::terminate`]) or SIGKILL ([`Server::kill`]) and started again on the same
//! data directory ([`Server::restart`]). It is always killed on drop; when the test is failing,
//! the tail of the server's log is printed and the temporary directory is kept for inspection.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use cairn_proto::v1::{self as pb, ipam_service_client::IpamServiceClient};
use tonic::transport::Channel;

/// The gRPC client type the tests use.
pub type Client = IpamServiceClient<Channel>;

/// How long a server may take to start serving (debug builds on a busy 2-core machine).
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a SIGTERM'd server may take to exit.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// The `cairn-ipam` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cairn-ipam")
}

/// A `cairn-ipam serve` child process.
pub struct Server {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    addr_file: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    /// The bound gRPC address of the current (or last) run.
    pub addr: SocketAddr,
    /// The bound metrics address of the current (or last) run, if any.
    pub metrics: Option<SocketAddr>,
    /// How many times the process was started.
    pub starts: u32,
    /// With etcd: (re)starts wait until this replica leads.
    pub wait_lead: bool,
}

impl Server {
    /// Starts a server with `--default-reuse-grace 0s` and a metrics listener.
    pub async fn start() -> Server {
        Server::start_with(&["--default-reuse-grace", "0s"]).await
    }

    /// Starts a server with extra `serve` flags (added after the harness's own flags).
    pub async fn start_with(extra: &[&str]) -> Server {
        Server::start_on(None, extra).await
    }

    /// Starts a server whose data directory is `data_dir` (default: inside its temporary
    /// directory), with extra `serve` flags.
    pub async fn start_on(data_dir: Option<&Path>, extra: &[&str]) -> Server {
        Server::start_as(data_dir, extra, true).await
    }

    /// An etcd replica that may follow: returns once it serves (leader or not).
    pub async fn start_replica(extra: &[&str]) -> Server {
        Server::start_as(None, extra, false).await
    }

    async fn start_as(data_dir: Option<&Path>, extra: &[&str], wait_lead: bool) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("cairn-ipam-test-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        let mut s = Server {
            data_dir: data_dir.map_or_else(|| root.join("data"), Path::to_path_buf),
            log: root.join("server.log"),
            addr_file: root.join("addrs"),
            root,
            dir: Some(dir),
            extra: extra.iter().map(ToString::to_string).collect(),
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            metrics: None,
            starts: 0,
            wait_lead,
        };
        s.spawn().await;
        s
    }

    /// The temporary directory holding data, log and address file.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sled data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `http://HOST:PORT` of the gRPC listener.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `HOST:PORT` of the gRPC listener (for grpcurl).
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// True while the child runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// The process id of the running child.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is not running").id()
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let _ = std::fs::remove_file(&self.addr_file);
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "==== harness: start #{} ====", self.starts).unwrap();
        let err = log.try_clone().unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--addr-file")
            .arg(&self.addr_file)
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("CAIRN_IPAM_LISTEN")
            .env_remove("CAIRN_IPAM_DATA_DIR")
            .env_remove("CAIRN_IPAM_METRICS_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {}: {e}", bin()));
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.addr_file) {
                let mut grpc = None;
                for line in text.lines() {
                    if let Some(a) = line.strip_prefix("grpc=") {
                        grpc = Some(a.parse().unwrap());
                    } else if let Some(a) = line.strip_prefix("metrics=") {
                        self.metrics = Some(a.parse().unwrap());
                    }
                }
                if let Some(a) = grpc {
                    self.addr = a;
                    if self.wait_lead && self.extra.iter().any(|f| f == "etcd") {
                        // With etcd the replica campaigns first (and waits out a killed
                        // predecessor's lease): wait until it leads.
                        self.wait_serving(deadline).await;
                    }
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "cairn-ipam serve exited with {st} before serving\n{}",
                    self.log_tail(60)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "cairn-ipam serve did not write {} within {START_DEADLINE:?}\n{}",
                    self.addr_file.display(),
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// True when gRPC health says `cairn.ipam.v1.IpamService` is SERVING (this replica leads).
    pub async fn is_serving(&self) -> bool {
        let Ok(ch) = Channel::from_shared(self.endpoint()).unwrap().connect().await else {
            return false;
        };
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        h.check(tonic_health::pb::HealthCheckRequest {
            service: "cairn.ipam.v1.IpamService".into(),
        })
        .await
        .is_ok_and(|r| {
            r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
    }

    async fn wait_serving(&mut self, deadline: Instant) {
        while !self.is_serving().await {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "cairn-ipam serve exited with {st} before leading\n{}",
                    self.log_tail(60)
                );
            }
            assert!(
                Instant::now() < deadline,
                "cairn-ipam did not lead within {START_DEADLINE:?}\n{}",
                self.log_tail(60)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A new client connection.
    pub async fn client(&self) -> Client {
        let ch = Channel::from_shared(self.endpoint())
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}\n{}", self.endpoint(), self.log_tail(40)));
        IpamServiceClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// SIGKILL (no shutdown path at all), then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (with a deadline) for a clean exit; returns the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("server is not running");
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&c),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "cairn-ipam serve did not exit within {STOP_DEADLINE:?} of SIGTERM\n{}",
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the server again on the same data directory (it must be stopped).
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// The last `n` lines of the server's log (all runs).
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "---- last {} line(s) of {} ----\n{}\n---- end of log ----",
            lines.len() - from,
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(80));
            if let Some(d) = self.dir.take() {
                let kept = d.keep();
                eprintln!("kept the server's directory for inspection: {}", kept.display());
            }
        }
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === request builders ===

/// A pool.
pub fn pool(name: &str, purpose: pb::PoolPurpose, ranges: &[&str]) -> pb::Pool {
    pb::Pool {
        name: name.into(),
        purpose: purpose as i32,
        ranges: ranges.iter().map(ToString::to_string).collect(),
        exclusions: vec![],
        auto_assign: None,
    }
}

/// A network with the given prefixes and pools.
pub fn network(name: &str, prefixes: &[&str], pools: Vec<pb::Pool>) -> pb::Network {
    pb::Network {
        name: name.into(),
        prefixes: prefixes.iter().map(ToString::to_string).collect(),
        pools,
        ..Default::default()
    }
}

/// The standard dual-stack test network: prefixes 10.20.0.0/16 + fd00:20::/64, gateway
/// 10.20.0.1, pool `vip` 10.20.1.0/24 + fd00:20::1:0/112, pool `nodes` 10.20.2.0/24.
pub fn net_a(name: &str) -> pb::Network {
    pb::Network {
        name: name.into(),
        prefixes: vec!["10.20.0.0/16".into(), "fd00:20::/64".into()],
        gateways: vec!["10.20.0.1".into()],
        dns_servers: vec!["10.20.0.2".into()],
        vlan: 20,
        pools: vec![
            pool("vip", pb::PoolPurpose::Vip, &["10.20.1.0/24", "fd00:20::1:0/112"]),
            pool("nodes", pb::PoolPurpose::Node, &["10.20.2.0/24"]),
        ],
        ..Default::default()
    }
}

/// An owner.
pub fn owner(cluster: &str, kind: pb::OwnerKind, namespace: &str, name: &str) -> pb::Owner {
    pb::Owner {
        cluster_id: cluster.into(),
        kind: kind as i32,
        namespace: namespace.into(),
        name: name.into(),
        uid: String::new(),
    }
}

/// A Service owner in namespace `default`.
pub fn svc(cluster: &str, name: &str) -> pb::Owner {
    owner(cluster, pb::OwnerKind::Service, "default", name)
}

/// A Node owner.
pub fn node(cluster: &str, name: &str) -> pb::Owner {
    owner(cluster, pb::OwnerKind::Node, "", name)
}

/// A plain Allocate request (IPv4, default pool).
pub fn alloc_req(network: &str, owner: pb::Owner) -> pb::AllocateRequest {
    pb::AllocateRequest {
        network: network.into(),
        owner: Some(owner),
        ..Default::default()
    }
}

/// A TCP port.
pub fn tcp(port: u32) -> pb::PortSpec {
    pb::PortSpec {
        protocol: pb::Protocol::Tcp as i32,
        port,
    }
}

/// Upserts `n` and panics on failure.
pub async fn upsert(c: &mut Client, n: pb::Network) -> pb::UpsertNetworkResponse {
    c.upsert_network(pb::UpsertNetworkRequest {
        network: Some(n),
        expected_version: None,
        dry_run: false,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Allocates and panics on failure.
pub async fn allocate(c: &mut Client, req: pb::AllocateRequest) -> pb::Allocation {
    c.allocate(req).await.unwrap().into_inner().allocation.unwrap()
}

/// Every allocation matching `req`'s filters, following page tokens.
pub async fn list_all(c: &mut Client, mut req: pb::ListAllocationsRequest) -> Vec<pb::Allocation> {
    let mut out = Vec::new();
    loop {
        let r = c.list_allocations(req.clone()).await.unwrap().into_inner();
        out.extend(r.allocations);
        if r.next_page_token.is_empty() {
            return out;
        }
        req.page_token = r.next_page_token;
    }
}

/// Asserts a gRPC error's code and that its message contains every needle.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: tonic::Code, needles: &[&str]) {
    match r {
        Ok(v) => panic!("expected {code:?} mentioning {needles:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected code; message: {}", s.message());
            for n in needles {
                assert!(
                    s.message().contains(n),
                    "{code:?} message {:?} does not mention {n:?}",
                    s.message()
                );
            }
        }
    }
}

/// Writes `text` to `path`.
pub fn write(path: &Path, text: &str) {
    File::create(path).unwrap().write_all(text.as_bytes()).unwrap();
}

/// The grpcurl binary: `$CAIRN_BIN_DIR/grpcurl`, `$CAIRN_CACHE/bin/grpcurl` or
/// `<workspace>/.cache/bin/grpcurl` (`e2e/tools/build.sh grpcurl` builds it there).
pub fn grpcurl_bin() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut candidates = Vec::new();
    if let Ok(d) = std::env::var("CAIRN_BIN_DIR") {
        candidates.push(PathBuf::from(d).join("grpcurl"));
    }
    if let Ok(d) = std::env::var("CAIRN_CACHE") {
        candidates.push(PathBuf::from(d).join("bin/grpcurl"));
    }
    candidates.push(workspace.join(".cache/bin/grpcurl"));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "grpcurl not found (looked at {candidates:?}); build it with `e2e/tools/build.sh grpcurl` \
         (or point CAIRN_BIN_DIR at a directory holding it)"
    );
}

/// Runs `cairn-ipam certs <args>` and panics with its stderr on failure.
pub fn certs(args: &[&str]) {
    let out = std::process::Command::new(bin())
        .arg("certs")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cairn-ipam certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
