//! A process-wide cap on how many control planes run at once (`CAIRN_E2E_MAX_PLANES`).
//!
//! `cargo test` runs the tests of one binary on parallel threads; on a small machine a
//! dozen apiservers starting together would starve each other past their deadlines. Every
//! control plane holds one permit for its lifetime.

use std::sync::{Arc, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

static PERMITS: OnceLock<(Arc<Semaphore>, usize)> = OnceLock::new();

/// How many control planes this process runs at once: `$CAIRN_E2E_MAX_PLANES`, else the number
/// of CPUs, but at least 2 (so that a test can run two planes side by side).
pub fn max_planes() -> usize {
    permits().1
}

fn permits() -> &'static (Arc<Semaphore>, usize) {
    PERMITS.get_or_init(|| {
        let n = std::env::var("CAIRN_E2E_MAX_PLANES")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
                    .max(2)
            });
        (Arc::new(Semaphore::new(n)), n)
    })
}

/// Waits for `n` permits (all at once, so two callers can never deadlock holding half each).
pub(crate) async fn acquire(n: usize) -> Result<OwnedSemaphorePermit> {
    let (sem, max) = permits();
    if n > *max {
        return Err(Error::Invalid(format!(
            "{n} control planes requested at once but CAIRN_E2E_MAX_PLANES allows {max}; raise it"
        )));
    }
    let n32 = u32::try_from(n).map_err(|_| Error::Invalid(format!("{n} planes is too many")))?;
    Arc::clone(sem)
        .acquire_many_owned(n32)
        .await
        .map_err(|_| Error::Invalid("control-plane semaphore closed".into()))
}
