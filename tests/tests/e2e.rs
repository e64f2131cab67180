//! End-to-end: real `custos` processes and real HTTP receivers.

use std::time::Duration;

use custos_api::client::Client;
use custos_api::types::*;
use custos_api::webhook::{self, Secret, SignedHeaders};
use custos_api::{CloudEvent, ErrorCode};
use custos_tests::node::{Node, NodeOptions};
use custos_tests::poll;
use custos_tests::receiver::Receiver;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

#[path = "e2e/portal.rs"]
mod portal;

#[path = "e2e/oidc.rs"]
mod oidc;

/// A node with an airline, a hotel (with a receiver) and a car-rental company registered, one
/// customer linked to the airline and hotel, and the delay -> room-hold rule.
struct World {
    node: Node,
    hotel_rx: Receiver,
    airline: Secret,
    hotel: Secret,
    car: Secret,
    customer: CustomerCreated,
    rule: Rule,
}

fn type_spec(name: &str, schema: Option<Value>) -> TypeSpec {
    TypeSpec {
        type_name: name.into(),
        schema,
    }
}

async fn register(
    admin: &Client,
    id: &str,
    url: &str,
    events: Vec<TypeSpec>,
    commands: Vec<TypeSpec>,
) -> anyhow::Result<Secret> {
    let e = admin
        .register_entity(&RegisterEntity {
            id: id.into(),
            name: format!("{id} Inc."),
            command_url: url.into(),
            event_types: events,
            command_types: commands,
            oauth: None,
        })
        .await?;
    let secret = e.secret.ok_or_else(|| anyhow::anyhow!("no secret"))?;
    anyhow::ensure!(secret.starts_with("whsec_"));
    Secret::parse(&secret).map_err(|e| anyhow::anyhow!("{e}"))
}

fn delay_rule() -> RuleSpec {
    RuleSpec {
        name: "Hold my room when my flight is late".into(),
        when: Trigger {
            entity: "airline".into(),
            event_type: "flight.delayed".into(),
            condition: Some("data.delay_minutes > 60".into()),
        },
        then: Action {
            entity: "hotel".into(),
            command_type: "room.hold".into(),
            data: json!({"arrival": "data.new_arrival", "flight": "data.flight"}),
        },
    }
}

async fn world_with(options: NodeOptions, hotel_rx: Receiver) -> anyhow::Result<World> {
    // Without private targets, loopback IP literals are refused when registered: register the
    // loopback receivers by a name instead (the resolver's guard then refuses to deliver).
    let private = options.allow_private_targets;
    let by_name = |u: &str| {
        if private {
            u.to_owned()
        } else {
            u.replace("127.0.0.1", "localhost")
        }
    };
    let node = Node::start(options).await?;
    let admin = node.admin();
    let airline = register(
        &admin,
        "airline",
        &by_name("http://127.0.0.1:9/unused"),
        vec![
            type_spec(
                "flight.delayed",
                Some(json!({"type": "object", "required": ["delay_minutes", "flight"],
                    "properties": {"delay_minutes": {"type": "integer"}, "flight": {"type": "string"}}})),
            ),
            type_spec("flight.boarded", None),
        ],
        vec![],
    )
    .await?;
    let hotel = register(
        &admin,
        "hotel",
        &by_name(&hotel_rx.url),
        vec![],
        vec![type_spec(
            "room.hold",
            Some(json!({"type": "object", "required": ["arrival", "flight"],
                "properties": {"arrival": {"type": "string"}, "flight": {"type": "string"}},
                "additionalProperties": false})),
        )],
    )
    .await?;
    let car = register(
        &admin,
        "car-rental",
        &by_name("http://127.0.0.1:9/unused"),
        vec![type_spec("car.returned", None)],
        vec![],
    )
    .await?;
    let customer = admin.create_customer().await?;
    admin
        .link(
            &customer.id,
            &LinkRequest {
                entity_id: "airline".into(),
                subject: "FF-1234".into(),
            },
        )
        .await?;
    admin
        .link(
            &customer.id,
            &LinkRequest {
                entity_id: "hotel".into(),
                subject: "guest-77".into(),
            },
        )
        .await?;
    let me = admin.with_token(&customer.token);
    let rule = me.create_rule(&customer.id, &delay_rule()).await?;
    Ok(World {
        node,
        hotel_rx,
        airline,
        hotel,
        car,
        customer,
        rule,
    })
}

async fn world() -> anyhow::Result<World> {
    world_with(NodeOptions::default(), Receiver::start(vec![], 200)?).await
}

fn delayed(id: &str, subject: &str, minutes: i64) -> CloudEvent {
    let mut e = CloudEvent::new(id, "airline", "flight.delayed");
    e.subject = Some(subject.into());
    e.time = Some("2026-11-28T18:00:00Z".into());
    e.data = Some(json!({"delay_minutes": minutes, "flight": "XY123",
        "new_arrival": "2026-11-28T23:40:00Z"}));
    e
}

async fn delivery_status(
    admin: &Client,
    id: &str,
    want: DeliveryStatus,
) -> anyhow::Result<Delivery> {
    poll::until(&format!("delivery {id} {want:?}"), WAIT, || async {
        admin.delivery(id).await.ok().filter(|d| d.status == want)
    })
    .await
}

#[tokio::test]
async fn airline_delay_becomes_a_signed_room_hold_at_the_hotel() -> anyhow::Result<()> {
    let w = world().await?;
    let receipt = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("evt-1", "FF-1234", 95))
        .await?;
    assert_eq!(receipt.status, EventStatus::Accepted, "{receipt:?}");
    assert_eq!(receipt.commands.len(), 1);
    let cmd_id = &receipt.commands[0];

    let got = w.hotel_rx.wait_delivered(1, WAIT).await?;
    let r = &got[0];
    assert_eq!(&r.webhook_id, cmd_id);
    assert_eq!(r.content_type, "application/cloudevents+json");
    // The signature verifies with the hotel's secret, and only with it.
    let headers = SignedHeaders {
        id: Some(&r.webhook_id),
        timestamp: Some(&r.timestamp),
        signature: Some(&r.signature),
    };
    webhook::verify(&[&w.hotel], headers, &r.body, webhook::unix_now())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(webhook::verify(&[&w.airline], headers, &r.body, webhook::unix_now()).is_err());
    let body = r.json();
    assert_eq!(body["specversion"], "1.0");
    assert_eq!(body["id"], json!(cmd_id));
    assert_eq!(body["type"], "room.hold");
    assert_eq!(
        body["subject"], "guest-77",
        "addressed with the subject at the hotel"
    );
    assert_eq!(
        body["data"],
        json!({"arrival": "2026-11-28T23:40:00Z", "flight": "XY123"}),
        "exactly the mapped data"
    );
    assert_eq!(body["custoseventid"], "evt-1");
    assert_eq!(body["custoseventsource"], "airline");
    assert_eq!(body["custosrule"], json!(w.rule.id));

    // A delay under the threshold triggers nothing and says why.
    let small = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("evt-2", "FF-1234", 20))
        .await?;
    assert_eq!(small.status, EventStatus::Ignored);
    // The airline is not told about the customer's rules; the customer's activity says why.
    assert_eq!(small.reason.as_deref(), Some(IGNORED_BY_RULES));
    let me = w.node.admin().with_token(&w.customer.token);
    let page = me.activity(&w.customer.id, 50, None).await?;
    assert!(page.items.iter().any(|i| matches!(&i.kind,
        ActivityKind::EventReceived { event_id, reason: Some(why), .. }
            if event_id == "evt-2" && why.contains("condition is false"))));

    // The activity shows event, match and each attempt, newest first.
    let me = w.node.admin().with_token(&w.customer.token);
    let d = delivery_status(&w.node.admin(), cmd_id, DeliveryStatus::Delivered).await?;
    assert_eq!(d.attempts.len(), 1);
    let page = me.activity(&w.customer.id, 50, None).await?;
    let kinds: Vec<String> = page
        .items
        .iter()
        .map(|i| {
            serde_json::to_value(i)
                .map(|v| v["kind"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default()
        })
        .collect();
    for k in [
        "event_received",
        "rule_matched",
        "delivery_attempt",
        "rule_saved",
        "linked",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    assert!(page.items.iter().any(|i| matches!(&i.kind,
        ActivityKind::DeliveryAttempt { command_id, status: DeliveryStatus::Delivered, .. } if command_id == cmd_id)));
    // Paging: one item at a time walks the same list.
    let first = me.activity(&w.customer.id, 1, None).await?;
    let second = me
        .activity(&w.customer.id, 1, first.next.as_deref())
        .await?;
    assert_eq!(first.items[0], page.items[0]);
    assert_eq!(second.items[0], page.items[1]);
    Ok(())
}

#[tokio::test]
async fn unlinked_entities_and_unnamed_events_are_ignored_and_duplicates_deduplicated(
) -> anyhow::Result<()> {
    let w = world().await?;
    let anon = w.node.anonymous();
    // The car-rental company is registered but this customer never linked it.
    let mut car = CloudEvent::new("car-1", "car-rental", "car.returned");
    car.subject = Some("FF-1234".into());
    let r = anon.send_event(&w.car, &car).await?;
    assert_eq!(r.status, EventStatus::Ignored);
    assert!(r.commands.is_empty());
    // A linked entity's event that no rule names.
    let mut boarded = CloudEvent::new("b-1", "airline", "flight.boarded");
    boarded.subject = Some("FF-1234".into());
    let r = anon.send_event(&w.airline, &boarded).await?;
    assert_eq!(r.status, EventStatus::Ignored);
    assert_eq!(r.reason.as_deref(), Some(IGNORED_BY_RULES));

    // The same (source, id) twice: one command, delivered once, the same ids answered.
    let first = anon
        .send_event(&w.airline, &delayed("dup-1", "FF-1234", 120))
        .await?;
    let second = anon
        .send_event(&w.airline, &delayed("dup-1", "FF-1234", 120))
        .await?;
    assert_eq!(first.status, EventStatus::Accepted);
    assert_eq!(second.status, EventStatus::Duplicate);
    assert_eq!(first.commands, second.commands);
    w.hotel_rx.wait_delivered(1, WAIT).await?;
    delivery_status(
        &w.node.admin(),
        &first.commands[0],
        DeliveryStatus::Delivered,
    )
    .await?;
    assert_eq!(w.hotel_rx.received().len(), 1, "delivered exactly once");

    // The ignored events are in the customer's activity with their reason.
    let page = w.node.admin().activity(&w.customer.id, 50, None).await?;
    assert!(page.items.iter().any(|i| matches!(&i.kind,
        ActivityKind::EventReceived { event_id, status: EventStatus::Ignored, reason: Some(why), .. }
            if event_id == "b-1" && why.contains("no rule"))));
    Ok(())
}

#[tokio::test]
async fn failing_receiver_is_retried_until_it_succeeds() -> anyhow::Result<()> {
    let w = world_with(
        NodeOptions::default(),
        Receiver::start(vec![500, 503], 200)?,
    )
    .await?;
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("retry-1", "FF-1234", 90))
        .await?;
    let id = &r.commands[0];
    let d = delivery_status(&w.node.admin(), id, DeliveryStatus::Delivered).await?;
    assert_eq!(d.attempts.len(), 3);
    assert_eq!(d.attempts[0].status_code, Some(500));
    assert_eq!(d.attempts[1].status_code, Some(503));
    let got = w.hotel_rx.received();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|g| &g.webhook_id == id),
        "the same webhook-id on every retry"
    );
    Ok(())
}

