//! Fixtures shared by the state-machine tests and the apply benchmark (which includes this
//! file by path).

#![allow(dead_code)]

use custos_raft::records::*;
use custos_raft::{StateChange, TypeConfig};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

/// A customer record with a fixed token hash.
pub fn customer(id: &str, email: Option<&str>) -> CustomerRecord {
    CustomerRecord {
        id: id.into(),
        created_ms: 0,
        token_hash: vec![1; 32],
        email: email.map(str::to_owned),
        session_epoch: 0,
    }
}

/// Links `customer` to `entity` as `subject`.
pub fn link(customer: &str, entity: &str, subject: &str) -> StateChange {
    StateChange::Link {
        customer_id: customer.into(),
        link: LinkRecord {
            entity_id: entity.into(),
            subject: subject.into(),
            linked_ms: 10,
            sealed_token: None,
            sealed_refresh_token: None,
            claim: format!("int_{customer}_{entity}"),
        },
        intent: None,
    }
}

/// Saves rule `id` of `customer`: the airline's `flight.delayed` holds a room at the hotel.
pub fn rule(customer: &str, id: &str) -> StateChange {
    StateChange::PutRule {
        customer_id: customer.into(),
        rule: RuleRecord {
            id: id.into(),
            name: id.into(),
            when_entity: "airline".into(),
            when_event_type: "flight.delayed".into(),
            condition: None,
            then_entity: "hotel".into(),
            then_command_type: "room.hold".into(),
            data_json: "{}".into(),
            created_ms: 5,
        },
    }
}

/// The changes as log entries, numbered on from `index`.
pub fn entries(index: &mut u64, changes: Vec<StateChange>) -> Vec<Entry<TypeConfig>> {
    changes
        .into_iter()
        .map(|c| {
            *index += 1;
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), *index),
                payload: EntryPayload::Normal(c),
            }
        })
        .collect()
}

/// The airline's `flight.delayed` event `event_id` about `subject`, routed to `customer`, and
/// the one command its rule `r1` makes: a room hold at the hotel for `hotel_subject`.
pub fn one_command(
    event_id: &str,
    customer: &str,
    subject: &str,
    hotel_subject: &str,
    cloudevent_json: String,
    data_json: &str,
    at_ms: i64,
) -> StateChange {
    StateChange::Ingest(Ingest {
        event: EventRecord {
            id: event_id.into(),
            source: "airline".into(),
            event_type: "flight.delayed".into(),
            subject: subject.into(),
            cloudevent_json,
        },
        customer_id: Some(customer.into()),
        commands: vec![CommandRecord {
            id: format!("cmd-{event_id}"),
            customer_id: customer.into(),
            target: "hotel".into(),
            command_type: "room.hold".into(),
            subject: hotel_subject.into(),
            data_json: data_json.into(),
            event_id: event_id.into(),
            event_source: "airline".into(),
            rule_id: "r1".into(),
            created_ms: at_ms,
        }],
        ignored_reason: None,
        rule_failures: Vec::new(),
        at_ms,
    })
}
