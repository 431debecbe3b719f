//! Independence of control planes and teardown that leaves no process behind.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use cairn_e2e::{ControlPlane, Error, Options, eventually, process_alive};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

fn config_map(name: &str, value: &str) -> anyhow::Result<ConfigMap> {
    Ok(serde_json::from_value(
        json!({ "metadata": { "name": name }, "data": { "value": value } }),
    )?)
}

async fn value_of(api: &Api<ConfigMap>, name: &str) -> anyhow::Result<Option<String>> {
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|cm| cm.data)
        .and_then(|d| d.get("value").cloned()))
}

#[tokio::test]
async fn two_control_planes_are_independent() -> anyhow::Result<()> {
    let planes = ControlPlane::start_many(2).await?;
    let [a, b] = &planes[..] else {
        bail!("expected two planes")
    };
    ensure!(a.server_url() != b.server_url() && a.etcd_url() != b.etcd_url() && a.dir() != b.dir());
    ensure!(a.admin_token() != b.admin_token());

    // Each plane's CA signs only its own apiserver: A's credentials are useless against B.
    let mut crossed = a.config()?;
    crossed.cluster_url = b.server_url().parse()?;
    let crossed = kube::Client::try_from(crossed)?;
    ensure!(
        crossed.apiserver_version().await.is_err(),
        "A's CA/token accepted by B"
    );

    let (ca, cb) = (a.client()?, b.client()?);
    let (ma, mb): (Api<ConfigMap>, Api<ConfigMap>) =
        (Api::namespaced(ca, "default"), Api::namespaced(cb, "default"));
    ma.create(&PostParams::default(), &config_map("same-name", "in-a")?)
        .await?;
    mb.create(&PostParams::default(), &config_map("same-name", "in-b")?)
        .await?;
    ma.create(&PostParams::default(), &config_map("only-a", "x")?)
        .await?;

    ensure!(value_of(&ma, "same-name").await?.as_deref() == Some("in-a"));
    ensure!(value_of(&mb, "same-name").await?.as_deref() == Some("in-b"));
    ensure!(mb.get_opt("only-a").await?.is_none(), "B sees A's object");

    ma.delete("same-name", &DeleteParams::default()).await?;
    let ma = &ma;
    eventually("A's configmap to be deleted", DEADLINE, || async move {
        match ma.get_opt("same-name").await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err("still present".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await?;
    ensure!(
        value_of(&mb, "same-name").await?.as_deref() == Some("in-b"),
        "delete in A reached B"
    );

    // Stopping one leaves the other serving.
    let mut planes = planes;
    let b = planes.pop().context("plane b")?;
    let a = planes.pop().context("plane a")?;
    let a_pids = a.pids();
    drop(a);
    ensure!(
        a_pids.iter().all(|p| !process_alive(*p)),
        "A's processes survived"
    );
    ensure!(value_of(&mb, "same-name").await?.as_deref() == Some("in-b"));
    b.check_running()?;
    Ok(())
}

#[tokio::test]
async fn drop_leaves_no_processes_behind() -> anyhow::Result<()> {
    let cp = ControlPlane::start().await?;
    // An extra component that forks: the process-group kill must reach the grandchild too.
    let pid_file = cp.dir().join("grandchild.pid");
    let mut script = Command::new("sh");
    script
        .arg("-c")
        .arg(format!("sleep 3600 & echo $! > {}; wait", pid_file.display()));
    cp.spawn("forker", &script)?;
    let pid_file = &pid_file;
    let grandchild: u32 = eventually("the grandchild's pid file", DEADLINE, || async move {
        std::fs::read_to_string(pid_file)
            .map_err(|e| e.to_string())
            .and_then(|s| s.trim().parse::<u32>().map_err(|e| e.to_string()))
    })
    .await?;

    let names: Vec<String> = cp.processes().into_iter().map(|p| p.name).collect();
    ensure!(
        names == ["etcd", "kube-apiserver", "forker"],
        "processes: {names:?}"
    );
    let mut pids = cp.pids();
    pids.push(grandchild);
    ensure!(
        pids.iter().all(|p| process_alive(*p)),
        "not all alive before drop: {pids:?}"
    );
    let dir = cp.dir().to_owned();

    drop(cp);
    // Drop kills and reaps synchronously: no polling needed, nothing may be left.
    let alive: Vec<u32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
    ensure!(alive.is_empty(), "still alive after drop: {alive:?}");
    ensure!(!dir.exists(), "{} not removed", dir.display());
    Ok(())
}

#[tokio::test]
async fn a_panic_tears_the_control_plane_down() -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let cp = ControlPlane::start().await.expect("start");
        tx.send((cp.pids(), cp.dir().to_owned())).expect("send pids");
        panic!("deliberate panic with a live control plane (its logs are printed above/below)");
    });
    let (pids, dir): (Vec<u32>, PathBuf) = rx.await.context("the task died before starting")?;
    let joined = task.await;
    ensure!(
        joined.as_ref().is_err_and(|e| e.is_panic()),
        "task should have panicked: {joined:?}"
    );
    let alive: Vec<u32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
    ensure!(
        pids.len() == 2 && alive.is_empty(),
        "pids {pids:?}, alive after panic: {alive:?}"
    );
    ensure!(!dir.exists(), "{} not removed", dir.display());
    Ok(())
}

