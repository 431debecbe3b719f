//! Putting a configuration into service: validate with `haproxy -c`, swap the file atomically
//! (write a temp file beside it, fsync, rename, fsync the directory), reload through the
//! master CLI; and, with `--manage-haproxy`, run HAProxy itself (`haproxy -W -S …`).
//!
//! A configuration that fails validation never reaches the file. One that validates but fails
//! to load (e.g. a `VIP:port` another process holds) leaves the old worker serving the
//! previous configuration; the previous file is then written back, so a restart of HAProxy
//! comes up with what is running.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};

use super::master::{Master, MasterError};

/// The HAProxy binary when `--haproxy-bin` is not given: `haproxy` on `$PATH`, else
/// `/usr/sbin/haproxy` (Debian's path, not on every `$PATH`).
pub fn default_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("haproxy").is_file()))
        .unwrap_or(false);
    if on_path || !Path::new("/usr/sbin/haproxy").is_file() {
        PathBuf::from("haproxy")
    } else {
        PathBuf::from("/usr/sbin/haproxy")
    }
}

/// Applying failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// `haproxy -c` refused the configuration; nothing changed.
    #[error("haproxy -c rejected the configuration: {output}")]
    Rejected {
        /// HAProxy's complaints.
        output: String,
    },
    /// HAProxy could not load the new configuration; the previous one keeps running.
    #[error("reload failed: {message}")]
    ReloadFailed {
        /// Why (HAProxy's alerts when the agent runs HAProxy, else a pointer to its log).
        message: String,
    },
    /// The master CLI does not answer.
    #[error(transparent)]
    Master(#[from] MasterError),
    /// File or process I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl ApplyError {
    /// Metric label of the stage that failed.
    pub fn stage(&self) -> &'static str {
        match self {
            ApplyError::Rejected { .. } => "validate",
            ApplyError::ReloadFailed { .. } | ApplyError::Master(_) => "reload",
            ApplyError::Io { .. } => "io",
        }
    }

    /// HAProxy's own words about the failure, if any.
    pub fn output(&self) -> &str {
        match self {
            ApplyError::Rejected { output } => output,
            ApplyError::ReloadFailed { message } => message,
            _ => "",
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ApplyError {
    let what = what.into();
    move |source| ApplyError::Io { what, source }
}

/// Line numbers HAProxy names as `[<file>:<line>]` in its messages about `file`.
pub fn cited_lines(output: &str, file: &Path) -> Vec<usize> {
    let name = file.to_string_lossy();
    let mut out = Vec::new();
    for (i, _) in output.match_indices('[') {
        let rest = &output[i + 1..];
        let Some(end) = rest.find(']') else { continue };
        let Some((f, line)) = rest[..end].rsplit_once(':') else {
            continue;
        };
        if (f == name || name.ends_with(f) || f.ends_with(&*name))
            && let Ok(n) = line.trim().parse()
            && !out.contains(&n)
        {
            out.push(n);
        }
    }
    out
}

/// Writes `text` to `path` atomically: readers see the old file or the new one, never a mix,
/// and a crash leaves one of them.
pub async fn write_atomic(path: &Path, text: &str) -> Result<(), ApplyError> {
    let tmp = temp_path(path);
    write_synced(&tmp, text).await?;
    let r = rename_synced(&tmp, path).await;
    if r.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    r
}

/// A fresh temp name beside `path`, unique per process and call: a name an attacker (or a
/// second agent on the same directory) could predict and pre-create would let them choose
/// what is renamed over the configuration; [`write_synced`] also refuses to open an existing
/// file.
fn temp_path(path: &Path) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "haproxy.cfg".into());
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(".{name}.cairn-{}-{seq}.tmp", std::process::id()))
}

/// The mode of the files the agent writes: HAProxy's group may read them, nobody else (the
/// configuration names every backend address).
pub const FILE_MODE: u32 = 0o640;

async fn write_synced(path: &Path, text: &str) -> Result<(), ApplyError> {
    use tokio::io::AsyncWriteExt as _;
    // O_CREAT|O_EXCL: never follows a symlink or reuses a file someone else created.
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .await
        .map_err(io(format!("create {}", path.display())))?;
    f.write_all(text.as_bytes())
        .await
        .map_err(io(format!("write {}", path.display())))?;
    f.sync_all()
        .await
        .map_err(io(format!("fsync {}", path.display())))?;
    Ok(())
}

