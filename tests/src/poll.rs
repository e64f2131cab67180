//! Polling with a deadline instead of sleeping.

use std::future::Future;
use std::time::{Duration, Instant};

/// Calls `f` every 20 ms until it returns `Some`, or fails after `timeout` naming `what`.
/// A call still running at the deadline is given up too (an HTTP request without a timeout
/// of its own would otherwise hang the test rather than fail it).
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // At least a second for the last call, so one started just before the deadline runs.
        let call = tokio::time::timeout(left.max(Duration::from_secs(1)), f());
        if let Ok(Some(v)) = call.await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