#[tokio::test]
async fn retries_due_at_once_are_not_lost_while_their_attempt_is_recorded() -> anyhow::Result<()> {
    // Every retry due at once: the apply recording an attempt hands its retry over before the
    // attempt is finished on the worker's side. Delivered well before the outbox's periodic
    // reload (30 s) would find a retry that was dropped.
    let opts = NodeOptions {
        retry_schedule_secs: vec![0.0; 6],
        ..NodeOptions::default()
    };
    let w = world_with(opts, Receiver::start(vec![500, 503, 500, 503], 200)?).await?;
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("retry-now-1", "FF-1234", 90))
        .await?;
    let id = &r.commands[0];
    let d = poll::until(
        &format!("delivery {id} delivered"),
        Duration::from_secs(15),
        || async {
            w.node
                .admin()
                .delivery(id)
                .await
                .ok()
                .filter(|d| d.status == DeliveryStatus::Delivered)
        },
    )
    .await?;
    assert_eq!(d.attempts.len(), 5);
    assert_eq!(w.hotel_rx.received().len(), 5);
    Ok(())
}

#[tokio::test]
async fn gone_endpoint_is_disabled_and_can_be_replayed_after_reenabling() -> anyhow::Result<()> {
    let w = world_with(NodeOptions::default(), Receiver::start(vec![410], 200)?).await?;
    let admin = w.node.admin();
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("gone-1", "FF-1234", 90))
        .await?;
    let id = &r.commands[0];
    let d = delivery_status(&admin, id, DeliveryStatus::Failed).await?;
    assert_eq!(d.attempts.len(), 1);
    assert!(!admin.entity("hotel").await?.endpoint_enabled);
    let failed = admin.deliveries(DeliveryStatus::Failed).await?;
    assert!(
        failed.items.iter().any(|x| &x.command_id == id),
        "listed for the operator"
    );

    // Further commands to a disabled endpoint fail without an attempt.
    let r2 = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("gone-2", "FF-1234", 90))
        .await?;
    let d2 = delivery_status(&admin, &r2.commands[0], DeliveryStatus::Failed).await?;
    assert!(d2.attempts.is_empty());

    admin
        .update_entity(
            "hotel",
            &UpdateEntity {
                endpoint_enabled: Some(true),
                ..Default::default()
            },
        )
        .await?;
    admin.replay(id).await?;
    let d = delivery_status(&admin, id, DeliveryStatus::Delivered).await?;
    assert_eq!(d.attempts.len(), 2);
    let again = admin
        .replay(id)
        .await
        .expect_err("delivered cannot be replayed");
    assert_eq!(again.code(), Some(ErrorCode::Conflict));
    Ok(())
}

#[tokio::test]
async fn retries_are_exhausted_then_listed_as_failed() -> anyhow::Result<()> {
    let opts = NodeOptions {
        retry_schedule_secs: vec![0.0, 0.1],
        ..NodeOptions::default()
    };
    let w = world_with(opts, Receiver::start(vec![], 500)?).await?;
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("ex-1", "FF-1234", 90))
        .await?;
    let d = delivery_status(&w.node.admin(), &r.commands[0], DeliveryStatus::Failed).await?;
    assert_eq!(d.attempts.len(), 2);
    assert_eq!(d.reason.as_deref(), Some("retries exhausted"));
    Ok(())
}

#[tokio::test]
async fn unlinking_cancels_pending_deliveries() -> anyhow::Result<()> {
    let w = world_with(NodeOptions::default(), Receiver::start(vec![], 503)?).await?;
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("un-1", "FF-1234", 90))
        .await?;
    w.hotel_rx.wait_received(1, WAIT).await?;
    let me = w.node.admin().with_token(&w.customer.token);
    me.unlink(&w.customer.id, "hotel").await?;
    // Cancelled by the unlink itself, not when its next attempt finds no link: the customer
    // may link the hotel again before then, and the retry must not go out.
    let d = w.node.admin().delivery(&r.commands[0]).await?;
    assert_eq!(d.status, DeliveryStatus::Cancelled, "{d:?}");
    assert_eq!(d.reason.as_deref(), Some("the customer unlinked hotel"));
    assert_eq!(d.next_attempt_at, None);
    // The airline's events about this customer no longer produce commands for the hotel.
    let r2 = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("un-2", "FF-1234", 90))
        .await?;
    assert_eq!(r2.status, EventStatus::Ignored);
    w.node
        .admin()
        .link(
            &w.customer.id,
            &LinkRequest {
                entity_id: "hotel".into(),
                subject: "guest-77".into(),
            },
        )
        .await?;
    let d = w.node.admin().delivery(&r.commands[0]).await?;
    assert_eq!(d.status, DeliveryStatus::Cancelled, "linked again: {d:?}");
    Ok(())
}

/// A world whose hotel holds each command 2 s, with one attempt under way to it. The node
/// waits out one drain (the test nodes' 5 s delivery timeout and 1 s) after it took its
/// groups over at start before it answers an unlink or an erasure; this waits past it, so
/// only the attempt under way can make them wait, which is what the tests check.
async fn world_with_an_attempt_under_way(event_id: &str) -> anyhow::Result<World> {
    let hotel_rx = Receiver::start(vec![], 200)?;
    hotel_rx.set_hold(Duration::from_secs(2));
    let w = world_with(NodeOptions::default(), hotel_rx).await?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    w.node
        .anonymous()
        .send_event(&w.airline, &delayed(event_id, "FF-1234", 90))
        .await?;
    w.hotel_rx.wait_received(1, WAIT).await?;
    Ok(w)
}

#[tokio::test]
async fn an_unlink_is_answered_once_the_attempt_already_sending_has_finished() -> anyhow::Result<()>
{
    let w = world_with_an_attempt_under_way("slow-1").await?;
    let me = w.node.admin().with_token(&w.customer.token);
    me.unlink(&w.customer.id, "hotel").await?;
    // Nothing is sent to the hotel for this customer after the unlink is acknowledged, not
    // even the end of an attempt that began before it.
    assert!(
        w.hotel_rx.first_answered_by(std::time::Instant::now()),
        "the unlink was acknowledged while the attempt was still sending"
    );
    Ok(())
}

#[tokio::test]
async fn an_erasure_is_answered_once_the_attempt_already_sending_has_finished() -> anyhow::Result<()>
{
    let w = world_with_an_attempt_under_way("erase-1").await?;
    w.node.admin().erase_customer(&w.customer.id).await?;
    assert!(
        w.hotel_rx.first_answered_by(std::time::Instant::now()),
        "the erasure was acknowledged while an attempt to the hotel was still sending"
    );
    // An event for the erased customer's subject, sent before the subject is released (the
    // routing index still names the customer): ignored as unclaimed, not a 404 naming the
    // erased customer.
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("erase-2", "FF-1234", 90))
        .await?;
    assert_eq!(r.status, EventStatus::Ignored, "{r:?}");
    assert!(r.commands.is_empty());
    assert!(
        !format!("{r:?}").contains(&w.customer.id),
        "the erased customer's id is not told: {r:?}"
    );
    Ok(())
}

