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

/// How many watches may be open at once (`serve --max-watchers`): each holds a task, a
/// channel of 256 events and its place in the ledger's watch ring.
pub const DEFAULT_MAX_WATCHERS: usize = 10_000;

/// Open watches, counted against a limit.
#[derive(Debug)]
pub(super) struct WatchSlots {
    open: std::sync::atomic::AtomicUsize,
    max: usize,
}

/// One open watch's place; gives it back when dropped (the stream ended).
pub(super) struct WatchSlot(Arc<WatchSlots>);

impl WatchSlots {
    /// At most `max` open watches.
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(WatchSlots {
            open: std::sync::atomic::AtomicUsize::new(0),
            max,
        })
    }

    /// A place for one more watch, unless `max` are open.
    pub(super) fn acquire(self: &Arc<Self>) -> Result<WatchSlot, crate::error::Error> {
        use std::sync::atomic::Ordering;
        let taken = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < self.max).then_some(n + 1)
        });
        match taken {
            Ok(_) => Ok(WatchSlot(self.clone())),
            Err(n) => Err(crate::error::Error::Exhausted(format!(
                "watchers: {n} watches are open, the store's limit (serve --max-watchers {}); retry later",
                self.max
            ))),
        }
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

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
    slot: WatchSlot,
) -> WatchStream {
    async_stream(move |tx| async move {
        // Held until the stream's task ends.
        let _slot = slot;
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
        // The client went away (its stream dropped): end now, not at the next change, which
        // on a quiet store may never come — the task and its watch slot would leak.
        let gone_tx = tx.clone();
        let gone = async move { gone_tx.closed().await };
        // A graceful shutdown waits for every open stream, so a watch ends when it begins
        // (without waiting for a slow reader: try_send).
        tokio::select! {
            () = feed => {}
            () = gone => {}
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
