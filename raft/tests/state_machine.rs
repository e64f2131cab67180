//! The state machine's own rules: dedup, outbox transitions, retention pruning, the meta
//! group's claims, intents, the authoritative link re-check, erasure, and a snapshot streamed
//! from one store (and group) into another.

mod common;

use std::sync::Arc;

use common::{customer, entries, link, one_command, rule};

use custos_api::ErrorCode;
use custos_raft::records::*;
use custos_raft::state_machine::{ApplyObserver, Effect, NoObserver};
use custos_raft::{codec, keys};
use custos_raft::{ChangeOutcome, StateChange, StateMachineStore, StateReader};
use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;

struct Store {
    dir: tempfile::TempDir,
    db: Arc<custos_raft::DB>,
    sm: StateMachineStore,
    reader: StateReader,
    index: u64,
}

fn store(group: u32) -> anyhow::Result<Store> {
    store_observed(group, Arc::new(NoObserver))
}

fn store_observed(group: u32, observer: Arc<dyn ApplyObserver>) -> anyhow::Result<Store> {
    let dir = tempfile::tempdir()?;
    let db = custos_raft::open_db(dir.path(), custos_raft::DbOptions::default())?;
    let sm = StateMachineStore::new(db.clone(), group, observer, dir.path().join("snapshots"))?;
    Ok(Store {
        reader: sm.reader(),
        db,
        sm,
        dir,
        index: 0,
    })
}

impl Store {
    async fn apply(&mut self, changes: Vec<StateChange>) -> anyhow::Result<Vec<ChangeOutcome>> {
        Ok(self.sm.apply(entries(&mut self.index, changes)).await?)
    }

    /// The stored values of every key with state machine tag `tag` (any group or space).
    fn tagged(&self, tag: u8) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut found = Vec::new();
        for kv in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (k, v) = kv?;
            if k.get(4) == Some(&tag) {
                found.push(v.to_vec());
            }
        }
        Ok(found)
    }
}

fn entity(id: &str) -> EntityRecord {
    EntityRecord {
        id: id.into(),
        name: id.into(),
        command_url: "https://x.example/c".into(),
        endpoint_enabled: true,
        event_types: vec![],
        command_types: vec![],
        sealed_secret: vec![1; 48],
        sealed_previous_secret: None,
        previous_valid_until_ms: 0,
        created_ms: 0,
        oauth: None,
    }
}

/// A data group with customer c1 linked to the airline (as "ff") and the hotel (as "g"),
/// with rule r1 (a delayed flight holds a room).
fn setup() -> Vec<StateChange> {
    vec![
        StateChange::CreateCustomer {
            customer: customer("c1", None),
            intent: None,
        },
        link("c1", "airline", "ff"),
        link("c1", "hotel", "g"),
        rule("c1", "r1"),
    ]
}

fn ingest(event_id: &str, at_ms: i64) -> StateChange {
    ingest_as(event_id, "ff", at_ms)
}

fn ingest_as(event_id: &str, subject: &str, at_ms: i64) -> StateChange {
    one_command(event_id, "c1", subject, "g", "{}".into(), "{}", at_ms)
}

fn delivered(cmd: &str, at_ms: i64) -> StateChange {
    StateChange::RecordDeliveries(vec![DeliveryUpdate::Attempted {
        command_id: cmd.into(),
        attempt: AttemptRecord {
            at_ms,
            status_code: Some(200),
            error: None,
            duration_ms: 1,
        },
        next: AttemptNext::Delivered,
    }])
}

/// A prune of everything aged before `before_ms` (up to 1,000 retention entries).
fn prune_before(before_ms: i64) -> StateChange {
    StateChange::Prune {
        now_ms: 0,
        before_ms,
        limit: 1000,
    }
}

/// Applies `change` and the erasure of c1 in one log entry; the erasure must succeed.
async fn erase_c1_after(s: &mut Store, change: StateChange) -> anyhow::Result<()> {
    let out = s
        .apply(vec![StateChange::Batch(vec![
            change,
            StateChange::EraseCustomer {
                customer_id: "c1".into(),
            },
        ])])
        .await?;
    anyhow::ensure!(
        matches!(&out[0], ChangeOutcome::Batch(o) if o[1] == ChangeOutcome::Done),
        "{out:?}"
    );
    Ok(())
}

/// The reason of an event ignored (no command made); an error if it was not.
fn ignored_reason(o: &ChangeOutcome) -> anyhow::Result<Option<&str>> {
    match o {
        ChangeOutcome::Ingested {
            fate: EventFate::Ignored,
            commands,
            reason,
            ..
        } if commands.is_empty() => Ok(reason.as_deref()),
        other => anyhow::bail!("not ignored: {other:?}"),
    }
}

fn rejected(o: &ChangeOutcome, want: ErrorCode) -> bool {
    matches!(o, ChangeOutcome::Rejected { code, .. } if *code == want)
}

