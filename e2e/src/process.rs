//! Child processes that cannot outlive the test: each component runs in its own process group
//! (so a kill reaches anything it forks), is killed and reaped on drop, and, where util-linux's
//! `setpriv` is available, carries a parent-death signal (SIGKILL) so that even a test binary
//! killed with SIGKILL leaves no orphans behind.
//!
//! Linux delivers the parent-death signal when the *thread* that forked the child exits, not the
//! process. Test threads come and go, and tokio's blocking threads time out, so every spawn is
//! done by one dedicated thread that lives as long as the process.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;

use crate::error::{Error, Result};

struct SpawnRequest {
    command: Command,
    reply: mpsc::SyncSender<std::io::Result<Child>>,
}

struct Spawner {
    requests: mpsc::Sender<SpawnRequest>,
    setpriv: Option<PathBuf>,
}

static SPAWNER: OnceLock<Option<Spawner>> = OnceLock::new();

fn spawner() -> Option<&'static Spawner> {
    SPAWNER
        .get_or_init(|| {
            let (requests, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("cairn-e2e-spawner".into())
                .spawn(move || {
                    for SpawnRequest { mut command, reply } in rx {
                        // The requester may have given up; nothing to do then.
                        let _ = reply.send(command.spawn());
                    }
                })
                .ok()?;
            Some(Spawner {
                requests,
                setpriv: find_setpriv(),
            })
        })
        .as_ref()
}

/// `setpriv` from util-linux, if it is on PATH and knows `--pdeathsig`.
fn find_setpriv() -> Option<PathBuf> {
    if std::env::var_os("CAIRN_E2E_NO_PDEATHSIG").is_some() {
        return None;
    }
    let path = std::env::var_os("PATH")?;
    let candidate = std::env::split_paths(&path)
        .map(|d| d.join("setpriv"))
        .find(|p| p.is_file())?;
    let help = Command::new(&candidate)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&help.stdout)
        .contains("--pdeathsig")
        .then_some(candidate)
}

/// True if the spawner wraps children in `setpriv --pdeathsig KILL`.
pub fn parent_death_signal_available() -> bool {
    spawner().is_some_and(|s| s.setpriv.is_some())
}

/// Whether a process with this pid exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) S ..." — comm may contain spaces and parentheses.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// Resident set size of a process in KiB, from /proc.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One child process with its log file.
#[derive(Debug)]
pub(crate) struct Component {
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) log: PathBuf,
    child: Child,
    exited: Option<ExitStatus>,
    killed: bool,
}

impl Component {
    /// Starts `command` (program, args, env and cwd are taken from it; stdio is replaced) with
    /// stdout and stderr appended to `log`.
    pub(crate) fn spawn(name: &str, command: &Command, log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(format!("opening log {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(format!("duplicating log handle {}", log.display()), e))?;

        let spawner = spawner();
        let setpriv = spawner.and_then(|s| s.setpriv.as_deref());
        let mut cmd = match setpriv {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(command.get_program());
                c
            }
            None => Command::new(command.get_program()),
        };
        cmd.args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            cmd.current_dir(dir);
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);

        let what = || {
            let args: Vec<OsString> = command.get_args().map(OsString::from).collect();
            format!(
                "starting {name}: {} {args:?}",
                command.get_program().to_string_lossy()
            )
        };
        let child = match spawner {
            Some(s) => {
                let (reply, answer) = mpsc::sync_channel(1);
                s.requests
                    .send(SpawnRequest { command: cmd, reply })
                    .map_err(|_| Error::Invalid("the spawner thread is gone".into()))?;
                answer
                    .recv()
                    .map_err(|_| Error::Invalid("the spawner thread is gone".into()))?
            }
            None => cmd.spawn(),
        }
        .map_err(|e| Error::io(what(), e))?;

        Ok(Self {
            name: name.to_owned(),
            pid: child.id(),
            log: log.to_owned(),
            child,
            exited: None,
            killed: false,
        })
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// [`Error::ComponentExited`] if the process has exited without being killed by us.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if self.killed {
            return Ok(());
        }
        match self.exit_status() {
            None => Ok(()),
            Some(status) => Err(Error::ComponentExited {
                component: self.name.clone(),
                status: status.to_string(),
                log: self.log.clone(),
                log_tail: tail(&self.log, 40),
            }),
        }
    }

    /// SIGKILLs the process group and reaps the process. Idempotent.
    pub(crate) fn kill(&mut self) {
        if self.killed {
            return;
        }
        self.killed = true;
        if let Some(pgid) = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            // The group outlives its leader while members remain, so this also reaches
            // grandchildren of a leader that has already exited.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if file.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    // Skip a partial first line if we started mid-file.
    let from = if start > 0 && from == 0 {
        1.min(all.len())
    } else {
        from
    };
    all[from..].join("\n")
}
