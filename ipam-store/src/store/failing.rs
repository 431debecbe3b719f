//! An engine that fails on command, wrapped around a real one: the ledger's disk-failure path
//! ("a failed commit stops the ledger; nothing is acknowledged that is not durable") is tested
//! with it, for each way a commit can fail.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use super::{Engine, Op, Snapshot};
use crate::error::{Error, Result};

/// How the next failing commit fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Nothing of the batch is applied (e.g. `ENOSPC` before the write).
    Before,
    /// The first half of the batch's ops is applied, then the error (a torn write that the
    /// engine did not roll back).
    Partial,
    /// The whole batch is applied, then the error (e.g. fsync failed after the write).
    After,
}

/// Wraps `inner`; commits succeed until [`FailingEngine::fail_after`] commits have passed.
pub struct FailingEngine<E> {
    inner: E,
    /// Commits left before failing; `u64::MAX` = never.
    left: AtomicU64,
    mode: Mutex<Failure>,
    commits: AtomicU64,
}

impl<E: Engine> FailingEngine<E> {
    /// Never fails until told to.
    pub fn new(inner: E) -> Arc<Self> {
        Arc::new(FailingEngine {
            inner,
            left: AtomicU64::new(u64::MAX),
            mode: Mutex::new(Failure::Before),
            commits: AtomicU64::new(0),
        })
    }

    /// Lets `n` more commits succeed, then fails every later one the way `how` says.
    pub fn fail_after(&self, n: u64, how: Failure) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = how;
        self.left.store(n, Ordering::SeqCst);
    }

    /// Successful commits so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    /// The wrapped engine (to "restart" on what it holds).
    pub fn inner(&self) -> &E {
        &self.inner
    }
}

impl<E: Engine> Engine for FailingEngine<E> {
    fn load(&self) -> Result<Snapshot> {
        self.inner.load()
    }

    fn commit(&self, ops: &[Op], seq: u64) -> Result<()> {
        let pass = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u64::MAX => Some(u64::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        if pass {
            self.inner.commit(ops, seq)?;
            self.commits.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        let how = *self.mode.lock().unwrap_or_else(|p| p.into_inner());
        match how {
            Failure::Before => {}
            Failure::Partial => self.inner.commit(&ops[..ops.len() / 2], seq)?,
            Failure::After => self.inner.commit(ops, seq)?,
        }
        Err(Error::Storage(format!("injected commit failure ({how:?})")))
    }

    fn name(&self) -> &'static str {
        "failing"
    }
}