/// A customer created through the API (no email, so no portal account) and erased: within a
/// bounded time neither its id nor its subjects are in any file of the data directory, the
/// meta group's log (which held its subject claims) included.
#[tokio::test]
async fn an_erased_customer_without_an_email_leaves_nothing_on_disk() -> anyhow::Result<()> {
    let w = world().await?;
    w.node.admin().erase_customer(&w.customer.id).await?;
    let needles = [w.customer.id.clone(), "FF-1234".into(), "guest-77".into()];
    let dir = w.node.data_dir.clone();
    let gone = poll::until(
        "the erased customer gone from disk",
        Duration::from_secs(60),
        || {
            let found =
                custos_tests::files::containing(&dir, &needles, &["node.log", "custos.toml"]);
            async move { found.is_empty().then_some(()) }
        },
    )
    .await;
    if let Err(e) = gone {
        anyhow::bail!(
            "{e}: still in {:?}",
            custos_tests::files::containing(&dir, &needles, &["node.log", "custos.toml"])
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_subject_linked_anew_routes_its_events_to_the_new_customer() -> anyhow::Result<()> {
    let w = world().await?;
    let anon = w.node.anonymous();
    let admin = w.node.admin();
    // The node now holds FF-1234's route to the first customer in memory.
    let r = anon
        .send_event(&w.airline, &delayed("move-1", "FF-1234", 90))
        .await?;
    assert_eq!(r.status, EventStatus::Accepted);
    w.node
        .admin()
        .with_token(&w.customer.token)
        .unlink(&w.customer.id, "airline")
        .await?;
    // Another customer links the same frequent-flyer number once the release has landed.
    let second = admin.create_customer().await?;
    let link = |entity: &str, subject: &str| LinkRequest {
        entity_id: entity.into(),
        subject: subject.into(),
    };
    poll::until("FF-1234 released for a new link", WAIT, || {
        let (admin, id, req) = (admin.clone(), second.id.clone(), link("airline", "FF-1234"));
        async move { admin.link(&id, &req).await.ok() }
    })
    .await?;
    admin.link(&second.id, &link("hotel", "guest-88")).await?;
    let me = admin.with_token(&second.token);
    me.create_rule(&second.id, &delay_rule()).await?;
    // Routed to the second customer: a stale route would reach the first, who no longer
    // links the airline, and the event would be ignored.
    let r = anon
        .send_event(&w.airline, &delayed("move-2", "FF-1234", 90))
        .await?;
    assert_eq!(r.status, EventStatus::Accepted, "{:?}", r.reason);
    let page = admin.activity(&second.id, 50, None).await?;
    assert!(page.items.iter().any(|i| matches!(&i.kind,
        ActivityKind::EventReceived { event_id, .. } if event_id == "move-2")));
    Ok(())
}

#[tokio::test]
async fn nothing_acknowledged_is_lost_across_a_kill_and_pending_deliveries_resume(
) -> anyhow::Result<()> {
    // Retries for half a minute: the deliveries must still be pending however long the 20
    // sends take on a slow machine.
    let opts = NodeOptions {
        retry_schedule_secs: std::iter::once(0.0).chain([1.0; 30]).collect(),
        ..NodeOptions::default()
    };
    let mut w = world_with(opts, Receiver::start(vec![], 503)?).await?;
    let anon = w.node.anonymous();
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = anon
            .send_event(&w.airline, &delayed(&format!("k-{i}"), "FF-1234", 90))
            .await?;
        assert_eq!(r.status, EventStatus::Accepted);
        ids.push(r.commands[0].clone());
    }
    w.hotel_rx.wait_received(1, WAIT).await?;
    w.node.kill()?;
    w.hotel_rx.set_status(200);
    w.node.restart().await?;
    let admin = w.node.admin();
    for id in &ids {
        delivery_status(&admin, id, DeliveryStatus::Delivered).await?;
    }
    let delivered: std::collections::HashSet<String> = w
        .hotel_rx
        .received()
        .into_iter()
        .filter(|r| r.answered == 200)
        .map(|r| r.webhook_id)
        .collect();
    assert_eq!(delivered.len(), ids.len());
    // Rules, links and the customer survived; a graceful stop and start also works.
    w.node.stop().await?;
    w.node.restart().await?;
    let me = w.node.admin().with_token(&w.customer.token);
    assert_eq!(me.rules(&w.customer.id).await?.len(), 1);
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("k-after", "FF-1234", 90))
        .await?;
    assert_eq!(r.status, EventStatus::Accepted);
    Ok(())
}

#[tokio::test]
async fn private_targets_are_refused_unless_allowed() -> anyhow::Result<()> {
    let opts = NodeOptions {
        allow_private_targets: false,
        retry_schedule_secs: vec![0.0],
        ..NodeOptions::default()
    };
    let w = world_with(opts, Receiver::start(vec![], 200)?).await?;
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("ssrf-1", "FF-1234", 90))
        .await?;
    let d = delivery_status(&w.node.admin(), &r.commands[0], DeliveryStatus::Failed).await?;
    let error = d.attempts[0].error.as_deref().unwrap_or_default();
    // Customers see this text: it says why, not the hotel's URL or address.
    assert!(error.contains("not allowed"), "{d:?}");
    assert!(
        !error.contains("127.0.0.1") && !error.contains("http"),
        "{d:?}"
    );
    assert!(
        w.hotel_rx.received().is_empty(),
        "nothing reached the loopback receiver"
    );
    // IP literals skip the resolver: they are refused when registered, for every URL the
    // vault itself requests (commands, OAuth token and revocation): IPv4 ones it may not call
    // as forbidden targets (422), IPv6 ones as outside the URL pattern (400).
    for (command_url, token_url, code) in [
        (
            "http://169.254.169.254/latest/meta-data",
            "https://bank.example/token",
            ErrorCode::ForbiddenTarget,
        ),
        (
            "http://[::ffff:127.0.0.1]:9/",
            "https://bank.example/token",
            ErrorCode::InvalidField,
        ),
        (
            "http://[64:ff9b::a9fe:a9fe]/",
            "https://bank.example/token",
            ErrorCode::InvalidField,
        ),
        (
            "https://bank.example/commands",
            "http://10.0.0.1/token",
            ErrorCode::ForbiddenTarget,
        ),
    ] {
        let err = w
            .node
            .admin()
            .register_entity(&RegisterEntity {
                id: "metadata".into(),
                name: "Metadata".into(),
                command_url: command_url.into(),
                event_types: vec![],
                command_types: vec![],
                oauth: Some(OAuthEndpoints {
                    authorize_url: Some("https://bank.example/authorize".into()),
                    token_url: Some(token_url.into()),
                    client_id: "custos".into(),
                    ..Default::default()
                }),
            })
            .await
            .expect_err("a forbidden address was registered");
        assert_eq!(err.code(), Some(code), "{err}");
    }
    Ok(())
}

