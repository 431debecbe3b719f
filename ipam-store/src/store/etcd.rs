//! The HA engine: the ledger's records in an etcd cluster (`etcd-client` 0.21), so the store
//! survives losing a machine. Every commit is ONE etcd transaction — all puts and deletes of
//! the batch plus the sequence — so it is atomic, and it returns only once etcd has applied it
//! on a quorum (etcd acknowledges a write after the raft entry is committed on a majority and
//! fsynced there).
//!
//! Key layout under a prefix (default `/cairn`), one key per record, readable with
//! `etcdctl get --prefix /cairn/`:
//! - `<prefix>/networks/<name>` — a [`NetworkRecord`]
//! - `<prefix>/allocations/<network>/<cluster>/<kind>/<namespace>/<name>` — an [`Allocation`]
//!   (the suffix is [`Allocation::key`])
//! - `<prefix>/quarantine/<network>/<address>` — a [`Quarantined`]
//! - `<prefix>/meta/seq` — the last commit sequence (a JSON number); every commit requires
//!   its mod revision unchanged since this engine's last load or commit, so a stale retry or a
//!   second store writing the same prefix fails instead of interleaving
//! - `<prefix>/meta/writer` — the id (pid-nanos) of the engine instance of the last commit
//! - `<prefix>/meta/…` — reserved for the engine (e.g. the leader key of phase B); `load`
//!   skips other `meta/` keys and refuses any other unknown key, naming it.
//!
//! Values are JSON (serde), not the sled engine's postcard: an operator inspecting or repairing
//! the store with `etcdctl` reads them directly, and etcd's per-key overhead (key, revisions,
//! MVCC history) dwarfs the 2–3× size difference (measured in `docs/etcd.md`).
//!
//! Limits: etcd refuses a transaction with more than `--max-txn-ops` operations (default 128)
//! or a request over `--max-request-bytes` (default 1.5 MiB), and a group-commit batch (or an
//! import) can be larger. Splitting a batch over several transactions would lose atomicity
//! (a crash between them leaves half a batch that `load` would serve), so this engine does not
//! split: it requires the server to run with at least [`MAX_TXN_OPS`] and
//! [`MAX_REQUEST_BYTES`] ([`server_flags`]), checks the first with a probe transaction at
//! start-up (a clear error instead of a ledger that stops at its first large batch), and
//! fails a commit whose batch exceeds them (which stops the ledger, like a full disk). Ops on
//! the same key within a batch are collapsed to the last one first (etcd refuses a key twice
//! in one transaction; puts carry whole values, so the last op decides).
//!
//! Fencing (for leader election): the engine can carry a [`Fence`] — a key and the create
//! revision it must still have — compared in every commit's `when(...)`. When the compare
//! fails (the leader's lease expired and its key was deleted or re-created by another
//! replica) the commit is refused with "fenced: lost leadership" and nothing of it is applied.
//!
//! Election (the building block of phase B): [`EtcdEngine::try_lead`] grants a lease, creates
//! `<prefix>/meta/leader` under it only if absent, sets the fence to that key's create
//! revision and keeps the lease alive on the engine's runtime ([`Leadership`]).
//!
//! Runtime: the [`Engine`] trait is synchronous and is called from the committer's std thread
//! and from `Ledger::open` inside the server's async `main`. The engine owns a one-worker tokio
//! runtime; each call spawns its future there and waits on a std channel, so it never enters
//! (or nests) the caller's runtime, from whichever thread it is called. Transient transport
//! errors are retried until the request timeout: a commit transaction is idempotent (whole
//! values and a fixed sequence; the fence keeps others out), so applying it twice is harmless.

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Event, EventType, GetOptions, Identity,
    KvClient, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Serialize, de::DeserializeOwned};

use super::{Engine, Op, Snapshot};
use crate::error::{Error, Result};

/// Operations per transaction the etcd server must allow (`--max-txn-ops`): the largest
/// commit batch (distinct keys + `meta/seq` + `meta/writer`) this engine can write.
pub const MAX_TXN_OPS: usize = 16_384;
/// Request size the etcd server must allow (`--max-request-bytes`).
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Keys per page when loading.
const PAGE: i64 = 10_000;
/// The client's message limit: a full page of the largest records, and a maximal commit.
const MAX_MESSAGE: usize = MAX_REQUEST_BYTES + (1 << 20);

/// The flags an etcd server needs for this engine.
pub fn server_flags() -> Vec<String> {
    vec![
        format!("--max-txn-ops={MAX_TXN_OPS}"),
        format!("--max-request-bytes={MAX_REQUEST_BYTES}"),
    ]
}

/// TLS to etcd: a CA bundle and optionally a client certificate and key (PEM files).
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    /// CA certificate(s) that sign the etcd servers' certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for etcd's `--client-cert-auth`.
    pub cert_key: Option<(PathBuf, PathBuf)>,
}

