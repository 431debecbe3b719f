//! Polling with a deadline — the only way tests and the harness wait for anything.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_millis(500);

/// Calls `check` until it returns `Ok`, backing off from 50 ms to 500 ms between attempts, and
/// gives up with [`Error::Timeout`] (carrying the last error) once `timeout` has passed. A
/// single attempt is also cut off at the deadline.
pub async fn eventually<T, E, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, E>>,
    E: Display,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut delay = FIRST_DELAY;
    let mut last = String::from("(no attempt finished)");
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("attempt still running at the deadline; before: {last}"),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                waited: now - start,
                last,
            });
        }
        tokio::time::sleep_until((now + delay).min(deadline)).await;
        delay = (delay * 3 / 2).min(MAX_DELAY);
    }
}
