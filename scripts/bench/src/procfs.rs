//! What the nodes' processes used, read from Linux `/proc`: memory, read calls, CPU in all and
//! CPU by kind of thread (so a profile's thread shares can be checked by a plain bench run).

use std::collections::BTreeMap;
use std::process::Command;

/// The number after `field` (e.g. "VmRSS:") in each process's `/proc/<pid>/<file>`, summed.
fn proc_sum(pids: &[u32], file: &str, field: &str) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}

/// Resident memory of the nodes' processes, summed, in bytes (Linux `VmRSS`).
pub fn nodes_rss(pids: &[u32]) -> u64 {
    proc_sum(pids, "status", "VmRSS:") * 1024
}

/// Read system calls the processes have made so far (Linux `/proc/<pid>/io`, `syscr`): during
/// the event phase nearly all are RocksDB reading table blocks missing from its block cache
/// (sockets are read with `recv`, which this does not count; a snapshot sent to a follower is
/// a file read too).
pub fn read_syscalls(pids: &[u32]) -> u64 {
    proc_sum(pids, "io", "syscr:")
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s CPU times.
fn ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(100.0)
    })
}

/// A `stat` line's name (between the parentheses; it may hold spaces) and its user plus
/// system CPU time in seconds (the 14th and 15th fields).
fn parse_stat(stat: &str) -> Option<(&str, f64)> {
    let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime = fields.next()?.parse::<f64>().ok()?;
    let stime = fields.next()?.parse::<f64>().ok()?;
    Some((name, (utime + stime) / ticks()))
}

/// CPU time (user and system) the processes have used so far, in seconds, exited threads
/// included (Linux `/proc/<pid>/stat`).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| Some(parse_stat(&stat)?.1))
        .sum()
}

/// The kind of node thread a thread name (Linux truncates it to 15 bytes) belongs to.
pub fn thread_kind(name: &str) -> &'static str {
    if name.starts_with("rocksdb:") {
        "RocksDB flush and compaction"
    } else if name.starts_with("custos-raft") {
        "Raft runtime (openraft, log store, state machine, proposer, delivery)"
    } else if name.starts_with("custos-wal-sync") {
        "WAL sync"
    } else if name.starts_with("actix") {
        "actix (HTTP gateway, profile actors)"
    } else if name.starts_with("tokio-rt-worker") {
        // tokio's default name: the actix runtimes' blocking pool (the Raft runtime's is
        // named after it).
        "blocking pool (API reads, rule previews, work off the event loop)"
    } else {
        OTHER
    }
}

/// Threads of no kind above (the main thread), and threads that exited (a blocking pool's
/// idle threads exit after a while).
pub const OTHER: &str = "other (main thread, exited threads)";

/// CPU seconds used so far by the processes' live threads, by [`thread_kind`].
pub fn thread_cpu(pids: &[u32]) -> BTreeMap<&'static str, f64> {
    let mut by_kind = BTreeMap::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            if let Some((name, secs)) = parse_stat(&stat) {
                *by_kind.entry(thread_kind(name)).or_default() += secs;
            }
        }
    }
    by_kind
}

/// What each kind of thread used between two readings, out of `total` (the processes' CPU
/// between the same readings, which keeps what threads that exited meanwhile used: that
/// goes to [`OTHER`]), largest first.
pub fn thread_cpu_between(
    before: &BTreeMap<&'static str, f64>,
    after: &BTreeMap<&'static str, f64>,
    total: f64,
) -> Vec<(&'static str, f64)> {
    let mut used: Vec<(&'static str, f64)> = after
        .iter()
        .filter(|(kind, _)| **kind != OTHER)
        .map(|(kind, secs)| (*kind, (secs - before.get(kind).unwrap_or(&0.0)).max(0.0)))
        .collect();
    let named: f64 = used.iter().map(|(_, s)| s).sum();
    used.push((OTHER, (total - named).max(0.0)));
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_name_and_cpu() {
        let stat = "4242 (actix-rt|system) S 1 2 3 0 -1 4194368 10 0 0 0 250 50 0 0 20 0 1 0";
        let (name, secs) = parse_stat(stat).expect("parsed");
        assert_eq!(name, "actix-rt|system");
        assert!((secs - 300.0 / ticks()).abs() < 1e-9);
        assert_eq!(parse_stat("no parentheses"), None);
    }

    #[test]
    fn threads_are_told_apart_by_name() {
        assert_eq!(thread_kind("rocksdb:low"), "RocksDB flush and compaction");
        assert_eq!(thread_kind("custos-wal-sync"), "WAL sync");
        assert!(thread_kind("custos-raft").starts_with("Raft"));
        assert!(thread_kind("actix-server wo").starts_with("actix"));
        assert!(thread_kind("tokio-rt-worker").starts_with("blocking pool"));
        assert_eq!(thread_kind("custos"), OTHER);
    }

    #[test]
    fn exited_threads_count_as_other_and_nothing_goes_negative() {
        let before = BTreeMap::from([("WAL sync", 1.0), (OTHER, 5.0)]);
        let after = BTreeMap::from([("WAL sync", 3.0), ("RocksDB flush and compaction", 4.0)]);
        let used = thread_cpu_between(&before, &after, 10.0);
        assert_eq!(
            used,
            vec![
                ("RocksDB flush and compaction", 4.0),
                (OTHER, 4.0),
                ("WAL sync", 2.0)
            ]
        );
        let used = thread_cpu_between(&after, &before, 1.0);
        assert!(used.iter().all(|(_, s)| *s >= 0.0));
    }
}
