//! `cairn-e2e-cluster`: starts real control planes (etcd + kube-apiserver on loopback) and keeps
//! them running until SIGINT or SIGTERM, then tears everything down. `make demo` uses it.
//!
//! stdout gets one line per control plane: the path of its admin kubeconfig. Everything else
//! (server URL, pids, memory, timings) goes to stderr.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use cairn_e2e::{ControlPlane, Options};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// Start Kubernetes control planes on loopback for demos and manual testing.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// How many independent control planes to start.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Name of the control plane (with --count > 1, planes are named <name>-0, <name>-1, …).
    #[arg(long, default_value = "cairn")]
    name: String,
    /// Also copy each kubeconfig to DIR/<name>.kubeconfig (removed again on exit).
    #[arg(long, value_name = "DIR")]
    kubeconfig_dir: Option<PathBuf>,
    /// Once ready, write a JSON description (servers, kubeconfigs, pids) to FILE (removed on
    /// exit). Scripts can wait for this file to appear.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Extra kube-apiserver flag, e.g. --apiserver-arg=--v=4 (repeatable).
    #[arg(long = "apiserver-arg", value_name = "FLAG", allow_hyphen_values = true)]
    apiserver_args: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn-e2e-cluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Install the handlers first so that a signal during start-up still tears down cleanly.
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;

    let mut options = Options::default().name(&args.name);
    options.extra_apiserver_args = args.apiserver_args.clone();
    let planes = tokio::select! {
        planes = start(&args, options) => planes?,
        _ = sigint.recv() => return Ok(ExitCode::from(130)),
        _ = sigterm.recv() => return Ok(ExitCode::from(143)),
    };

    let mut written = Vec::new();
    let result = announce(&args, &planes, &mut written);
    let code = match result {
        Ok(()) => wait(&planes, &mut sigint, &mut sigterm).await,
        Err(e) => {
            eprintln!("cairn-e2e-cluster: {e:#}");
            ExitCode::FAILURE
        }
    };
    for path in written {
        let _ = std::fs::remove_file(path);
    }
    eprintln!("cairn-e2e-cluster: stopping");
    drop(planes);
    Ok(code)
}

async fn start(args: &Args, options: Options) -> anyhow::Result<Vec<ControlPlane>> {
    if args.count == 1 {
        Ok(vec![ControlPlane::start_with(options).await?])
    } else {
        Ok(ControlPlane::start_many_with(args.count, options).await?)
    }
}

fn announce(args: &Args, planes: &[ControlPlane], written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut described = Vec::new();
    for cp in planes {
        let mut kubeconfig = cp.kubeconfig_path().to_path_buf();
        if let Some(dir) = &args.kubeconfig_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let copy = dir.join(format!("{}.kubeconfig", cp.name()));
            std::fs::copy(cp.kubeconfig_path(), &copy)
                .with_context(|| format!("copying kubeconfig to {}", copy.display()))?;
            written.push(copy.clone());
            kubeconfig = copy;
        }
        println!("{}", kubeconfig.display());
        let processes = cp.processes();
        eprintln!(
            "{}: {} ready in {:.1?} (etcd {}, dir {})",
            cp.name(),
            cp.server_url(),
            cp.started_in(),
            cp.etcd_url(),
            cp.dir().display()
        );
        for p in &processes {
            eprintln!(
                "  {:<15} pid {:<7} rss {:>7} KiB  log {}",
                p.name,
                p.pid,
                p.rss_kib.unwrap_or(0),
                p.log.display()
            );
        }
        described.push(serde_json::json!({
            "name": cp.name(),
            "server": cp.server_url(),
            "kubeconfig": kubeconfig,
            "ca": cp.ca_cert_path(),
            "etcd": cp.etcd_url(),
            "dir": cp.dir(),
            "startedInSeconds": cp.started_in().as_secs_f64(),
            "pids": processes.iter().map(|p| (p.name.clone(), serde_json::Value::from(p.pid))).collect::<serde_json::Map<_, _>>(),
        }));
    }
    eprintln!("cairn-e2e-cluster: running; SIGINT (Ctrl-C) or SIGTERM stops it");
    if let Some(file) = &args.ready_file {
        let json = serde_json::json!({ "pid": std::process::id(), "planes": described });
        write_atomically(file, &serde_json::to_string_pretty(&json)?)?;
        written.push(file.clone());
    }
    Ok(())
}

async fn wait(
    planes: &[ControlPlane],
    sigint: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
) -> ExitCode {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigint.recv() => return ExitCode::SUCCESS,
            _ = sigterm.recv() => return ExitCode::SUCCESS,
            _ = tick.tick() => {
                for cp in planes {
                    if let Err(e) = cp.check_running() {
                        eprintln!("cairn-e2e-cluster: {}: {e}", cp.name());
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