#[tokio::test]
async fn secret_rotation_keeps_the_old_secret_valid_for_the_grace_period() -> anyhow::Result<()> {
    let mut w = world().await?;
    let rotated = w.node.admin().rotate_secret("airline").await?;
    let new =
        Secret::parse(&rotated.secret.unwrap_or_default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(rotated.previous_secret_valid_until.is_some());
    let anon = w.node.anonymous();
    assert_eq!(
        anon.send_event(&w.airline, &delayed("rot-1", "FF-1234", 90))
            .await?
            .status,
        EventStatus::Accepted
    );
    assert_eq!(
        anon.send_event(&new, &delayed("rot-2", "FF-1234", 90))
            .await?
            .status,
        EventStatus::Accepted
    );
    // Signing secrets are sealed at rest: neither is anywhere in the data directory (Raft log,
    // RocksDB WAL and tables), also after a restart reopened them from there.
    w.node.stop().await?;
    w.node.restart().await?;
    let anon = w.node.anonymous();
    assert_eq!(
        anon.send_event(&new, &delayed("rot-3", "FF-1234", 90))
            .await?
            .status,
        EventStatus::Accepted
    );
    let secrets: Vec<String> = [w.airline.encode(), new.encode()]
        .iter()
        .map(|s| s.trim_start_matches("whsec_").to_owned())
        .collect();
    let files = custos_tests::files::walk(&w.node.data_dir).1.len();
    let found = custos_tests::files::containing(&w.node.data_dir, &secrets, &[]);
    assert!(found.is_empty(), "a signing secret in clear: {found:?}");
    assert!(files > 5, "read {files} files");
    // A secret that leaked is revoked with the rotation: it verifies nothing from then on,
    // the grace period notwithstanding.
    let revoked = w
        .node
        .admin()
        .rotate_secret_revoking_previous("airline")
        .await?;
    let newest =
        Secret::parse(&revoked.secret.unwrap_or_default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let anon = w.node.anonymous();
    let err = anon
        .send_event(&new, &delayed("rot-4", "FF-1234", 90))
        .await
        .expect_err("the revoked secret");
    assert_eq!(err.code(), Some(ErrorCode::BadSignature), "{err}");
    assert_eq!(
        anon.send_event(&newest, &delayed("rot-5", "FF-1234", 90))
            .await?
            .status,
        EventStatus::Accepted
    );
    Ok(())
}

#[tokio::test]
async fn token_keys_configured_later_keep_opening_what_was_sealed_before() -> anyhow::Result<()> {
    let mut w = world().await?;
    let key = || {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    };
    let restart_with = |node: &mut Node, keys: &str| {
        node.options.extra_toml = format!("portal.token_keys = [\"{keys}\"]\n");
    };
    // The cluster sealed the airline's secret under the key it generated; an operator then
    // starts managing keys: what was sealed before still opens.
    w.node.stop().await?;
    restart_with(&mut w.node, &key());
    w.node.restart().await?;
    let anon = w.node.anonymous();
    assert_eq!(
        anon.send_event(&w.airline, &delayed("keys-1", "FF-1234", 90))
            .await?
            .status,
        EventStatus::Accepted
    );
    // A secret sealed under the configured key, which is then dropped from the configuration:
    // the start says which entities cannot be checked, and their events are answered 503 (to
    // be sent again), not 401 (which a sender drops).
    let rotated = w.node.admin().rotate_secret("airline").await?;
    let new =
        Secret::parse(&rotated.secret.unwrap_or_default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    w.node.stop().await?;
    restart_with(&mut w.node, &key());
    w.node.restart().await?;
    let err = w
        .node
        .anonymous()
        .send_event(&new, &delayed("keys-2", "FF-1234", 90))
        .await
        .expect_err("cannot be checked");
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    let log = w.node.log();
    assert!(
        log.contains("entity secrets cannot be opened") && log.contains("airline"),
        "{log}"
    );
    Ok(())
}

#[tokio::test]
async fn hostile_rules_never_stall_the_node() -> anyhow::Result<()> {
    let w = world().await?;
    let me = w.node.admin().with_token(&w.customer.token);
    // The issue's expressions (refused when compiled) and the costliest shape accepted, over
    // the largest lists its budget allows, tried many times at once.
    let mut nested = "true".to_owned();
    for i in 0..10 {
        nested = format!("[0,1,2,3,4,5,6,7,8,9].all(a{i}, {nested})");
    }
    let chain = vec!["1"; 2_000].join("+") + " > 0";
    let costly = "data.l.all(a, data.l.all(b, a + b >= 0))".to_owned();
    let mut tries = Vec::new();
    for i in 0..12 {
        let mut spec = delay_rule();
        spec.when.condition = Some([&nested, &chain, &costly][i % 3].clone());
        let me = me.clone();
        let id = w.customer.id.clone();
        tries.push(tokio::spawn(async move {
            me.try_rule(
                &id,
                &TryRule {
                    rule: spec,
                    event_id: None,
                    sample_data: Some(json!({"l": (0..30_000).collect::<Vec<_>>()})),
                },
            )
            .await
        }));
    }
    // A liveness bound, not a benchmark: the node answers while they run (generous, for a
    // loaded 2-core machine; a stalled node would not answer at all).
    let health = reqwest::Client::new()
        .get(format!("{}/healthz", w.node.url))
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    assert_eq!(health.status(), 200);
    for (i, t) in tries.into_iter().enumerate() {
        match (i % 3, t.await?) {
            (0 | 1, Err(e)) => assert_eq!(e.code(), Some(ErrorCode::InvalidRule), "{e}"),
            (2, Ok(outcome)) => {
                // Accepted when saved, but this event's lists are too long for its budget.
                assert!(!outcome.matched);
                let reason = outcome.reason.unwrap_or_default();
                assert!(reason.contains("budget"), "{reason}");
            }
            (_, other) => anyhow::bail!("try {i}: {other:?}"),
        }
    }
    Ok(())
}

/// A raw request for the bad-input table.
struct Bad {
    what: &'static str,
    method: reqwest::Method,
    path: String,
    token: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    status: u16,
    code: ErrorCode,
}

fn signed_headers(secret: &Secret, id: &str, ts: i64, body: &[u8]) -> Vec<(String, String)> {
    vec![
        ("content-type".into(), "application/cloudevents+json".into()),
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        ("webhook-signature".into(), secret.sign(id, ts, body)),
    ]
}

#[tokio::test]
async fn bad_input_gets_a_clear_problem_never_a_500() -> anyhow::Result<()> {
    let w = world().await?;
    let admin_token = Some(custos_tests::node::ADMIN_TOKEN.to_owned());
    let cust_token = Some(w.customer.token.clone());
    let other = w.node.admin().create_customer().await?;
    let now = webhook::unix_now();
    let event = |e: &CloudEvent| serde_json::to_vec(e).unwrap_or_default();
    let good = event(&delayed("bad-x", "FF-1234", 90));
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    let mut cases = vec![
        Bad {
            what: "wrong signature",
            method: post.clone(),
            path: "/v1/events".into(),
            token: None,
            headers: signed_headers(&w.hotel, "m1", now, &good),
            body: good.clone(),
            status: 401,
            code: ErrorCode::BadSignature,
        },
        Bad {
            what: "no signature headers",
            method: post.clone(),
            path: "/v1/events".into(),
            token: None,
            headers: vec![("content-type".into(), "application/cloudevents+json".into())],
            body: good.clone(),
            status: 400,
            code: ErrorCode::MissingSignature,
        },
        Bad {
            what: "timestamp 10 minutes old",
            method: post.clone(),
            path: "/v1/events".into(),
            token: None,
            headers: signed_headers(&w.airline, "m1", now - 600, &good),
            body: good.clone(),
            status: 401,
            code: ErrorCode::StaleTimestamp,
        },
        Bad {
            what: "malformed JSON",
            method: post.clone(),
            path: "/v1/events".into(),
            token: None,
            headers: signed_headers(&w.airline, "m1", now, b"{nope"),
            body: b"{nope".to_vec(),
            status: 400,
            code: ErrorCode::MalformedBody,
        },
        Bad {
            what: "oversize body",
            method: post.clone(),
            path: "/v1/events".into(),
            token: None,
            headers: vec![("content-type".into(), "application/cloudevents+json".into())],
            body: vec![b' '; 300 * 1024],
            status: 413,
            code: ErrorCode::BodyTooLarge,
        },
        Bad {
            what: "wrong content type",
            method: post.clone(),
            path: "/v1/events".into(),
            token: None,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: good.clone(),
            status: 415,
            code: ErrorCode::UnsupportedMediaType,
        },
        Bad {
            what: "admin call without a token",
            method: get.clone(),
            path: "/v1/entities".into(),
            token: None,
            headers: vec![],
            body: vec![],
            status: 401,
            code: ErrorCode::Unauthorized,
        },
        Bad {
            what: "admin call with a customer token",
            method: get.clone(),
            path: "/v1/entities".into(),
            token: cust_token.clone(),
            headers: vec![],
            body: vec![],
            status: 403,
            code: ErrorCode::Forbidden,
        },
        Bad {
            what: "another customer's activity",
            method: get.clone(),
            path: format!("/v1/customers/{}/activity", other.id),
            token: cust_token.clone(),
            headers: vec![],
            body: vec![],
            status: 403,
            code: ErrorCode::Forbidden,
        },
        Bad {
            what: "another customer's rules",
            method: get.clone(),
            path: format!("/v1/customers/{}/rules", other.id),
            token: cust_token.clone(),
            headers: vec![],
            body: vec![],
            status: 403,
            code: ErrorCode::Forbidden,
        },
        Bad {
            what: "unknown route",
            method: get.clone(),
            path: "/v1/nothing".into(),
            token: None,
            headers: vec![],
            body: vec![],
            status: 404,
            code: ErrorCode::NotFound,
        },
        Bad {
            what: "an array where an object is wanted (rename by position)",
            method: reqwest::Method::PATCH,
            path: "/v1/entities/airline".into(),
            token: admin_token.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"["Renamed"]"#.to_vec(),
            status: 400,
            code: ErrorCode::MalformedBody,
        },
        Bad {
            what: "an array where an object is wanted (register by position)",
            method: post.clone(),
            path: "/v1/entities".into(),
            token: admin_token.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"["arr","Arr","https://example.com/c"]"#.to_vec(),
            status: 400,
            code: ErrorCode::MalformedBody,
        },
        Bad {
            what: "a method the path does not serve",
            method: reqwest::Method::PUT,
            path: "/v1/entities".into(),
            token: admin_token.clone(),
            headers: vec![],
            body: vec![],
            status: 405,
            code: ErrorCode::MethodNotAllowed,
        },
        Bad {
            what: "unknown customer",
            method: get.clone(),
            path: "/v1/customers/cus_nobody".into(),
            token: admin_token.clone(),
            headers: vec![],
            body: vec![],
            status: 404,
            code: ErrorCode::NotFound,
        },
        Bad {
            what: "entity registered twice",
            method: post.clone(),
            path: "/v1/entities".into(),
            token: admin_token.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(
                &json!({"id": "hotel", "name": "Again", "command_url": "https://h.example/c"}),
            )?,
            status: 409,
            code: ErrorCode::Conflict,
        },
        Bad {
            what: "entity with a bad id",
            method: post.clone(),
            path: "/v1/entities".into(),
            token: admin_token.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(
                &json!({"id": "no spaces please", "name": "X", "command_url": "https://h.example/c"}),
            )?,
            status: 400,
            code: ErrorCode::InvalidField,
        },
        Bad {
            what: "entity with an unknown field",
            method: post.clone(),
            path: "/v1/entities".into(),
            token: admin_token.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(
                &json!({"id": "x", "name": "X", "command_url": "https://h.example/c", "colour": 1}),
            )?,
            status: 400,
            code: ErrorCode::MalformedBody,
        },
    ];
    let mut with_event =
        |what: &'static str, e: CloudEvent, status: u16, code: ErrorCode, secret: &Secret| {
            let body = event(&e);
            cases.push(Bad {
                what,
                method: post.clone(),
                path: "/v1/events".into(),
                token: None,
                headers: signed_headers(secret, "m2", now, &body),
                body,
                status,
                code,
            });
        };
    let mut unknown = delayed("u-1", "FF-1234", 90);
    unknown.source = "nobody".into();
    // Answered as a bad signature: unauthenticated callers do not learn which entities exist.
    with_event(
        "unknown entity",
        unknown,
        401,
        ErrorCode::BadSignature,
        &w.airline,
    );
    let mut undeclared = delayed("u-2", "FF-1234", 90);
    undeclared.event_type = "flight.teleported".into();
    with_event(
        "undeclared event type",
        undeclared,
        422,
        ErrorCode::UnknownType,
        &w.airline,
    );
    let mut violating = delayed("u-3", "FF-1234", 90);
    violating.data = Some(json!({"delay_minutes": "lots", "flight": "XY1"}));
    with_event(
        "data violating the event schema",
        violating,
        422,
        ErrorCode::SchemaViolation,
        &w.airline,
    );
    let mut no_subject = delayed("u-4", "FF-1234", 90);
    no_subject.subject = None;
    with_event(
        "event without subject",
        no_subject,
        400,
        ErrorCode::InvalidField,
        &w.airline,
    );
    let mut bad_time = delayed("u-5", "FF-1234", 90);
    bad_time.time = Some("tomorrow".into());
    with_event(
        "event with a bad time",
        bad_time,
        400,
        ErrorCode::InvalidField,
        &w.airline,
    );

    let rule_cases: Vec<(&str, RuleSpec, u16, ErrorCode)> = {
        let mut syntax = delay_rule();
        syntax.when.condition = Some("data.delay_minutes >".into());
        let mut unknown_var = delay_rule();
        unknown_var.then.data = json!({"arrival": "dta.new_arrival", "flight": "data.flight"});
        let mut unlinked = delay_rule();
        unlinked.then.entity = "car-rental".into();
        let mut bad_type = delay_rule();
        bad_type.then.command_type = "room.demolish".into();
        let mut schema = delay_rule();
        schema.then.data = json!({"flight": "data.flight"});
        // Hostile CEL: ten nested comprehensions (10^10 steps), and a 2,000-term chain.
        let mut nested = delay_rule();
        let mut src = "true".to_owned();
        for i in 0..10 {
            src = format!("[0,1,2,3,4,5,6,7,8,9].all(a{i}, {src})");
        }
        nested.when.condition = Some(src);
        let mut chain = delay_rule();
        chain.when.condition = Some(vec!["1"; 2_000].join("+") + " > 0");
        for (what, spec) in [
            ("Try it: nested comprehensions", nested.clone()),
            ("Try it: a 2,000-term chain", chain.clone()),
        ] {
            cases.push(Bad {
                what,
                method: post.clone(),
                path: format!("/v1/customers/{}/rules/try", w.customer.id),
                token: cust_token.clone(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: serde_json::to_vec(&json!({"rule": spec}))?,
                status: 422,
                code: ErrorCode::InvalidRule,
            });
        }
        vec![
            (
                "rule with ten nested comprehensions",
                nested,
                422,
                ErrorCode::InvalidRule,
            ),
            (
                "rule with a 2,000-term chain",
                chain,
                422,
                ErrorCode::InvalidRule,
            ),
            (
                "rule with a CEL syntax error",
                syntax,
                422,
                ErrorCode::InvalidRule,
            ),
            (
                "rule with an unknown variable",
                unknown_var,
                422,
                ErrorCode::InvalidRule,
            ),
            (
                "rule naming an unlinked entity",
                unlinked,
                422,
                ErrorCode::EntityNotLinked,
            ),
            (
                "rule with an undeclared command type",
                bad_type,
                422,
                ErrorCode::UnknownType,
            ),
            (
                "rule mapping short of the command schema",
                schema,
                422,
                ErrorCode::SchemaViolation,
            ),
        ]
    };
    for (what, spec, status, code) in rule_cases {
        cases.push(Bad {
            what,
            method: post.clone(),
            path: format!("/v1/customers/{}/rules", w.customer.id),
            token: cust_token.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&spec)?,
            status,
            code,
        });
    }

    let http = reqwest::Client::new();
    let mut failures = Vec::new();
    for c in &cases {
        let mut rb = http
            .request(c.method.clone(), format!("{}{}", w.node.url, c.path))
            .body(c.body.clone());
        for (k, v) in &c.headers {
            rb = rb.header(k, v);
        }
        if let Some(t) = &c.token {
            rb = rb.bearer_auth(t);
        }
        let resp = rb.send().await?;
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let problem: Option<custos_api::Problem> = resp.json().await.ok();
        let ok = status == c.status
            && ct == "application/problem+json"
            && problem.as_ref().map(|p| p.code) == Some(c.code);
        if !ok {
            failures.push(format!(
                "{}: got {status} {ct} {problem:?}, want {} {:?}",
                c.what, c.status, c.code
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // And after all that, the node still works.
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("after-bad", "FF-1234", 90))
        .await?;
    assert_eq!(r.status, EventStatus::Accepted);
    assert!(
        !w.node.log().contains("panicked"),
        "no panic in the node log"
    );
    Ok(())
}

#[tokio::test]
async fn operations_endpoints_describe_and_measure_the_node() -> anyhow::Result<()> {
    let w = world().await?;
    w.node
        .anonymous()
        .send_event(&w.airline, &delayed("ops-1", "FF-1234", 90))
        .await?;
    w.hotel_rx.wait_delivered(1, WAIT).await?;
    let http = reqwest::Client::new();
    let doc: Value = http
        .get(format!("{}/openapi.json", w.node.url))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(doc["openapi"], "3.1.0");
    // Path parameters are the path's own: a query parameter declared `in: path` (a generated
    // client would put it in the URL's path) or a template without its parameter is invalid.
    let mut misplaced = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            let declared: Vec<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str())
                .collect();
            for name in &declared {
                if !path.contains(&format!("{{{name}}}")) {
                    misplaced.push(format!("{method} {path}: {name} is not in the path"));
                }
            }
            for seg in path.split('/').filter(|s| s.starts_with('{')) {
                let name = seg.trim_matches(|c| c == '{' || c == '}');
                if !declared.contains(&name) {
                    misplaced.push(format!("{method} {path}: {name} is not declared"));
                }
            }
        }
    }
    assert!(misplaced.is_empty(), "{misplaced:#?}");
    for p in [
        "/v1/events",
        "/v1/entities",
        "/v1/customers/{id}/rules",
        "/v1/customers/{id}/activity",
        "/v1/deliveries/{command_id}/replay",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing from OpenAPI");
    }
    let metrics = http
        .get(format!("{}/metrics", w.node.url))
        .send()
        .await?
        .text()
        .await?;
    for m in [
        "custos_events_total",
        "custos_delivery_attempts_total",
        "custos_raft_term",
        "custos_raft_commit_index",
        "custos_raft_applied_index",
        "custos_command_delivery_latency_seconds",
    ] {
        assert!(metrics.contains(m), "{m} missing from /metrics");
    }
    let ready: Readiness = http
        .get(format!("{}/readyz", w.node.url))
        .send()
        .await?
        .json()
        .await?;
    assert!(ready.ready);
    assert_eq!(ready.leader, Some(1));
    let health = http.get(format!("{}/healthz", w.node.url)).send().await?;
    assert_eq!(health.status(), 200);
    let wrong = http
        .delete(format!("{}/v1/entities", w.node.url))
        .send()
        .await?;
    assert_eq!(wrong.status(), 405);
    assert_eq!(
        wrong.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, POST")
    );
    // The data directory and everything in it are the owner's alone, and a configured admin
    // token is never printed.
    use std::os::unix::fs::PermissionsExt;
    let (dirs, files) = custos_tests::files::walk(&w.node.data_dir);
    assert!(files.len() > 5, "read {} files", files.len());
    let exposed: Vec<_> = dirs
        .iter()
        .chain(&files)
        .filter(|p| std::fs::metadata(p).map_or(true, |m| m.permissions().mode() & 0o077 != 0))
        .collect();
    assert!(exposed.is_empty(), "readable by others: {exposed:?}");
    let log = w.node.log();
    assert!(
        log.contains("admin token  from CUSTOS_ADMIN_TOKEN"),
        "{log}"
    );
    assert!(
        !log.contains(custos_tests::node::ADMIN_TOKEN),
        "the admin token was printed"
    );
    Ok(())
}

#[tokio::test]
async fn https_when_a_certificate_is_configured() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let custos_tests::tls::Certs { ca, cert, key } = custos_tests::tls::make(dir.path())?;
    let opts = NodeOptions {
        extra_toml: format!("[tls]\ncert = {:?}\nkey = {:?}\n", cert, key),
        ..NodeOptions::default()
    };
    let node = Node::start(opts).await?;
    assert!(node.url.starts_with("https://"), "{}", node.url);
    let root = reqwest::Certificate::from_pem(&std::fs::read(&ca)?)?;
    let https = reqwest::Client::builder()
        .add_root_certificate(root)
        .build()?;
    let r = https.get(format!("{}/healthz", node.url)).send().await?;
    assert_eq!(r.status(), 200);
    // Plain HTTP on the TLS port does not get through.
    let plain = node.url.replace("https://", "http://");
    let r = reqwest::Client::new()
        .get(format!("{plain}/healthz"))
        .send()
        .await;
    assert!(r.map(|r| !r.status().is_success()).unwrap_or(true));
    Ok(())
}

/// Two entities and 15 customers linked to both: 14 keep the delay rule, 11 of them also the
/// release rule, the last keeps none.
async fn recommendation_population(admin: &Client) -> anyhow::Result<Vec<CustomerCreated>> {
    register(
        admin,
        "airline",
        "http://127.0.0.1:9/unused",
        vec![
            type_spec("flight.delayed", None),
            type_spec("flight.cancelled", None),
        ],
        vec![],
    )
    .await?;
    register(
        admin,
        "hotel",
        "http://127.0.0.1:9/unused",
        vec![],
        vec![
            type_spec("room.hold", None),
            type_spec("room.release", None),
        ],
    )
    .await?;
    let release = RuleSpec {
        name: "Release my room when my flight is cancelled".into(),
        when: Trigger {
            entity: "airline".into(),
            event_type: "flight.cancelled".into(),
            condition: None,
        },
        then: Action {
            entity: "hotel".into(),
            command_type: "room.release".into(),
            data: json!({"flight": "data.flight"}),
        },
    };
    let mut customers = Vec::new();
    for i in 0..15 {
        let c = admin.create_customer().await?;
        admin
            .link(
                &c.id,
                &LinkRequest {
                    entity_id: "airline".into(),
                    subject: format!("ff-{i}"),
                },
            )
            .await?;
        admin
            .link(
                &c.id,
                &LinkRequest {
                    entity_id: "hotel".into(),
                    subject: format!("g-{i}"),
                },
            )
            .await?;
        let me = admin.with_token(&c.token);
        // The last customer has linked both entities but keeps no rule yet.
        if i < 14 {
            me.create_rule(&c.id, &delay_rule()).await?;
        }
        if i < 11 {
            me.create_rule(&c.id, &release).await?;
        }
        customers.push(c);
    }
    Ok(customers)
}

/// Nobody asks for training: the first model is trained by the node itself once customers
/// exist (retried every `recommend_warmup_secs` while it covers fewer than k customers), and
/// retraining an unchanged population writes nothing new.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_model_is_trained_without_being_asked() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions {
        extra_toml: "recommend_warmup_secs = 0.3\nrecommend_retrain_changes = 2\n".into(),
        ..NodeOptions::default()
    })
    .await?;
    let admin = node.admin();
    let customers = recommendation_population(&admin).await?;
    let last = &customers[12];
    let me = admin.with_token(&last.token);
    let list = poll::until("a model covering the 15 customers", WAIT, || {
        let me = me.clone();
        let id = last.id.clone();
        async move {
            let l = me.recommendations(&id).await.ok()?;
            (!l.items.is_empty()).then_some(l)
        }
    })
    .await?;
    assert!(list.model_version.is_some());
    // Trained again by hand with nothing changed: the same model, no new version.
    let settled = admin.train_recommender().await?;
    let again = admin.train_recommender().await?;
    assert_eq!(again.version, settled.version);
    assert_eq!(again.customers, 15);
    // Two rule changes (recommend_retrain_changes = 2 here): retrained without being asked.
    let quiet = &customers[14];
    let them = admin.with_token(&quiet.token);
    let rule = them.create_rule(&quiet.id, &delay_rule()).await?;
    them.delete_rule(&quiet.id, &rule.id).await?;
    them.create_rule(&quiet.id, &delay_rule()).await?;
    poll::until("a retraining after the rule changes", WAIT, || {
        let me = me.clone();
        let id = last.id.clone();
        async move {
            let v = me.recommendations(&id).await.ok()?.model_version?;
            (v > again.version).then_some(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn recommendations_are_trained_served_accepted_and_dismissed() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let admin = node.admin();
    let customers = recommendation_population(&admin).await?;
    // Before any training: an empty list, not an error.
    let first = &customers[12];
    let me = admin.with_token(&first.token);
    assert!(me.recommendations(&first.id).await?.items.is_empty());

    let model = admin.train_recommender().await?;
    assert_eq!(model.customers, 15);
    let recs = me.recommendations(&first.id).await?;
    assert_eq!(recs.model_version, Some(model.version));
    assert_eq!(recs.items.len(), 1, "{recs:?}");
    let rec = &recs.items[0];
    assert_eq!(rec.template.event_type, "flight.cancelled");
    // Read from counts the model stores rounded to multiples of k (11 of 14 keep it: the
    // stored counts say 10 and 10), with too few customers for the ranker.
    assert!(
        rec.confidence >= 0.5 && rec.confidence <= 0.9,
        "{}",
        rec.confidence
    );
    // 10 / (10 + 1), rounded to 5% (the build before: 11 / (14 + 1), so 0.75).
    assert!((rec.confidence - 0.9).abs() < 1e-9, "{}", rec.confidence);
    assert!(
        rec.reason.contains("% of the 10+ customers"),
        "{}",
        rec.reason
    );
    assert_eq!(
        rec.rule.then.data,
        json!({"flight": "data.flight"}),
        "the mapping 11 customers agree on"
    );
    // Customers who already keep it get nothing.
    let keeper = admin.with_token(&customers[0].token);
    assert!(keeper
        .recommendations(&customers[0].id)
        .await?
        .items
        .is_empty());

    let rule = me.accept_recommendation(&first.id, &rec.id).await?;
    assert_eq!(rule.when.event_type, "flight.cancelled");
    assert_eq!(me.rules(&first.id).await?.len(), 2);
    assert!(me.recommendations(&first.id).await?.items.is_empty());

    let other = &customers[13];
    let them = admin.with_token(&other.token);
    let rec = them.recommendations(&other.id).await?.items.remove(0);
    // Only what the customer is offered can be dismissed: a rule they already keep is not.
    let kept_id = keeper.recommendations(&customers[0].id).await?.items;
    assert!(kept_id.is_empty());
    let err = keeper
        .dismiss_recommendation(&customers[0].id, &rec.id)
        .await
        .expect_err("not offered to the keeper");
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    them.dismiss_recommendation(&other.id, &rec.id).await?;
    assert!(
        them.recommendations(&other.id).await?.items.is_empty(),
        "dismissed is not shown again"
    );
    // Links alone are engagement enough: the customer without rules is offered both rules.
    let newcomer = &customers[14];
    let fresh = admin
        .with_token(&newcomer.token)
        .recommendations(&newcomer.id)
        .await?;
    assert_eq!(fresh.items.len(), 2, "{fresh:?}");
    assert!(
        fresh.items[0].reason.contains("who link"),
        "{}",
        fresh.items[0].reason
    );
    // A customer who linked only the airline is offered the rules that need the hotel too,
    // saying so; accepting one before linking is refused with what to do.
    let halfway = admin.create_customer().await?;
    admin
        .link(
            &halfway.id,
            &LinkRequest {
                entity_id: "airline".into(),
                subject: "ff-halfway".into(),
            },
        )
        .await?;
    let recs = admin
        .with_token(&halfway.token)
        .recommendations(&halfway.id)
        .await?;
    assert!(!recs.items.is_empty(), "{recs:?}");
    assert!(
        recs.items
            .iter()
            .all(|r| r.needs_link.as_deref() == Some("hotel")),
        "{recs:?}"
    );
    let err = admin
        .with_token(&halfway.token)
        .accept_recommendation(&halfway.id, &recs.items[0].id)
        .await
        .expect_err("the hotel is not linked");
    assert_eq!(err.code(), Some(ErrorCode::EntityNotLinked), "{err}");
    assert!(err.to_string().contains("link it first"), "{err}");
    // One customer cannot read another's recommendations.
    let err = them
        .recommendations(&first.id)
        .await
        .expect_err("forbidden");
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    Ok(())
}

/// Runs the authorization code flow against an entity-sim as the portal will; returns the code.
async fn authorize(
    http: &reqwest::Client,
    sim: &str,
    user: &str,
    password: &str,
    challenge: &str,
) -> anyhow::Result<reqwest::Response> {
    Ok(http
        .post(format!("{sim}/oauth/authorize"))
        .form(&[
            ("username", user),
            ("password", password),
            ("client_id", "custos"),
            ("redirect_uri", "http://127.0.0.1:1/callback"),
            ("state", "st-1"),
            ("code_challenge", challenge),
        ])
        .send()
        .await?)
}

fn code_from(resp: &reqwest::Response) -> anyhow::Result<String> {
    let loc = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let url = url::Url::parse(loc)?;
    let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    anyhow::ensure!(
        q.get("state").map(String::as_str) == Some("st-1"),
        "state not returned: {loc}"
    );
    q.get("code")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no code in {loc}"))
}

async fn exchange(
    http: &reqwest::Client,
    sim: &str,
    code: &str,
    verifier: &str,
) -> anyhow::Result<(u16, Value)> {
    let r = http
        .post(format!("{sim}/oauth/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", "http://127.0.0.1:1/callback"),
            ("client_id", "custos"),
            (
                "client_secret",
                &custos_tests::entity::client_secret("airline"),
            ),
            ("code_verifier", verifier),
        ])
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await.unwrap_or_default()))
}

