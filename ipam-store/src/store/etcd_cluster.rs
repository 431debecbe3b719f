//! Test harness: a real etcd cluster (1 or more members) on loopback, in a temporary
//! directory, killed on drop. Used by the etcd engine's unit tests and (included by path) by
//! the integration tests, so it uses std only.
//!
//! The binary is `$CAIRN_BIN_DIR/etcd` or `<workspace>/.cache/bin/etcd`, built by
//! `e2e/tools/build.sh etcd`; when it is missing, starting a cluster panics saying so (a test
//! without its etcd fails, it never passes).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long members may take to elect a leader (debug builds on a busy 2-core machine).
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// The etcd binary, or a panic saying how to build it.
pub fn etcd_binary() -> PathBuf {
    let dir = match std::env::var_os("CAIRN_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/bin"),
    };
    let bin = dir.join("etcd");
    assert!(
        bin.is_file(),
        "etcd not found at {}: build it with `e2e/tools/build.sh etcd` (into .cache/bin), or point \
         CAIRN_BIN_DIR at a directory holding it",
        bin.display()
    );
    bin
}

static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that was free a moment ago, never handed out twice by this process.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner()).insert(port) {
            return port;
        }
    }
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    /// Plain-HTTP `/health` (and `/metrics`) listener, also when clients use TLS.
    metrics: u16,
    child: Option<Child>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    flags: Vec<String>,
    /// `http` or `https` (client URLs).
    scheme: &'static str,
    members: Vec<Member>,
}

/// Files for a TLS client listener: the CA that signs client certificates and the server's
/// certificate (for 127.0.0.1) and key, PEM.
pub struct ServerTls<'a> {
    /// CA of client certificates (`--trusted-ca-file`, with `--client-cert-auth`).
    pub ca: &'a Path,
    /// Server certificate.
    pub cert: &'a Path,
    /// Server key.
    pub key: &'a Path,
}

impl EtcdCluster {
    /// Starts `n` members with the extra server `flags` and waits until each reports healthy.
    pub fn start(n: usize, flags: &[String]) -> Self {
        Self::start_scheme(n, flags.to_vec(), "http")
    }

    /// Like [`EtcdCluster::start`], with clients on TLS that must present a certificate.
    pub fn start_tls(n: usize, flags: &[String], tls: &ServerTls<'_>) -> Self {
        let mut flags = flags.to_vec();
        flags.extend([
            format!("--cert-file={}", tls.cert.display()),
            format!("--key-file={}", tls.key.display()),
            format!("--trusted-ca-file={}", tls.ca.display()),
            "--client-cert-auth".into(),
        ]);
        Self::start_scheme(n, flags, "https")
    }

    fn start_scheme(n: usize, flags: Vec<String>, scheme: &'static str) -> Self {
        let bin = etcd_binary();
        let dir = tempfile::Builder::new().prefix("cairn-etcd-").tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                metrics: free_port(),
                child: None,
            })
            .collect();
        let mut c = EtcdCluster {
            dir,
            bin,
            flags,
            scheme,
            members,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let client = format!("{}://127.0.0.1:{}", self.scheme, m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new(&self.bin)
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", self.dir.path().join(&m.name).display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--listen-metrics-urls=http://127.0.0.1:{}", m.metrics))
            .arg(format!("--initial-cluster={}", cluster.join(",")))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=cairn-test")
            .arg("--log-level=warn")
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.members[i].child = Some(child);
    }

    /// Client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme, m.client))
            .collect()
    }

    /// The temporary directory (data and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Polls member `i`'s `/health` (true once it has a leader) until the deadline.
    pub fn wait_healthy(&mut self, i: usize) {
        let deadline = Instant::now() + START_DEADLINE;
        let port = self.members[i].metrics;
        loop {
            if health(port) {
                return;
            }
            if let Some(st) = self.members[i].child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("etcd member {i} exited ({st}): {}", self.log_tail(i));
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {i} not healthy: {}",
                self.log_tail(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self, i: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.members[i].name)))
            .unwrap_or_default();
        log.lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `GET /health` over plain HTTP/1.0: true when the member answers `"health":"true"`.
fn health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
