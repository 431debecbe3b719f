//! One control plane: etcd + kube-apiserver on loopback, with its own PKI, ports and temp dir.
//!
//! Longer than the house's ~600 lines on purpose: start-up, readiness, credentials and
//! teardown of one plane share its private state, and splitting them would only spread it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::AuthInfo;
use kube::{Client, Config};
use tokio::sync::OwnedSemaphorePermit;

use crate::binaries::binary_path;
use crate::error::{Error, Result};
use crate::limit;
use crate::pki::{self, Pki};
use crate::ports::free_port;
use crate::process::{self, Component};
use crate::wait::{Attempt, poll};

/// Default dual-stack Service CIDRs (IPv4 first, so IPv4 is the primary family).
pub const DEFAULT_SERVICE_CIDRS: [&str; 2] = ["10.96.0.0/16", "fd00:10:96::/112"];

/// User name and group of the admin identity in the static token file.
pub const ADMIN_USER: &str = "cairn-e2e-admin";

const START_ATTEMPTS: usize = 3;
const LOG_TAIL_LINES: usize = 60;

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// How to start a control plane. `Options::default()` is what [`ControlPlane::start`] uses.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Name used for the kubeconfig cluster/context and the temp dir; default `plane-<n>`.
    pub name: Option<String>,
    /// `--service-cluster-ip-range` entries (at most one per family).
    pub service_cidrs: Vec<String>,
    /// Extra kube-apiserver flags, appended last (so they override the harness's defaults).
    pub extra_apiserver_args: Vec<String>,
    /// How long start-up may take before it fails with the component logs. Default 120 s,
    /// or `$CAIRN_E2E_START_TIMEOUT_SECS`.
    pub start_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        let secs = std::env::var("CAIRN_E2E_START_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(120);
        Self {
            name: None,
            service_cidrs: DEFAULT_SERVICE_CIDRS.iter().map(|s| (*s).to_owned()).collect(),
            extra_apiserver_args: Vec::new(),
            start_timeout: Duration::from_secs(secs),
        }
    }
}

impl Options {
    /// Sets the name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Replaces the Service CIDRs.
    pub fn service_cidrs<I, S>(mut self, cidrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.service_cidrs = cidrs.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a kube-apiserver flag, e.g. `--feature-gates=Foo=true`.
    pub fn apiserver_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_apiserver_args.push(arg.into());
        self
    }

    /// Sets the start-up deadline.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }
}

/// A process the control plane owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// `etcd`, `kube-apiserver`, or the name given to [`ControlPlane::spawn`].
    pub name: String,
    /// Its pid (also its process-group id).
    pub pid: u32,
    /// Its resident set size in KiB, if it is still running.
    pub rss_kib: Option<u64>,
    /// Its log file.
    pub log: PathBuf,
}

/// A running etcd + kube-apiserver pair on loopback. Dropping it kills every process it owns
/// (and their process groups), reaps them, and deletes its directory; if the thread is
/// panicking, the tails of all component logs are printed first.
#[derive(Debug)]
pub struct ControlPlane {
    name: String,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    pki: Pki,
    admin_token: String,
    server_url: String,
    etcd_url: String,
    kubeconfig: PathBuf,
    started_in: Duration,
    /// Order matters: the harness's own components first, extra ones after; teardown runs
    /// in reverse.
    components: Mutex<Vec<Component>>,
    _permit: OwnedSemaphorePermit,
}

impl ControlPlane {
    /// Starts one control plane with default [`Options`] and waits until it serves.
    pub async fn start() -> Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts one control plane with the given options.
    pub async fn start_with(options: Options) -> Result<Self> {
        let permit = limit::acquire(1).await?;
        Self::start_with_permit(options, permit).await
    }

    /// Starts `n` independent control planes concurrently (each with its own etcd, PKI, ports).
    pub async fn start_many(n: usize) -> Result<Vec<Self>> {
        Self::start_many_with(n, Options::default()).await
    }

