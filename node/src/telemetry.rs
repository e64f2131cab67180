//! Logs (`tracing`, human or JSON) and metrics (`metrics` with the Prometheus exporter).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::core::Core;

/// Starts logging once per process; later calls (tests) are ignored.
pub fn init_logging(format: &str, level: &str) {
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let overridden = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: redirected to a file or a collector, escapes are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // RUST_LOG (the usual variable for Rust programs) wins over the configured level: said
    // once, so an operator who set `log_level` knows why it is not in effect.
    if overridden {
        tracing::warn!(log_level = %level, "RUST_LOG is set: it replaces log_level");
    }
}

/// The Prometheus exporter's handle, and the gauges computed at scrape time.
#[derive(Clone)]
pub struct Telemetry {
    handle: Option<PrometheusHandle>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 3600.0,
];

impl Telemetry {
    /// Installs the global recorder (one per process).
    pub fn install() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .map(|b| b.install_recorder());
        let handle = match recorder {
            Ok(Ok(h)) => Some(h),
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                None
            }
        };
        Telemetry { handle }
    }

    /// The exposition text, with per-group Raft and outbox gauges and the batching counters
    /// refreshed first.
    pub async fn render(&self, core: &Core) -> String {
        for g in core.groups() {
            let m = g.metrics();
            let group = g.id.to_string();
            let set = |name: &'static str, v: f64| {
                metrics::gauge!(name, "group" => group.clone()).set(v);
            };
            set("custos_raft_term", m.current_term as f64);
            set(
                "custos_raft_last_log_index",
                m.last_log_index.unwrap_or(0) as f64,
            );
            set(
                "custos_raft_applied_index",
                m.last_applied.map(|l| l.index).unwrap_or(0) as f64,
            );
            set(
                "custos_raft_commit_index",
                g.reader.committed().ok().flatten().unwrap_or(0) as f64,
            );
            set(
                "custos_raft_is_leader",
                if m.current_leader == Some(core.node_id) {
                    1.0
                } else {
                    0.0
                },
            );
            set(
                "custos_raft_leader",
                m.current_leader.map(|l| l as f64).unwrap_or(0.0),
            );
            set("custos_pending_deliveries", g.due.len() as f64);
            set("custos_cached_links", g.links.len() as f64);
            let stats = g.proposer.stats();
            set(
                "custos_proposer_entries",
                stats.entries.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
            set(
                "custos_proposer_changes",
                stats.changes.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
            set("custos_snapshots_built", g.pacer.builds() as f64);
            set(
                "custos_snapshot_bytes_written",
                g.pacer.bytes_built() as f64,
            );
            set("custos_snapshot_bytes", g.pacer.state_bytes() as f64);
            set(
                "custos_log_bytes_since_snapshot",
                g.pacer.log_bytes() as f64,
            );
        }
        let wal = core.wal.stats();
        metrics::gauge!("custos_wal_syncs")
            .set(wal.syncs.load(std::sync::atomic::Ordering::Relaxed) as f64);
        metrics::gauge!("custos_log_appends_flushed")
            .set(wal.appends.load(std::sync::atomic::Ordering::Relaxed) as f64);
        let relay = core.relay.stats();
        metrics::gauge!("custos_relayed_event_batches")
            .set(relay.batches.load(std::sync::atomic::Ordering::Relaxed) as f64);
        metrics::gauge!("custos_relayed_events")
            .set(relay.events.load(std::sync::atomic::Ordering::Relaxed) as f64);
        metrics::gauge!("custos_relay_refused_events")
            .set(relay.refused.load(std::sync::atomic::Ordering::Relaxed) as f64);
        metrics::gauge!("custos_cached_routes").set(core.routes.len() as f64);
        let mem = custos_raft::db_memory(&core.db);
        metrics::gauge!("custos_rocksdb_block_cache_bytes").set(mem.block_cache as f64);
        metrics::gauge!("custos_rocksdb_memtable_bytes").set(mem.memtables as f64);
        metrics::gauge!("custos_rocksdb_table_readers_bytes").set(mem.table_readers as f64);
        metrics::gauge!("custos_state_keys_written")
            .set(custos_raft::state_machine::keys_written() as f64);
        match &self.handle {
            Some(h) => h.render(),
            None => String::new(),
        }
    }
}