/// How to reach the etcd cluster.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs, `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/cairn` (no trailing slash).
    pub prefix: String,
    /// TLS settings (required for `https://` endpoints with a private CA).
    pub tls: Option<EtcdTls>,
    /// Deadline of one engine call, retries included.
    pub request_timeout: Duration,
}

impl EtcdOptions {
    /// Options for `endpoints` with the default prefix `/cairn`, no TLS and a 30 s deadline
    /// (when etcd's raft leader dies, a pending request fails only after etcd's own ~7 s
    /// timeout; the retry must still fit).
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdOptions {
            endpoints,
            prefix: "/cairn".into(),
            tls: None,
            request_timeout: Duration::from_secs(30),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid(
                "etcd-endpoints",
                "at least one endpoint is required",
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.contains(char::is_whitespace) {
                return Err(Error::invalid(
                    format!("etcd-endpoints[{i}]"),
                    format!("{e:?} is not an http:// or https:// URL"),
                ));
            }
        }
        let p = &self.prefix;
        if !p.starts_with('/') || p.ends_with('/') || p.contains(char::is_whitespace) || p.contains("//") {
            return Err(Error::invalid(
                "etcd-prefix",
                format!("{p:?} must start with '/', not end with '/', and hold no spaces or '//'"),
            ));
        }
        Ok(())
    }
}

/// The leadership a writer must still hold: `key` must still have `create_revision` (the key
/// a leader created under its lease; deleted on lease expiry, re-created by the next leader).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The full etcd key (prefix included).
    pub key: String,
    /// Its create revision when this replica won the election.
    pub create_revision: i64,
}

/// The leader key, under the prefix: the id of the replica holding it, under its lease.
pub const LEADER_KEY: &str = "meta/leader";

/// The outcome of [`EtcdEngine::try_lead`].
pub enum Campaign {
    /// This replica leads; the engine's fence is set to its key.
    Won(Leadership),
    /// Another replica leads.
    Held {
        /// Its id (the leader key's value).
        by: String,
    },
}

/// A won election: the lease is kept alive by a task on the engine's runtime until this is
/// dropped or a keep-alive fails. Losing the lease locally is only a hint (step down); the
/// fence on every commit is what keeps a former leader from writing.
pub struct Leadership {
    /// The fence now set on the engine.
    pub fence: Fence,
    /// The lease the leader key is attached to.
    pub lease: i64,
    lost: tokio::sync::watch::Receiver<bool>,
    keeper: tokio::task::AbortHandle,
}

impl Leadership {
    /// True once the lease could not be kept alive (expired, revoked, or etcd unreachable).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Turns true when the lease could not be kept alive (await `wait_for(|l| *l)`).
    pub fn lost_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.lost.clone()
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// etcd behind the [`Engine`] trait.
pub struct EtcdEngine {
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    /// `<prefix>/`.
    root: String,
    fence: Mutex<Option<Fence>>,
    /// The mod revision `meta/seq` had after this engine's last load or commit: every commit
    /// requires it unchanged, so a stale retry or a second writer on the prefix cannot land.
    seq_rev: Mutex<Option<i64>>,
    /// This engine instance's id, written to `meta/writer` with every commit.
    writer: String,
    timeout: Duration,
}

fn storage(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("etcd {what}: {e}"))
}

/// True for errors worth retrying: the connection, not the request, failed.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ) && !s.message().contains("too many operations")
        }
        _ => false,
    }
}

/// The first key after every key starting with `p`.
fn prefix_end(p: &str) -> Vec<u8> {
    let mut end = p.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| storage("encoding", e))
}

fn parse<T: DeserializeOwned>(key: &str, v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| Error::Storage(format!("etcd record {key:?}: {e}")))
}

