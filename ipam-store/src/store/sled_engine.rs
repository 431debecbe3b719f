//! The embedded engine: sled 0.34 (the stable line), one tree, key prefixes per record kind,
//! values = a format byte + postcard. A batch is one `apply_batch` (atomic in sled's log)
//! followed by one `flush` (fsync), so the group committer pays one fsync per batch.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};

use super::{Engine, Op, Snapshot};
use crate::{
    error::{Error, Result},
    model::Allocation,
};

const NET: &[u8] = b"n/";
const ALLOC: &[u8] = b"a/";
const QUAR: &[u8] = b"q/";
const SEQ_KEY: &[u8] = b"m/seq";
/// The record format; bump it (and read the old one) when a stored type changes shape.
const FORMAT: u8 = 1;

/// sled behind the [`Engine`] trait.
pub struct SledEngine {
    db: sled::Db,
    /// sled's log file, opened again by us: sled 0.34's `flush` ends in `sync_file_range`,
    /// which neither flushes the device's write cache nor the file's metadata, so an ack
    /// after `flush` alone survives `kill -9` but not power loss. `sync_data` on this
    /// handle after each flush closes that gap (one call per batch, shared by its requests).
    log: std::fs::File,
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT];
    out.extend(postcard::to_stdvec(v).map_err(storage)?);
    Ok(out)
}

fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T> {
    match v.split_first() {
        Some((&FORMAT, rest)) => postcard::from_bytes(rest)
            .map_err(|e| Error::Storage(format!("record {:?}: {e}", String::from_utf8_lossy(key)))),
        _ => Err(Error::Storage(format!(
            "record {:?}: unknown format",
            String::from_utf8_lossy(key)
        ))),
    }
}

fn key(prefix: &[u8], rest: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(rest.as_bytes());
    k
}

impl SledEngine {
    /// Opens (or creates) the database in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| Error::Storage(format!("opening {}: {e}", dir.display())))?;
        let path = dir.join("db");
        let log = std::fs::File::open(&path)
            .map_err(|e| Error::Storage(format!("opening {}: {e}", path.display())))?;
        // The directory entries sled just created must be durable too.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::Storage(format!("syncing {}: {e}", dir.display())))?;
        Ok(SledEngine { db, log })
    }

    /// The last committed sequence (0 for a new store).
    fn seq(&self) -> Result<u64> {
        match self.db.get(SEQ_KEY).map_err(storage)? {
            Some(v) => decode(SEQ_KEY, &v),
            None => Ok(0),
        }
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>> {
        self.db
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv.map_err(storage)?;
                decode(&k, &v)
            })
            .collect()
    }
}

impl Engine for SledEngine {
    fn load(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            networks: self.scan(NET)?,
            allocations: self.scan(ALLOC)?,
            quarantined: self.scan(QUAR)?,
            seq: self.seq()?,
        })
    }

    fn load_streamed(
        &self,
        head: &mut dyn FnMut(Snapshot) -> Result<()>,
        chunk: &mut dyn FnMut(Vec<Allocation>) -> Result<()>,
    ) -> Result<()> {
        const CHUNK: usize = 4096;
        head(Snapshot {
            networks: self.scan(NET)?,
            allocations: Vec::new(),
            quarantined: self.scan(QUAR)?,
            seq: self.seq()?,
        })?;
        let mut buf = Vec::with_capacity(CHUNK);
        for kv in self.db.scan_prefix(ALLOC) {
            let (k, v) = kv.map_err(storage)?;
            buf.push(decode(&k, &v)?);
            if buf.len() == CHUNK {
                chunk(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK)))?;
            }
        }
        if !buf.is_empty() {
            chunk(buf)?;
        }
        Ok(())
    }

    fn commit(&self, ops: &[Op], seq: u64) -> Result<()> {
        let mut b = sled::Batch::default();
        for op in ops {
            match op {
                Op::PutNetwork(n) => b.insert(key(NET, &n.def.name), encode(&**n)?),
                Op::DelNetwork(name) => b.remove(key(NET, name)),
                Op::PutAlloc(a) => b.insert(key(ALLOC, &a.key()), encode(a)?),
                Op::DelAlloc(k) => b.remove(key(ALLOC, k)),
                Op::PutQuarantine(q) => {
                    b.insert(key(QUAR, &format!("{}/{}", q.network, q.address)), encode(q)?)
                }
                Op::DelQuarantine(net, ip) => b.remove(key(QUAR, &format!("{net}/{ip}"))),
            }
        }
        b.insert(SEQ_KEY, encode(&seq)?);
        self.db.apply_batch(b).map_err(storage)?;
        self.db.flush().map_err(storage)?;
        self.log.sync_data().map_err(storage)?;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "sled"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the engine; an earlier instance in this process may still hold sled's file lock
    /// for a moment after it is dropped (sled's flusher thread lets go of the database last),
    /// so a reopen polls for the lock with a deadline instead of failing on the first try.
    fn reopen(dir: &Path) -> SledEngine {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledEngine::open(dir, 8 << 20) {
                Ok(e) => return e,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("opening {}: {e}", dir.display()),
            }
        }
    }

    crate::engine_suite!(|| {
        let dir = tempfile::tempdir().unwrap();
        move || Box::new(reopen(dir.path())) as Box<dyn Engine>
    });

    #[test]
    fn corrupt_record_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let e = SledEngine::open(dir.path(), 8 << 20).unwrap();
        e.db.insert(b"a/bad", vec![FORMAT, 0xff, 0xff]).unwrap();
        let err = e.load().unwrap_err().to_string();
        assert!(err.contains("a/bad"), "{err}");
    }
}
