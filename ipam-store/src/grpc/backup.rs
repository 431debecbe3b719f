//! Streamed backups. `ExportStream` copies the ledger under its lock once (a point-in-time
//! snapshot) and then sends it in bounded chunks from a task that holds no lock, so writers
//! never wait on a slow reader. `ImportStream` collects the whole stream first; only a stream
//! that ends with its `last` chunk reaches the ledger's whole-backup validation, so an invalid,
//! truncated or abandoned stream writes nothing.

use cairn_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::convert::{allocation_to, network_to, quarantined_to, ts};
use crate::{error::Error, store::Snapshot};

/// Most records in one exported chunk.
pub(super) const CHUNK_RECORDS: usize = 5_000;
/// Most encoded bytes of records in one exported chunk (one record larger than this is sent
/// alone; the message limit still bounds it).
pub(super) const CHUNK_BYTES: usize = 1 << 20;
/// Most records (networks + allocations + quarantined) one ImportStream may send: bounds the
/// memory a client can make the server hold before validation.
pub(super) const MAX_IMPORT_RECORDS: usize = 10_000_000;

/// The response stream of `ExportStream`.
pub(super) type ExportStream = ReceiverStream<Result<pb::ExportChunk, Status>>;

/// Streams `snap` (with each allocation's out-of-range flag) as chunks: networks, then
/// allocations, then quarantined addresses, then an empty chunk with `last`. Stops early when
/// the client goes away.
pub(super) fn export_stream(snap: Snapshot, flags: Vec<bool>) -> ExportStream {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut p = Pump {
            tx,
            exported_at: Some(ts(crate::ledger::now_ms())),
        };
        let nets = snap.networks.iter().map(network_to);
        let allocs = snap
            .allocations
            .iter()
            .zip(flags.iter().copied().chain(std::iter::repeat(false)))
            .map(|(a, oor)| allocation_to(a, oor));
        let quar = snap.quarantined.iter().map(quarantined_to);
        let _sent = p.send_all(nets, |c, v| c.networks = v).await
            && p.send_all(allocs, |c, v| c.allocations = v).await
            && p.send_all(quar, |c, v| c.quarantined = v).await
            && p.send(pb::ExportChunk {
                last: true,
                ..Default::default()
            })
            .await;
    });
    ReceiverStream::new(rx)
}

struct Pump {
    tx: mpsc::Sender<Result<pb::ExportChunk, Status>>,
    /// Set on the first chunk sent, then taken.
    exported_at: Option<cairn_proto::Timestamp>,
}

impl Pump {
    /// Sends one chunk; false when the client is gone.
    async fn send(&mut self, mut c: pb::ExportChunk) -> bool {
        c.exported_at = self.exported_at.take();
        self.tx.send(Ok(c)).await.is_ok()
    }

    /// Sends `items` in chunks of at most [`CHUNK_RECORDS`] records and about [`CHUNK_BYTES`].
    async fn send_all<T: prost::Message>(
        &mut self,
        items: impl Iterator<Item = T>,
        put: fn(&mut pb::ExportChunk, Vec<T>),
    ) -> bool {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for item in items {
            // Field tag plus length prefix: at most 1 + 5 bytes.
            let len = item.encoded_len() + 6;
            if !batch.is_empty() && (batch.len() >= CHUNK_RECORDS || bytes + len > CHUNK_BYTES) {
                let mut c = pb::ExportChunk::default();
                put(&mut c, std::mem::take(&mut batch));
                if !self.send(c).await {
                    return false;
                }
                bytes = 0;
            }
            bytes += len;
            batch.push(item);
        }
        if batch.is_empty() {
            return true;
        }
        let mut c = pb::ExportChunk::default();
        put(&mut c, batch);
        self.send(c).await
    }
}

/// Why an ImportStream did not produce a backup.
pub(super) enum Collect {
    /// The stream itself failed (the client cancelled or went away): its status.
    Stream(Status),
    /// The stream's content is refused.
    Refused(Error),
}

/// Reads an ImportStream to its end: the backup, once a chunk with `last` ended it.
pub(super) async fn collect(mut s: Streaming<pb::ImportChunk>) -> Result<pb::ExportResponse, Collect> {
    let mut b = pb::ExportResponse::default();
    let mut last = false;
    let mut chunks = 0usize;
    while let Some(c) = s.message().await.map_err(Collect::Stream)? {
        if last {
            return Err(Collect::Refused(Error::invalid(
                format!("chunks[{chunks}]"),
                "follows the chunk with last = true",
            )));
        }
        let records = b.networks.len() + b.allocations.len() + b.quarantined.len();
        if records + c.networks.len() + c.allocations.len() + c.quarantined.len() > MAX_IMPORT_RECORDS {
            return Err(Collect::Refused(Error::Exhausted(format!(
                "chunks[{chunks}]: the backup exceeds {MAX_IMPORT_RECORDS} records (networks, allocations and quarantined addresses)"
            ))));
        }
        b.networks.extend(c.networks);
        b.allocations.extend(c.allocations);
        b.quarantined.extend(c.quarantined);
        last = c.last;
        chunks += 1;
    }
    if !last {
        return Err(Collect::Refused(Error::invalid(
            "last",
            format!(
                "the stream ended after {chunks} chunk(s) without one with last = true (a truncated backup)"
            ),
        )));
    }
    Ok(b)
}