impl EtcdEngine {
    /// Connects to the cluster and checks it accepts transactions of [`MAX_TXN_OPS`]
    /// operations. Safe to call from inside another tokio runtime.
    pub fn connect(opts: &EtcdOptions) -> Result<Self> {
        opts.validate()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cairn-etcd")
            .enable_all()
            .build()
            .map_err(|e| storage("starting the client runtime", e))?;
        let mut copts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(opts.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let Some(tls) = &opts.tls {
            copts = copts.with_tls(tls_options(tls)?);
        }
        let endpoints = opts.endpoints.clone();
        let client = on(&rt, async move { Client::connect(endpoints, Some(copts)).await })
            .map_err(|e| storage(&format!("connecting to {}", opts.endpoints.join(",")), e))?;
        let engine = EtcdEngine {
            rt: Some(rt),
            client,
            root: format!("{}/", opts.prefix),
            fence: Mutex::new(None),
            seq_rev: Mutex::new(None),
            writer: format!(
                "{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
            timeout: opts.request_timeout,
        };
        engine.probe(&opts.endpoints.join(","))?;
        Ok(engine)
    }

    /// Sets (or clears) the fence every later commit is compared against.
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = fence;
    }

    /// The `<prefix>/` all keys live under.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// A client on the engine's connection (phase B: elections, watches).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Runs `f` (a fresh request each attempt) on the engine's runtime, retrying transient
    /// errors until the deadline.
    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(KvClient) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>> + Send,
    {
        let (kv, timeout) = (self.kv(), self.timeout);
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| storage(what, "the client runtime stopped"))?;
        on(rt, async move {
            let deadline = Instant::now() + timeout;
            let mut pause = Duration::from_millis(20);
            loop {
                match f(kv.clone()).await {
                    Err(e) if transient(&e) && Instant::now() + pause < deadline => {
                        tracing::warn!(error = %e, "etcd request failed; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(500));
                    }
                    r => return r,
                }
            }
        })
        .map_err(|e| storage(what, e))
    }

    /// A read-only transaction of [`MAX_TXN_OPS`] gets: refused by a server whose
    /// `--max-txn-ops` is lower.
    fn probe(&self, endpoints: &str) -> Result<()> {
        let key = format!("{}meta/probe", self.root);
        self.call(&format!("start-up probe of {endpoints}"), move |mut kv| {
            let ops: Vec<TxnOp> = (0..MAX_TXN_OPS).map(|_| TxnOp::get(key.clone(), None)).collect();
            async move { kv.txn(Txn::new().and_then(ops)).await }
        })
        .map(drop)
        .map_err(|e| {
            if e.to_string().contains("too many operations") {
                Error::Storage(format!(
                    "the etcd cluster refuses transactions of {MAX_TXN_OPS} operations: start every \
                     member with {} (see docs/etcd.md)",
                    server_flags().join(" ")
                ))
            } else {
                e
            }
        })
    }

    /// Gives leadership up at once: stops the keep-alive and revokes the lease, which deletes
    /// the leader key, so a standby can take over without waiting for the lease to expire. The
    /// engine's fence stays set: any later commit of this engine is refused.
    pub fn resign(&self, lead: Leadership) -> Result<()> {
        let lease = lead.lease;
        drop(lead);
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| storage("resign", "the client runtime stopped"))?;
        let client = self.client.clone();
        on(
            rt,
            async move { client.lease_client().revoke(lease).await.map(drop) },
        )
        .map_err(|e| storage("resign", e))
    }

    /// The id of the replica holding `<prefix>/meta/leader` now, if any (one read).
    pub fn leader(&self) -> Result<Option<String>> {
        let key = format!("{}{LEADER_KEY}", self.root);
        self.call("leader lookup", move |mut kv| {
            let key = key.clone();
            async move { kv.get(key, None).await }
        })
        .map(|r| {
            r.kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        })
    }

