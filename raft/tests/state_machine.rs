//! The state machine's own rules: dedup, outbox transitions, retention pruning, and a
//! snapshot carrying real state from one store (and group) into another.

use std::sync::Arc;

use custos_raft::records::*;
use custos_raft::state_machine::NoObserver;
use custos_raft::{ChangeOutcome, StateChange, StateMachineStore, StateReader, TypeConfig};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};

struct Store {
    _dir: tempfile::TempDir,
    sm: StateMachineStore,
    reader: StateReader,
    index: u64,
}

fn store(group: u32) -> anyhow::Result<Store> {
    let dir = tempfile::tempdir()?;
    let db = custos_raft::open_db(dir.path())?;
    Ok(Store {
        sm: StateMachineStore::new(
            db.clone(),
            group,
            Arc::new(NoObserver),
            dir.path().join("snapshots"),
        ),
        reader: StateReader::new(db, group),
        _dir: dir,
        index: 0,
    })
}

impl Store {
    async fn apply(&mut self, changes: Vec<StateChange>) -> anyhow::Result<Vec<ChangeOutcome>> {
        let entries: Vec<Entry<TypeConfig>> = changes
            .into_iter()
            .map(|c| {
                self.index += 1;
                Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
                    payload: EntryPayload::Normal(c),
                }
            })
            .collect();
        Ok(self.sm.apply(entries).await?)
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
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        previous_secret: None,
        previous_valid_until_ms: 0,
        created_ms: 0,
        oauth: None,
    }
}

fn setup() -> Vec<StateChange> {
    vec![
        StateChange::RegisterEntity(entity("airline")),
        StateChange::RegisterEntity(entity("hotel")),
        StateChange::CreateCustomer {
            customer: CustomerRecord {
                id: "c1".into(),
                created_ms: 0,
                token_hash: vec![1; 32],
                email: None,
            },
        },
        StateChange::Link {
            customer_id: "c1".into(),
            link: LinkRecord {
                entity_id: "airline".into(),
                subject: "ff".into(),
                linked_ms: 10,
                sealed_token: None,
            },
        },
        StateChange::Link {
            customer_id: "c1".into(),
            link: LinkRecord {
                entity_id: "hotel".into(),
                subject: "g".into(),
                linked_ms: 10,
                sealed_token: None,
            },
        },
    ]
}

fn ingest(event_id: &str, at_ms: i64) -> StateChange {
    StateChange::Ingest(Ingest {
        event: EventRecord {
            id: event_id.into(),
            source: "airline".into(),
            event_type: "flight.delayed".into(),
            subject: "ff".into(),
            cloudevent_json: "{}".into(),
        },
        customer_id: Some("c1".into()),
        commands: vec![CommandRecord {
            id: format!("cmd-{event_id}"),
            customer_id: "c1".into(),
            target: "hotel".into(),
            command_type: "room.hold".into(),
            subject: "g".into(),
            data_json: "{}".into(),
            event_id: event_id.into(),
            event_source: "airline".into(),
            rule_id: "r1".into(),
            created_ms: at_ms,
        }],
        ignored_reason: None,
        at_ms,
    })
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

#[tokio::test]
async fn duplicates_in_one_batch_are_caught_and_links_are_unique() -> anyhow::Result<()> {
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
    // Another customer cannot take the same subject at the same entity.
    let out = s
        .apply(vec![
            StateChange::CreateCustomer {
                customer: CustomerRecord {
                    id: "c2".into(),
                    created_ms: 0,
                    token_hash: vec![2; 32],
                    email: None,
                },
            },
            StateChange::Link {
                customer_id: "c2".into(),
                link: LinkRecord {
                    entity_id: "airline".into(),
                    subject: "ff".into(),
                    linked_ms: 0,
                    sealed_token: None,
                },
            },
        ])
        .await?;
    assert!(matches!(
        &out[1],
        ChangeOutcome::Rejected {
            code: custos_api::ErrorCode::Conflict,
            ..
        }
    ));
    assert_eq!(
        s.reader.customer_for_subject("airline", "ff")?.as_deref(),
        Some("c1")
    );
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
    let out = s
        .apply(vec![StateChange::Prune {
            before_ms: 10_000,
            limit: 1000,
        }])
        .await?;
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
            before_ms: i64::MAX,
            limit: 1,
        }])
        .await?;
    assert!(matches!(out[0], ChangeOutcome::Pruned(1)));
    Ok(())
}

