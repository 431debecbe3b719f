//! The durable ledger: the pure [`State`] behind one mutex, made durable through a storage
//! [`Engine`] by a group committer.
//!
//! Every call runs its transition on the in-memory state under the mutex (microseconds),
//! hands the resulting ops to the committer thread, and replies only after the committer has
//! made them durable. The committer takes every batch queued while the previous commit ran and
//! commits them together (group commit), so under load one fsync acknowledges many requests.
//!
//! Reads wait for the commit of everything already applied in memory, so no reply ever shows
//! state that a crash could take back. If a commit fails, the ledger refuses all further work
//! (`Error::Storage`, also for calls already waiting on that commit) and [`Ledger::failure`]
//! resolves, on which the server exits; a restart reloads what the engine holds.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{broadcast, mpsc, watch};

use super::{AddressInfo, AllocateReq, Change, ListFilter, Outcome, State, Upserted, Usage};
use crate::{
    error::{Error, Result},
    model::{Allocation, NetworkDef, NetworkRecord, Owner},
    store::{Engine, Op, Snapshot},
};

/// Watch events of one commit batch, in order, with the batch's sequence.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The batch's commit sequence (changes within it are in order).
    pub seq: u64,
    /// The changes.
    pub changes: Arc<Vec<Change>>,
}

struct Batch {
    seq: u64,
    ops: Vec<Op>,
    changes: Vec<Change>,
}

/// The durable-commit high-water mark, or the failure that stopped the committer.
#[derive(Clone, Debug)]
enum Durable {
    Upto(u64),
    Failed(String),
}

/// Observer of commit batches (metrics).
pub trait CommitObserver: Send + Sync + 'static {
    /// A batch of `requests` requests and `ops` operations took `elapsed` to commit.
    fn committed(&self, requests: usize, ops: usize, elapsed: Duration);
}

/// No-op observer.
pub struct NoObserver;
impl CommitObserver for NoObserver {
    fn committed(&self, _: usize, _: usize, _: Duration) {}
}

/// The durable ledger.
pub struct Ledger {
    state: Mutex<State>,
    tx: mpsc::UnboundedSender<Batch>,
    durable: watch::Receiver<Durable>,
    events: broadcast::Sender<Committed>,
    /// On a follower's replica ([`Ledger::replica`]): advances the durable mark as batches
    /// the leader committed are applied. A replica refuses every mutation.
    replica: Option<watch::Sender<Durable>>,
}

/// Wall clock in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many commit batches a watcher may fall behind before it is ended with ABORTED, unless
/// the server is told otherwise (`serve --watch-buffer`). The buffer is one ring shared by
/// every watcher: its memory is this many batches' change lists, however many watch.
pub const DEFAULT_WATCH_BUFFER: usize = 16_384;
/// The bounds `--watch-buffer` accepts.
pub const WATCH_BUFFER_RANGE: std::ops::RangeInclusive<usize> = 16..=1 << 20;

