//! Backups at scale (issue 11): streamed Export/Import through the CLI and the gRPC streams
//! against real `cairn-ipam` processes. Before the streams, `cairn-ipam export` failed above
//! ~25k allocations (the 4 MiB message default) and Import could never take more.
#![allow(clippy::unwrap_used)]

#[path = "support/backup_gen.rs"]
mod backup_gen;
mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use backup_gen::generated_backup;
use cairn_proto::v1 as pb;
use common::*;
use prost::Message as _;
use tonic::Code;

/// Allocations in the round-trip test: well past what one 4 MiB (~25k) or 16 MiB (~100k)
/// message could carry in the old unary Export, small enough for CI.
const ROUND_TRIP: usize = 60_000;

/// The store's content through ExportStream, checking each chunk against the documented
/// bounds and order on the way.
async fn export_stream(c: &mut Client) -> pb::ExportResponse {
    let mut s = c.export_stream(pb::ExportRequest {}).await.unwrap().into_inner();
    let mut b = pb::ExportResponse::default();
    let (mut stage, mut n, mut last) = (0, 0, false);
    while let Some(chunk) = s.message().await.unwrap() {
        assert!(!last, "a chunk after the last one");
        assert_eq!(
            chunk.exported_at.is_some(),
            n == 0,
            "exported_at on the first chunk only"
        );
        let records = chunk.networks.len() + chunk.allocations.len() + chunk.quarantined.len();
        assert!(records <= 5_000, "chunk {n}: {records} records");
        assert!(
            chunk.encoded_len() <= (1 << 20) + 4096,
            "chunk {n}: {} bytes",
            chunk.encoded_len()
        );
        for (k, len) in [
            chunk.networks.len(),
            chunk.allocations.len(),
            chunk.quarantined.len(),
        ]
        .into_iter()
        .enumerate()
        {
            if len > 0 {
                assert!(
                    k >= stage,
                    "chunk {n}: networks, then allocations, then quarantined"
                );
                stage = k;
            }
        }
        b.networks.extend(chunk.networks);
        b.allocations.extend(chunk.allocations);
        b.quarantined.extend(chunk.quarantined);
        b.exported_at = b.exported_at.or(chunk.exported_at);
        last = chunk.last;
        n += 1;
    }
    assert!(last, "the export stream ended without its last chunk");
    b
}

fn key(a: &pb::Allocation) -> (String, String) {
    (a.network.clone(), format!("{:?}", a.owner))
}

/// `b` without its export time, records in a canonical order.
fn canonical(mut b: pb::ExportResponse) -> pb::ExportResponse {
    b.exported_at = None;
    b.networks.sort_by(|x, y| x.name.cmp(&y.name));
    b.allocations.sort_by_key(key);
    b.quarantined
        .sort_by(|x, y| (&x.network, &x.address).cmp(&(&y.network, &y.address)));
    b
}

async fn cli_ok(args: &[&str]) -> String {
    let out = tokio::process::Command::new(bin())
        .args(args)
        .env_remove("CAIRN_IPAM_ENDPOINT")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "cairn-ipam {args:?} failed:\n{stdout}\n{stderr}"
    );
    format!("{stdout}{stderr}")
}