    /// One attempt to become the writer: grants a lease of `ttl_secs`, and creates
    /// `<prefix>/meta/leader` = `id` under it if no one holds it. On success the engine's
    /// fence is set to that key's create revision and the lease is kept alive.
    pub fn try_lead(&self, id: &str, ttl_secs: i64) -> Result<Campaign> {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| storage("election", "the client runtime stopped"))?;
        let key = format!("{}{LEADER_KEY}", self.root);
        let (client, k, me) = (self.client.clone(), key.clone(), id.to_string());
        let won = on(rt, async move {
            let mut leases = client.lease_client();
            let lease = leases.grant(ttl_secs, None).await?.id();
            let txn = Txn::new()
                .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    k.clone(),
                    me,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(k, None)]);
            let resp = client.kv_client().txn(txn).await?;
            if resp.succeeded() {
                return Ok(Ok((lease, resp.header().map_or(0, |h| h.revision()))));
            }
            leases.revoke(lease).await?;
            let by = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            });
            Ok(Err(by.unwrap_or_default()))
        })
        .map_err(|e| storage("election", e))?;
        let (lease, create_revision) = match won {
            Ok(w) => w,
            Err(by) => return Ok(Campaign::Held { by }),
        };
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let mut leases = self.client.lease_client();
        let period = Duration::from_millis((ttl_secs.max(1) as u64) * 1000 / 3);
        let ttl = Duration::from_secs(ttl_secs.max(1) as u64);
        let keeper = rt
            .spawn(async move {
                // The lease was granted just before the key was created.
                let mut confirmed = Instant::now();
                loop {
                    // One keep-alive stream; a transport error (the etcd member it runs on died,
                    // a connection reset) is retried on a new stream — the client picks another
                    // member — for as long as the lease can still be alive.
                    let session = async {
                        let (mut keeper, mut stream) = leases.keep_alive(lease).await?;
                        loop {
                            keeper.keep_alive().await?;
                            let answer = tokio::time::timeout(period, stream.message())
                                .await
                                .map_err(|_| etcd_client::Error::IoError(std::io::ErrorKind::TimedOut.into()))??;
                            match answer {
                                Some(m) if m.ttl() > 0 => confirmed = Instant::now(),
                                // Expired or revoked: leadership is over.
                                _ => return Ok::<(), etcd_client::Error>(()),
                            }
                            tokio::time::sleep(period).await;
                        }
                    };
                    match session.await {
                        Ok(()) => break,
                        Err(e) if confirmed.elapsed() + Duration::from_millis(100) < ttl => {
                            tracing::warn!(error = %e, "leader lease keep-alive failed; retrying on a new stream");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "keeping the leader lease alive failed for its whole TTL");
                            break;
                        }
                    }
                }
                lost_tx.send_replace(true);
            })
            .abort_handle();
        let fence = Fence { key, create_revision };
        self.set_fence(Some(fence.clone()));
        Ok(Campaign::Won(Leadership {
            fence,
            lease,
            lost,
            keeper,
        }))
    }

    fn seq_key(&self) -> String {
        format!("{}meta/seq", self.root)
    }

    fn writer_key(&self) -> String {
        format!("{}meta/writer", self.root)
    }

    fn seq_rev(&self) -> std::sync::MutexGuard<'_, Option<i64>> {
        self.seq_rev.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_key(&self, op: &Op) -> String {
        let r = &self.root;
        match op {
            Op::PutNetwork(n) => format!("{r}networks/{}", n.def.name),
            Op::DelNetwork(name) => format!("{r}networks/{name}"),
            Op::PutAlloc(a) => format!("{r}allocations/{}", a.key()),
            Op::DelAlloc(k) => format!("{r}allocations/{k}"),
            Op::PutQuarantine(q) => format!("{r}quarantine/{}/{}", q.network, q.address),
            Op::DelQuarantine(net, ip) => format!("{r}quarantine/{net}/{ip}"),
        }
    }

    /// The batch as transaction ops: the last op per key, in the order of those last ops.
    fn txn_ops(&self, ops: &[Op], seq: u64) -> Result<Vec<TxnOp>> {
        let keyed: Vec<String> = ops.iter().map(|op| self.record_key(op)).collect();
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(ops.len());
        for (i, k) in keyed.iter().enumerate() {
            last.insert(k, i);
        }
        let mut out = Vec::with_capacity(last.len() + 1);
        for (i, (op, key)) in ops.iter().zip(&keyed).enumerate() {
            if last.get(key.as_str()) != Some(&i) {
                continue;
            }
            out.push(match op {
                Op::PutNetwork(n) => TxnOp::put(key.clone(), json(&**n)?, None),
                Op::PutAlloc(a) => TxnOp::put(key.clone(), json(a)?, None),
                Op::PutQuarantine(q) => TxnOp::put(key.clone(), json(q)?, None),
                Op::DelNetwork(_) | Op::DelAlloc(_) | Op::DelQuarantine(..) => {
                    TxnOp::delete(key.clone(), None)
                }
            });
        }
        out.push(TxnOp::put(self.seq_key(), json(&seq)?, None));
        out.push(TxnOp::put(self.writer_key(), self.writer.clone(), None));
        if out.len() > MAX_TXN_OPS {
            return Err(Error::Storage(format!(
                "a commit batch of {} keys exceeds the etcd engine's limit of {MAX_TXN_OPS} \
                 operations per transaction",
                out.len()
            )));
        }
        Ok(out)
    }
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions> {
    let read = |field: &str, p: &PathBuf| {
        std::fs::read(p).map_err(|e| Error::invalid(field, format!("reading {}: {e}", p.display())))
    };
    let mut o = TlsOptions::new();
    if let Some(ca) = &tls.ca {
        o = o.ca_certificate(Certificate::from_pem(read("etcd-ca", ca)?));
    }
    if let Some((cert, key)) = &tls.cert_key {
        o = o.identity(Identity::from_pem(
            read("etcd-cert", cert)?,
            read("etcd-key", key)?,
        ));
    }
    Ok(o)
}

impl EtcdEngine {
    fn parse_into(&self, snap: &mut Snapshot, k: &[u8], v: &[u8]) -> Result<()> {
        let key = String::from_utf8_lossy(k);
        let rest = key.strip_prefix(self.root.as_str()).unwrap_or(&key);
        let (kind, _) = rest.split_once('/').unwrap_or((rest, ""));
        match kind {
            "networks" => snap.networks.push(parse(&key, v)?),
            "allocations" => snap.allocations.push(parse(&key, v)?),
            "quarantine" => snap.quarantined.push(parse(&key, v)?),
            "meta" if rest == "meta/seq" => snap.seq = parse(&key, v)?,
            "meta" => {}
            _ => {
                return Err(Error::Storage(format!(
                    "etcd: unknown key {key:?} under the store's prefix"
                )));
            }
        }
        Ok(())
    }
}

