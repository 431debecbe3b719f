//! HAProxy's master CLI (`haproxy -W -S <socket>`): `show proc`, `reload`, and `@1 show stat`
//! (the current worker's stats, routed by the master).
//!
//! Reload is the master CLI's `reload` command: the master re-executes itself with the file
//! on disk, binds (or inherits from the old worker, over their socket pair) the listeners,
//! forks a new worker and tells the old one to finish its established connections and exit
//! (`hard-stop-after` bounds that). Listening sockets are handed over, never closed and
//! reopened, so no connection attempt is refused during a reload. HAProxy 2.6 answers the
//! command by closing the connection, so the outcome is read from `show proc` afterwards: the
//! master's reload counter has moved, and either a new worker runs (success) or the master's
//! `failed` counter has moved and the old worker still serves the old configuration.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
    time::Instant,
};

/// Master CLI failures.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// The socket does not answer (HAProxy not running, or not in master-worker mode).
    #[error("master CLI {path}: {source}")]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An answer that could not be understood.
    #[error("master CLI: unexpected answer to {command:?}: {answer:?}")]
    Unexpected {
        /// The command.
        command: String,
        /// What came back (truncated).
        answer: String,
    },
    /// The master counted the reload as failed; the old worker keeps running.
    #[error("HAProxy failed to load the new configuration; the previous one keeps running")]
    ReloadFailed,
    /// The reload did not finish in time.
    #[error("reload did not complete within {0:?}")]
    Timeout(Duration),
}

/// What `show proc` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Procs {
    /// The master's pid.
    pub master_pid: u32,
    /// Reloads since the master started.
    pub reloads: u64,
    /// Failed reloads (HAProxy ≥ 2.5 shows them).
    pub failed: Option<u64>,
    /// Current workers' pids (old workers still finishing connections not included).
    pub workers: Vec<u32>,
}

/// Parses `show proc` (HAProxy 2.x).
pub fn parse_show_proc(text: &str) -> Option<Procs> {
    let mut procs = Procs::default();
    let mut seen_master = false;
    let mut section = "";
    // 2.0–2.4 have a `<relative PID>` column before `<reloads>`.
    let mut reloads_col = 2;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(h) = line.strip_prefix('#') {
            if h.starts_with('<') {
                section = "";
                let cols: Vec<&str> = h.split('<').map(str::trim).filter(|c| !c.is_empty()).collect();
                reloads_col = cols.iter().position(|c| *c == "reloads>").unwrap_or(2);
            } else {
                section = h.trim();
            }
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        match (section, f.get(1).copied()) {
            ("", Some("master")) => {
                procs.master_pid = f.first()?.parse().ok()?;
                procs.reloads = f.get(reloads_col)?.parse().ok()?;
                if f.get(reloads_col + 1) == Some(&"[failed:") {
                    procs.failed = f
                        .get(reloads_col + 2)
                        .and_then(|x| x.trim_end_matches(']').parse().ok());
                }
                seen_master = true;
            }
            ("workers", Some("worker")) => procs.workers.push(f.first()?.parse().ok()?),
            _ => {}
        }
    }
    seen_master.then_some(procs)
}

/// One server's line of `show stat`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerStat {
    /// Backend (proxy) name.
    pub proxy: String,
    /// Server name.
    pub server: String,
    /// `UP`, `DOWN`, `MAINT`, `no check`, `UP 1/2`, …
    pub status: String,
    /// Result of the last health check: `L4OK`, `L7OK`, `L4CON`, `L7STS`, … (`*` prefix
    /// while a check runs); empty before the first one.
    pub check_status: String,
}

impl ServerStat {
    /// Takes traffic: up (also while a failing check has not yet reached `fall`), or not
    /// checked.
    pub fn is_up(&self) -> bool {
        self.status.starts_with("UP") || self.status == "no check"
    }
}

/// The server rows of `show stat` CSV.
pub fn parse_stat_csv(text: &str) -> Vec<ServerStat> {
    let mut cols: Option<(usize, usize, usize, Option<usize>)> = None;
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("# ") {
            let names: Vec<&str> = h.split(',').collect();
            let at = |n: &str| names.iter().position(|x| *x == n);
            cols = at("pxname")
                .zip(at("svname"))
                .zip(at("status"))
                .map(|((a, b), c)| (a, b, c, at("check_status")));
            continue;
        }
        let Some((px, sv, st, ck)) = cols else { continue };
        let f: Vec<&str> = line.split(',').collect();
        let (Some(px), Some(sv), Some(st)) = (f.get(px), f.get(sv), f.get(st)) else {
            continue;
        };
        if matches!(*sv, "FRONTEND" | "BACKEND") {
            continue;
        }
        out.push(ServerStat {
            proxy: (*px).to_string(),
            server: (*sv).to_string(),
            status: (*st).to_string(),
            check_status: ck
                .and_then(|i| f.get(i))
                .map(|c| c.to_string())
                .unwrap_or_default(),
        });
    }
    out
}

