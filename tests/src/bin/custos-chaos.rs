//! `custos-chaos`: runs the chaos scenario (see `custos_tests::chaos`) and prints its summary
//! line; exits non-zero when a check fails. Needs root (network namespaces, iptables).

use std::time::Duration;

use clap::Parser;
use custos_tests::chaos::{self, ChaosOptions};

/// Chaos run against a cluster of real `custos` processes.
#[derive(Debug, Parser)]
#[command(name = "custos-chaos")]
struct Args {
    /// Nodes (3 to 7).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Seconds of workload (the faults are spread over them).
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Customers receiving events.
    #[arg(long, default_value_t = 24)]
    customers: usize,
    /// Concurrent event senders.
    #[arg(long, default_value_t = 4)]
    senders: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(chaos::run(ChaosOptions {
        nodes: a.nodes,
        duration: Duration::from_secs(a.duration),
        customers: a.customers,
        senders: a.senders,
    }))?;
    println!("{}", report.line());
    anyhow::ensure!(report.ok(), "a chaos check failed");
    Ok(())
}