#[tokio::test]
async fn reference_entities_link_by_oauth_pkce_and_receive_verified_commands() -> anyhow::Result<()>
{
    use custos_tests::entity::EntitySim;
    let node = Node::start(NodeOptions::default()).await?;
    let airline = EntitySim::start("airline", &node).await?;
    let hotel = EntitySim::start("hotel", &node).await?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let verifier = "a-verifier-that-is-long-enough-for-rfc-7636-0123456789abcdef";
    let challenge = custos_node_pkce(verifier);

    // The sign-in page, and PKCE being required.
    let page = http
        .get(format!("{}/oauth/authorize?response_type=code&client_id=custos&redirect_uri=http://127.0.0.1:1/callback&state=st-1&code_challenge={challenge}&code_challenge_method=S256", airline.url))
        .send().await?;
    assert_eq!(page.status(), 200);
    assert!(page.text().await?.contains("Sign in to Example Air"));
    let no_pkce = http
        .get(format!("{}/oauth/authorize?response_type=code&client_id=custos&redirect_uri=http://127.0.0.1:1/callback&state=st-1", airline.url))
        .send().await?;
    assert_eq!(no_pkce.status(), 400);
    // A wrong password gets no code.
    let wrong = authorize(&http, &airline.url, "alice", "nope", &challenge).await?;
    assert_eq!(wrong.status(), 200, "the form again, not a redirect");

    // A wrong verifier is refused, and the code is then spent.
    let code = code_from(&authorize(&http, &airline.url, "alice", "alice-air", &challenge).await?)?;
    let (status, body) = exchange(
        &http,
        &airline.url,
        &code,
        "the-wrong-verifier-that-is-also-long-enough-0123456789",
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, _) = exchange(&http, &airline.url, &code, verifier).await?;
    assert_eq!(status, 400, "a code is single-use");
    // The right verifier on a fresh code yields the customer's subject at the airline.
    let code = code_from(&authorize(&http, &airline.url, "alice", "alice-air", &challenge).await?)?;
    let (status, token) = exchange(&http, &airline.url, &code, verifier).await?;
    assert_eq!(status, 200, "{token}");
    assert!(token["refresh_token"].is_string(), "{token}");
    let at = token["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let info: Value = http
        .get(format!("{}/oauth/userinfo", airline.url))
        .bearer_auth(&at)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(info["sub"], "FF-1001");
    http.post(format!("{}/oauth/revoke", airline.url))
        .form(&[("token", at.as_str())])
        .send()
        .await?;
    let after = http
        .get(format!("{}/oauth/userinfo", airline.url))
        .bearer_auth(&at)
        .send()
        .await?;
    assert_eq!(after.status(), 401, "revoked");

    // Link with the learned subjects, keep a rule, and let the airline emit an event.
    let admin = node.admin();
    let c = admin.create_customer().await?;
    admin
        .link(
            &c.id,
            &LinkRequest {
                entity_id: "airline".into(),
                subject: "FF-1001".into(),
            },
        )
        .await?;
    // The hotel is linked through OAuth: the vault starts the flow (state + PKCE; from the API
    // only an operator may), the customer signs in at the hotel, the hotel sends them back to
    // the vault's callback.
    let me = admin.with_token(&c.token);
    let err = me
        .authorize_link(&c.id, "hotel")
        .await
        .expect_err("customers link through the portal, bound to their session");
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    let start = admin.authorize_link(&c.id, "hotel").await?;
    let url = url::Url::parse(&start.authorize_url)?;
    let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(
        q.get("code_challenge_method").map(String::as_str),
        Some("S256")
    );
    let back = portal::sign_in_at_entity(&start.authorize_url, "alice", "alice-hotel").await?;
    assert!(
        back.starts_with(&format!("{}/v1/oauth/callback/hotel?", node.url)),
        "each entity has its own redirect URI: {back}"
    );
    assert_eq!(
        q.get("scope").map(String::as_str),
        Some("openid"),
        "the hotel's provider speaks OpenID Connect"
    );
    assert!(q.contains_key("nonce"));
    let linked = http.get(&back).send().await?;
    assert_eq!(linked.status(), 201);
    let link: Link = linked.json().await?;
    assert_eq!(
        (link.entity_id.as_str(), link.subject.as_str()),
        ("hotel", "guest-77")
    );
    let hotel_subject = link.subject.clone();
    // The same callback again: the state is spent.
    let replay = http.get(&back).send().await?;
    assert_eq!(replay.status(), 403);
    // A forged state is refused too.
    let forged = http
        .get(format!(
            "{}/v1/oauth/callback/hotel?code=x&state=forged",
            node.url
        ))
        .send()
        .await?;
    assert_eq!(forged.status(), 403);
    me.create_rule(
        &c.id,
        &RuleSpec {
            name: "hold".into(),
            when: Trigger {
                entity: "airline".into(),
                event_type: "flight.delayed".into(),
                condition: None,
            },
            then: Action {
                entity: "hotel".into(),
                command_type: "room.hold".into(),
                data: json!({"flight": "data.flight"}),
            },
        },
    )
    .await?;
    let receipt: EventReceipt = http
        .post(format!("{}/emit", airline.url))
        .json(&json!({"username": "alice", "type": "flight.delayed", "data": {"flight": "XY9"}}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(receipt.status, EventStatus::Accepted);
    let got: Vec<Value> = poll::until("hotel received the command", WAIT, || {
        let (http, url) = (http.clone(), format!("{}/commands", hotel.url));
        async move {
            let v: Vec<Value> = http.get(url).send().await.ok()?.json().await.ok()?;
            (!v.is_empty()).then_some(v)
        }
    })
    .await?;
    assert_eq!(
        got[0]["verified"], true,
        "the hotel verified the vault's signature"
    );
    assert_eq!(got[0]["command"]["subject"], json!(hotel_subject));
    assert_eq!(got[0]["command"]["data"], json!({"flight": "XY9"}));
    Ok(())
}

/// The source document's example: an airline's contact centre rebooks a customer onto a late
/// arrival, and the customer's rule has the hotel's contact centre schedule a callback, with
/// only the mapped fields (Amazon Connect contact-event shapes, as in the README scenario).
#[tokio::test(flavor = "multi_thread")]
async fn contact_centres_hand_a_rebooking_to_the_hotel_as_a_callback() -> anyhow::Result<()> {
    use custos_tests::entity::EntitySim;
    let node = Node::start(NodeOptions::default()).await?;
    let air = EntitySim::start("air-contact", &node).await?;
    let hotel = EntitySim::start("hotel-contact", &node).await?;
    let admin = node.admin();
    let c = admin.create_customer().await?;
    for (entity, subject) in [
        ("air-contact", "cust-a-1001"),
        ("hotel-contact", "profile-77"),
    ] {
        let link = LinkRequest {
            entity_id: entity.into(),
            subject: subject.into(),
        };
        admin.link(&c.id, &link).await?;
    }
    admin
        .create_rule(
            &c.id,
            &RuleSpec {
                name: "Late arrival after a rebooking: the hotel calls me".into(),
                when: Trigger {
                    entity: "air-contact".into(),
                    event_type: "contact.disconnected".into(),
                    condition: Some(
                        r#"data.attributes.disposition == "REBOOKED" && data.attributes.arrivalLocal > "22:00""#
                            .into(),
                    ),
                },
                then: Action {
                    entity: "hotel-contact".into(),
                    command_type: "callback.schedule".into(),
                    data: json!({
                        "queue": r#""Front desk - late arrivals""#,
                        "channel": r#""VOICE""#,
                        "reason": r#""Guest rebooked by the airline, arrives " + data.attributes.arrivalLocal + " on " + data.attributes.newFlight"#,
                        "airlineContactId": "data.contactId",
                    }),
                },
            },
        )
        .await?;
    let http = reqwest::Client::new();
    let emit = |disposition: &str, contact: &str| {
        json!({"username": "alice", "type": "contact.disconnected", "data": {
            "contactId": contact, "channel": "VOICE", "initiationMethod": "INBOUND",
            "queueInfo": {"queueName": "Rebooking"}, "agentInfo": {"agentName": "Sam"},
            "disconnectReason": "AGENT_DISCONNECT",
            "attributes": {"disposition": disposition, "newFlight": "EA 412", "arrivalLocal": "23:40"}}})
    };
    // A contact that ended without a rebooking triggers nothing.
    let ignored: EventReceipt = http
        .post(format!("{}/emit", air.url))
        .json(&emit("INFO_ONLY", "contact-1"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(ignored.status, EventStatus::Ignored, "{ignored:?}");
    let receipt: EventReceipt = http
        .post(format!("{}/emit", air.url))
        .json(&emit("REBOOKED", "contact-2"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(receipt.status, EventStatus::Accepted, "{receipt:?}");
    let got: Vec<Value> = poll::until("the hotel's contact centre got the callback", WAIT, || {
        let (http, url) = (http.clone(), format!("{}/commands", hotel.url));
        async move {
            let v: Vec<Value> = http.get(url).send().await.ok()?.json().await.ok()?;
            (!v.is_empty()).then_some(v)
        }
    })
    .await?;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["verified"], true);
    let command = &got[0]["command"];
    assert_eq!(command["type"], "callback.schedule");
    assert_eq!(
        command["subject"], "profile-77",
        "the hotel's own id for her"
    );
    assert_eq!(
        command["data"],
        json!({"queue": "Front desk - late arrivals", "channel": "VOICE",
               "reason": "Guest rebooked by the airline, arrives 23:40 on EA 412",
               "airlineContactId": "contact-2"}),
        "only the mapped fields: no agent, queue or disconnect reason"
    );
    Ok(())
}

/// With `log_format = "json"`, every line the node writes is JSON: the start banner is one
/// `node ready` event with the addresses, and the access log names the method.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_json_from_the_banner_on() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions {
        log_level: "info,openraft=warn".into(),
        extra_toml: "log_format = \"json\"\n".into(),
        ..NodeOptions::default()
    })
    .await?;
    let status = reqwest::get(format!("{}/healthz", node.url))
        .await?
        .status();
    assert_eq!(status, 200);
    let log = poll::until("the access log line", WAIT, || {
        let log = node.log();
        async move { log.contains("/healthz").then_some(log) }
    })
    .await?;
    let mut ready = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON ({e}): {line}"))?;
        assert!(!line.contains('\u{1b}'), "colour codes in a file: {line}");
        if v["fields"]["message"] == "node ready" {
            ready = Some(v);
        }
    }
    let ready = ready.ok_or_else(|| anyhow::anyhow!("no node ready event:\n{log}"))?;
    assert_eq!(ready["fields"]["client_api"], json!(node.url));
    assert!(ready["fields"]["portal"]
        .as_str()
        .is_some_and(|p| p.ends_with("/portal")));
    assert!(
        log.lines().any(|l| l.contains("GET /healthz 200")),
        "the access log names the method:\n{log}"
    );
    Ok(())
}

fn custos_node_pkce(verifier: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()))
}