/// A client of the master CLI socket.
#[derive(Clone, Debug)]
pub struct Master {
    path: PathBuf,
    timeout: Duration,
}

impl Master {
    /// A client; `timeout` bounds each command.
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Master {
            path: path.into(),
            timeout,
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one command and reads the answer (the master closes after it).
    pub async fn command(&self, cmd: &str) -> Result<String, MasterError> {
        let unreachable = |source| MasterError::Unreachable {
            path: self.path.clone(),
            source,
        };
        let run = async {
            let mut s = UnixStream::connect(&self.path).await?;
            s.write_all(format!("{cmd}\n").as_bytes()).await?;
            // Non-interactive mode: the answer ends when we stop writing.
            s.shutdown().await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r.map_err(unreachable),
            Err(_) => Err(unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer to {cmd:?} within {:?}", self.timeout),
            ))),
        }
    }

    /// `show proc`.
    pub async fn show_proc(&self) -> Result<Procs, MasterError> {
        let text = self.command("show proc").await?;
        parse_show_proc(&text).ok_or_else(|| MasterError::Unexpected {
            command: "show proc".into(),
            answer: text.chars().take(300).collect(),
        })
    }

    /// The current worker's server states.
    pub async fn show_stat(&self) -> Result<Vec<ServerStat>, MasterError> {
        let text = self.command("@1 show stat").await?;
        if !text.starts_with("# pxname") {
            return Err(MasterError::Unexpected {
                command: "@1 show stat".into(),
                answer: text.chars().take(300).collect(),
            });
        }
        Ok(parse_stat_csv(&text))
    }

    /// Waits until the master answers and runs a worker.
    pub async fn wait_running(&self, within: Duration) -> Result<Procs, MasterError> {
        let deadline = Instant::now() + within;
        loop {
            let r = self.show_proc().await;
            match r {
                Ok(p) if !p.workers.is_empty() => return Ok(p),
                _ if Instant::now() >= deadline => {
                    return Err(match r {
                        Err(e) => e,
                        Ok(_) => MasterError::Timeout(within),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Reloads HAProxy from the file on disk and reports whether the new configuration runs.
    pub async fn reload(&self, within: Duration) -> Result<Procs, MasterError> {
        let before = self.show_proc().await?;
        // The master re-executes itself: the connection is usually cut without an answer.
        if let Err(e) = self.command("reload").await {
            tracing::debug!(error = %e, "reload command connection");
        }
        let deadline = Instant::now() + within;
        loop {
            if let Ok(now) = self.show_proc().await
                && now.master_pid == before.master_pid
                && now.reloads > before.reloads
            {
                if now.failed.zip(before.failed).is_some_and(|(n, b)| n > b) {
                    return Err(MasterError::ReloadFailed);
                }
                if now.workers.iter().any(|w| !before.workers.contains(w)) {
                    return Ok(now);
                }
                if now.failed.is_none() {
                    // Older HAProxy: no failure counter; a reload without a new worker failed.
                    return Err(MasterError::ReloadFailed);
                }
            }
            if Instant::now() >= deadline {
                return Err(MasterError::Timeout(within));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SHOW_PROC: &str = "\
#<PID>          <type>          <reloads>       <uptime>        <version>
5803            master          2 [failed: 1]   0d00h10m22s     2.6.12-1+deb12u4
# workers
4368            worker          1               0d00h00m05s     2.6.12-1+deb12u4
# old workers
4100            worker          3               0d00h01m05s     2.6.12-1+deb12u4
# programs

";

    #[test]
    fn show_proc() {
        let p = parse_show_proc(SHOW_PROC).unwrap();
        assert_eq!(
            p,
            Procs {
                master_pid: 5803,
                reloads: 2,
                failed: Some(1),
                workers: vec![4368],
            }
        );
        let old = "#<PID> <type> <relative PID> <reloads> <uptime> <version>\n1 master 0 4 0d0h 2.0\n# workers\n7 worker 1 0 0d 2.0\n";
        let p = parse_show_proc(old).unwrap();
        assert_eq!((p.reloads, p.failed, p.workers), (4, None, vec![7]));
        assert!(parse_show_proc("Unknown command\n").is_none());
    }

    #[test]
    fn stat_csv() {
        let csv = "# pxname,svname,qcur,status,weight,check_status\n\
                   svc:a:b:80,FRONTEND,,OPEN,,\n\
                   svc:a:b:80,n1,0,UP,1,L4OK\n\
                   svc:a:b:80,n2,0,DOWN,1,L4CON\n\
                   svc:a:b:80,n3,0,UP 1/2,1,L4TOUT\n\
                   api-server,cp,0,no check,1,\n\
                   svc:a:b:80,BACKEND,0,UP,2,\n";
        let s = parse_stat_csv(csv);
        assert_eq!(s.len(), 4);
        assert_eq!(s.iter().filter(|s| s.is_up()).count(), 3);
        assert_eq!(
            (s[1].server.as_str(), s[1].check_status.as_str()),
            ("n2", "L4CON")
        );
    }
}