/// Reads the engine on a second thread while this one builds the state from what it has read
/// so far: with 1M allocations, sled's ~1.3 s of scanning and decoding and the state's ~1 s
/// of building overlap instead of adding up, and the records are never all held twice.
fn load_pipelined(engine: &dyn Engine, default_grace_secs: u32) -> Result<State> {
    let (head_tx, head_rx) = std::sync::mpsc::sync_channel::<Snapshot>(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Allocation>>(16);
    let gone = || Error::Storage("loading: the state builder stopped".into());
    thread::scope(|s| {
        let reader = s.spawn(move || {
            engine.load_streamed(&mut |h| head_tx.send(h).map_err(|_| gone()), &mut |c| {
                tx.send(c).map_err(|_| gone())
            })
        });
        let built = head_rx
            .recv()
            .ok()
            .map(|head| State::load_streamed(head, rx.iter().flatten(), default_grace_secs, now_ms(), false));
        // Unblocks a reader still sending when the builder stopped early.
        drop(rx);
        let read = reader
            .join()
            .map_err(|_| Error::Storage("loading: the store reader panicked".into()))?;
        // A read error wins: the builder may have seen only part of the store.
        read?;
        built.unwrap_or_else(|| Err(Error::Storage("loading: the store reader sent nothing".into())))
    })
}

/// The ring every watcher reads from, `watch_buffer` batches deep (clamped to
/// [`WATCH_BUFFER_RANGE`]).
fn watch_ring(watch_buffer: usize) -> broadcast::Sender<Committed> {
    let depth = watch_buffer.clamp(*WATCH_BUFFER_RANGE.start(), *WATCH_BUFFER_RANGE.end());
    broadcast::channel(depth).0
}

impl Ledger {
    /// Loads the ledger from `engine` and starts the committer thread.
    pub fn open(
        engine: Arc<dyn Engine>,
        default_grace_secs: u32,
        observer: Arc<dyn CommitObserver>,
    ) -> Result<Arc<Self>> {
        Self::open_with(engine, default_grace_secs, observer, DEFAULT_WATCH_BUFFER)
    }

    /// [`Ledger::open`] with watchers cut off after falling `watch_buffer` batches behind
    /// (clamped to [`WATCH_BUFFER_RANGE`]).
    pub fn open_with(
        engine: Arc<dyn Engine>,
        default_grace_secs: u32,
        observer: Arc<dyn CommitObserver>,
        watch_buffer: usize,
    ) -> Result<Arc<Self>> {
        let state = load_pipelined(&*engine, default_grace_secs)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (durable_tx, durable) = watch::channel(Durable::Upto(state.seq));
        let events = watch_ring(watch_buffer);
        let ev = events.clone();
        thread::Builder::new()
            .name("cairn-commit".into())
            .spawn(move || committer(engine, rx, durable_tx, ev, observer))
            .map_err(|e| Error::Storage(format!("starting the committer: {e}")))?;
        Ok(Arc::new(Ledger {
            state: Mutex::new(state),
            tx,
            durable,
            events,
            replica: None,
        }))
    }

    /// A read-only replica of the ledger another process writes, from `snap` (records read
    /// at one point of the shared engine); [`Ledger::apply`] feeds it every later committed
    /// batch. It serves reads and watches like the writer; mutations fail with
    /// `Error::Storage` (no committer runs).
    pub fn replica(snap: Snapshot, default_grace_secs: u32, watch_buffer: usize) -> Result<Arc<Self>> {
        let state = State::load(snap, default_grace_secs, now_ms(), false)?;
        let (tx, _) = mpsc::unbounded_channel();
        let (durable_tx, durable) = watch::channel(Durable::Upto(state.seq));
        let events = watch_ring(watch_buffer);
        Ok(Arc::new(Ledger {
            state: Mutex::new(state),
            tx,
            durable,
            events,
            replica: Some(durable_tx),
        }))
    }

    /// On a replica: applies one batch the writer committed, with its sequence, and tells
    /// watchers. An error (a record the writer could not have written) leaves the replica
    /// unusable: the caller loads a new one.
    pub fn apply(&self, ops: Vec<Op>, seq: u64) -> Result<()> {
        let Some(durable) = &self.replica else {
            return Err(Error::Storage(
                "apply: this ledger is the writer, not a replica".into(),
            ));
        };
        let (changes, seq) = {
            let mut st = self.lock();
            let changes = st.apply(ops, seq)?;
            (changes, st.seq)
        };
        durable.send_replace(Durable::Upto(seq));
        if !changes.is_empty() {
            // No receivers is fine.
            let _ = self.events.send(Committed {
                seq,
                changes: Arc::new(changes),
            });
        }
        Ok(())
    }

    /// The last commit sequence in the state (on a replica: the last applied).
    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave half a transition (they check before they
        // change), so a poisoned lock's state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn healthy(&self) -> Result<()> {
        match &*self.durable.borrow() {
            Durable::Failed(e) => Err(Error::Storage(e.clone())),
            Durable::Upto(_) => Ok(()),
        }
    }

    /// Resolves when everything up to `seq` is durable, or with the commit failure.
    async fn wait_durable(&self, seq: u64) -> Result<()> {
        let mut rx = self.durable.clone();
        let res = rx
            .wait_for(|d| match d {
                Durable::Upto(s) => *s >= seq,
                Durable::Failed(_) => true,
            })
            .await;
        match res.as_deref() {
            Ok(Durable::Upto(_)) => Ok(()),
            Ok(Durable::Failed(e)) => Err(Error::Storage(e.clone())),
            Err(_) => Err(Error::Storage("the committer stopped".into())),
        }
    }

    /// Runs a transition and waits until its ops (if any) are durable.
    async fn mutate<T>(&self, f: impl FnOnce(&mut State, u64, u64) -> Result<Outcome<T>>) -> Result<T> {
        if self.replica.is_some() {
            return Err(Error::Storage(
                "this cairn-ipam replica follows the leader and does not write".into(),
            ));
        }
        let retired;
        let wait_for = {
            let mut st = self.lock();
            self.healthy()?;
            let seq = st.seq + 1;
            let outcome = f(&mut st, seq, now_ms());
            // Freed after the lock is released.
            retired = st.take_retired();
            let (out, mut ops, changes) = match outcome {
                Ok((out, ops, changes)) => (Ok(out), ops, changes),
                // A refusal is an answer about the state too: it must not be sent before
                // the state it describes is durable.
                Err(e) => (Err(e), vec![], vec![]),
            };
            if ops.is_empty() {
                (out, st.seq)
            } else {
                ops.extend(st.take_deferred());
                // An import may have raised the sequence past `seq`.
                st.seq = st.seq.max(seq);
                let seq = st.seq;
                // Sent under the lock so batches reach the committer in sequence order.
                self.tx
                    .send(Batch { seq, ops, changes })
                    .map_err(|_| Error::Storage("the committer stopped".into()))?;
                (out, seq)
            }
        };
        drop(retired);
        let (out, seq) = wait_for;
        self.wait_durable(seq).await?;
        out
    }

    /// Runs a read and waits until the state it saw is durable.
    async fn read<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let (out, seq) = {
            let mut st = self.lock();
            self.healthy()?;
            (f(&mut st), st.seq)
        };
        // Refusals too describe state: sent only once it is durable.
        self.wait_durable(seq).await?;
        out
    }

    /// See `State::upsert_network`.
    pub async fn upsert_network(
        &self,
        def: NetworkDef,
        expected_version: Option<u64>,
        dry_run: bool,
    ) -> Result<Upserted> {
        // Validation and everything else derived from the definition alone happen before
        // the lock, on a blocking thread: the largest definition the limits allow costs
        // ~100 ms of CPU, which would otherwise hold the lock (every other request) or an
        // async worker (a share of them).
        let (def, prepared) = tokio::task::spawn_blocking(move || {
            let prepared = super::networks::prepare(&def);
            (def, prepared)
        })
        .await
        .map_err(|e| Error::Storage(format!("validating the network definition: {e}")))?;
        let prepared = prepared?;
        self.mutate(|st, _, now| st.upsert_prepared(def, prepared, expected_version, dry_run, now))
            .await
    }

    /// See `State::delete_network`.
    pub async fn delete_network(&self, name: &str, force: bool) -> Result<u64> {
        self.mutate(|st, _, now| st.delete_network(name, force, now))
            .await
    }

    /// One network.
    pub async fn network(&self, name: &str) -> Result<NetworkRecord> {
        self.read(|st| st.network(name).cloned()).await
    }

    /// All networks.
    pub async fn networks(&self) -> Result<Vec<NetworkRecord>> {
        self.read(|st| Ok(st.networks())).await
    }

    /// See [`State::allocate`]. Returns the allocation and whether it was created.
    pub async fn allocate(&self, req: AllocateReq) -> Result<(Allocation, bool)> {
        self.mutate(|st, seq, now| st.allocate(req, seq, now)).await
    }

    /// See `State::release`.
    pub async fn release(&self, network: &str, owner: &Owner) -> Result<Option<Allocation>> {
        self.mutate(|st, _, now| st.release(network, owner, now)).await
    }

    /// See [`State::report_conflict`].
    pub async fn report_conflict(&self, req: super::ConflictReq) -> Result<super::Reported> {
        self.mutate(|st, seq, now| st.report_conflict(req, seq, now))
            .await
    }

    /// The owner's allocation.
    pub async fn get_allocation(&self, network: &str, owner: &Owner) -> Result<Allocation> {
        self.read(|st| st.get_allocation(network, owner)).await
    }

    /// A page of allocations.
    pub async fn list(
        &self,
        f: &ListFilter,
        page_size: usize,
        token: &str,
    ) -> Result<(Vec<Allocation>, String)> {
        self.read(|st| st.list(f, page_size, token)).await
    }

    /// Usage per pool and family.
    pub async fn usage(&self, network: Option<&str>) -> Result<Vec<Usage>> {
        self.read(|st| st.usage(network, now_ms())).await
    }

    /// See [`State::lookup`].
    pub async fn lookup(&self, ip: std::net::IpAddr) -> Result<AddressInfo> {
        self.read(|st| Ok(st.lookup(ip))).await
    }

    /// Every durable commit batch from now on, without a snapshot (for live views that load
    /// their state by paging). A receiver that falls behind gets `Lagged` and must reload.
    pub fn subscribe(&self) -> broadcast::Receiver<Committed> {
        self.events.subscribe()
    }

    /// True when any address of `a` is outside its pool's ranges.
    pub fn is_out_of_range(&self, a: &Allocation) -> bool {
        self.lock().is_out_of_range(a)
    }

    /// Everything, for backup.
    pub async fn export(&self) -> Result<Snapshot> {
        self.read(|st| Ok(st.snapshot())).await
    }

    /// Everything, for a streamed backup, with each allocation's out-of-range flag, all from
    /// one point in time. Holds the lock only for the copy; callers stream from it afterwards.
    pub async fn export_flagged(&self) -> Result<(Snapshot, Vec<bool>)> {
        self.read(|st| {
            let s = st.snapshot();
            let flags = s.allocations.iter().map(|a| st.is_out_of_range(a)).collect();
            Ok((s, flags))
        })
        .await
    }

    /// Restores a backup into an empty ledger, after checking it as a whole.
    pub async fn import(&self, snap: Snapshot, default_grace_secs: u32) -> Result<(u64, u64)> {
        self.mutate(|st, _seq, now| {
            if !st.is_empty() {
                return Err(Error::Conflict(
                    "the store is not empty; import restores into an empty store only".into(),
                ));
            }
            let counts = (snap.networks.len() as u64, snap.allocations.len() as u64);
            let mut fresh = State::load(snap.clone(), default_grace_secs, now, true)?;
            let mut ops: Vec<Op> = snap
                .networks
                .into_iter()
                .map(|n| Op::PutNetwork(Arc::new(n)))
                .collect();
            let changes = snap.allocations.iter().cloned().map(Change::Added).collect();
            ops.extend(snap.allocations.into_iter().map(Op::PutAlloc));
            ops.extend(
                snap.quarantined
                    .into_iter()
                    .filter(|q| q.until_ms > now)
                    .map(Op::PutQuarantine),
            );
            ops.extend(fresh.take_deferred());
            *st = fresh;
            Ok((counts, ops, changes))
        })
        .await
    }

    /// Starts a watch: the allocations matching `f` as of a durable point, and a receiver of
    /// every later batch (filter and skip batches with `seq <= ` the returned sequence).
    pub async fn watch(
        &self,
        f: &ListFilter,
    ) -> Result<(Vec<Allocation>, u64, broadcast::Receiver<Committed>)> {
        let (snap, seq, rx) = {
            let st = self.lock();
            self.healthy()?;
            if let Some(n) = &f.network {
                st.network(n)?;
            }
            // Subscribed under the lock: no batch after `seq` can be missed.
            (st.matching(f), st.seq, self.events.subscribe())
        };
        self.wait_durable(seq).await?;
        Ok((snap, seq, rx))
    }

    /// Number of allocations (metrics).
    pub fn allocation_count(&self) -> usize {
        self.lock().allocation_count()
    }

    /// Waits until every queued batch is durable (used at shutdown).
    pub async fn sync(&self) -> Result<()> {
        let seq = self.lock().seq;
        self.wait_durable(seq).await
    }
}