    /// Starts `n` control planes with the same options; a given name gets `-<i>` appended.
    pub async fn start_many_with(n: usize, options: Options) -> Result<Vec<Self>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut all = Some(limit::acquire(n).await?);
        let mut starts = Vec::with_capacity(n);
        for i in 0..n {
            // Each plane gets a single permit of its own; the last one takes what is left.
            let permit = if i + 1 < n {
                all.as_mut().and_then(|p| p.split(1))
            } else {
                all.take()
            }
            .ok_or_else(|| Error::Invalid("splitting control-plane permits".into()))?;
            let mut opts = options.clone();
            opts.name = options.name.as_ref().map(|n| format!("{n}-{i}"));
            starts.push(Self::start_with_permit(opts, permit));
        }
        let results = futures::future::join_all(starts).await;
        results.into_iter().collect()
    }

    async fn start_with_permit(options: Options, permit: OwnedSemaphorePermit) -> Result<Self> {
        let etcd = binary_path("etcd")?;
        let apiserver = binary_path("kube-apiserver")?;
        let started = Instant::now();
        let name = options
            .name
            .clone()
            .unwrap_or_else(|| format!("plane-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)));
        validate_name(&name)?;

        let prefix = format!("cairn-e2e-{name}-");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix);
        let tmp = match std::env::var_os("CAIRN_E2E_TMPDIR") {
            Some(base) => builder.tempdir_in(base),
            None => builder.tempdir(),
        }
        .map_err(|e| Error::io("creating the control plane's temp dir", e))?;
        let dir_path = tmp.path().to_owned();
        mkdir(&dir_path.join("logs"))?;

        let pki = pki::generate(&dir_path.join("pki")).await?;
        let admin_token = random_token()?;
        // token,user,uid,"group1,group2"
        write(
            &dir_path.join("tokens.csv"),
            &format!("{admin_token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n"),
        )?;

        let mut plane = Self {
            kubeconfig: dir_path.join("kubeconfig"),
            name,
            dir: Some(tmp),
            dir_path,
            pki,
            admin_token,
            server_url: String::new(),
            etcd_url: String::new(),
            started_in: Duration::ZERO,
            components: Mutex::new(Vec::new()),
            _permit: permit,
        };

        let mut attempt = 1;
        loop {
            match plane.boot(&etcd, &apiserver, &options).await {
                Ok(()) => break,
                Err(e) if e.is_port_conflict() && attempt < START_ATTEMPTS => {
                    tracing::warn!(plane = %plane.name, error = %e, "port conflict; retrying with new ports");
                    plane.kill_all();
                    plane.components().clear();
                    let etcd_dir = plane.dir_path.join("etcd");
                    std::fs::remove_dir_all(&etcd_dir)
                        .or_else(|e| {
                            if e.kind() == std::io::ErrorKind::NotFound {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        })
                        .map_err(|e| Error::io("removing etcd data for a retry", e))?;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        plane.started_in = started.elapsed();
        tracing::info!(plane = %plane.name, url = %plane.server_url, took = ?plane.started_in, "control plane ready");
        Ok(plane)
    }

    /// Starts etcd, waits for its port, starts kube-apiserver, waits for /readyz and for the
    /// `default` namespace.
    async fn boot(&mut self, etcd: &Path, apiserver: &Path, options: &Options) -> Result<()> {
        let deadline = options.start_timeout;
        let began = Instant::now();
        let (client_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        self.etcd_url = format!("http://127.0.0.1:{client_port}");
        self.server_url = format!("https://127.0.0.1:{api_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let dir = &self.dir_path;

        let mut cmd = Command::new(etcd);
        cmd.arg("--name=cairn-e2e")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={}", self.etcd_url))
            .arg(format!("--advertise-client-urls={}", self.etcd_url))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=cairn-e2e={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        self.add_component("etcd", &cmd)?;

        // The apiserver would retry etcd on its own, but starting it only once etcd listens
        // keeps its log readable and blames the right component when etcd fails.
        let etcd_addr = format!("127.0.0.1:{client_port}");
        self.poll_while_running("etcd to listen", deadline.saturating_sub(began.elapsed()), || {
            let addr = etcd_addr.clone();
            async move { tokio::net::TcpStream::connect(addr).await.map(drop) }
        })
        .await?;

        let pki = &self.pki;
        let mut cmd = Command::new(apiserver);
        cmd.arg(format!("--etcd-servers={}", self.etcd_url))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg("--advertise-address=127.0.0.1")
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--cert-dir={}", pki.dir.display()))
            .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
            .arg(format!("--tls-private-key-file={}", pki.serving_key.display()))
            .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
            .arg(format!("--token-auth-file={}", dir.join("tokens.csv").display()))
            .arg("--authorization-mode=RBAC")
            .arg("--allow-privileged=true")
            .arg(format!(
                "--service-cluster-ip-range={}",
                options.service_cidrs.join(",")
            ))
            // No controller-manager creates default ServiceAccounts (envtest does the same).
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg(format!("--service-account-issuer={}", self.server_url))
            .arg(format!("--service-account-key-file={}", pki.sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki.sa_key.display()
            ))
            // Lean: no APF bootstrap objects/queues, no pprof handlers.
            .arg("--enable-priority-and-fairness=false")
            .arg("--profiling=false")
            .args(&options.extra_apiserver_args);
        self.add_component("kube-apiserver", &cmd)?;
        self.write_kubeconfig_file(&self.kubeconfig, &self.admin_token)?;

        let client = self.client()?;
        let readyz = || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| format!("building /readyz request: {e}"))?;
                match client.request_text(req).await {
                    Ok(body) if body.trim() == "ok" => Ok(()),
                    Ok(body) => Err(format!("/readyz said {body:?}")),
                    Err(e) => Err(format!("/readyz: {e}")),
                }
            }
        };
        self.poll_while_running(
            "kube-apiserver /readyz",
            deadline.saturating_sub(began.elapsed()),
            readyz,
        )
        .await?;
        // The system-namespaces controller runs as a post-start hook; tests expect `default`.
        let namespaces: Api<Namespace> = Api::all(client);
        self.poll_while_running(
            "namespace default",
            deadline.saturating_sub(began.elapsed()),
            || {
                let namespaces = namespaces.clone();
                async move { namespaces.get("default").await.map(drop) }
            },
        )
        .await
    }

    /// Polls `check` until it succeeds, failing at once if a component exits, and on timeout
    /// with [`Error::StartTimeout`] carrying the component logs.
    async fn poll_while_running<E, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<(), E>>,
        E: std::fmt::Display,
    {
        // One attempt may not take longer than 5 s (nor run past the deadline).
        let result = poll(what, timeout, Duration::from_secs(5), || {
            let alive = self.check_running();
            let attempt = check();
            async move {
                if let Err(e) = alive {
                    return Attempt::Fail(e);
                }
                match attempt.await {
                    Ok(()) => Attempt::Done(()),
                    Err(e) => Attempt::Retry(e.to_string()),
                }
            }
        })
        .await;
        match result {
            Err(Error::Timeout { waited, last, .. }) => {
                // A component that died in the last interval is the better explanation.
                self.check_running()?;
                Err(Error::StartTimeout {
                    name: self.name.clone(),
                    waited,
                    last: format!("{what}: {last}"),
                    logs: self.log_tails(LOG_TAIL_LINES),
                })
            }
            other => other,
        }
    }

    fn components(&self) -> MutexGuard<'_, Vec<Component>> {
        self.components
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add_component(&self, name: &str, cmd: &Command) -> Result<u32> {
        let log = self.log_path(name);
        let component = Component::spawn(name, cmd, &log)?;
        let pid = component.pid;
        self.components().push(component);
        Ok(pid)
    }

    /// The control plane's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `https://127.0.0.1:<port>` of the kube-apiserver.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// `http://127.0.0.1:<port>` of its etcd.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// Path of an admin kubeconfig (absolute CA path, inline bearer token) for kubectl and for
    /// child processes such as `cairn-ccm --kubeconfig`. Valid while the plane lives.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The PEM CA certificate that signed the apiserver's serving certificate.
    pub fn ca_cert_path(&self) -> &Path {
        &self.pki.ca_cert
    }

    /// The admin bearer token (user [`ADMIN_USER`], group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The control plane's private directory (pki/, etcd/, logs/, kubeconfig).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// How long start-up took (PKI, etcd, apiserver until ready).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// A `kube::Config` for the admin identity.
    pub fn config(&self) -> Result<Config> {
        self.config_for_token(&self.admin_token)
    }

    /// A `kube::Config` authenticating with `token` (e.g. from
    /// [`service_account_token`](Self::service_account_token)).
    pub fn config_for_token(&self, token: &str) -> Result<Config> {
        let url = self
            .server_url
            .parse()
            .map_err(|e| Error::Invalid(format!("server url {}: {e}", self.server_url)))?;
        let mut config = Config::new(url);
        config.root_cert = Some(vec![self.pki.ca_der.clone()]);
        // AuthInfo's token is a secrecy::SecretString; build it through serde rather than
        // depending on secrecy directly.
        config.auth_info = serde_json::from_value::<AuthInfo>(serde_json::json!({ "token": token }))
            .map_err(|e| Error::Invalid(format!("building auth info: {e}")))?;
        Ok(config)
    }

    /// A new admin client. Call it inside the tokio runtime that will use the client (a
    /// client's background task lives on the runtime it was made in; `#[tokio::test]` makes
    /// one runtime per test).
    pub fn client(&self) -> Result<Client> {
        Ok(Client::try_from(self.config()?)?)
    }

    /// A new client authenticating with `token`.
    pub fn client_for_token(&self, token: &str) -> Result<Client> {
        Ok(Client::try_from(self.config_for_token(token)?)?)
    }

    /// Creates a namespace unless it exists. (No controller-manager runs: nothing else
    /// creates namespaces, and deleted ones stay `Terminating`.)
    pub async fn ensure_namespace(&self, name: &str) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client()?);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Mints a token for ServiceAccount `namespace/name` with the TokenRequest API, creating
    /// the namespace and the ServiceAccount if needed. The token authenticates as
    /// `system:serviceaccount:<namespace>:<name>`, valid for one hour, audience = the apiserver.
    pub async fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        self.ensure_namespace(namespace).await?;
        let sas: Api<ServiceAccount> = Api::namespaced(self.client()?, namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        match sas.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(e) => return Err(e.into()),
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let response: TokenRequest = sas
            .create_subresource("token", name, &PostParams::default(), &request)
            .await?;
        response
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Invalid(format!("TokenRequest for {namespace}/{name} returned no token")))
    }

    /// A client acting as ServiceAccount `namespace/name` (see
    /// [`service_account_token`](Self::service_account_token)).
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        let token = self.service_account_token(namespace, name).await?;
        self.client_for_token(&token)
    }

    /// Writes a kubeconfig authenticating with `token` to `<dir>/<file_name>` and returns its
    /// path — for running a controller as a ServiceAccount in a child process.
    pub fn write_kubeconfig_for_token(&self, file_name: &str, token: &str) -> Result<PathBuf> {
        validate_name(file_name)?;
        let path = self.dir_path.join(file_name);
        self.write_kubeconfig_file(&path, token)?;
        Ok(path)
    }

    fn write_kubeconfig_file(&self, path: &Path, token: &str) -> Result<()> {
        // JSON-quoted scalars are valid YAML and survive any character in paths or tokens.
        let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
        let name = q(&self.name);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n    namespace: default\ncurrent-context: {name}\n",
            server = q(&self.server_url),
            ca = q(&self.pki.ca_cert.to_string_lossy()),
            token = q(token),
        );
        write(path, &text)
    }

    /// Starts an extra process owned by this control plane (e.g. `cairn-ccm --kubeconfig …`):
    /// stdout/stderr go to `logs/<name>.log`; it is killed (with its process group) before
    /// the apiserver on drop, and its log tail is printed on panic. Returns its pid.
    pub fn spawn(&self, name: &str, command: &Command) -> Result<u32> {
        validate_name(name)?;
        if self.is_running(name) {
            return Err(Error::Invalid(format!(
                "a component named {name} is already running"
            )));
        }
        self.add_component(name, command)
    }

    /// SIGKILLs the named component (and its process group) and reaps it. Returns false if
    /// no component has that name.
    pub fn kill(&self, name: &str) -> bool {
        let mut components = self.components();
        let mut found = false;
        for c in components.iter_mut().filter(|c| c.name == name) {
            c.kill();
            found = true;
        }
        found
    }

    /// True if the named component is running.
    pub fn is_running(&self, name: &str) -> bool {
        self.components()
            .iter_mut()
            .any(|c| c.name == name && c.exit_status().is_none())
    }

    /// [`Error::ComponentExited`] (with its log tail) if any component has exited, except
    /// those stopped with [`kill`](Self::kill).
    pub fn check_running(&self) -> Result<()> {
        for c in self.components().iter_mut() {
            c.check_running()?;
        }
        Ok(())
    }

    /// Path of a component's log file (`logs/<name>.log`).
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir_path.join("logs").join(format!("{name}.log"))
    }

    /// The last `lines` lines of one component's log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        process::tail(&self.log_path(name), lines)
    }

    /// The last `lines` lines of every component's log, with headers.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for c in self.components().iter() {
            let _ = writeln!(
                out,
                "----- {} / {} (pid {}), last {lines} lines of {} -----\n{}",
                self.name,
                c.name,
                c.pid,
                c.log.display(),
                process::tail(&c.log, lines)
            );
        }
        out
    }

    /// Prints the tail of every component log to stderr (captured and shown by the test
    /// harness for a failing test).
    pub fn dump_logs(&self) {
        eprintln!("{}", self.log_tails(LOG_TAIL_LINES));
    }

    /// Awaits `body`; if it returns an error, prints the component log tails before passing
    /// the error on. (A panic prints them anyway, from `Drop`.) For tests that fail with `?`:
    ///
    /// ```no_run
    /// # async fn t() -> anyhow::Result<()> {
    /// let cp = cairn_e2e::ControlPlane::start().await?;
    /// cp.logs_on_error(async {
    ///     let _client = cp.client()?;
    ///     anyhow::Ok(())
    /// })
    /// .await
    /// # }
    /// ```
    pub async fn logs_on_error<T, E, Fut>(&self, body: Fut) -> std::result::Result<T, E>
    where
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        let result = body.await;
        if result.is_err() {
            eprintln!(
                "control plane {}: the test body failed; component logs follow",
                self.name
            );
            self.dump_logs();
        }
        result
    }

    /// The processes this plane owns, with their memory use.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        self.components()
            .iter_mut()
            .map(|c| ProcessInfo {
                name: c.name.clone(),
                pid: c.pid,
                rss_kib: if c.exit_status().is_none() {
                    process::rss_kib(c.pid)
                } else {
                    None
                },
                log: c.log.clone(),
            })
            .collect()
    }

    /// Pids of the processes this plane owns.
    pub fn pids(&self) -> Vec<u32> {
        self.components().iter().map(|c| c.pid).collect()
    }

    /// Pid of the named component.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.components()
            .iter()
            .rev()
            .find(|c| c.name == name)
            .map(|c| c.pid)
    }

    /// A `kubectl` command (from the tools dir) with `--kubeconfig` set to the admin kubeconfig.
    pub fn kubectl(&self) -> Result<Command> {
        let mut cmd = Command::new(binary_path("kubectl")?);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        Ok(cmd)
    }

    /// Stops everything now (same as dropping).
    pub fn shutdown(self) {
        drop(self);
    }

    fn kill_all(&self) {
        for c in self.components().iter_mut().rev() {
            c.kill();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "control plane {} torn down during a panic; component logs follow",
                self.name
            );
            self.dump_logs();
        }
        self.kill_all();
        if std::env::var_os("CAIRN_E2E_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
            && let Some(dir) = self.dir.take()
        {
            eprintln!("CAIRN_E2E_KEEP: kept {}", dir.keep().display());
        }
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid name {name:?}: use [A-Za-z0-9._-], ≤63 chars"
        )))
    }
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn random_token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("reading /dev/urandom for the admin token", e))?;
    Ok(bytes.iter().fold(String::with_capacity(48), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}