async fn metric(node: &Node, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", node.url))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn idle_profiles_are_passivated_and_rebuilt_from_storage() -> anyhow::Result<()> {
    let opts = NodeOptions {
        extra_toml: "profile_idle_secs = 0.3\n".into(),
        ..NodeOptions::default()
    };
    let w = world_with(opts, Receiver::start(vec![], 200)?).await?;
    let idle = poll::until("profiles passivated", WAIT, || async {
        metric(&w.node, "custos_active_profiles")
            .await
            .filter(|v| *v == 0.0)
    })
    .await?;
    assert_eq!(idle, 0.0);
    // The profile comes back with its links and rules, read from the state machine.
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("p-1", "FF-1234", 90))
        .await?;
    assert_eq!(r.status, EventStatus::Accepted);
    assert_eq!(r.commands.len(), 1);
    Ok(())
}

#[tokio::test]
async fn records_past_retention_are_pruned_through_raft() -> anyhow::Result<()> {
    // About 1.7 s of retention, pruned every 0.2 s.
    let opts = NodeOptions {
        extra_toml: "retention_days = 0.00002\nprune_interval_secs = 0.2\n".into(),
        ..NodeOptions::default()
    };
    let w = world_with(opts, Receiver::start(vec![], 200)?).await?;
    let admin = w.node.admin();
    let r = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("old-1", "FF-1234", 90))
        .await?;
    let id = r.commands[0].clone();
    // Delivered is waited for at the receiver: the record itself may be pruned by the time a
    // slow machine's first poll of it comes round.
    w.hotel_rx.wait_delivered(1, WAIT).await?;
    poll::until("delivered command pruned", WAIT, || async {
        match admin.delivery(&id).await {
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Some(()),
            _ => None,
        }
    })
    .await?;
    let page = admin.activity(&w.customer.id, 50, None).await?;
    assert!(
        page.items.iter().all(|i| !matches!(&i.kind,
        ActivityKind::EventReceived { event_id, .. } if event_id == "old-1")),
        "activity pruned"
    );
    // Rules and links are not records with a retention: they stay.
    assert_eq!(admin.rules(&w.customer.id).await?.len(), 1);
    // The dedup key aged out too: the same id is a new event now.
    let again = w
        .node
        .anonymous()
        .send_event(&w.airline, &delayed("old-1", "FF-1234", 90))
        .await?;
    assert_eq!(again.status, EventStatus::Accepted);
    Ok(())
}

