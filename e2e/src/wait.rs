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
    poll(what, timeout, timeout, || {
        let attempt = check();
        async move {
            match attempt.await {
                Ok(value) => Attempt::Done(value),
                Err(e) => Attempt::Retry(e.to_string()),
            }
        }
    })
    .await
}

/// One attempt's verdict for [`poll`].
pub(crate) enum Attempt<T> {
    Done(T),
    Retry(String),
    Fail(Error),
}

/// The loop behind [`eventually`] and the start-up waits: back off from 50 ms to 500 ms between
/// attempts, cut each attempt off after `attempt_cap` and at the deadline, stop at the first
/// `Done` or `Fail`, and return [`Error::Timeout`] with the last `Retry` reason at the deadline.
pub(crate) async fn poll<T, F, Fut>(
    what: &str,
    timeout: Duration,
    attempt_cap: Duration,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut delay = FIRST_DELAY;
    let mut last = String::from("(no attempt finished)");
    loop {
        let cutoff = (Instant::now() + attempt_cap).min(deadline);
        match tokio::time::timeout_at(cutoff, attempt()).await {
            Ok(Attempt::Done(value)) => return Ok(value),
            Ok(Attempt::Retry(why)) => last = why,
            Ok(Attempt::Fail(e)) => return Err(e),
            Err(_) => last = format!("attempt still running when cut off; before: {last}"),
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