#[tokio::test]
async fn a_snapshot_moves_real_state_into_another_store_and_group() -> anyhow::Result<()> {
    let mut a = store(3)?;
    a.apply(setup()).await?;
    a.apply(vec![ingest("e1", 100)]).await?;
    let built = a.sm.get_snapshot_builder().await.build_snapshot().await?;
    // As openraft does: the data a follower receives comes from the current snapshot.
    let snap =
        a.sm.get_current_snapshot()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no current snapshot"))?;
    assert_eq!(snap.meta, built.meta);
    // Writes after the snapshot are not in it.
    a.apply(vec![ingest("e2", 200)]).await?;

    let mut b = store(9)?;
    // Something that must disappear when the snapshot is installed.
    b.apply(vec![StateChange::RegisterEntity(entity("stale"))])
        .await?;
    b.sm.install_snapshot(&snap.meta, snap.snapshot).await?;
    assert!(b.reader.entity("stale")?.is_none());
    assert!(b.reader.entity("hotel")?.is_some());
    assert_eq!(
        b.reader.customer_for_subject("airline", "ff")?.as_deref(),
        Some("c1")
    );
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
    assert_eq!(current, Some(snap.meta));
    Ok(())
}

#[tokio::test]
async fn erasing_a_customer_removes_everything_held_about_it_and_nothing_else() -> anyhow::Result<()>
{
    let mut s = store(1)?;
    s.apply(setup()).await?;
    s.apply(vec![
        StateChange::CreateAccount {
            account: AccountRecord {
                email: "two@example.com".into(),
                customer_id: "c2".into(),
                password_hash: "$argon2id$...".into(),
                session_epoch: 0,
                created_ms: 0,
            },
            customer: CustomerRecord {
                id: "c2".into(),
                created_ms: 0,
                token_hash: vec![2; 32],
                email: Some("two@example.com".into()),
            },
        },
        StateChange::Link {
            customer_id: "c2".into(),
            link: LinkRecord {
                entity_id: "airline".into(),
                subject: "ff2".into(),
                linked_ms: 10,
                sealed_token: Some(vec![9; 40]),
            },
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
    let pruned = s
        .apply(vec![StateChange::Prune {
            before_ms: 900,
            limit: 1000,
        }])
        .await?;
    assert!(
        matches!(pruned[0], ChangeOutcome::Pruned(n) if n > 0),
        "{pruned:?}"
    );
    s.apply(vec![
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
        },
        StateChange::BeginLink {
            state_hash: vec![8; 32],
            pending: PendingLink {
                customer_id: "c1".into(),
                entity_id: "hotel".into(),
                verifier: "v".into(),
                at_ms: 1_000,
                via_portal: true,
            },
        },
    ])
    .await?;
    assert!(
        s.reader.outbox("cmd-aged")?.is_some(),
        "pending: kept by pruning"
    );
    assert!(s.reader.session(&[7; 32])?.is_some());
    // An event and the erasure in one apply batch: the erasure sees the batch's own writes.
    let out = s
        .apply(vec![
            ingest("pending", 2_000),
            StateChange::EraseCustomer {
                customer_id: "c1".into(),
            },
        ])
        .await?;
    assert_eq!(out[1], ChangeOutcome::Done);
    let r = &s.reader;
    assert!(r.customer("c1")?.is_none());
    assert!(r.links("c1")?.is_empty());
    assert!(r.activity("c1", None, 100)?.0.is_empty());
    assert!(r.outbox("cmd-delivered")?.is_none());
    assert!(r.outbox("cmd-pending")?.is_none());
    assert!(r.customer_by_token(&[1; 32])?.is_none());
    assert!(r.customer_for_subject("airline", "ff")?.is_none());
    assert!(r.customer_for_subject("hotel", "g")?.is_none());
    assert!(r.engagements(Some("c1"))?.is_empty());
    assert!(r.dismissed("c1")?.is_empty());
    assert!(
        r.outbox("cmd-aged")?.is_none(),
        "found without its activity line"
    );
    assert!(r.session(&[7; 32])?.is_none());
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
    assert_eq!(
        r.customer_for_subject("airline", "ff2")?.as_deref(),
        Some("c2")
    );
    assert!(r.account("two@example.com")?.is_some());
    // Erasing c2 removes its portal account too; erasing again is "not found".
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
    assert!(s.reader.account("two@example.com")?.is_none());
    Ok(())
}
