//! The disk-full path against a real process: the store's data directory is a small tmpfs
//! this test mounts (root required, as in CI). When the disk fills, nothing is acknowledged
//! that is not durable, the server stops refusing work rather than serving a state it cannot
//! keep, and once space returns a restart serves every acknowledged allocation unchanged.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use cairn_proto::v1 as pb;
use common::*;
use tonic::Code;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test mounts a tmpfs and needs root: run `make test` as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("disk");
        std::fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs failed: {st}");
        Tmpfs(mnt, dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` with a file of zeros, then gives `leave` bytes back.
fn fill(path: &Path, leave: u64) -> PathBuf {
    let filler = path.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    let mut written = 0u64;
    while f.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    drop(f);
    let f = std::fs::OpenOptions::new().write(true).open(&filler).unwrap();
    f.set_len(written.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
    filler
}

#[tokio::test]
async fn a_full_disk_acknowledges_nothing_it_cannot_keep_and_recovers_when_space_returns() {
    let disk = Tmpfs::mount("64m");
    let data = disk.path().join("ledger");
    let mut srv = Server::start_on(Some(&data), &["--default-reuse-grace", "0s"]).await;
    let mut c = srv.client().await;
    upsert(
        &mut c,
        network(
            "net-a",
            &["10.0.0.0/8"],
            vec![pool("vip", pb::PoolPurpose::Vip, &["10.0.0.0/8"])],
        ),
    )
    .await;
    let filler = fill(disk.path(), 1 << 20);

    // Allocate until the disk refuses; remember every acknowledged answer.
    let mut acked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let refusal = loop {
        assert!(
            Instant::now() < deadline,
            "the disk never filled ({} acked)",
            acked.len()
        );
        let name = format!("svc-{}", acked.len());
        match c.allocate(alloc_req("net-a", svc("a", &name))).await {
            Ok(r) => {
                acked.insert(name, r.into_inner().allocation.unwrap().addresses);
            }
            Err(s) => break s,
        }
    };
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(acked.len() > 10, "only {} allocations fitted", acked.len());

    // The server does not go on serving a state it cannot keep: it exits.
    let exit = Instant::now() + Duration::from_secs(30);
    while srv.is_running() {
        assert!(
            Instant::now() < exit,
            "the server kept running after a failed commit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        srv.log_text().contains("commit failed"),
        "no commit failure logged:\n{}",
        srv.log_tail(30)
    );

    srv.kill(); // reaps the exited process

    // Space returns; a restart serves every acknowledged allocation, unchanged.
    std::fs::remove_file(filler).unwrap();
    srv.restart().await;
    let mut c = srv.client().await;
    for (name, addresses) in &acked {
        let a = c
            .get_allocation(pb::GetAllocationRequest {
                network: "net-a".into(),
                owner: Some(svc("a", name)),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged {name} lost: {e}"))
            .into_inner();
        assert_eq!(&a.addresses, addresses, "{name} moved");
    }
    // And the store takes new work.
    allocate(&mut c, alloc_req("net-a", svc("a", "after"))).await;
}