/// Runs `fut` on `rt` and blocks the calling (non-runtime or foreign-runtime) thread for it.
fn on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>> + Send + 'static,
) -> std::result::Result<T, String> {
    let (tx, rx) = mpsc::sync_channel(1);
    rt.spawn(async move {
        // The receiver is gone only if the caller gave up; nothing to report to.
        let _ = tx.send(fut.await);
    });
    match rx.recv() {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the client runtime stopped".into()),
    }
}

/// One record change read back from a watch.
#[derive(Debug)]
pub enum Replicated {
    /// A record the ledger keeps.
    Op(Box<Op>),
    /// `meta/seq`: the commit sequence of the transaction.
    Seq(u64),
}

impl EtcdEngine {
    /// The key and options of a watch of every record from `revision` on (inclusive).
    pub fn watch_from(&self, revision: i64) -> (String, WatchOptions) {
        let opts = WatchOptions::new()
            .with_range(prefix_end(&self.root))
            .with_start_revision(revision)
            .with_progress_notify();
        (self.root.clone(), opts)
    }

    /// What a watch event did to the store's records; `None` for keys the ledger does not
    /// keep (the leader key, the writer id). An unknown or corrupt key is an error naming it.
    pub fn replicated(&self, ev: &Event) -> Result<Option<Replicated>> {
        let Some(kv) = ev.kv() else {
            return Ok(None);
        };
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let rest = key.strip_prefix(self.root.as_str()).unwrap_or(&key);
        let (kind, name) = rest.split_once('/').unwrap_or((rest, ""));
        let put = ev.event_type() == EventType::Put;
        let v = kv.value();
        Ok(Some(match (kind, put) {
            ("networks", true) => {
                Replicated::Op(Box::new(Op::PutNetwork(std::sync::Arc::new(parse(&key, v)?))))
            }
            ("networks", false) => Replicated::Op(Box::new(Op::DelNetwork(name.to_string()))),
            ("allocations", true) => Replicated::Op(Box::new(Op::PutAlloc(parse(&key, v)?))),
            ("allocations", false) => Replicated::Op(Box::new(Op::DelAlloc(name.to_string()))),
            ("quarantine", true) => Replicated::Op(Box::new(Op::PutQuarantine(parse(&key, v)?))),
            ("quarantine", false) => {
                let parsed = name
                    .rsplit_once('/')
                    .and_then(|(net, ip)| Some((net.to_string(), ip.parse().ok()?)));
                let Some((net, ip)) = parsed else {
                    return Err(Error::Storage(format!("etcd: malformed quarantine key {key:?}")));
                };
                Replicated::Op(Box::new(Op::DelQuarantine(net, ip)))
            }
            ("meta", true) if rest == "meta/seq" => Replicated::Seq(parse(&key, v)?),
            ("meta", _) => return Ok(None),
            _ => {
                return Err(Error::Storage(format!(
                    "etcd: unknown key {key:?} under the store's prefix"
                )));
            }
        }))
    }

    /// Everything stored, as one snapshot at one etcd revision, and that revision (a watch
    /// from the next one sees every later change exactly once).
    pub fn load_at(&self) -> Result<(Snapshot, i64)> {
        let end = prefix_end(&self.root);
        let mut snap = Snapshot::default();
        let mut from = self.root.clone().into_bytes();
        // Every page after the first at the first page's revision: one consistent snapshot.
        // Pages are parsed as they come, so at most one page of raw values is held.
        let mut rev = 0;
        let seq_key = self.seq_key();
        let mut seq_rev = 0;
        loop {
            let (start, end) = (from.clone(), end.clone());
            let (r, more, page) = self.call("load", move |mut kv| {
                let mut o = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
                if rev != 0 {
                    o = o.with_revision(rev);
                }
                let start = start.clone();
                async move {
                    let mut resp = kv.get(start, Some(o)).await?;
                    let r = resp.header().map_or(0, |h| h.revision());
                    let kvs: Vec<(Vec<u8>, Vec<u8>, i64)> = resp
                        .take_kvs()
                        .into_iter()
                        .map(|kv| {
                            let m = kv.mod_revision();
                            let (k, v) = kv.into_key_value();
                            (k, v, m)
                        })
                        .collect();
                    Ok((r, resp.more(), kvs))
                }
            })?;
            if rev == 0 {
                rev = r;
            }
            if let Some((k, ..)) = page.last() {
                from = k.clone();
                from.push(0);
            }
            for (k, v, m) in &page {
                if *k == seq_key.as_bytes() {
                    seq_rev = *m;
                }
                self.parse_into(&mut snap, k, v)?;
            }
            if !more || page.is_empty() {
                *self.seq_rev() = Some(seq_rev);
                return Ok((snap, rev));
            }
        }
    }
}

impl Engine for EtcdEngine {
    fn load(&self) -> Result<Snapshot> {
        self.load_at().map(|(snap, _)| snap)
    }