async fn rename_synced(from: &Path, to: &Path) -> Result<(), ApplyError> {
    tokio::fs::rename(from, to).await.map_err(io(format!(
        "rename {} to {}",
        from.display(),
        to.display()
    )))?;
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is durable once the directory is.
        if let Ok(d) = tokio::fs::File::open(dir).await {
            let _ = d.sync_all().await;
        }
    }
    Ok(())
}

/// The last lines HAProxy printed (when the agent runs it), numbered.
#[derive(Debug, Default)]
pub struct LogRing {
    inner: Mutex<(u64, VecDeque<String>)>,
}

const RING: usize = 400;

impl LogRing {
    fn push(&self, line: String) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        g.1.push_back(line);
        if g.1.len() > RING {
            g.1.pop_front();
        }
    }

    /// Sequence number of the last line.
    pub fn seq(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Lines after `seq`.
    pub fn since(&self, seq: u64) -> Vec<String> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = usize::try_from(g.0.saturating_sub(seq)).unwrap_or(usize::MAX);
        let skip = g.1.len().saturating_sub(n);
        g.1.iter().skip(skip).cloned().collect()
    }
}

/// HAProxy as the agent drives it.
#[derive(Debug)]
pub struct Haproxy {
    /// The binary.
    pub bin: PathBuf,
    /// The configuration file it runs.
    pub config: PathBuf,
    /// Its master CLI.
    pub master: Master,
    /// How long a reload or a start may take.
    pub reload_timeout: Duration,
    /// HAProxy's output, when the agent runs it.
    pub log: Arc<LogRing>,
    /// The master process, when the agent runs it.
    child: Option<Child>,
}

impl Haproxy {
    /// A handle; nothing runs yet.
    pub fn new(bin: PathBuf, config: PathBuf, master_socket: PathBuf, reload_timeout: Duration) -> Self {
        Haproxy {
            bin,
            config,
            master: Master::new(master_socket, Duration::from_secs(5)),
            reload_timeout,
            log: Arc::new(LogRing::default()),
            child: None,
        }
    }