/// A first start stopped at any moment (here: killed at a range of moments through its
/// bootstrap) starts again and serves: it does not wait for a cluster it never finished
/// creating, and its data groups have a leader.
#[tokio::test]
async fn a_first_start_killed_at_any_moment_starts_again_and_serves() -> anyhow::Result<()> {
    let options = NodeOptions {
        extra_toml: "[cluster]\ndata_groups = 4\n".into(),
        ..NodeOptions::default()
    };
    for ms in [
        10u64, 15, 20, 25, 30, 40, 50, 65, 80, 110, 140, 170, 200, 250, 300, 400, 600, 900,
    ] {
        let mut node = Node::start_killed_after(options.clone(), Duration::from_millis(ms)).await?;
        if let Err(e) = node.restart().await {
            anyhow::bail!("killed {ms} ms into its first start: {e:#}\n{}", node.log());
        }
        let created = node.admin().create_customer().await;
        anyhow::ensure!(
            created.is_ok(),
            "killed {ms} ms into its first start, then: {created:?}\n{}",
            node.log()
        );
        node.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_body_trickled_in_is_refused_after_the_read_deadline() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let node = Node::start(NodeOptions::default()).await?;
    let addr = node.url.trim_start_matches("http://").to_owned();
    // No token, and a JSON body announced but never finished: its extractor read it before
    // the handler asked who calls, without a deadline, so the connection and its buffer were
    // held for as long as the caller liked.
    let mut conn = tokio::net::TcpStream::connect(&addr).await?;
    let head = format!(
        "POST /v1/entities HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: 1000\r\nconnection: close\r\n\r\n{{\"id\": "
    );
    conn.write_all(head.as_bytes()).await?;
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(90), conn.read_to_end(&mut answer))
        .await
        .map_err(|_| anyhow::anyhow!("no answer in 90 s: the body is waited for without end"))??;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("did not arrive within"), "{text}");
    // The deadline is the body's (30 s), not some other timer's.
    assert!(
        started.elapsed() >= Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_target_that_does_not_answer_holds_only_its_share_of_the_sending_slots(
) -> anyhow::Result<()> {
    // Four sending slots (a target may hold half of them, by default); attempts wait up to two
    // minutes for an answer.
    let hotel_rx = Receiver::start(vec![], 200)?;
    let options = NodeOptions {
        delivery_toml: "concurrency = 4\ntimeout_secs = 120\n".into(),
        ..NodeOptions::default()
    };
    let w = world_with(options, hotel_rx).await?;
    let spa_rx = Receiver::start(vec![], 200)?;
    let admin = w.node.admin();
    register(
        &admin,
        "spa",
        &spa_rx.url,
        vec![],
        vec![type_spec("booking.made", None)],
    )
    .await?;
    admin
        .link(
            &w.customer.id,
            &LinkRequest {
                entity_id: "spa".into(),
                subject: "spa-guest-1".into(),
            },
        )
        .await?;
    let me = admin.with_token(&w.customer.token);
    me.create_rule(
        &w.customer.id,
        &RuleSpec {
            name: "Book the spa when I board".into(),
            when: Trigger {
                entity: "airline".into(),
                event_type: "flight.boarded".into(),
                condition: None,
            },
            then: Action {
                entity: "spa".into(),
                command_type: "booking.made".into(),
                data: json!({"flight": "id"}),
            },
        },
    )
    .await?;
    // The hotel takes requests and never answers: four room holds to it.
    w.hotel_rx.set_hold(Duration::from_secs(600));
    let anon = w.node.anonymous();
    for i in 0..4 {
        let r = anon
            .send_event(&w.airline, &delayed(&format!("slow-{i}"), "FF-1234", 90))
            .await?;
        assert_eq!(r.status, EventStatus::Accepted);
    }
    poll::until("two attempts held at the hotel", WAIT, || async {
        (w.hotel_rx.received().len() >= 2).then_some(())
    })
    .await?;
    // The spa's command is sent at once: the hotel holds two slots, not all four (before, it
    // waited behind the hotel's attempts for their two minutes).
    let mut boarded = CloudEvent::new("boarded-1", "airline", "flight.boarded");
    boarded.subject = Some("FF-1234".into());
    assert_eq!(
        anon.send_event(&w.airline, &boarded).await?.status,
        EventStatus::Accepted
    );
    spa_rx.wait_delivered(1, WAIT).await?;
    let hotel = w.hotel_rx.received();
    assert_eq!(hotel.len(), 2, "the hotel holds its share only");
    assert!(hotel.iter().all(|r| r.replied.is_none()), "still held");
    Ok(())
}

/// An event about a subject nobody has linked is deduplicated by its source and id, and that
/// is all its group keeps: its subject and body went into the Raft log before, in the group
/// the subject routes to, which no customer's erasure scrubs (a passenger the airline wrote
/// about before they linked, who later erases their vault, stayed there).
#[tokio::test]
async fn an_event_about_a_subject_nobody_linked_leaves_no_trace_of_it_on_disk() -> anyhow::Result<()>
{
    let w = world().await?;
    let anon = w.node.anonymous();
    let mut e = delayed("unlinked-1", "PAX-NOBODY-4711", 90);
    e.data = Some(json!({"delay_minutes": 90, "flight": "XY123", "seat": "SEAT-MARK-31C"}));
    assert_eq!(
        anon.send_event(&w.airline, &e).await?.status,
        EventStatus::Ignored
    );
    // Deduplicated all the same.
    assert_eq!(
        anon.send_event(&w.airline, &e).await?.status,
        EventStatus::Duplicate
    );
    let needles = ["PAX-NOBODY-4711".to_owned(), "SEAT-MARK-31C".to_owned()];
    let found =
        custos_tests::files::containing(&w.node.data_dir, &needles, &["node.log", "custos.toml"]);
    assert!(found.is_empty(), "kept on disk: {found:?}");
    Ok(())
}

/// A retry of an event the vault recorded (its answer lost) is answered as the first time,
/// whatever its checks say now: refused, the entity would take an event whose commands were
/// sent for one never accepted (a check added by an upgrade, say, refusing what it holds).
#[tokio::test]
async fn a_recorded_event_sent_again_is_answered_as_the_first_time() -> anyhow::Result<()> {
    let w = world().await?;
    let anon = w.node.anonymous();
    let first = anon
        .send_event(&w.airline, &delayed("again-1", "FF-1234", 90))
        .await?;
    assert_eq!(first.status, EventStatus::Accepted);
    // The same event as the checks of today would refuse it (here: data the schema refuses).
    let mut again = delayed("again-1", "FF-1234", 90);
    again.data = Some(json!({"delay_minutes": "ninety", "flight": "XY123"}));
    let r = anon.send_event(&w.airline, &again).await?;
    assert_eq!(r.status, EventStatus::Duplicate, "{r:?}");
    assert_eq!(r.commands, first.commands);
    // An event never recorded is still refused.
    let mut new = delayed("again-2", "FF-1234", 90);
    new.data = again.data.clone();
    let err = anon
        .send_event(&w.airline, &new)
        .await
        .expect_err("refused by the schema");
    assert_eq!(err.code(), Some(ErrorCode::SchemaViolation), "{err}");
    Ok(())
}
