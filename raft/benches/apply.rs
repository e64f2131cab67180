//! The state machine's apply, per event: one log entry of 32 events (each making one command)
//! and one of their 32 delivery results, on a real RocksDB, as every replica applies them.
//! `cargo bench --bench apply` (criterion); the memtable fills as a node's does under load.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use common::{customer, entries, link, one_command, rule};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use custos_raft::records::*;
use custos_raft::state_machine::NoObserver;
use custos_raft::{StateChange, StateMachineStore};
use openraft::storage::RaftStateMachine;

/// Events per log entry: about what the proposer batches at 64 in flight.
const EVENTS: usize = 32;
/// Customers the events rotate over.
const CUSTOMERS: usize = 1000;

fn ingest(n: usize, at_ms: i64) -> StateChange {
    let event_id = format!("evt-{n}");
    let json = format!(
        r#"{{"specversion":"1.0","id":"{event_id}","source":"airline","type":"flight.delayed","data":{{"flight":"XY123","delay_minutes":95}}}}"#
    );
    one_command(
        &event_id,
        &format!("c{}", n % CUSTOMERS),
        &format!("ff-{}", n % CUSTOMERS),
        &format!("g-{}", n % CUSTOMERS),
        json,
        r#"{"hold_until":"late","flight":"XY123"}"#,
        at_ms,
    )
}

fn delivered(n: usize, at_ms: i64) -> DeliveryUpdate {
    DeliveryUpdate::Attempted {
        command_id: format!("cmd-{n}"),
        attempt: AttemptRecord {
            at_ms,
            status_code: Some(200),
            error: None,
            duration_ms: 3,
        },
        next: AttemptNext::Delivered,
    }
}

struct Replica {
    _dir: tempfile::TempDir,
    sm: StateMachineStore,
    index: u64,
}

impl Replica {
    fn new(rt: &tokio::runtime::Runtime) -> Replica {
        let dir = tempfile::tempdir().expect("temporary directory");
        let db =
            custos_raft::open_db(dir.path(), custos_raft::DbOptions::default()).expect("RocksDB");
        let sm = StateMachineStore::new(db, 1, Arc::new(NoObserver), dir.path().join("snap"))
            .expect("state machine");
        let mut r = Replica {
            _dir: dir,
            sm,
            index: 0,
        };
        let mut setup = Vec::new();
        for c in 0..CUSTOMERS {
            let id = format!("c{c}");
            setup.push(StateChange::CreateCustomer {
                customer: customer(&id, None),
                intent: None,
            });
            setup.push(link(&id, "airline", &format!("ff-{c}")));
            setup.push(link(&id, "hotel", &format!("g-{c}")));
            setup.push(rule(&id, "r1"));
        }
        r.apply(rt, setup);
        r
    }

    fn apply(&mut self, rt: &tokio::runtime::Runtime, changes: Vec<StateChange>) {
        let entries = entries(&mut self.index, changes);
        rt.block_on(self.sm.apply(entries)).expect("applied");
    }
}

fn apply(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut replica = Replica::new(&rt);
    let mut next = 0usize;
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(EVENTS as u64));
    // One entry of 32 events, then one of their 32 delivery results: what one event costs a
    // replica, its delivery's record included.
    group.bench_function("32 events and their deliveries", |b| {
        b.iter(|| {
            let first = next;
            next += EVENTS;
            let at = 1_700_000_000_000 + first as i64;
            let events = (first..next).map(|n| ingest(n, at)).collect();
            replica.apply(&rt, vec![StateChange::Batch(events)]);
            let results = (first..next).map(|n| delivered(n, at + 5)).collect();
            replica.apply(&rt, vec![StateChange::RecordDeliveries(results)]);
        })
    });
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