    /// `haproxy -v`'s first line; fails when the binary cannot run or is older than 2.0
    /// (no master CLI).
    pub async fn version(&self) -> Result<String, ApplyError> {
        let out = Command::new(&self.bin)
            .arg("-v")
            .output()
            .await
            .map_err(io(format!("run {} -v", self.bin.display())))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or_default().trim().to_string();
        let major: Option<u32> = first
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok());
        match major {
            Some(m) if m >= 2 => Ok(first),
            _ => Err(ApplyError::Io {
                what: format!("{} -v", self.bin.display()),
                source: std::io::Error::other(format!(
                    "HAProxy 2.x or newer is needed (master CLI); got {first:?}"
                )),
            }),
        }
    }

    /// `haproxy -c -f path`.
    pub async fn validate(&self, path: &Path) -> Result<(), ApplyError> {
        let out = Command::new(&self.bin)
            .args(["-c", "-f"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io(format!("run {} -c", self.bin.display())))?;
        if out.status.success() {
            return Ok(());
        }
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(ApplyError::Rejected {
            output: output.trim().to_string(),
        })
    }

    /// Validates `text` in a temp file beside the configuration and, if HAProxy accepts it,
    /// renames it over the configuration. On rejection the file is untouched; the error's
    /// line numbers are those of `text`.
    pub async fn install(&self, text: &str) -> Result<(), ApplyError> {
        let tmp = temp_path(&self.config);
        write_synced(&tmp, text).await?;
        if let Err(e) = self.validate(&tmp).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            // Name the real file in messages: that is what an operator looks at.
            return Err(match e {
                ApplyError::Rejected { output } => ApplyError::Rejected {
                    output: output.replace(&*tmp.to_string_lossy(), &self.config.to_string_lossy()),
                },
                e => e,
            });
        }
        let r = rename_synced(&tmp, &self.config).await;
        if r.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        r
    }

    /// Whether the agent runs HAProxy and it is alive.
    pub fn child_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Reloads the running HAProxy from the file on disk.
    pub async fn reload(&self) -> Result<(), ApplyError> {
        let seq = self.log.seq();
        match self.master.reload(self.reload_timeout).await {
            Ok(_) => Ok(()),
            Err(MasterError::ReloadFailed) => Err(ApplyError::ReloadFailed {
                message: self.alerts_since(seq, self.child.is_some()).await,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// HAProxy's alerts after `seq` (waiting briefly for its output to arrive), or a pointer
    /// to its log when the agent does not see its output.
    async fn alerts_since(&self, seq: u64, ours: bool) -> String {
        if !ours {
            return "HAProxy refused the new configuration; see HAProxy's log".into();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let lines = self.log.since(seq);
            let done = lines
                .iter()
                .any(|l| l.contains("Loading failure") || l.contains("Exiting") || l.contains("exit("));
            if done || tokio::time::Instant::now() >= deadline {
                let alerts: Vec<String> = lines.into_iter().filter(|l| l.contains("[ALERT]")).collect();
                return if alerts.is_empty() {
                    "HAProxy refused the new configuration".into()
                } else {
                    alerts.join("\n")
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts HAProxy in master-worker mode with the file on disk and waits until a worker
    /// runs. On failure the process is gone and the error carries its alerts.
    ///
    /// A master that still answers on the socket — left by an earlier run of the agent that
    /// was killed without stopping it — is soft-stopped (SIGUSR1: its workers close their
    /// listeners and finish their connections) once the new one runs, so the two never serve
    /// different configurations for long.
    pub async fn start(&mut self) -> Result<(), ApplyError> {
        let seq = self.log.seq();
        let ours = self.child.as_ref().and_then(Child::id);
        let stale = self
            .master
            .show_proc()
            .await
            .ok()
            .map(|p| p.master_pid)
            .filter(|pid| Some(*pid) != ours);
        let mut master_arg = self.master.path().as_os_str().to_owned();
        master_arg.push(",mode,600");
        let mut child = Command::new(&self.bin)
            .arg("-W")
            .arg("-S")
            .arg(master_arg)
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("start {}", self.bin.display())))?;
        let mut readers = Vec::new();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let log = self.log.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("[ALERT]") {
                        tracing::error!(target: "haproxy", "{line}");
                    } else if line.contains("[WARNING]") {
                        tracing::warn!(target: "haproxy", "{line}");
                    } else {
                        tracing::info!(target: "haproxy", "{line}");
                    }
                    log.push(line);
                }
            }));
        }
        let pid = child.id();
        tracing::info!(pid, config = %self.config.display(), "started haproxy");
        // Running once the master answers with a worker; failed if the process exits.
        let deadline = tokio::time::Instant::now() + self.reload_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                // Its output is complete once the readers reach the end of the pipes.
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), futures::future::join_all(readers)).await;
                let message = self.alerts_since(seq, true).await;
                return Err(ApplyError::ReloadFailed {
                    message: format!("haproxy exited ({status}): {message}"),
                });
            }
            if let Ok(p) = self.master.show_proc().await
                && Some(p.master_pid) == pid
                && !p.workers.is_empty()
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill().await;
                return Err(MasterError::Timeout(self.reload_timeout).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child = Some(child);
        if let Some(old) = stale {
            tracing::warn!(
                pid = old,
                "an HAProxy master from an earlier run was still serving; soft-stopping it"
            );
            signal(old, rustix::process::Signal::USR1);
        }
        Ok(())
    }

    /// Resolves when the HAProxy the agent runs exits (never, if it runs none).
    pub async fn exited(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self.child.as_mut() {
            Some(c) => {
                let r = c.wait().await;
                self.child = None;
                r
            }
            None => std::future::pending().await,
        }
    }

    /// Stops the HAProxy the agent runs: SIGTERM to the master (it stops its workers), then
    /// SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else { return };
        if let Some(pid) = c.id() {
            signal(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(grace, c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
        tracing::info!("stopped haproxy");
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw)
        && let Err(e) = rustix::process::kill_process(pid, sig)
    {
        tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e, "could not signal HAProxy");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cited_lines_of_the_file() {
        let out = "[ALERT]    (12) : config : parsing [/etc/haproxy/haproxy.cfg:23] : unknown keyword 'bindd'\n\
                   [ALERT]    (12) : Binding [/etc/haproxy/haproxy.cfg:40] for frontend x: cannot bind socket\n\
                   [ALERT]    (12) : config : parsing [/other.cfg:7] : nope\n\
                   [ALERT]    (12) : [haproxy.main()] Some protocols failed";
        assert_eq!(
            cited_lines(out, Path::new("/etc/haproxy/haproxy.cfg")),
            vec![23, 40]
        );
    }

    #[test]
    fn log_ring_since() {
        let r = LogRing::default();
        r.push("a".into());
        let s = r.seq();
        r.push("b".into());
        r.push("c".into());
        assert_eq!(r.since(s), vec!["b", "c"]);
        assert!(r.since(r.seq()).is_empty());
        for i in 0..1000 {
            r.push(i.to_string());
        }
        assert_eq!(r.since(0).len(), RING);
    }

    /// The `haproxy` binary these tests run. A missing or broken `haproxy` fails the test that
    /// needs it, never passes it: there is no opt-out (`.ci/run` installs haproxy; so does
    /// `apt-get install haproxy` on a developer machine).
    pub(crate) fn require_haproxy() -> PathBuf {
        let b = default_bin();
        match std::process::Command::new(&b).arg("-v").output() {
            Ok(out) if out.status.success() => b,
            Ok(out) => panic!(
                "`{} -v` failed ({}): this test needs a working haproxy\n{}",
                b.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!(
                "cannot run `{}` ({e}): this test needs haproxy on PATH or at /usr/sbin/haproxy \
                 (apt-get install haproxy; .ci/run installs it)",
                b.display()
            ),
        }
    }

    #[tokio::test]
    async fn install_validates_then_swaps() {
        let bin = require_haproxy();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        let h = Haproxy::new(
            bin,
            cfg.clone(),
            dir.path().join("m.sock"),
            Duration::from_secs(5),
        );
        assert!(h.version().await.unwrap().contains("HAProxy"));
        let good = "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\n\
                    frontend f\n    bind 127.0.0.1:1\n    default_backend b\nbackend b\n";
        h.install(good).await.unwrap();
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), good);
        let bad = format!("{good}frontend x\n    bindd 127.0.0.1:1\n");
        // Line 11 is `bindd`.
        let e = h.install(&bad).await.unwrap_err();
        assert_eq!(e.stage(), "validate");
        assert_eq!(cited_lines(e.output(), &cfg), vec![11], "{e}");
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), good, "untouched");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left");
    }

    #[tokio::test]
    async fn files_are_0640_and_never_written_through_a_planted_temp_name() {
        use std::os::unix::fs::PermissionsExt as _;
        let bin = require_haproxy();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        // What someone with write access to the directory could plant at a predictable name.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".haproxy.cfg.cairn-new")).unwrap();
        let h = Haproxy::new(
            bin,
            cfg.clone(),
            dir.path().join("m.sock"),
            Duration::from_secs(5),
        );
        let good = "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\n\
                    frontend f\n    bind 127.0.0.1:1\n    default_backend b\nbackend b\n";
        h.install(good).await.unwrap();
        write_atomic(&dir.path().join("agent.addr"), "metrics=127.0.0.1:1\n")
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "keep",
            "written through the link"
        );
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), good);
        for f in [&cfg, &dir.path().join("agent.addr")] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            // 0640, or less under a stricter umask; never readable by others.
            assert_eq!(mode & !FILE_MODE, 0, "{} is {mode:o}", f.display());
            assert_eq!(mode & 0o600, 0o600, "{} is {mode:o}", f.display());
        }
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [".haproxy.cfg.cairn-new", "agent.addr", "haproxy.cfg", "victim"]
        );
    }

    /// A long connection (a database session, a websocket) is served by the worker that
    /// accepted it until it ends: reloads must never kill that worker, however many there are
    /// (`mworker-max-reloads 50` did, after the 50th).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_connection_survives_a_hundred_reloads() {
        use crate::haproxy::{
            model::{Check, LbConfig, Proxy, Server, Settings},
            render::render,
        };
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let bin = require_haproxy();
        let dir = tempfile::tempdir().unwrap();
        // The backend: an echo server.
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = backend.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let frontend = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = LbConfig {
            settings: Settings {
                stats: None,
                hard_stop_after: Duration::from_secs(3600),
                maxconn: None,
                user: None,
                group: None,
                log: None,
            },
            proxies: vec![Proxy {
                name: "echo".into(),
                owner: None,
                binds: vec![frontend],
                check: Check::Tcp,
                servers: vec![Server {
                    name: "n1".into(),
                    addr: backend_addr,
                }],
                source_ranges: None,
            }],
        };
        let path = dir.path().join("haproxy.cfg");
        let mut h = Haproxy::new(bin, path, dir.path().join("m.sock"), Duration::from_secs(10));
        h.install(&render(&cfg).text).await.unwrap();
        h.start().await.unwrap();

        let mut conn = tokio::net::TcpStream::connect(frontend).await.unwrap();
        let mut buf = [0u8; 5];
        conn.write_all(b"first").await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"first");
        for i in 0..100 {
            h.reload().await.unwrap_or_else(|e| panic!("reload {i}: {e}"));
        }
        // Still the same connection, through the worker that accepted it.
        conn.write_all(b"after").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
            .await
            .expect("an answer within 5s")
            .expect("the connection survived 100 reloads");
        assert_eq!(&buf, b"after");
        h.stop(Duration::from_secs(5)).await;
    }
}