    fn commit(&self, ops: &[Op], seq: u64) -> Result<()> {
        let ops = self.txn_ops(ops, seq)?;
        let known = *self.seq_rev();
        let expected = match known {
            Some(r) => r,
            // Never loaded: take the current revision (a fresh engine on a store).
            None => self.load().map(|_| self.seq_rev().unwrap_or(0))?,
        };
        let fence = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (seq_key, writer_key) = (self.seq_key(), self.writer_key());
        let mut when = vec![Compare::mod_revision(seq_key.clone(), CompareOp::Equal, expected)];
        let mut check = vec![TxnOp::get(seq_key.clone(), None), TxnOp::get(writer_key, None)];
        if let Some(f) = &fence {
            when.push(Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.create_revision,
            ));
            check.push(TxnOp::get(f.key.clone(), None));
        }
        let (ok, rev, found) = self.call("commit", move |mut kv| {
            let txn = Txn::new()
                .when(when.clone())
                .and_then(ops.clone())
                .or_else(check.clone());
            async move {
                let r = kv.txn(txn).await?;
                let rev = r.header().map_or(0, |h| h.revision());
                // On failure: (value, mod revision, create revision) of seq, writer, fence key.
                let found: Vec<Option<(Vec<u8>, i64, i64)>> = r
                    .op_responses()
                    .into_iter()
                    .map(|o| match o {
                        TxnOpResponse::Get(g) => g
                            .kvs()
                            .first()
                            .map(|kv| (kv.value().to_vec(), kv.mod_revision(), kv.create_revision())),
                        _ => None,
                    })
                    .collect();
                Ok((r.succeeded(), rev, found))
            }
        })?;
        if ok {
            *self.seq_rev() = Some(rev);
            return Ok(());
        }
        let get = |i: usize| found.get(i).cloned().flatten();
        if let Some(f) = &fence
            && get(2).map(|(_, _, c)| c) != Some(f.create_revision)
        {
            return Err(Error::Storage(format!(
                "fenced: lost leadership ({} no longer has create revision {}); nothing of the \
                 batch was written",
                f.key, f.create_revision
            )));
        }
        let landed = get(0).and_then(|(v, m, _)| serde_json::from_slice::<u64>(&v).ok().map(|s| (s, m)));
        let by_us =
            get(1).is_some_and(|(w, m, _)| w == self.writer.as_bytes() && Some(m) == landed.map(|l| l.1));
        match landed {
            // An earlier attempt of this very commit landed (its reply was lost).
            Some((s, m)) if s == seq && by_us => {
                *self.seq_rev() = Some(m);
                Ok(())
            }
            _ => Err(Error::Storage(format!(
                "{seq_key} changed under this store (expected mod revision {expected}, found \
                 {landed:?}): another writer on the same prefix? nothing of the batch was written"
            ))),
        }
    }

    fn name(&self) -> &'static str {
        "etcd"
    }
}

