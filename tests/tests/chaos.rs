//! A short chaos run: 3 nodes in network namespaces, every fault at least once (kill -9 of a
//! leader, pause, a leader cut off, a split, a full restart), then every check.

use std::time::Duration;

use custos_tests::chaos::{self, ChaosOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_run_passes_every_check() -> anyhow::Result<()> {
    let report = chaos::run(ChaosOptions {
        nodes: 3,
        duration: Duration::from_secs(60),
        customers: 12,
        senders: 3,
    })
    .await?;
    eprintln!("{}", report.line());
    assert!(report.ok(), "{}", report.line());
    Ok(())
}
