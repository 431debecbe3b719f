//! WatchAllocations: the snapshot (EXISTING… then SYNCED), then every later committed change
//! that passes the filter, in commit order. A watcher that falls behind the ledger's buffer is
//! ended with ABORTED; a shutting-down server ends every watch with UNAVAILABLE.

use std::{pin::Pin, sync::Arc};

use cairn_proto::v1 as pb;
use futures::Stream;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};
use tonic::Status;

use super::convert::allocation_to;
use crate::{
    ledger::{Change, Committed, Ledger, ListFilter},
    model::Allocation,
};

/// The least time between two wake-ups of one watcher while changes keep coming; a change
/// reaches a watcher at most this much later than it would unpaced.
const PACE: std::time::Duration = std::time::Duration::from_millis(10);

/// The stream a watch returns.
pub(super) type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchAllocationsResponse, Status>> + Send>>;

/// Streams `snap` (as of `seq`), then the batches `rx` receives after `seq` that match `f`.
pub(super) fn stream(
    ledger: Arc<Ledger>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    f: ListFilter,
    snap: Vec<Allocation>,
    seq: u64,
    mut rx: broadcast::Receiver<Committed>,
) -> WatchStream {
    async_stream(move |tx| async move {
        // Resolves when the server shuts down; never if nobody can signal it.
        let stopped = async move {
            if stopping.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let feed_tx = tx.clone();
        let feed = async move {
            let tx = feed_tx;
            for a in snap {
                let oor = ledger.is_out_of_range(&a);
                let ev = pb::WatchAllocationsResponse {
                    r#type: pb::WatchEventType::Existing as i32,
                    allocation: Some(allocation_to(&a, oor)),
                    revision: a.revision,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            let synced = pb::WatchAllocationsResponse {
                r#type: pb::WatchEventType::Synced as i32,
                allocation: None,
                revision: seq,
            };
            if tx.send(Ok(synced)).await.is_err() {
                return;
            }
            // Waits for a batch, then takes every batch already there, then pauses for
            // PACE before waiting again: a watcher wakes at most 1/PACE times a second however
            // many small batches the committer makes (1,000 watchers each woken for every batch
            // fell behind and were ended: docs/benchmarks.md section 8).
            loop {
                let first = rx.recv().await;
                let mut next = Some(first);
                while let Some(got) = next.take() {
                    let batch = match got {
                        Ok(b) => b,
                        Err(RecvError::Lagged(n)) => {
                            let _ = tx
                                .send(Err(Status::aborted(format!(
                                    "watch fell {n} batches behind; watch again"
                                ))))
                                .await;
                            return;
                        }
                        Err(RecvError::Closed) => {
                            let _ = tx
                                .send(Err(Status::unavailable("the store is shutting down")))
                                .await;
                            return;
                        }
                    };
                    if batch.seq > seq {
                        for c in batch.changes.iter().filter(|c| f.matches(c.allocation())) {
                            let (ty, a) = match c {
                                Change::Added(a) => (pb::WatchEventType::Added, a),
                                Change::Modified(a) => (pb::WatchEventType::Modified, a),
                                Change::Deleted(a) => (pb::WatchEventType::Deleted, a),
                            };
                            let oor = !matches!(c, Change::Deleted(_)) && ledger.is_out_of_range(a);
                            let ev = pb::WatchAllocationsResponse {
                                r#type: ty as i32,
                                allocation: Some(allocation_to(a, oor)),
                                revision: batch.seq,
                            };
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                    }
                    next = match rx.try_recv() {
                        Ok(b) => Some(Ok(b)),
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                        Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                    };
                }
                tokio::time::sleep(PACE).await;
            }
        };
        // A graceful shutdown waits for every open stream, so a watch ends when it begins
        // (without waiting for a slow reader: try_send).
        tokio::select! {
            () = feed => {}
            () = stopped => {
                let _ = tx.try_send(Err(Status::unavailable(
                    "this store replica stopped serving watches (shutting down, or a follower reloading or taking over); watch again",
                )));
            }
        }
    })
}

/// A stream fed by a task through a bounded channel; the task stops when the client goes.
fn async_stream<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::WatchAllocationsResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