fn committer(
    engine: Arc<dyn Engine>,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    durable: watch::Sender<Durable>,
    events: broadcast::Sender<Committed>,
    observer: Arc<dyn CommitObserver>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batches = vec![first];
        while let Ok(b) = rx.try_recv() {
            batches.push(b);
        }
        let seq = batches.iter().map(|b| b.seq).max().unwrap_or(0);
        let ops: Vec<Op> = batches
            .iter_mut()
            .flat_map(|b| std::mem::take(&mut b.ops))
            .collect();
        let started = Instant::now();
        if let Err(e) = engine.commit(&ops, seq) {
            tracing::error!(error = %e, "commit failed; refusing further work");
            // The bare cause: it is wrapped in `Error::Storage` again where it is reported.
            let cause = match e {
                Error::Storage(m) => m,
                other => other.to_string(),
            };
            durable.send_replace(Durable::Failed(cause));
            return;
        }
        observer.committed(batches.len(), ops.len(), started.elapsed());
        durable.send_replace(Durable::Upto(seq));
        for b in batches {
            if !b.changes.is_empty() {
                // No receivers is fine.
                let _ = events.send(Committed {
                    seq: b.seq,
                    changes: Arc::new(b.changes),
                });
            }
        }
    }
}

impl Ledger {
    /// Resolves with the reason once a commit has failed.
    pub async fn failure(&self) -> String {
        let mut rx = self.durable.clone();
        match rx.wait_for(|d| matches!(d, Durable::Failed(_))).await.as_deref() {
            Ok(Durable::Failed(e)) => e.clone(),
            _ => "the committer stopped".into(),
        }
    }
}
