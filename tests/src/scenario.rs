//! The airline -> hotel scenario for many customers, set up through the public API of any
//! node: what the cluster tests and the chaos run drive.

use custos_api::client::Client;
use custos_api::types::*;
use custos_api::webhook::Secret;
use custos_api::CloudEvent;
use serde_json::json;

/// One customer of the scenario.
#[derive(Debug, Clone)]
pub struct Customer {
    /// Its id.
    pub id: String,
    /// Its API token.
    pub token: String,
    /// Its subject at the airline.
    pub subject: String,
}

/// Entities registered, customers linked with the delay -> room-hold rule.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The airline's signing secret.
    pub airline: Secret,
    /// The hotel's signing secret (commands are signed with it).
    pub hotel: Secret,
    /// The customers.
    pub customers: Vec<Customer>,
}

fn types(names: &[&str]) -> Vec<TypeSpec> {
    names
        .iter()
        .map(|n| TypeSpec {
            type_name: (*n).into(),
            schema: None,
        })
        .collect()
}

/// Registers an entity (retrying while the cluster settles) and answers its secret.
pub async fn register(
    admin: &Client,
    id: &str,
    url: &str,
    events: &[&str],
    commands: &[&str],
) -> anyhow::Result<Secret> {
    let req = RegisterEntity {
        id: id.into(),
        name: format!("{id} Inc."),
        command_url: url.into(),
        event_types: types(events),
        command_types: types(commands),
        oauth: None,
    };
    let e = retry(|| admin.register_entity(&req)).await?;
    let secret = e.secret.ok_or_else(|| anyhow::anyhow!("no secret"))?;
    Secret::parse(&secret).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Retries a call answered 503 (a group electing a leader), a few times.
pub async fn retry<T, F, Fut>(mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, custos_api::client::ClientError>>,
{
    let mut last = None;
    for _ in 0..50 {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.code() == Some(custos_api::ErrorCode::Unavailable) => {
                last = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(anyhow::anyhow!("still unavailable: {last:?}"))
}

impl Scenario {
    /// Registers the airline and the hotel (commands to `hotel_url`) and `n` customers linked
    /// to both with the rule; every call goes to `admins[i % len]`, so every node serves some.
    pub async fn setup(admins: &[Client], hotel_url: &str, n: usize) -> anyhow::Result<Scenario> {
        let pick = |i: usize| &admins[i % admins.len()];
        let airline = register(
            pick(0),
            "airline",
            "https://air.example/c",
            &["flight.delayed"],
            &[],
        )
        .await?;
        let hotel = register(pick(1), "hotel", hotel_url, &[], &["room.hold"]).await?;
        let mut customers = Vec::with_capacity(n);
        for i in 0..n {
            let admin = pick(i);
            let c = retry(|| admin.create_customer()).await?;
            let subject = format!("FF-{i}");
            for (entity, subject) in [("airline", subject.clone()), ("hotel", format!("G-{i}"))] {
                let req = LinkRequest {
                    entity_id: entity.into(),
                    subject,
                };
                retry(|| pick(i + 1).link(&c.id, &req)).await?;
            }
            let me = pick(i + 2).with_token(&c.token);
            let spec = rule();
            retry(|| me.create_rule(&c.id, &spec)).await?;
            customers.push(Customer {
                id: c.id,
                token: c.token,
                subject,
            });
        }
        Ok(Scenario {
            airline,
            hotel,
            customers,
        })
    }

    /// A delay event about customer `c`.
    pub fn event(&self, id: &str, c: &Customer) -> CloudEvent {
        delayed(id, &c.subject)
    }
}

/// The rule every scenario customer keeps.
pub fn rule() -> RuleSpec {
    RuleSpec {
        name: "Hold my room".into(),
        when: Trigger {
            entity: "airline".into(),
            event_type: "flight.delayed".into(),
            condition: None,
        },
        then: Action {
            entity: "hotel".into(),
            command_type: "room.hold".into(),
            data: json!({"flight": "data.flight", "event": "id"}),
        },
    }
}

/// A delay event.
pub fn delayed(id: &str, subject: &str) -> CloudEvent {
    let mut e = CloudEvent::new(id, "airline", "flight.delayed");
    e.subject = Some(subject.into());
    e.time = Some(rfc3339_ms(unix_now_ms()));
    e.data = Some(json!({"flight": "XY123", "delay_minutes": 90}));
    e
}