impl Drop for EtcdEngine {
    fn drop(&mut self) {
        // Never blocks, so dropping the engine inside another runtime is fine.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::etcd_cluster::EtcdCluster;

    fn engine(c: &EtcdCluster, prefix: &str) -> EtcdEngine {
        let mut o = EtcdOptions::new(c.endpoints());
        o.prefix = prefix.into();
        EtcdEngine::connect(&o).unwrap()
    }

    // One fresh single-member etcd per case (killed when the case's opener drops).
    crate::engine_suite!(|| {
        let c = EtcdCluster::start(1, &server_flags());
        move || Box::new(engine(&c, "/cairn")) as Box<dyn Engine>
    });

    fn block<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn alloc(name: &str) -> crate::model::Allocation {
        crate::model::Allocation {
            network: "n".into(),
            pool: "vip".into(),
            owner: crate::model::Owner {
                cluster_id: "c".into(),
                kind: crate::model::OwnerKind::Service,
                namespace: "ns".into(),
                name: name.into(),
                uid: "u".into(),
            },
            addresses: vec!["10.0.1.1".parse().unwrap()],
            sharing_key: String::new(),
            ports: vec![],
            created_ms: 1,
            updated_ms: 1,
            revision: 1,
        }
    }

    #[test]
    fn prefixes_are_separate_stores_and_keys_are_readable() {
        let c = EtcdCluster::start(1, &server_flags());
        let (a, b) = (engine(&c, "/a"), engine(&c, "/ab"));
        a.commit(&[Op::PutAlloc(alloc("x"))], 3).unwrap();
        assert_eq!(b.load().unwrap(), Snapshot::default());
        assert_eq!(a.load().unwrap().allocations, vec![alloc("x")]);
        let mut kv = a.client().kv_client();
        let got = block(kv.get("/a/allocations/n/c/service/ns/x", None)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(got.kvs()[0].value()).unwrap();
        assert_eq!(v["owner"]["name"], "x", "{v}");
        let seq = block(kv.get("/a/meta/seq", None)).unwrap();
        assert_eq!(seq.kvs()[0].value(), b"3");
    }

    #[test]
    fn a_moved_fence_refuses_the_commit_and_writes_nothing() {
        let c = EtcdCluster::start(1, &server_flags());
        let e = engine(&c, "/cairn");
        let mut kv = e.client().kv_client();
        let leader = "/cairn/meta/leader";
        let put = block(kv.txn(Txn::new().and_then([TxnOp::put(leader, "me", None)]))).unwrap();
        let rev = put.header().unwrap().revision();
        e.set_fence(Some(Fence {
            key: leader.into(),
            create_revision: rev,
        }));
        e.commit(&[Op::PutAlloc(alloc("kept"))], 1).unwrap();
        // Another replica takes over: the key is deleted (lease expiry) and created again.
        block(kv.delete(leader, None)).unwrap();
        block(kv.put(leader, "other", None)).unwrap();
        let err = e
            .commit(&[Op::PutAlloc(alloc("lost"))], 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fenced: lost leadership"), "{err}");
        let s = e.load().unwrap();
        assert_eq!((s.allocations, s.seq), (vec![alloc("kept")], 1));
        // Deleted alone (lease expired, nobody took over yet) also fences.
        block(kv.delete(leader, None)).unwrap();
        assert!(e.commit(&[], 3).unwrap_err().to_string().contains("fenced"));
    }

    #[test]
    fn one_replica_leads_and_a_revoked_lease_fences_it_until_another_takes_over() {
        let c = EtcdCluster::start(1, &server_flags());
        let (a, b) = (engine(&c, "/cairn"), engine(&c, "/cairn"));
        let Campaign::Won(lead) = a.try_lead("a", 5).unwrap() else {
            panic!("a did not win an empty election")
        };
        assert!(matches!(b.try_lead("b", 5).unwrap(), Campaign::Held { by } if by == "a"));
        a.commit(&[Op::PutAlloc(alloc("by-a"))], 1).unwrap();
        assert!(!lead.is_lost());
        // a's lease ends (as on expiry after a pause): its key goes, its commits are fenced.
        block(a.client().lease_client().revoke(lead.lease)).unwrap();
        let err = a
            .commit(&[Op::PutAlloc(alloc("late"))], 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fenced"), "{err}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lead.is_lost() {
            assert!(Instant::now() < deadline, "a never noticed its lease ended");
            std::thread::sleep(Duration::from_millis(20));
        }
        let Campaign::Won(_b_lead) = b.try_lead("b", 5).unwrap() else {
            panic!("b did not take over a free key")
        };
        b.commit(&[Op::PutAlloc(alloc("by-b"))], 2).unwrap();
        let s = a.load().unwrap();
        let mut names: Vec<_> = s.allocations.iter().map(|x| x.owner.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!((names, s.seq), (vec!["by-a", "by-b"], 2));
        assert!(a.commit(&[], 3).unwrap_err().to_string().contains("fenced"));
    }

    #[test]
    fn the_leader_keeps_its_lease_past_its_ttl() {
        let c = EtcdCluster::start(1, &server_flags());
        let a = engine(&c, "/cairn");
        let Campaign::Won(lead) = a.try_lead("a", 2).unwrap() else {
            panic!("a did not win an empty election")
        };
        // Three TTLs of commits: without keep-alives the key would be gone and these fenced.
        let until = Instant::now() + Duration::from_secs(6);
        let mut seq = 0;
        while Instant::now() < until {
            seq += 1;
            a.commit(&[], seq).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(!lead.is_lost());
    }

    #[test]
    fn a_second_writer_on_the_same_prefix_is_refused_and_writes_nothing() {
        let c = EtcdCluster::start(1, &server_flags());
        let (a, b) = (engine(&c, "/cairn"), engine(&c, "/cairn"));
        assert_eq!(b.load().unwrap().seq, 0);
        a.commit(&[Op::PutAlloc(alloc("by-a"))], 1).unwrap();
        // b loaded before a wrote: its view is stale, so its commit must not land.
        let err = b
            .commit(&[Op::PutAlloc(alloc("by-b"))], 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("another writer on the same prefix"), "{err}");
        let s = a.load().unwrap();
        assert_eq!((s.allocations, s.seq), (vec![alloc("by-a")], 1));
        // a goes on; b, reloaded, sees a's state and may write after it.
        a.commit(&[], 2).unwrap();
        assert_eq!(b.load().unwrap().seq, 2);
        b.commit(&[Op::PutAlloc(alloc("by-b"))], 3).unwrap();
        assert!(a.commit(&[], 4).is_err(), "a's view is now stale");
    }

    #[test]
    fn a_server_with_the_default_txn_limit_is_refused_at_start_up() {
        let c = EtcdCluster::start(1, &[]);
        let err = EtcdEngine::connect(&EtcdOptions::new(c.endpoints()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&format!("--max-txn-ops={MAX_TXN_OPS}")), "{err}");
    }

    #[test]
    fn a_batch_over_the_limit_fails_before_writing() {
        let c = EtcdCluster::start(1, &server_flags());
        let e = engine(&c, "/cairn");
        let ops: Vec<Op> = (0..MAX_TXN_OPS)
            .map(|i| Op::PutAlloc(alloc(&format!("s{i}"))))
            .collect();
        let err = e.commit(&ops, 1).unwrap_err().to_string();
        assert!(
            err.contains("exceeds") && err.contains(&MAX_TXN_OPS.to_string()),
            "{err}"
        );
        assert_eq!(e.load().unwrap(), Snapshot::default());
    }

    #[test]
    fn bad_options_name_the_field() {
        let mut o = EtcdOptions::new(vec![]);
        assert!(
            EtcdEngine::connect(&o)
                .err()
                .unwrap()
                .to_string()
                .starts_with("etcd-endpoints:")
        );
        o.endpoints = vec!["http://127.0.0.1:1".into(), "127.0.0.1:2".into()];
        assert!(
            EtcdEngine::connect(&o)
                .err()
                .unwrap()
                .to_string()
                .starts_with("etcd-endpoints[1]:")
        );
        o.endpoints.pop();
        o.prefix = "/cairn/".into();
        assert!(
            EtcdEngine::connect(&o)
                .err()
                .unwrap()
                .to_string()
                .starts_with("etcd-prefix:")
        );
    }

    #[test]
    fn unknown_and_corrupt_keys_are_errors_naming_the_key() {
        let c = EtcdCluster::start(1, &server_flags());
        let e = engine(&c, "/cairn");
        let mut kv = e.client().kv_client();
        block(kv.put("/cairn/meta/leader", "x", None)).unwrap();
        assert_eq!(
            e.load().unwrap(),
            Snapshot::default(),
            "meta/ keys are the engine's"
        );
        block(kv.put("/cairn/allocations/n/bad", "{", None)).unwrap();
        let err = e.load().unwrap_err().to_string();
        assert!(err.contains("/cairn/allocations/n/bad"), "{err}");
        block(kv.delete("/cairn/allocations/n/bad", None)).unwrap();
        block(kv.put("/cairn/stray", "x", None)).unwrap();
        let err = e.load().unwrap_err().to_string();
        assert!(err.contains("/cairn/stray"), "{err}");
    }

    #[test]
    fn load_reads_every_page() {
        let c = EtcdCluster::start(1, &server_flags());
        let e = engine(&c, "/cairn");
        let n = (PAGE as usize) * 2 + 17;
        let all: Vec<Op> = (0..n).map(|i| Op::PutAlloc(alloc(&format!("s{i:06}")))).collect();
        for (i, chunk) in all.chunks(MAX_TXN_OPS - 2).enumerate() {
            e.commit(chunk, i as u64 + 1).unwrap();
        }
        assert_eq!(e.load().unwrap().allocations.len(), n);
    }

    /// The server opens the ledger inside its async main: connect, load and drop there too.
    #[tokio::test]
    async fn works_inside_a_tokio_runtime() {
        let c = EtcdCluster::start(1, &server_flags());
        let e: Arc<dyn Engine> = Arc::new(engine(&c, "/cairn"));
        e.commit(&[Op::PutAlloc(alloc("a"))], 1).unwrap();
        let ledger = crate::ledger::Ledger::open(e, 0, Arc::new(crate::ledger::NoObserver)).unwrap();
        assert_eq!(ledger.allocation_count(), 1);
        drop(ledger);
    }

    #[test]
    fn three_members_commit_with_the_raft_leader_down_and_it_serves_everything_after_restart() {
        let mut c = EtcdCluster::start(3, &server_flags());
        let e = engine(&c, "/cairn");
        e.commit(&[Op::PutAlloc(alloc("before"))], 1).unwrap();
        // Kill the raft leader: the next commit rides out an election (retried until it lands).
        let eps = c.endpoints();
        let leader = (0..3)
            .find(|&i| {
                let ep = eps[i].clone();
                let st = block(async move {
                    Client::connect([ep], None)
                        .await?
                        .maintenance_client()
                        .status()
                        .await
                })
                .unwrap();
                st.header().map(|h| h.member_id()) == Some(st.leader())
            })
            .expect("no member is the raft leader");
        c.kill(leader);
        e.commit(&[Op::PutAlloc(alloc("during"))], 2).unwrap();
        c.restart(leader);
        drop(e);
        // Only the restarted member: a linearizable read there sees both commits.
        let only = EtcdEngine::connect(&EtcdOptions::new(vec![eps[leader].clone()])).unwrap();
        let s = only.load().unwrap();
        let mut names: Vec<String> = s.allocations.iter().map(|a| a.owner.name.clone()).collect();
        names.sort();
        assert_eq!(
            (names, s.seq),
            (vec!["before".to_string(), "during".to_string()], 2)
        );
    }
}