#[tokio::test]
async fn duplicates_in_one_batch_are_caught_and_a_batch_answers_each_change() -> anyhow::Result<()>
{
    let mut s = store(1)?;
    s.apply(setup()).await?;
    // The same event twice in one apply call: the overlay must see the first.
    let out = s.apply(vec![ingest("e1", 100), ingest("e1", 100)]).await?;
    assert!(matches!(
        &out[0],
        ChangeOutcome::Ingested {
            duplicate: false,
            ..
        }
    ));
    assert!(
        matches!(&out[1], ChangeOutcome::Ingested { duplicate: true, commands, .. } if commands == &vec!["cmd-e1".to_owned()])
    );
    assert_eq!(s.reader.due(i64::MAX, 10)?.len(), 1);
    // A proposer's batch is one entry with one outcome per change, in order.
    let out = s
        .apply(vec![StateChange::Batch(vec![
            ingest("e2", 200),
            ingest("e2", 200),
            StateChange::DeleteRule {
                customer_id: "c1".into(),
                rule_id: "none".into(),
                at_ms: 200,
            },
        ])])
        .await?;
    let ChangeOutcome::Batch(outs) = &out[0] else {
        anyhow::bail!("not a batch outcome: {out:?}");
    };
    assert_eq!(outs.len(), 3);
    assert!(matches!(
        &outs[0],
        ChangeOutcome::Ingested {
            duplicate: false,
            ..
        }
    ));
    assert!(matches!(
        &outs[1],
        ChangeOutcome::Ingested {
            duplicate: true,
            ..
        }
    ));
    assert!(rejected(&outs[2], ErrorCode::NotFound));
    // Meta-group changes are refused in a data group.
    let out = s
        .apply(vec![StateChange::RegisterEntity(entity("x"))])
        .await?;
    assert!(rejected(&out[0], ErrorCode::Internal), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn a_410_from_an_endpoint_the_entity_moved_away_from_disables_nothing() -> anyhow::Result<()>
{
    let mut m = store(0)?;
    m.apply(vec![StateChange::RegisterEntity(entity("hotel"))])
        .await?;
    // The operator moves the endpoint while an attempt to the old one is under way.
    m.apply(vec![StateChange::UpdateEntity {
        id: "hotel".into(),
        name: None,
        command_url: Some("https://new.example/c".into()),
        endpoint_enabled: None,
        sealed_client_secret: None,
    }])
    .await?;
    let gone = |url: &str| StateChange::DisableGoneEndpoint {
        id: "hotel".into(),
        command_url: url.into(),
    };
    let out = m.apply(vec![gone("https://x.example/c")]).await?;
    assert!(rejected(&out[0], ErrorCode::Conflict), "{out:?}");
    let hotel = m.reader.entity("hotel")?.expect("registered");
    assert!(hotel.endpoint_enabled, "the new endpoint stays enabled");
    // The endpoint it has answering 410 disables it.
    m.apply(vec![gone("https://new.example/c")]).await?;
    let hotel = m.reader.entity("hotel")?.expect("registered");
    assert!(!hotel.endpoint_enabled);
    Ok(())
}

#[tokio::test]
async fn a_creation_proposed_again_is_done_and_another_with_its_id_conflicts() -> anyhow::Result<()>
{
    // The node retries a proposal whose answer it lost; the first may have committed.
    let mut m = store(0)?;
    let register = |e: EntityRecord| StateChange::RegisterEntity(e);
    let out = m
        .apply(vec![
            register(entity("airline")),
            register(entity("airline")),
        ])
        .await?;
    assert_eq!(out, vec![ChangeOutcome::Done, ChangeOutcome::Done]);
    let mut other = entity("airline");
    other.name = "Another".into();
    let out = m.apply(vec![register(other)]).await?;
    assert!(rejected(&out[0], ErrorCode::Conflict), "{out:?}");
    // A rotation applied twice keeps the secret before it valid for its grace period.
    let rotate = StateChange::RotateSecret {
        id: "airline".into(),
        sealed_secret: vec![2; 48],
        previous_valid_until_ms: 5_000,
    };
    let out = m.apply(vec![rotate.clone(), rotate]).await?;
    assert_eq!(out, vec![ChangeOutcome::Done, ChangeOutcome::Done]);
    let airline = m.reader.entity("airline")?.expect("registered");
    assert_eq!(airline.sealed_secret, vec![2; 48]);
    assert_eq!(airline.sealed_previous_secret, Some(vec![1; 48]));
    let mut s = store(1)?;
    let create = |token: u8| StateChange::CreateCustomer {
        customer: CustomerRecord {
            token_hash: vec![token; 32],
            ..customer("c9", None)
        },
        intent: None,
    };
    let out = s.apply(vec![create(1), create(1)]).await?;
    assert_eq!(out, vec![ChangeOutcome::Done, ChangeOutcome::Done]);
    let out = s.apply(vec![create(2)]).await?;
    assert!(rejected(&out[0], ErrorCode::Conflict), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn the_meta_group_gives_a_subject_and_an_email_to_one_customer() -> anyhow::Result<()> {
    let mut m = store(0)?;
    m.apply(vec![StateChange::RegisterEntity(entity("airline"))])
        .await?;
    let claim = |c: &str, subject: &str, id: &str| StateChange::ClaimSubject {
        entity_id: "airline".into(),
        subject: subject.into(),
        customer_id: c.into(),
        claim: id.into(),
    };
    let release = |c: &str, id: &str| StateChange::ReleaseSubject {
        entity_id: "airline".into(),
        subject: "ff".into(),
        customer_id: c.into(),
        claim: id.into(),
    };
    let out = m
        .apply(vec![
            claim("c1", "ff", "int_a"),
            claim("c1", "ff", "int_a"),
            claim("c2", "ff", "int_x"),
        ])
        .await?;
    assert_eq!(out[0], ChangeOutcome::Done);
    assert_eq!(out[1], ChangeOutcome::Done, "claiming again is idempotent");
    assert!(rejected(&out[2], ErrorCode::Conflict));
    // Only the holder releases.
    m.apply(vec![release("c2", "int_a")]).await?;
    assert_eq!(
        m.reader.customer_for_subject("airline", "ff")?.as_deref(),
        Some("c1")
    );
    // A newer linking of the same subject holds its own claim: the older one's release (an
    // unlink's, arriving late) leaves it held.
    m.apply(vec![claim("c1", "ff", "int_b"), release("c1", "int_a")])
        .await?;
    assert_eq!(
        m.reader.customer_for_subject("airline", "ff")?.as_deref(),
        Some("c1")
    );
    m.apply(vec![release("c1", "int_b")]).await?;
    assert!(m.reader.customer_for_subject("airline", "ff")?.is_none());
    let out = m.apply(vec![claim("c2", "ff", "int_x")]).await?;
    assert_eq!(
        out[0],
        ChangeOutcome::Done,
        "free again once every claim went"
    );
    let out = m
        .apply(vec![claim("c1", "unknown-entity-subject", "int_c")])
        .await?;
    assert_eq!(out[0], ChangeOutcome::Done);
    let account = |c: &str| AccountRecord {
        email: "a@example.com".into(),
        customer_id: c.into(),
        password_hash: "h".into(),
        created_ms: 0,
    };
    let out = m
        .apply(vec![
            StateChange::ClaimEmail(account("c1")),
            StateChange::ClaimEmail(account("c2")),
        ])
        .await?;
    assert_eq!(out[0], ChangeOutcome::Done);
    assert!(rejected(&out[1], ErrorCode::Conflict));
    // Data-group changes are refused in the meta group.
    let out = m.apply(setup()).await?;
    assert!(rejected(&out[0], ErrorCode::Internal));
    Ok(())
}

#[tokio::test]
async fn a_node_that_lost_its_data_cannot_rejoin_under_the_id_of_its_replicas() -> anyhow::Result<()>
{
    let mut m = store(0)?;
    let join = |id: u64| {
        StateChange::RegisterNode(NodeRecord {
            id,
            peer_addr: "10.0.0.2:7001".into(),
            api_addr: "10.0.0.2:7000".into(),
            state: NodeState::Active,
            joined_ms: 0,
        })
    };
    let out = m.apply(vec![join(0)]).await?;
    assert_eq!(out[0], ChangeOutcome::NodeRegistered(1));
    // It crashed before it kept its id: at the same address, it is given the same one.
    let out = m.apply(vec![join(0)]).await?;
    assert_eq!(out[0], ChangeOutcome::NodeRegistered(1));
    // Once a group reports it holding a replica, a node there without an id is refused.
    m.apply(vec![StateChange::ReportGroup(GroupReport {
        group: 0,
        leader: 7,
        term: 1,
        voters: vec![7],
        learners: vec![1],
        at_ms: 0,
    })])
    .await?;
    let out = m.apply(vec![join(0)]).await?;
    assert!(
        matches!(&out[0], ChangeOutcome::Rejected { code: ErrorCode::Conflict, detail }
            if detail.contains("cannot rejoin as node 1")),
        "{out:?}"
    );
    // With its id (a restart that kept its data directory) it is the same node.
    let out = m.apply(vec![join(1)]).await?;
    assert_eq!(out[0], ChangeOutcome::NodeRegistered(1));
    Ok(())
}

#[tokio::test]
async fn the_last_active_node_is_never_removed_even_by_removals_sent_at_once() -> anyhow::Result<()>
{
    let mut m = store(0)?;
    let join = |n: u8| {
        StateChange::RegisterNode(NodeRecord {
            id: 0,
            peer_addr: format!("10.0.0.{n}:7001"),
            api_addr: format!("10.0.0.{n}:7000"),
            state: NodeState::Active,
            joined_ms: 0,
        })
    };
    let out = m.apply(vec![join(1), join(2)]).await?;
    assert_eq!(
        out,
        vec![
            ChangeOutcome::NodeRegistered(1),
            ChangeOutcome::NodeRegistered(2)
        ]
    );
    // Two removals, each checked on a node that had not applied the other yet.
    let leave = |id: u64| StateChange::SetNodeState {
        id,
        state: NodeState::Leaving,
    };
    let out = m.apply(vec![leave(1), leave(2)]).await?;
    assert_eq!(out[0], ChangeOutcome::Done);
    assert!(rejected(&out[1], ErrorCode::Conflict), "{out:?}");
    let active: Vec<u64> = m
        .reader
        .nodes()?
        .into_iter()
        .filter(|n| n.state == NodeState::Active)
        .map(|n| n.id)
        .collect();
    assert_eq!(active, vec![2]);
    Ok(())
}

#[tokio::test]
async fn an_intent_fences_the_step_that_completes_it() -> anyhow::Result<()> {
    let mut s = store(2)?;
    s.apply(vec![StateChange::CreateCustomer {
        customer: customer("c1", None),
        intent: None,
    }])
    .await?;
    // A link completing an intent that was never recorded (or already ended) does nothing.
    let out = s
        .apply(vec![StateChange::Link {
            customer_id: "c1".into(),
            link: LinkRecord {
                entity_id: "airline".into(),
                subject: "ff".into(),
                linked_ms: 1,
                sealed_token: None,
                sealed_refresh_token: None,
                claim: "int_gone".into(),
            },
            intent: Some("int_gone".into()),
        }])
        .await?;
    assert!(rejected(&out[0], ErrorCode::NotFound));
    assert!(s.reader.links("c1")?.is_empty());
    let intent = IntentRecord {
        id: "int_1".into(),
        at_ms: 5,
        step: IntentStep::ClaimEmail {
            account: AccountRecord {
                email: "b@example.com".into(),
                customer_id: "c2".into(),
                password_hash: "h".into(),
                created_ms: 0,
            },
            customer: customer("c2", Some("b@example.com")),
        },
    };
    let create = StateChange::CreateCustomer {
        customer: customer("c2", Some("b@example.com")),
        intent: Some("int_1".into()),
    };
    // Another sign-up under the same intent once it ended is refused; the same one finished
    // again (its answer was lost, or the intent worker finished it too) is done.
    let another = StateChange::CreateCustomer {
        customer: CustomerRecord {
            token_hash: vec![9; 32],
            ..customer("c2", Some("b@example.com"))
        },
        intent: Some("int_1".into()),
    };
    let out = s
        .apply(vec![
            StateChange::BeginIntent(intent),
            create.clone(),
            another,
            create,
        ])
        .await?;
    assert_eq!(out[1], ChangeOutcome::Done);
    assert!(
        rejected(&out[2], ErrorCode::NotFound),
        "the intent ended with the first: {out:?}"
    );
    assert_eq!(out[3], ChangeOutcome::Done);
    assert!(s.reader.customer("c2")?.is_some());
    assert!(s.reader.intents(10)?.is_empty());
    // Unlinking records the release of the subject in the meta group.
    s.apply(vec![link("c1", "airline", "ff")]).await?;
    s.apply(vec![StateChange::Unlink {
        customer_id: "c1".into(),
        entity_id: "airline".into(),
        at_ms: 20,
    }])
    .await?;
    let intents = s.reader.intents(10)?;
    assert!(
        matches!(&intents[..], [IntentRecord { step: IntentStep::ReleaseSubject { subject, .. }, .. }] if subject == "ff"),
        "{intents:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_event_routed_by_a_stale_index_entry_is_ignored() -> anyhow::Result<()> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    // c1 is "ff" at the airline; an event about "other" routed to c1 must not act for it.
    let out = s.apply(vec![ingest_as("e1", "other", 100)]).await?;
    let reason = ignored_reason(&out[0])?;
    // Told as a subject nobody links: the entity learns nothing of the customer's links.
    let unclaimed = custos_api::types::unclaimed_reason("airline");
    assert_eq!(reason, Some(unclaimed.as_str()));
    assert!(s.reader.outbox("cmd-e1")?.is_none());
    // Routed to a customer erased meanwhile (its links went with it): ignored, and the
    // event is kept for deduplication without naming anyone.
    s.apply(vec![StateChange::EraseCustomer {
        customer_id: "c1".into(),
    }])
    .await?;
    let out = s.apply(vec![ingest("e2", 200)]).await?;
    let ChangeOutcome::Ingested { fate, reason, .. } = &out[0] else {
        anyhow::bail!("{out:?}");
    };
    assert_eq!(*fate, EventFate::Ignored);
    // Nor of its erasure.
    assert_eq!(reason.as_deref(), Some(unclaimed.as_str()));
    assert!(s.reader.outbox("cmd-e2")?.is_none());
    assert!(s.reader.activity("c1", None, 10)?.0.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_rule_deleted_before_its_event_makes_no_command() -> anyhow::Result<()> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    s.apply(vec![rule("c1", "r2")]).await?;
    // The event was planned from a profile that still held r1 and r2 (a cached copy, or a
    // deposed leader's plan); r1's deletion reached the log first, in the same entry.
    let mut planned = ingest("e1", 100);
    if let StateChange::Ingest(i) = &mut planned {
        let mut second = i.commands[0].clone();
        second.id = "cmd-e1-r2".into();
        second.rule_id = "r2".into();
        i.commands.push(second);
    }
    let delete = |rule_id: &str| StateChange::DeleteRule {
        customer_id: "c1".into(),
        rule_id: rule_id.into(),
        at_ms: 90,
    };
    let out = s
        .apply(vec![StateChange::Batch(vec![
            delete("r1"),
            planned.clone(),
        ])])
        .await?;
    let ChangeOutcome::Batch(o) = &out[0] else {
        anyhow::bail!("{out:?}");
    };
    assert!(
        matches!(&o[1], ChangeOutcome::Ingested { fate: EventFate::Accepted, commands, .. } if commands == &["cmd-e1-r2"]),
        "{o:?}"
    );
    assert!(
        s.reader.outbox("cmd-e1")?.is_none(),
        "the deleted rule's command"
    );
    assert!(
        s.reader.outbox("cmd-e1-r2")?.is_some(),
        "the kept rule's command"
    );
    // With every rule it named deleted, the event is ignored and says why.
    s.apply(vec![delete("r2")]).await?;
    let mut again = planned;
    if let StateChange::Ingest(i) = &mut again {
        i.event.id = "e2".into();
        for c in &mut i.commands {
            c.id = c.id.replace("e1", "e2");
        }
    }
    let out = s.apply(vec![again]).await?;
    let reason = ignored_reason(&out[0])?;
    // The airline is told nothing of the customer's rules; the customer's activity says why.
    assert_eq!(reason, Some(custos_api::types::IGNORED_BY_RULES));
    let (lines, _) = s.reader.activity("c1", None, 1)?;
    assert!(
        matches!(&lines[..], [(_, ActivityRecord::EventReceived { reason: Some(why), .. })]
            if why == "rule r1: deleted before the event was recorded (and 1 more)"),
        "{lines:?}"
    );
    assert!(s.reader.outbox("cmd-e2")?.is_none());
    assert!(s.reader.outbox("cmd-e2-r2")?.is_none());
    Ok(())
}

#[tokio::test]
async fn a_command_for_an_account_the_customer_replaced_first_is_not_made() -> anyhow::Result<()> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    // Planned for the hotel account the customer had linked (a cached profile); the relink
    // as another account reached the log first.
    let out = s
        .apply(vec![StateChange::Batch(vec![
            link("c1", "hotel", "g2"),
            ingest("e1", 100),
        ])])
        .await?;
    let ChangeOutcome::Batch(o) = &out[0] else {
        anyhow::bail!("{out:?}");
    };
    assert_eq!(
        ignored_reason(&o[1])?,
        Some(custos_api::types::IGNORED_BY_RULES)
    );
    assert!(s.reader.outbox("cmd-e1")?.is_none(), "nothing for g");
    let (lines, _) = s.reader.activity("c1", None, 1)?;
    assert!(
        matches!(&lines[..], [(_, ActivityRecord::EventReceived { reason: Some(why), .. })]
            if why == "rule r1: hotel was linked as another account before the event was recorded"),
        "{lines:?}"
    );
    // Unlinked first: the same.
    s.apply(vec![StateChange::Unlink {
        customer_id: "c1".into(),
        entity_id: "hotel".into(),
        at_ms: 150,
    }])
    .await?;
    let out = s.apply(vec![ingest("e2", 200)]).await?;
    assert_eq!(
        ignored_reason(&out[0])?,
        Some(custos_api::types::IGNORED_BY_RULES)
    );
    assert!(s.reader.outbox("cmd-e2")?.is_none());
    Ok(())
}

/// Keeps every effect reported.
#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<Effect>>);

impl ApplyObserver for Recorded {
    fn applied(&self, _group: u32, effects: &[Effect]) {
        if let Ok(mut all) = self.0.lock() {
            all.extend_from_slice(effects);
        }
    }
}

impl Recorded {
    fn take(&self) -> Vec<Effect> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// The delivery effects reported since the last take.
    fn take_due(&self) -> Vec<Effect> {
        self.take()
            .into_iter()
            .filter(|e| matches!(e, Effect::DeliveryDue { .. }))
            .collect()
    }
}

#[tokio::test]
async fn linking_and_unlinking_are_reported_so_caches_of_links_drop_them() -> anyhow::Result<()> {
    let seen = Arc::new(Recorded::default());
    let mut s = store_observed(1, seen.clone())?;
    let changed = |seen: &Recorded| -> Vec<(String, String)> {
        seen.take()
            .into_iter()
            .filter_map(|e| match e {
                Effect::LinkChanged {
                    customer_id,
                    entity_id,
                } => Some((customer_id, entity_id)),
                _ => None,
            })
            .collect()
    };
    s.apply(setup()).await?;
    let pair = |c: &str, e: &str| (c.to_owned(), e.to_owned());
    assert_eq!(changed(&seen), [pair("c1", "airline"), pair("c1", "hotel")]);
    // Linked again (a new subject), unlinked, and an unlink of nothing linked.
    s.apply(vec![link("c1", "hotel", "g2")]).await?;
    assert_eq!(changed(&seen), [pair("c1", "hotel")]);
    let unlink = |entity: &str| StateChange::Unlink {
        customer_id: "c1".into(),
        entity_id: entity.into(),
        at_ms: 20,
    };
    s.apply(vec![unlink("hotel")]).await?;
    assert_eq!(changed(&seen), [pair("c1", "hotel")]);
    s.apply(vec![unlink("hotel")]).await?;
    assert_eq!(changed(&seen), []);
    Ok(())
}

#[tokio::test]
async fn a_new_command_is_handed_to_the_delivery_worker_as_stored_and_a_retry_is_not(
) -> anyhow::Result<()> {
    let seen = Arc::new(Recorded::default());
    let mut s = store_observed(1, seen.clone())?;
    s.apply(setup()).await?;
    s.apply(vec![ingest("e1", 100)]).await?;
    let due = seen.take_due();
    let Some(Effect::DeliveryDue {
        command_id,
        due_ms,
        created: Some(command),
    }) = due.first()
    else {
        anyhow::bail!("{due:?}");
    };
    assert_eq!((command_id.as_str(), *due_ms), ("cmd-e1", 100));
    // What is handed over is what is stored.
    let stored = s.reader.outbox("cmd-e1")?.map(|r| r.command);
    assert_eq!(stored.as_ref(), Some(&**command));
    // A retry is scheduled without the command: its attempt reads the record (and its
    // attempts so far) back.
    s.apply(vec![StateChange::RecordDeliveries(vec![
        DeliveryUpdate::Attempted {
            command_id: "cmd-e1".into(),
            attempt: AttemptRecord {
                at_ms: 150,
                status_code: Some(503),
                error: Some("target answered 503".into()),
                duration_ms: 1,
            },
            next: AttemptNext::RetryAt(5_000),
        },
    ])])
    .await?;
    let due = seen.take_due();
    assert_eq!(
        due,
        vec![Effect::DeliveryDue {
            command_id: "cmd-e1".into(),
            due_ms: 5_000,
            created: None,
        }]
    );
    assert!(s
        .reader
        .outbox("cmd-e1")?
        .is_some_and(|r| r.attempts.len() == 1));
    // Settled (here cancelled by the unlink): reported, so a handed-over command is dropped.
    s.apply(vec![StateChange::Unlink {
        customer_id: "c1".into(),
        entity_id: "hotel".into(),
        at_ms: 200,
    }])
    .await?;
    assert!(seen
        .take()
        .contains(&Effect::DeliverySettled("cmd-e1".into())));
    Ok(())
}

#[tokio::test]
async fn retention_prunes_settled_records_but_never_pending_ones() -> anyhow::Result<()> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    s.apply(vec![
        ingest("old", 1_000),
        ingest("pending", 1_000),
        delivered("cmd-old", 1_500),
    ])
    .await?;
    s.apply(vec![ingest("new", 50_000)]).await?;
    let out = s.apply(vec![prune_before(10_000)]).await?;
    assert!(matches!(out[0], ChangeOutcome::Pruned(n) if n > 0));
    assert!(
        s.reader.outbox("cmd-old")?.is_none(),
        "delivered and old: pruned"
    );
    assert!(
        s.reader.outbox("cmd-pending")?.is_some(),
        "pending: kept whatever its age"
    );
    assert!(s.reader.outbox("cmd-new")?.is_some(), "young: kept");
    let (items, _) = s.reader.activity("c1", None, 100)?;
    assert!(
        items.iter().all(|(at, _)| *at >= 10_000),
        "old activity pruned"
    );
    // The dedup key of the old event is gone too, so the id could be reused after retention.
    let out = s.apply(vec![ingest("old", 60_000)]).await?;
    assert!(matches!(
        &out[0],
        ChangeOutcome::Ingested {
            duplicate: false,
            ..
        }
    ));
    // A bounded prune reports a full batch, so the caller knows to go on.
    let out = s
        .apply(vec![StateChange::Prune {
            now_ms: 0,
            before_ms: i64::MAX,
            limit: 1,
        }])
        .await?;
    assert!(matches!(out[0], ChangeOutcome::Pruned(1)));
    Ok(())
}

#[tokio::test]
async fn a_log_entry_ages_its_records_in_a_few_retention_entries_at_their_latest_time(
) -> anyhow::Result<()> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    let listed = |s: &Store| -> anyhow::Result<Vec<usize>> {
        let mut n = Vec::new();
        for v in s.tagged(keys::EXPIRY)? {
            n.push(codec::decode_keys(&v)?.len());
        }
        Ok(n)
    };
    let before = s.tagged(keys::EXPIRY)?.len();
    let listed_before: usize = listed(&s)?.iter().sum();
    // The dedup key and the activity line (the event's, naming its rule match): one entry.
    s.apply(vec![ingest("e1", 1_000)]).await?;
    assert_eq!(s.tagged(keys::EXPIRY)?.len(), before + 1);
    assert_eq!(
        listed(&s)?.iter().sum::<usize>() - listed_before,
        2,
        "dedup key and the activity line"
    );
    // The settled delivery and its activity line: one more.
    s.apply(vec![delivered("cmd-e1", 1_500)]).await?;
    assert_eq!(s.tagged(keys::EXPIRY)?.len(), before + 2);
    // Two events in one log entry, at different times: one retention entry, at the later time.
    s.apply(vec![StateChange::Batch(vec![
        ingest("e2", 2_000),
        ingest("e3", 3_000),
    ])])
    .await?;
    assert_eq!(s.tagged(keys::EXPIRY)?.len(), before + 3);
    // Pruning up to 2.5 s takes the first event and its delivery, all of their listed keys;
    // the second event waits for the third's time, never going before its own.
    let out = s.apply(vec![prune_before(2_500)]).await?;
    assert_eq!(out[0], ChangeOutcome::Pruned(before as u32 + 2));
    assert!(s.reader.outbox("cmd-e1")?.is_none(), "delivered and aged");
    let (lines, _) = s.reader.activity("c1", None, 100)?;
    assert_eq!(
        lines.iter().map(|(at, _)| *at).collect::<Vec<_>>(),
        vec![3_000, 3_000, 2_000, 2_000],
        "the second and third events' lines are left"
    );
    assert_eq!(s.tagged(keys::EXPIRY)?.len(), 1);
    // Twenty events in one log entry age 40 keys: two entries, none listing more than 32.
    s.apply(vec![StateChange::Batch(
        (0..20)
            .map(|i| ingest(&format!("b{i}"), 4_000 + i))
            .collect(),
    )])
    .await?;
    assert_eq!(listed(&s)?, vec![4, 32, 8]);
    // Pruning up to 3.5 s takes the entry at 3 s, with both events it lists.
    let out = s.apply(vec![prune_before(3_500)]).await?;
    assert_eq!(out[0], ChangeOutcome::Pruned(1));
    assert!(s
        .reader
        .activity("c1", None, 100)?
        .0
        .iter()
        .all(|(at, _)| *at >= 4_000));
    Ok(())
}

#[tokio::test]
async fn replicas_write_the_same_state_however_their_entries_are_grouped_into_applies(
) -> anyhow::Result<()> {
    // A leader may apply a run of entries in one call where a follower applies them one by
    // one: the state (retention entries included) must not depend on it.
    let entries = || {
        let mut all = setup();
        for b in 0..4 {
            all.push(StateChange::Batch(
                (0..15)
                    .map(|i| ingest(&format!("e{b}-{i}"), 1_000 * b + i))
                    .collect(),
            ));
            all.push(delivered(&format!("cmd-e{b}-0"), 1_000 * b + 500));
        }
        // Prune steps back to back: a follower may apply both in one call.
        for _ in 0..2 {
            all.push(StateChange::Prune {
                now_ms: 0,
                before_ms: 10_000,
                limit: 2,
            });
        }
        all
    };
    let mut together = store(1)?;
    together.apply(entries()).await?;
    let mut apart = store(1)?;
    for e in entries() {
        apart.apply(vec![e]).await?;
    }
    assert_eq!(together.reader.digest()?, apart.reader.digest()?);
    Ok(())
}

#[tokio::test]
async fn a_snapshot_streams_real_state_into_another_store_and_group() -> anyhow::Result<()> {
    let mut a = store(3)?;
    a.apply(setup()).await?;
    a.apply(vec![ingest("e1", 100)]).await?;
    let built = a.sm.get_snapshot_builder().await.build_snapshot().await?;
    // As openraft does: the data a follower receives comes from the current snapshot.
    let mut snap =
        a.sm.get_current_snapshot()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no current snapshot"))?;
    assert_eq!(snap.meta, built.meta);
    // The snapshot's size is what the next one is paced against.
    let size =
        tokio::io::AsyncSeekExt::seek(&mut *snap.snapshot, std::io::SeekFrom::End(0)).await?;
    tokio::io::AsyncSeekExt::rewind(&mut *snap.snapshot).await?;
    let pacer = a.sm.pacer();
    assert!(size > 0);
    assert_eq!(
        (pacer.state_bytes(), pacer.builds(), pacer.bytes_built()),
        (size, 1, size)
    );
    // Writes after the snapshot are not in it.
    a.apply(vec![ingest("e2", 200)]).await?;

    let mut b = store(9)?;
    // Something that must disappear when the snapshot is installed.
    b.apply(vec![StateChange::CreateCustomer {
        customer: customer("stale", None),
        intent: None,
    }])
    .await?;
    // As openraft does: the chunks are written into the file the follower hands out.
    let mut recv = b.sm.begin_receiving_snapshot().await?;
    tokio::io::copy(&mut *snap.snapshot, &mut *recv).await?;
    b.sm.install_snapshot(&snap.meta, recv).await?;
    assert!(b.reader.customer("stale")?.is_none());
    assert!(b.reader.customer("c1")?.is_some());
    assert_eq!(b.reader.links("c1")?.len(), 2);
    assert_eq!(
        b.reader.outbox("cmd-e1")?.map(|o| o.state),
        Some(DeliveryState::Pending)
    );
    assert!(
        b.reader.outbox("cmd-e2")?.is_none(),
        "taken after the snapshot"
    );
    assert_eq!(b.reader.applied()?, snap.meta.last_log_id);
    let current = b.sm.get_current_snapshot().await?.map(|s| s.meta);
    assert_eq!(current, Some(snap.meta.clone()));
    assert_eq!(
        (b.sm.pacer().state_bytes(), b.sm.pacer().builds()),
        (size, 0)
    );
    // Reopened, the group paces against its current snapshot's size.
    let reopened = StateMachineStore::new(
        b.db.clone(),
        9,
        Arc::new(NoObserver),
        b.dir.path().join("snapshots"),
    )?;
    assert_eq!(reopened.pacer().state_bytes(), size);
    // Retention still finds what it indexed before the install moved the key space.
    b.apply(vec![delivered("cmd-e1", 150)]).await?;
    let out = b.apply(vec![prune_before(10_000)]).await?;
    assert!(matches!(out[0], ChangeOutcome::Pruned(n) if n > 0));
    assert!(
        b.reader.outbox("cmd-e1")?.is_none(),
        "pruned after the install"
    );
    Ok(())
}

#[tokio::test]
async fn a_profile_is_read_back_whole_from_its_own_range() -> anyhow::Result<()> {
    let mut s = store(4)?;
    s.apply(setup()).await?;
    // "c1x" shares c1's first bytes: its keys must not be read as c1's.
    s.apply(vec![
        StateChange::CreateCustomer {
            customer: customer("c1x", None),
            intent: None,
        },
        link("c1x", "airline", "fx"),
        link("c1x", "hotel", "gx"),
        rule("c1", "r2"),
        rule("c1", "r1"),
        rule("c1x", "r9"),
    ])
    .await?;
    // Read from the memtable, then from table files with their prefix filters; c2, written
    // to a later file than c1's, is what a seek over c1's prefix must skip, not end at.
    for round in 0..2 {
        let p = s
            .reader
            .profile("c1")?
            .ok_or_else(|| anyhow::anyhow!("no profile"))?;
        assert_eq!(p.customer.id, "c1");
        let linked: Vec<&str> = p.links.iter().map(|l| l.entity_id.as_str()).collect();
        assert_eq!(linked, ["airline", "hotel"]);
        let rules: Vec<&str> = p.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(rules, ["r1", "r2"]);
        assert!(s.reader.profile("c")?.is_none());
        assert_eq!(s.reader.rules("c1x")?.len(), 1);
        // Training's reads of every profile take each part, and only it.
        let all: Vec<(String, String)> = s
            .reader
            .all_rules()?
            .into_iter()
            .map(|(c, r)| (c, r.id))
            .collect();
        let want = [("c1", "r1"), ("c1", "r2"), ("c1x", "r9")];
        assert_eq!(all, want.map(|(c, r)| (c.to_owned(), r.to_owned())));
        assert_eq!(s.reader.all_links()?.len(), 4 + round);
        if round == 0 {
            s.db.flush()?;
            s.apply(vec![
                StateChange::CreateCustomer {
                    customer: customer("c2", None),
                    intent: None,
                },
                link("c2", "airline", "f2"),
            ])
            .await?;
            s.db.flush()?;
            assert!(s.reader.profile("c2")?.is_some_and(|p| p.links.len() == 1));
        }
    }
    // A rule deleted and the customer erased leave nothing of the profile behind.
    s.apply(vec![StateChange::DeleteRule {
        customer_id: "c1".into(),
        rule_id: "r1".into(),
        at_ms: 6,
    }])
    .await?;
    assert_eq!(s.reader.rules("c1")?.len(), 1);
    s.apply(vec![StateChange::EraseCustomer {
        customer_id: "c1".into(),
    }])
    .await?;
    assert!(s.reader.profile("c1")?.is_none());
    assert!(s.reader.rules("c1")?.is_empty() && s.reader.links("c1")?.is_empty());
    let left: Vec<String> = s.reader.all_rules()?.into_iter().map(|(c, _)| c).collect();
    assert_eq!(left, ["c1x"]);
    Ok(())
}

#[tokio::test]
async fn erasing_a_customer_removes_everything_held_about_it_and_nothing_else() -> anyhow::Result<()>
{
    let mut s = store(1)?;
    s.apply(setup()).await?;
    s.apply(vec![
        StateChange::CreateCustomer {
            customer: customer("c2", Some("two@example.com")),
            intent: None,
        },
        StateChange::Link {
            customer_id: "c2".into(),
            link: LinkRecord {
                entity_id: "airline".into(),
                subject: "ff2".into(),
                linked_ms: 10,
                sealed_token: Some(vec![9; 40]),
                sealed_refresh_token: None,
                claim: "int_c2".into(),
            },
            intent: None,
        },
        ingest("delivered", 1_000),
        delivered("cmd-delivered", 1_500),
        StateChange::Dismiss {
            customer_id: "c1".into(),
            template: "t".into(),
        },
    ])
    .await?;
    // A pending delivery whose activity line has aged out, a session and a started linking:
    // none of them is under the customer's own prefixes.
    s.apply(vec![ingest("aged", 500)]).await?;
    // Its own apply: pruning reads committed data, not the writes of its own batch.
    let pruned = s.apply(vec![prune_before(900)]).await?;
    assert!(
        matches!(pruned[0], ChangeOutcome::Pruned(n) if n > 0),
        "{pruned:?}"
    );
    s.apply(vec![c1_signs_in(), c1_begins_linking()]).await?;
    assert!(
        s.reader.outbox("cmd-aged")?.is_some(),
        "pending: kept by pruning"
    );
    assert!(s.reader.session(&[7; 32])?.is_some());
    // Clear the intents of the setup so the erasure's own are seen.
    for i in s.reader.intents(100)? {
        s.apply(vec![StateChange::EndIntent { id: i.id }]).await?;
    }
    // An event and the erasure in one log entry: the erasure sees the entry's own writes,
    // retention entries not yet written included.
    erase_c1_after(&mut s, ingest("pending", 2_000)).await?;
    let r = &s.reader;
    assert!(r.customer("c1")?.is_none());
    assert!(r.links("c1")?.is_empty());
    assert!(r.activity("c1", None, 100)?.0.is_empty());
    assert!(r.outbox("cmd-delivered")?.is_none());
    assert!(r.outbox("cmd-pending")?.is_none());
    assert!(r.engagements(Some("c1"))?.is_empty());
    assert!(r.dismissed("c1")?.is_empty());
    assert!(
        r.outbox("cmd-aged")?.is_none(),
        "found without its activity line"
    );
    assert!(r.session(&[7; 32])?.is_none());
    // Retention entries no longer name the customer's records, but still age the dedup keys
    // of its events (kept for the sources' sake, without the customer).
    let mut dedup_aged = 0;
    for v in s.tagged(keys::EXPIRY)? {
        for k in codec::decode_keys(&v)? {
            assert!(!k.windows(2).any(|w| w == b"c1"), "{k:?}");
            dedup_aged += usize::from(k.get(4) == Some(&keys::DEDUP));
        }
    }
    assert!(dedup_aged >= 2, "{dedup_aged}");
    // The routing index entries in the meta group are released by the recorded intents.
    let mut released: Vec<String> = r
        .intents(100)?
        .into_iter()
        .filter_map(|i| match i.step {
            IntentStep::ReleaseSubject {
                customer_id,
                subject,
                ..
            } if customer_id == "c1" => Some(subject),
            _ => None,
        })
        .collect();
    released.sort();
    assert_eq!(released, vec!["ff".to_owned(), "g".to_owned()]);
    // c1 has no email: its erasure's last step in the meta group still comes, empty, so the
    // meta group's log holding those claims is scrubbed.
    assert!(r.intents(100)?.iter().any(|i| matches!(
        &i.step,
        IntentStep::ReleaseEmail { email, customer_id } if email.is_empty() && customer_id == "c1"
    )));
    let taken = s
        .apply(vec![StateChange::TakeLink {
            state_hash: vec![8; 32],
        }])
        .await?;
    assert!(
        matches!(taken[0], ChangeOutcome::Rejected { .. }),
        "{taken:?}"
    );
    let r = &s.reader;
    // The other customer is untouched.
    assert!(r.customer("c2")?.is_some());
    assert_eq!(r.links("c2")?.len(), 1);
    // Erasing c2 releases its portal account's email too; erasing again is "not found".
    let out = s
        .apply(vec![
            StateChange::EraseCustomer {
                customer_id: "c2".into(),
            },
            StateChange::EraseCustomer {
                customer_id: "c2".into(),
            },
        ])
        .await?;
    assert_eq!(out[0], ChangeOutcome::Done);
    assert!(matches!(out[1], ChangeOutcome::Rejected { .. }));
    assert!(s.reader.intents(100)?.iter().any(|i| matches!(
        &i.step,
        IntentStep::ReleaseEmail { email, .. } if email == "two@example.com"
    )));
    Ok(())
}

#[tokio::test]
async fn engagement_counts_add_up_without_a_read_and_go_with_their_customer() -> anyhow::Result<()>
{
    let mut s = store(1)?;
    s.apply(setup()).await?;
    // Counted one entry at a time, several in one entry, and entries in one apply call.
    s.apply(vec![ingest("e1", 1_000)]).await?;
    s.apply(vec![
        StateChange::Batch(vec![ingest("e2", 1_100), ingest("e3", 1_200)]),
        ingest("e4", 1_300),
    ])
    .await?;
    // A duplicate is not counted.
    s.apply(vec![ingest("e4", 1_350)]).await?;
    assert_eq!(
        s.reader.engagements(Some("c1"))?,
        vec![("c1".into(), "airline/flight.delayed".into(), 4, 1_300)]
    );
    // A count an earlier build stored under `source.type` (written here as that build wrote
    // it: the same key with the dotted name) is read under the current name and added to it.
    let mut legacy = None;
    for kv in s.db.iterator(rocksdb::IteratorMode::Start) {
        let (k, v) = kv?;
        if k.get(4) == Some(&keys::ENGAGEMENT) {
            let at = k.len() - "airline/flight.delayed".len();
            let mut earlier = k[..at].to_vec();
            earlier.extend_from_slice(b"airline.flight.delayed");
            legacy = Some((earlier, v.to_vec()));
        }
    }
    let (earlier, value) = legacy.ok_or_else(|| anyhow::anyhow!("no engagement key"))?;
    s.db.put(&earlier, value)?;
    assert_eq!(
        s.reader.engagements(Some("c1"))?,
        vec![("c1".into(), "airline/flight.delayed".into(), 8, 1_300)]
    );
    // A type first received in the entry that erases the customer: its count is only the
    // entry's merge operand when the erasure looks, and goes too (as does the earlier
    // build's key).
    let mut cancelled = ingest("e5", 1_400);
    if let StateChange::Ingest(i) = &mut cancelled {
        i.event.event_type = "flight.cancelled".into();
    }
    erase_c1_after(&mut s, cancelled).await?;
    assert!(s.reader.engagements(Some("c1"))?.is_empty());
    Ok(())
}

#[tokio::test]
async fn an_event_and_its_matches_are_one_stored_line_read_and_paged_as_several(
) -> anyhow::Result<()> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    let lines_before = s.tagged(keys::ACTIVITY)?.len();
    for (i, id) in ["e1", "e2", "e3"].into_iter().enumerate() {
        s.apply(vec![ingest(id, 1_000 + i as i64)]).await?;
    }
    // One key per event, though each reads as two lines.
    assert_eq!(s.tagged(keys::ACTIVITY)?.len(), lines_before + 3);
    let (all, next) = s.reader.activity("c1", None, 100)?;
    assert!(next.is_none());
    let kinds: Vec<String> = all
        .iter()
        .take(6)
        .map(|(_, l)| match l {
            ActivityRecord::EventReceived { event, .. } => format!("event {}", event.id),
            ActivityRecord::RuleMatched {
                event_id,
                command_id,
                ..
            } => format!("match {event_id} {command_id}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "match e3 cmd-e3",
            "event e3",
            "match e2 cmd-e2",
            "event e2",
            "match e1 cmd-e1",
            "event e1"
        ]
    );
    // Any page size walks the same lines, a page ending inside a stored record included.
    for limit in [1, 2, 3, 4, 5] {
        let mut walked = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let (page, next) = s.reader.activity("c1", before.as_deref(), limit)?;
            assert!(page.len() <= limit, "{limit}: {}", page.len());
            walked.extend(page);
            match next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        assert_eq!(walked, all, "page size {limit}");
    }
    // A cursor claiming every line of a record read still leaves a page and a way on.
    let (_, inside) = s.reader.activity("c1", None, 1)?;
    let inside = inside.expect("a cursor inside the newest record");
    let claimed = format!("{}ffff", &inside[..inside.len() - 4]);
    let (page, next) = s.reader.activity("c1", Some(&claimed), 2)?;
    assert_eq!(page.len(), 2);
    assert!(next.is_some());
    Ok(())
}

#[tokio::test]
async fn an_erased_customers_last_steps_ending_have_the_group_scrubbed_again() -> anyhow::Result<()>
{
    let seen = Arc::new(Recorded::default());
    let mut s = store_observed(2, seen.clone())?;
    s.apply(setup()).await?;
    s.apply(vec![StateChange::EraseCustomer {
        customer_id: "c1".into(),
    }])
    .await?;
    let erased = |seen: &Recorded| {
        seen.take()
            .iter()
            .filter(|e| matches!(e, Effect::Erased))
            .count()
    };
    assert_eq!(erased(&seen), 1);
    // The releases of its two subjects and its email hold them in clear until they end; each
    // end has the group scrubbed again.
    let intents = s.reader.intents(100)?;
    assert_eq!(intents.len(), 3, "{intents:?}");
    assert!(s.reader.customer("c1")?.is_none(), "erased");
    for intent in intents {
        let out = s
            .apply(vec![StateChange::EndIntent {
                id: intent.id.clone(),
            }])
            .await?;
        let left = s.reader.intents(100)?.len();
        assert_eq!(erased(&seen), 1, "{intent:?} {out:?} left {left}");
    }
    // A live customer's release ending is no erasure, nor a sign-up's claim of an email
    // taken already (its customer never existed).
    s.apply(vec![
        StateChange::BeginIntent(IntentRecord {
            id: "int_signup".into(),
            at_ms: 5,
            step: IntentStep::ClaimEmail {
                account: AccountRecord {
                    email: "taken@example.com".into(),
                    customer_id: "c3".into(),
                    password_hash: String::new(),
                    created_ms: 5,
                },
                customer: customer("c3", None),
            },
        }),
        StateChange::EndIntent {
            id: "int_signup".into(),
        },
    ])
    .await?;
    assert_eq!(erased(&seen), 0);
    s.apply(vec![
        StateChange::CreateCustomer {
            customer: customer("c2", None),
            intent: None,
        },
        StateChange::BeginIntent(IntentRecord {
            id: "int_c2".into(),
            at_ms: 5,
            step: IntentStep::ReleaseSubject {
                customer_id: "c2".into(),
                entity_id: "hotel".into(),
                subject: "c2-hotel".into(),
                claim: "int_c2".into(),
            },
        }),
        StateChange::EndIntent {
            id: "int_c2".into(),
        },
    ])
    .await?;
    assert_eq!(erased(&seen), 0);
    Ok(())
}

#[tokio::test]
async fn a_linking_begun_after_its_customer_was_erased_is_refused() -> anyhow::Result<()> {
    let mut s = store(2)?;
    s.apply(vec![
        StateChange::CreateCustomer {
            customer: customer("c1", None),
            intent: None,
        },
        StateChange::EraseCustomer {
            customer_id: "c1".into(),
        },
    ])
    .await?;
    let intents_before = s.tagged(keys::INTENT)?.len();
    // Planned by the customer's actor before the erasure's apply, proposed after it.
    let out = s
        .apply(vec![StateChange::BeginIntent(IntentRecord {
            id: "int_9".into(),
            at_ms: 5,
            step: IntentStep::ClaimSubject {
                customer_id: "c1".into(),
                link: LinkRecord {
                    entity_id: "car".into(),
                    subject: "c1-car".into(),
                    linked_ms: 5,
                    sealed_token: None,
                    sealed_refresh_token: None,
                    claim: "int_9".into(),
                },
            },
        })])
        .await?;
    assert!(rejected(&out[0], ErrorCode::NotFound), "{out:?}");
    // Nothing of it stays: no intent (which would claim the subject for nobody), no claim.
    assert_eq!(s.tagged(keys::INTENT)?.len(), intents_before);
    assert!(s.tagged(keys::CLAIM_OF)?.is_empty());
    Ok(())
}

#[tokio::test]
async fn the_last_linking_or_unlinking_wins_over_one_left_unfinished() -> anyhow::Result<()> {
    let mut s = store(2)?;
    s.apply(vec![StateChange::CreateCustomer {
        customer: customer("c1", None),
        intent: None,
    }])
    .await?;
    let begin = |id: &str, subject: &str| {
        StateChange::BeginIntent(IntentRecord {
            id: id.into(),
            at_ms: 5,
            step: IntentStep::ClaimSubject {
                customer_id: "c1".into(),
                link: LinkRecord {
                    entity_id: "car".into(),
                    subject: subject.into(),
                    linked_ms: 5,
                    sealed_token: None,
                    sealed_refresh_token: None,
                    claim: id.into(),
                },
            },
        })
    };
    let finish = |id: &str, subject: &str| StateChange::Link {
        customer_id: "c1".into(),
        link: LinkRecord {
            entity_id: "car".into(),
            subject: subject.into(),
            linked_ms: 6,
            sealed_token: None,
            sealed_refresh_token: None,
            claim: id.into(),
        },
        intent: Some(id.into()),
    };
    let unlink = StateChange::Unlink {
        customer_id: "c1".into(),
        entity_id: "car".into(),
        at_ms: 7,
    };
    let releases = |s: &Store| -> anyhow::Result<Vec<String>> {
        let mut claims: Vec<String> = s
            .reader
            .intents(100)?
            .into_iter()
            .filter_map(|i| match i.step {
                IntentStep::ReleaseSubject { claim, .. } => Some(claim),
                _ => None,
            })
            .collect();
        claims.sort();
        Ok(claims)
    };
    // A linking whose call timed out, then an unlink: the unlink cancels it (and answers
    // done, though nothing was linked yet), so finishing it later links nothing.
    s.apply(vec![begin("int_a", "s1")]).await?;
    let out = s.apply(vec![unlink.clone()]).await?;
    assert_eq!(out[0], ChangeOutcome::Done);
    assert_eq!(releases(&s)?, vec!["int_a".to_owned()]);
    let out = s.apply(vec![finish("int_a", "s1")]).await?;
    assert!(rejected(&out[0], ErrorCode::NotFound), "{out:?}");
    assert!(s.reader.links("c1")?.is_empty());
    // With nothing linked or under way, an unlink is a 404.
    for i in s.reader.intents(100)? {
        s.apply(vec![StateChange::EndIntent { id: i.id }]).await?;
    }
    let out = s.apply(vec![unlink.clone()]).await?;
    assert!(rejected(&out[0], ErrorCode::NotFound), "{out:?}");
    // Two linkings under way: the one that finishes abandons the other, and a relink releases
    // the old link's own claim.
    s.apply(vec![begin("int_b", "s1"), begin("int_c", "s2")])
        .await?;
    s.apply(vec![finish("int_c", "s2")]).await?;
    assert_eq!(releases(&s)?, vec!["int_b".to_owned()]);
    // The same linking applied again (its answer was lost and it was proposed once more, or
    // the intent worker finished it too) is done, and the claim the link holds stays.
    let out = s.apply(vec![finish("int_c", "s2")]).await?;
    assert_eq!(out[0], ChangeOutcome::Done);
    assert_eq!(releases(&s)?, vec!["int_b".to_owned()]);
    assert_eq!(s.reader.links("c1")?[0].claim, "int_c");
    let out = s.apply(vec![finish("int_b", "s1")]).await?;
    assert!(rejected(&out[0], ErrorCode::NotFound));
    assert_eq!(s.reader.links("c1")?[0].subject, "s2");
    s.apply(vec![begin("int_d", "s3"), finish("int_d", "s3")])
        .await?;
    assert_eq!(releases(&s)?, vec!["int_b".to_owned(), "int_c".to_owned()]);
    s.apply(vec![unlink]).await?;
    assert_eq!(
        releases(&s)?,
        vec!["int_b".to_owned(), "int_c".to_owned(), "int_d".to_owned()]
    );
    assert!(s.reader.links("c1")?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_linking_abandons_only_the_same_customers_unfinished_linkings_of_that_entity(
) -> anyhow::Result<()> {
    let mut s = store(2)?;
    for c in ["c1", "c2"] {
        s.apply(vec![StateChange::CreateCustomer {
            customer: customer(c, None),
            intent: None,
        }])
        .await?;
    }
    let record = |customer: &str, entity: &str, id: &str| LinkRecord {
        entity_id: entity.into(),
        subject: format!("{customer}-{entity}"),
        linked_ms: 5,
        sealed_token: None,
        sealed_refresh_token: None,
        claim: id.into(),
    };
    let begin = |customer: &str, entity: &str, id: &str| {
        StateChange::BeginIntent(IntentRecord {
            id: id.into(),
            at_ms: 5,
            step: IntentStep::ClaimSubject {
                customer_id: customer.into(),
                link: record(customer, entity, id),
            },
        })
    };
    // Unfinished: c2's linking of the same entity, c1's of another, c1's of the same.
    s.apply(vec![
        begin("c2", "car", "int_1"),
        begin("c1", "hotel", "int_2"),
        begin("c1", "car", "int_3"),
        begin("c1", "car", "int_4"),
    ])
    .await?;
    s.apply(vec![StateChange::Link {
        customer_id: "c1".into(),
        link: record("c1", "car", "int_4"),
        intent: Some("int_4".into()),
    }])
    .await?;
    let mut left: Vec<(String, String)> = s
        .reader
        .intents(100)?
        .into_iter()
        .map(|i| match i.step {
            IntentStep::ClaimSubject { .. } => ("claim".to_owned(), i.id),
            IntentStep::ReleaseSubject { claim, .. } => ("release".to_owned(), claim),
            _ => ("other".to_owned(), i.id),
        })
        .collect();
    left.sort();
    let want: Vec<(String, String)> =
        [("claim", "int_1"), ("claim", "int_2"), ("release", "int_3")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    assert_eq!(left, want);
    // Erasing c1 abandons its remaining linking, not c2's.
    s.apply(vec![StateChange::EraseCustomer {
        customer_id: "c1".into(),
    }])
    .await?;
    let claims: Vec<String> = s
        .reader
        .intents(100)?
        .into_iter()
        .filter_map(|i| match i.step {
            IntentStep::ClaimSubject { .. } => Some(i.id),
            _ => None,
        })
        .collect();
    assert_eq!(claims, vec!["int_1".to_owned()]);
    Ok(())
}

/// Customer c1 starts linking the hotel through the portal (state hash 8...).
fn c1_begins_linking() -> StateChange {
    StateChange::BeginLink {
        state_hash: vec![8; 32],
        pending: PendingLink {
            customer_id: "c1".into(),
            entity_id: "hotel".into(),
            verifier: "v".into(),
            nonce: "n".into(),
            at_ms: 1_000,
            via_portal: true,
            then_rule_json: None,
        },
    }
}

/// Customer c1 signs in: a session under the hash `[7; 32]`, stamped with epoch 0 (the apply
/// sets the customer's own).
fn c1_signs_in() -> StateChange {
    StateChange::PutSession {
        token_hash: vec![7; 32],
        session: SessionRecord {
            email: "one@example.com".into(),
            customer_id: "c1".into(),
            epoch: 0,
            csrf: "x".into(),
            created_ms: 1_000,
            expires_ms: 9_000,
        },
    }
}

/// A data group where customer c1's event e1 made command `cmd-e1`.
async fn with_command_e1() -> anyhow::Result<Store> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    s.apply(vec![ingest("e1", 100)]).await?;
    Ok(s)
}

/// An attempt of `cmd-e1` at `at_ms` that failed (with `error`), and what comes next.
fn attempt_on_e1(
    at_ms: i64,
    status_code: Option<u16>,
    error: Option<String>,
    next: AttemptNext,
) -> DeliveryUpdate {
    DeliveryUpdate::Attempted {
        command_id: "cmd-e1".into(),
        attempt: AttemptRecord {
            at_ms,
            status_code,
            error,
            duration_ms: 7,
        },
        next,
    }
}

#[tokio::test]
async fn a_session_belongs_to_its_customers_current_epoch() -> anyhow::Result<()> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    // "Sign out everywhere", then a sign-in made by a node that could not read the epoch.
    s.apply(vec![StateChange::EndSessions {
        customer_id: "c1".into(),
    }])
    .await?;
    s.apply(vec![c1_signs_in()]).await?;
    let customer = s.reader.customer("c1")?.expect("c1");
    assert_eq!(customer.session_epoch, 1);
    assert_eq!(s.reader.session(&[7; 32])?.map(|x| x.epoch), Some(1));
    Ok(())
}

#[tokio::test]
async fn a_result_proposed_again_is_recorded_once() -> anyhow::Result<()> {
    let mut s = with_command_e1().await?;
    let failed = |at_ms: i64| {
        attempt_on_e1(
            at_ms,
            Some(503),
            Some("target answered 503".into()),
            AttemptNext::RetryAt(at_ms + 5_000),
        )
    };
    // The delivery worker proposes a batch again when its proposal failed; one that timed
    // out may have been committed too: in one entry, then in a later one.
    s.apply(vec![StateChange::RecordDeliveries(vec![
        failed(200),
        failed(200),
    ])])
    .await?;
    s.apply(vec![StateChange::RecordDeliveries(vec![failed(200)])])
        .await?;
    let rec = s.reader.outbox("cmd-e1")?.expect("kept");
    assert_eq!(rec.attempts.len(), 1);
    assert_eq!(rec.next_due_ms, Some(5_200));
    assert_eq!(s.reader.due(i64::MAX, usize::MAX)?.len(), 1);
    // The next attempt (another time) is recorded.
    s.apply(vec![StateChange::RecordDeliveries(vec![failed(5_300)])])
        .await?;
    let rec = s.reader.outbox("cmd-e1")?.expect("kept");
    assert_eq!(rec.attempts.len(), 2);
    assert_eq!(s.reader.due(i64::MAX, usize::MAX)?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn replays_are_bounded_and_attempt_errors_capped() -> anyhow::Result<()> {
    let mut s = with_command_e1().await?;
    let fail = |at_ms: i64| {
        StateChange::RecordDeliveries(vec![attempt_on_e1(
            at_ms,
            None,
            Some("é".repeat(10_000)),
            AttemptNext::Exhausted,
        )])
    };
    let replay = |at_ms: i64| StateChange::Replay {
        command_id: "cmd-e1".into(),
        at_ms,
    };
    let mut replays = 0;
    for i in 0..200 {
        s.apply(vec![fail(200 + i)]).await?;
        let out = s.apply(vec![replay(300 + i)]).await?;
        if out[0] != ChangeOutcome::Done {
            assert!(rejected(&out[0], ErrorCode::Conflict), "{out:?}");
            break;
        }
        replays += 1;
    }
    assert_eq!(replays, custos_api::limits::MAX_ATTEMPTS_PER_COMMAND - 1);
    let rec = s.reader.outbox("cmd-e1")?.expect("kept");
    assert_eq!(
        rec.attempts.len(),
        custos_api::limits::MAX_ATTEMPTS_PER_COMMAND
    );
    assert!(rec
        .attempts
        .iter()
        .all(|a| a.error.as_ref().is_some_and(|e| e.len()
            <= custos_api::limits::MAX_ATTEMPT_ERROR_LEN
            && e.starts_with('é'))));
    Ok(())
}

#[tokio::test]
async fn a_failed_delivery_of_withdrawn_consent_is_not_replayed() -> anyhow::Result<()> {
    let failed = || {
        StateChange::RecordDeliveries(vec![attempt_on_e1(
            200,
            None,
            Some("refused".into()),
            AttemptNext::Exhausted,
        )])
    };
    let replay = || StateChange::Replay {
        command_id: "cmd-e1".into(),
        at_ms: 300,
    };
    let refused = |s: &Store, out: &[ChangeOutcome], why: &str| -> anyhow::Result<()> {
        assert!(rejected(&out[0], ErrorCode::Conflict), "{out:?}");
        assert!(format!("{out:?}").contains(why), "{out:?}");
        assert_eq!(
            s.reader.outbox("cmd-e1")?.expect("kept").state,
            DeliveryState::Failed
        );
        Ok(())
    };
    // The hotel linked again as another account: the command is addressed to the first.
    let mut s = with_command_e1().await?;
    s.apply(vec![failed(), link("c1", "hotel", "g2")]).await?;
    let out = s.apply(vec![replay()]).await?;
    refused(&s, &out, "linked another account at hotel")?;
    // Unlinked.
    let mut s = with_command_e1().await?;
    s.apply(vec![
        failed(),
        StateChange::Unlink {
            customer_id: "c1".into(),
            entity_id: "hotel".into(),
            at_ms: 250,
        },
    ])
    .await?;
    let out = s.apply(vec![replay()]).await?;
    refused(&s, &out, "no longer links hotel")?;
    // The entity its event came from unlinked.
    let mut s = with_command_e1().await?;
    s.apply(vec![
        failed(),
        StateChange::Unlink {
            customer_id: "c1".into(),
            entity_id: "airline".into(),
            at_ms: 250,
        },
    ])
    .await?;
    let out = s.apply(vec![replay()]).await?;
    refused(&s, &out, "no longer links airline, whose event made it")?;
    // Its rule deleted.
    let mut s = with_command_e1().await?;
    let rule_id = s.reader.outbox("cmd-e1")?.expect("kept").command.rule_id;
    s.apply(vec![
        failed(),
        StateChange::DeleteRule {
            customer_id: "c1".into(),
            rule_id,
            at_ms: 250,
        },
    ])
    .await?;
    let out = s.apply(vec![replay()]).await?;
    refused(&s, &out, "was deleted")?;
    // Consent unchanged: replayed.
    let mut s = with_command_e1().await?;
    s.apply(vec![failed()]).await?;
    assert_eq!(s.apply(vec![replay()]).await?[0], ChangeOutcome::Done);
    Ok(())
}

#[tokio::test]
async fn a_pending_delivery_waiting_for_a_retry_can_be_retried_now() -> anyhow::Result<()> {
    let mut s = with_command_e1().await?;
    let replay = |at_ms: i64| StateChange::Replay {
        command_id: "cmd-e1".into(),
        at_ms,
    };
    // Due at once after the ingest: nothing to bring forward.
    let out = s.apply(vec![replay(150)]).await?;
    assert!(rejected(&out[0], ErrorCode::Conflict), "{out:?}");
    // The first attempt failed; the next retry is an hour away.
    s.apply(vec![StateChange::RecordDeliveries(vec![attempt_on_e1(
        200,
        Some(503),
        None,
        AttemptNext::RetryAt(3_600_200),
    )])])
    .await?;
    let out = s.apply(vec![replay(300)]).await?;
    assert_eq!(out[0], ChangeOutcome::Done, "{out:?}");
    let rec = s.reader.outbox("cmd-e1")?.expect("kept");
    assert_eq!(rec.state, DeliveryState::Pending);
    assert_eq!(rec.next_due_ms, Some(300));
    // Due now, and only once: the hour-away retry is gone from the schedule.
    let due: Vec<String> = s
        .reader
        .due(4_000_000, 10)?
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(due, vec!["cmd-e1".to_owned()]);
    Ok(())
}

#[tokio::test]
async fn pending_deliveries_of_withdrawn_consent_are_cancelled_at_once() -> anyhow::Result<()> {
    let waiting = || {
        StateChange::RecordDeliveries(vec![attempt_on_e1(
            200,
            Some(503),
            None,
            AttemptNext::RetryAt(3_600_200),
        )])
    };
    let state = |s: &Store| -> anyhow::Result<(DeliveryState, Option<String>, usize)> {
        let rec = s.reader.outbox("cmd-e1")?.expect("kept");
        Ok((rec.state, rec.reason, s.reader.due(i64::MAX, 10)?.len()))
    };
    // Cancelled for `why`, with nothing left to send.
    let cancelled = |s: &Store, why: &str| -> anyhow::Result<()> {
        assert_eq!(
            state(s)?,
            (DeliveryState::Cancelled, Some(why.to_owned()), 0)
        );
        Ok(())
    };
    let unlink_hotel = |at_ms: i64| StateChange::Unlink {
        customer_id: "c1".into(),
        entity_id: "hotel".into(),
        at_ms,
    };
    // Unlinked while waiting an hour for a retry, then linked again before it: the retry must
    // not go out (the customer withdrew it; its next attempt would have found a link).
    let mut s = with_command_e1().await?;
    s.apply(vec![waiting()]).await?;
    s.apply(vec![unlink_hotel(300)]).await?;
    s.apply(vec![link("c1", "hotel", "g")]).await?;
    cancelled(&s, "the customer unlinked hotel")?;
    // The entity the command's event came from unlinked: what the command carries came from
    // it, and the customer stopped the vault acting on it (before, only the target's unlink
    // cancelled).
    let mut s = with_command_e1().await?;
    s.apply(vec![waiting()]).await?;
    s.apply(vec![StateChange::Unlink {
        customer_id: "c1".into(),
        entity_id: "airline".into(),
        at_ms: 300,
    }])
    .await?;
    cancelled(&s, "the customer unlinked airline")?;
    // An attempt under way at the unlink that succeeded is recorded as what happened; one
    // that failed does not bring the delivery back.
    let mut s = with_command_e1().await?;
    s.apply(vec![unlink_hotel(150)]).await?;
    s.apply(vec![waiting()]).await?;
    assert_eq!(state(&s)?.0, DeliveryState::Cancelled);
    assert_eq!(s.reader.outbox("cmd-e1")?.expect("kept").attempts.len(), 0);
    s.apply(vec![StateChange::RecordDeliveries(vec![attempt_on_e1(
        201,
        Some(200),
        None,
        AttemptNext::Delivered,
    )])])
    .await?;
    let rec = s.reader.outbox("cmd-e1")?.expect("kept");
    assert_eq!(
        (rec.state, rec.attempts.len()),
        (DeliveryState::Delivered, 1)
    );
    // Linked again as another account: the commands addressed to the first one are cancelled;
    // linked again as the same account (say, new tokens): they are kept.
    let mut s = with_command_e1().await?;
    s.apply(vec![waiting()]).await?;
    s.apply(vec![link("c1", "hotel", "g")]).await?;
    assert_eq!(state(&s)?.0, DeliveryState::Pending);
    // What an export lists as pending: the customer's own, found from the due index.
    assert_eq!(s.reader.pending_of("c1", 10)?, vec!["cmd-e1".to_owned()]);
    assert!(s.reader.pending_of("c2", 10)?.is_empty());
    s.apply(vec![link("c1", "hotel", "g2")]).await?;
    cancelled(&s, "the customer linked another account at hotel")?;
    // The rule deleted: its waiting commands go with it; another rule's stay.
    let mut s = with_command_e1().await?;
    s.apply(vec![waiting()]).await?;
    s.apply(vec![
        rule("c1", "r2"),
        StateChange::DeleteRule {
            customer_id: "c1".into(),
            rule_id: "r2".into(),
            at_ms: 250,
        },
    ])
    .await?;
    assert_eq!(state(&s)?.0, DeliveryState::Pending);
    s.apply(vec![StateChange::DeleteRule {
        customer_id: "c1".into(),
        rule_id: "r1".into(),
        at_ms: 300,
    }])
    .await?;
    cancelled(&s, "the customer deleted rule r1")?;
    Ok(())
}

#[tokio::test]
async fn a_linking_ordered_after_an_erasure_keeps_nothing() -> anyhow::Result<()> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    let out = s
        .apply(vec![
            StateChange::EraseCustomer {
                customer_id: "c1".into(),
            },
            c1_begins_linking(),
        ])
        .await?;
    assert!(rejected(&out[1], ErrorCode::NotFound), "{out:?}");
    assert!(s.tagged(keys::PENDING_LINK)?.is_empty());
    assert!(s.tagged(keys::PENDING_OF)?.is_empty());
    Ok(())
}

#[tokio::test]
async fn dismissals_are_capped_per_customer() -> anyhow::Result<()> {
    let mut s = store(1)?;
    s.apply(setup()).await?;
    let dismiss = |n: usize| StateChange::Dismiss {
        customer_id: "c1".into(),
        template: format!("{n:064x}"),
    };
    let max = custos_api::limits::MAX_DISMISSALS_PER_CUSTOMER;
    let out = s.apply((0..max).map(dismiss).collect()).await?;
    assert!(out.iter().all(|o| *o == ChangeOutcome::Done));
    let out = s.apply(vec![dismiss(max), dismiss(0)]).await?;
    assert!(rejected(&out[0], ErrorCode::LimitReached), "{out:?}");
    assert_eq!(
        out[1],
        ChangeOutcome::Done,
        "dismissing one again is no new entry"
    );
    Ok(())
}

#[tokio::test]
async fn oauth_linkings_waiting_are_capped_per_customer_and_expire_at_their_ttl(
) -> anyhow::Result<()> {
    use custos_api::oauth::{LINK_TTL_MS, MAX_PENDING_LINKS};
    let mut s = store(1)?;
    s.apply(setup()).await?;
    let begin = |n: u8, at_ms: i64| StateChange::BeginLink {
        state_hash: vec![n; 32],
        pending: PendingLink {
            customer_id: "c1".into(),
            entity_id: "hotel".into(),
            verifier: format!("v{n}"),
            nonce: format!("n{n}"),
            at_ms,
            via_portal: false,
            then_rule_json: None,
        },
    };
    let take = |n: u8| StateChange::TakeLink {
        state_hash: vec![n; 32],
    };
    for n in 0..10u8 {
        s.apply(vec![begin(n, 1_000 + i64::from(n))]).await?;
    }
    // The two oldest were dropped to keep the cap; the newest are there, and taken once.
    for n in 0..2u8 {
        let out = s.apply(vec![take(n)]).await?;
        assert!(rejected(&out[0], ErrorCode::NotFound), "{n}: {out:?}");
    }
    let out = s.apply(vec![take(9), take(9)]).await?;
    assert!(matches!(&out[0], ChangeOutcome::LinkTaken(p) if p.verifier == "v9"));
    assert!(rejected(&out[1], ErrorCode::NotFound));
    assert_eq!(MAX_PENDING_LINKS, 8);
    // Past their TTL, the rest go at the next prune, long before retention.
    let out = s
        .apply(vec![StateChange::Prune {
            before_ms: 0,
            now_ms: 1_100 + LINK_TTL_MS,
            limit: 100,
        }])
        .await?;
    assert_eq!(out[0], ChangeOutcome::Pruned(7));
    for n in 2..9u8 {
        let out = s.apply(vec![take(n)]).await?;
        assert!(rejected(&out[0], ErrorCode::NotFound), "{n}: {out:?}");
    }
    Ok(())
}