/// A harness killed with SIGKILL runs no destructors; the parent-death signal must still take
/// its etcd and apiserver down.
#[tokio::test]
async fn killing_the_owner_process_leaves_no_orphans() -> anyhow::Result<()> {
    ensure!(
        cairn_e2e::parent_death_signal_available(),
        "setpriv (util-linux) with --pdeathsig is needed so killed test runs leave no orphans"
    );
    let scratch = tempfile::tempdir()?;
    let ready = scratch.path().join("ready.json");
    let mut cluster = tokio::process::Command::new(env!("CARGO_BIN_EXE_cairn-e2e-cluster"))
        .arg("--name=orphan-check")
        .arg(format!("--ready-file={}", ready.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(scratch.path().join("cluster.log"))?)
        .kill_on_drop(true)
        .spawn()?;
    let ready_ref = &ready;
    let info: Value = eventually(
        "cairn-e2e-cluster's ready file",
        Duration::from_secs(120),
        || async move {
            let text = std::fs::read_to_string(ready_ref).map_err(|e| e.to_string())?;
            serde_json::from_str::<Value>(&text).map_err(|e| e.to_string())
        },
    )
    .await?;
    let plane = &info["planes"][0];
    let pids: Vec<u32> = plane["pids"]
        .as_object()
        .context("pids")?
        .values()
        .filter_map(Value::as_u64)
        .filter_map(|p| u32::try_from(p).ok())
        .collect();
    ensure!(
        pids.len() == 2 && pids.iter().all(|p| process_alive(*p)),
        "pids: {pids:?}"
    );

    cluster.start_kill()?; // SIGKILL: no destructor runs in cairn-e2e-cluster
    cluster.wait().await?;
    let pids = &pids;
    eventually(
        "etcd and kube-apiserver to die with their owner",
        DEADLINE,
        || async move {
            let alive: Vec<u32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("alive: {alive:?}"))
            }
        },
    )
    .await?;
    // The killed owner could not remove its directory; do it for it.
    if let Some(dir) = plane["dir"].as_str() {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

#[tokio::test]
async fn missing_binaries_name_the_build_script() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cairn-e2e-cluster"))
        .env("CAIRN_BIN_DIR", empty.path())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "should fail without binaries");
    ensure!(
        stderr.contains("e2e/tools/build.sh"),
        "stderr does not say how to build: {stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn a_component_dying_at_start_fails_fast_with_its_log() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let result = ControlPlane::start_with(Options::default().apiserver_arg("--no-such-flag")).await;
    match result {
        Err(Error::ComponentExited {
            component, log_tail, ..
        }) => {
            ensure!(component == "kube-apiserver", "blamed {component}");
            ensure!(
                log_tail.contains("no-such-flag"),
                "log tail does not explain: {log_tail}"
            );
        }
        other => bail!(
            "expected ComponentExited, got {:?}",
            other.map(|cp| cp.server_url().to_owned())
        ),
    }
    // Not the 120 s start-up deadline: the exit is noticed at the next poll.
    ensure!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_missed_start_deadline_reports_the_component_logs() -> anyhow::Result<()> {
    let options = Options::default().start_timeout(Duration::from_millis(200));
    match ControlPlane::start_with(options).await {
        Err(Error::StartTimeout { last, logs, .. }) => {
            ensure!(!last.is_empty(), "no last observation");
            ensure!(
                logs.contains("----- plane-") && logs.contains("etcd"),
                "logs: {logs}"
            );
        }
        other => bail!(
            "expected StartTimeout, got {:?}",
            other.map(|cp| cp.server_url().to_owned())
        ),
    }
    Ok(())
}