/// `cairn-ipam export | cairn-ipam import -f -` carries every network, allocation and
/// quarantined address of a store far beyond one message into a fresh server, unchanged.
#[tokio::test]
async fn cli_export_pipe_import_round_trips_60k_allocations() {
    let (a, b) = tokio::join!(Server::start(), Server::start());
    let backup = generated_backup(ROUND_TRIP);
    let file = a.root().join("generated.json");
    std::fs::write(&file, serde_json::to_vec(&backup).unwrap()).unwrap();
    let out = cli_ok(&[
        "--endpoint",
        &a.endpoint(),
        "import",
        "-f",
        file.to_str().unwrap(),
    ])
    .await;
    assert!(
        out.contains(&format!(
            "imported 2 network(s), {} allocation(s)",
            ROUND_TRIP + 3
        )),
        "{out}"
    );

    let (ea, eb) = (a.endpoint(), b.endpoint());
    let piped = tokio::task::spawn_blocking(move || {
        let mut export = Command::new(bin())
            .args(["--endpoint", &ea, "export"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let import = Command::new(bin())
            .args(["--endpoint", &eb, "import", "-f", "-"])
            .stdin(export.stdout.take().unwrap())
            .output()
            .unwrap();
        (export.wait_with_output().unwrap(), import)
    })
    .await
    .unwrap();
    let (export, import) = piped;
    assert!(
        export.status.success(),
        "export: {}",
        String::from_utf8_lossy(&export.stderr)
    );
    assert!(
        import.status.success(),
        "import: {}{}",
        String::from_utf8_lossy(&import.stdout),
        String::from_utf8_lossy(&import.stderr)
    );
    let said = String::from_utf8_lossy(&export.stderr);
    assert!(
        said.contains(&format!(
            "{} allocation(s), {} quarantined",
            ROUND_TRIP + 3,
            ROUND_TRIP / 60
        )),
        "{said}"
    );

    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (from_a, from_b) = (
        canonical(export_stream(&mut ca).await),
        canonical(export_stream(&mut cb).await),
    );
    assert_eq!(from_b.allocations.len(), ROUND_TRIP + 3);
    assert_eq!(from_b.quarantined.len(), ROUND_TRIP / 60);
    let want = canonical(backup);
    assert_eq!(
        from_a.allocations, want.allocations,
        "the first import changed allocations"
    );
    assert_eq!(
        from_a.quarantined, want.quarantined,
        "the first import changed quarantine"
    );
    assert_eq!(from_a.networks.len(), 2);
    // The second store holds exactly what the first one does.
    assert!(from_a.networks == from_b.networks, "networks differ");
    assert!(from_a.allocations == from_b.allocations, "allocations differ");
    assert!(from_a.quarantined == from_b.quarantined, "quarantine differs");
    // And it serves them: the shared address and a dual-stack owner are held in B.
    let shared = list_all(
        &mut cb,
        pb::ListAllocationsRequest {
            address: "10.95.255.200".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(shared.len(), 2);
}

fn chunk(b: &pb::ExportResponse, allocations: std::ops::Range<usize>, last: bool) -> pb::ImportChunk {
    pb::ImportChunk {
        networks: if allocations.start == 0 {
            b.networks.clone()
        } else {
            vec![]
        },
        allocations: b.allocations[allocations].to_vec(),
        quarantined: if last { b.quarantined.clone() } else { vec![] },
        exported_at: None,
        last,
    }
}

async fn assert_empty(c: &mut Client, what: &str) {
    let nets = c
        .list_networks(pb::ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(nets.networks.is_empty(), "{what}: networks were written");
    let all = list_all(c, pb::ListAllocationsRequest::default()).await;
    assert!(all.is_empty(), "{what}: {} allocations were written", all.len());
}

/// The whole stream is validated before anything is written: a doubly-held address in the
/// last chunk, a stream that ends without its last chunk, or a chunk after the last one leave
/// the store empty — and a valid stream is accepted afterwards.
#[tokio::test]
async fn an_import_stream_invalid_at_its_end_writes_nothing() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let b = generated_backup(12_000);
    let n = b.allocations.len();

    // The last chunk holds an allocation whose address another owner already holds.
    let mut bad = chunk(&b, 10_000..n, true);
    let mut dup = b.allocations[5].clone();
    dup.owner = Some(svc("c2", "intruder"));
    let held = dup.addresses[0].clone();
    bad.allocations.push(dup);
    let stream = vec![chunk(&b, 0..5_000, false), chunk(&b, 5_000..10_000, false), bad];
    let r = c.import_stream(tokio_stream::iter(stream)).await;
    assert_status(r, Code::InvalidArgument, &[&held, "intruder"]);
    assert_empty(&mut c, "doubly-held address in the last chunk").await;

    // Truncated: every chunk valid, but none says last.
    let stream = vec![chunk(&b, 0..5_000, false), chunk(&b, 5_000..n, false)];
    let r = c.import_stream(tokio_stream::iter(stream)).await;
    assert_status(r, Code::InvalidArgument, &["last", "truncated"]);
    assert_empty(&mut c, "stream without last").await;

    // Something after the last chunk.
    let stream = vec![chunk(&b, 0..n, true), pb::ImportChunk::default()];
    let r = c.import_stream(tokio_stream::iter(stream)).await;
    assert_status(r, Code::InvalidArgument, &["chunks[1]", "last"]);
    assert_empty(&mut c, "chunk after last").await;

    // The same records, valid and complete, are imported.
    let stream = vec![chunk(&b, 0..5_000, false), chunk(&b, 5_000..n, true)];
    let r = c
        .import_stream(tokio_stream::iter(stream))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.networks, r.allocations), (2, n as u64));
}

async fn metrics_text(srv: &Server) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = srv.metrics.expect("no metrics address");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf
}

/// A client killed in the middle of an import (its connection reset mid-stream) leaves
/// nothing behind.
#[tokio::test]
async fn a_client_that_disconnects_mid_import_writes_nothing() {
    let srv = Server::start().await;
    let b = generated_backup(60_000);
    let text = serde_json::to_vec(&b).unwrap();
    let mut child = Command::new(bin())
        .args(["--endpoint", &srv.endpoint(), "import", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Two thirds of the file (~40k allocations). The CLI buffers at most ~1 MiB of input and
    // 5 chunks of 5,000 allocations, so this write returns only once the open ImportStream
    // has taken chunks off to the server.
    let part = text[..text.len() * 2 / 3].to_vec();
    let mut child = tokio::task::spawn_blocking(move || {
        std::io::Write::write_all(&mut stdin, &part).unwrap();
        child.kill().unwrap(); // SIGKILL: the connection is reset, the stream never ends
        child.wait().unwrap();
        drop(stdin);
        child
    })
    .await
    .unwrap();
    assert!(child.try_wait().unwrap().is_some());
    eventually(
        "the server to see the import broken off",
        Duration::from_secs(30),
        || async {
            let m = metrics_text(&srv).await;
            m.lines()
                .any(|l| l.contains("method=\"ImportStream\"") && l.contains("code=\"aborted\""))
                .then_some(())
        },
    )
    .await;
    let mut c = srv.client().await;
    assert_empty(&mut c, "client killed mid-import").await;
    let r = c
        .import_stream(tokio_stream::iter(vec![chunk(&b, 0..b.allocations.len(), true)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.allocations, b.allocations.len() as u64);
}

/// The message limit is explicit (16 MiB): larger messages are refused before decoding,
/// naming the limit, and nothing is written.
#[tokio::test]
async fn messages_above_16_mib_are_refused_naming_the_limit() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let mut a = generated_backup(10).allocations.remove(0);
    a.owner.as_mut().unwrap().name = "x".repeat(17 << 20);
    let r = c
        .import(pb::ImportRequest {
            backup: Some(pb::ExportResponse {
                allocations: vec![a],
                ..Default::default()
            }),
        })
        .await;
    assert_status(r, Code::OutOfRange, &["16777216"]);
    assert_empty(&mut c, "oversized import").await;
}
