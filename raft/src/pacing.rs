//! When a group builds a snapshot: once the log since its last one is worth a copy of its state.

use std::sync::atomic::{AtomicU64, Ordering};

/// When a group builds a snapshot (and then compacts its log).
///
/// A snapshot copies the group's whole state to a file. After a fixed number of entries, a
/// group of a million customers copies its gigabytes every half minute or so under load, and the
/// copying costs more per event the larger the group grows. Asking for as many bytes of log as
/// the last snapshot held keeps the copying in proportion to the log whatever the group's size
/// (about a byte per byte of log; more while the state grows faster than its log, as when
/// customers are created); the log stays about as large as the state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotPolicy {
    /// At least this many entries applied since the last snapshot.
    pub min_entries: u64,
    /// And at least this many bytes of log appended since then per byte of the last snapshot
    /// (0: entries alone decide).
    pub log_per_state_byte: f64,
}

impl SnapshotPolicy {
    /// Whether a group with `entries` applied and `log_bytes` appended since its last snapshot,
    /// which held `state_bytes`, should build a new one.
    pub fn due(&self, entries: u64, log_bytes: u64, state_bytes: u64) -> bool {
        let heavy = log_bytes as f64 >= self.log_per_state_byte * state_bytes as f64;
        entries >= self.min_entries && heavy
    }
}

/// What one group's snapshot policy is decided on, counted where it happens: bytes appended to
/// the log (by the log store) and the last snapshot's size (by the state machine, when it builds
/// or installs one). In memory only: after a restart the log count starts again from zero, which
/// delays the next snapshot by at most one period.
#[derive(Debug, Default)]
pub struct SnapshotPacer {
    log_bytes: AtomicU64,
    state_bytes: AtomicU64,
    /// Snapshots this replica built since it opened, and the bytes they wrote.
    built: AtomicU64,
    built_bytes: AtomicU64,
}

impl SnapshotPacer {
    /// A pacer whose last snapshot held `state_bytes`.
    pub fn new(state_bytes: u64) -> Self {
        SnapshotPacer {
            state_bytes: AtomicU64::new(state_bytes),
            ..SnapshotPacer::default()
        }
    }

    /// Bytes appended to the log since the last snapshot began.
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes.load(Ordering::Relaxed)
    }

    /// Size of the last snapshot, bytes.
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes.load(Ordering::Relaxed)
    }

    /// Snapshots built since the replica opened (not counting those installed from a leader).
    pub fn builds(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    /// Bytes those snapshots wrote.
    pub fn bytes_built(&self) -> u64 {
        self.built_bytes.load(Ordering::Relaxed)
    }

    /// Whether the group should build a snapshot now, `entries` applied since its last.
    pub fn due(&self, policy: &SnapshotPolicy, entries: u64) -> bool {
        policy.due(entries, self.log_bytes(), self.state_bytes())
    }

    pub(crate) fn appended(&self, bytes: u64) {
        self.log_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A snapshot of `state_bytes` was built; `log_bytes_at_start` were counted when it began
    /// (what was appended while it was being written counts towards the next one).
    pub(crate) fn built(&self, log_bytes_at_start: u64, state_bytes: u64) {
        let _ = self
            .log_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(log_bytes_at_start))
            });
        self.state_bytes.store(state_bytes, Ordering::Relaxed);
        self.built.fetch_add(1, Ordering::Relaxed);
        self.built_bytes.fetch_add(state_bytes, Ordering::Relaxed);
    }

    /// A snapshot of `state_bytes` was installed from the leader (the log before it is gone).
    pub(crate) fn installed(&self, state_bytes: u64) {
        self.log_bytes.store(0, Ordering::Relaxed);
        self.state_bytes.store(state_bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: SnapshotPolicy = SnapshotPolicy {
        min_entries: 100,
        log_per_state_byte: 1.0,
    };

    #[test]
    fn a_snapshot_waits_for_both_enough_entries_and_as_much_log_as_state() {
        assert!(!POLICY.due(99, 10_000, 0), "too few entries");
        assert!(
            POLICY.due(100, 0, 0),
            "a first snapshot needs only the entries"
        );
        assert!(!POLICY.due(100_000, 999, 1000), "less log than state");
        assert!(POLICY.due(100, 1000, 1000));
        let entries_only = SnapshotPolicy {
            log_per_state_byte: 0.0,
            ..POLICY
        };
        assert!(entries_only.due(100, 0, u64::MAX));
    }

    #[test]
    fn the_pacer_counts_log_since_the_snapshot_began() {
        let p = SnapshotPacer::new(500);
        p.appended(300);
        assert!(!p.due(&POLICY, 1000));
        p.appended(300);
        assert!(p.due(&POLICY, 1000));
        let at_start = p.log_bytes();
        p.appended(50); // written while the snapshot is built
        p.built(at_start, 2000);
        assert_eq!((p.log_bytes(), p.state_bytes()), (50, 2000));
        assert_eq!((p.builds(), p.bytes_built()), (1, 2000));
        assert!(!p.due(&POLICY, 1000));
        p.installed(10);
        assert_eq!((p.log_bytes(), p.state_bytes()), (0, 10));
    }
}
