//! Load generator: signed events at a fixed concurrency against a real node with N customers
//! and M rules each, a local receiver counting commands, and a one-member etcd measured the
//! same way in the same run.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clap::Parser;
use custos_api::client::{signed_event_request, Client};
use custos_api::types::*;
use custos_api::webhook::Secret;
use custos_tests::node::{Node, NodeOptions};
use custos_tests::poll;
use custos_tests::receiver::Receiver;
use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::json;

/// Benchmark Custos against a one-member etcd.
#[derive(Debug, Parser)]
struct Args {
    /// Customers to create.
    #[arg(long, default_value_t = 10_000)]
    customers: usize,
    /// Rules per customer (one matches the bench event; the rest name other event types).
    #[arg(long, default_value_t = 5)]
    rules: usize,
    /// Events to send.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The etcd server binary; the comparison is skipped when it is absent.
    #[arg(long, default_value = "etcd")]
    etcd: String,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn setup(
    client: &Client,
    args: &Args,
    hotel_url: &str,
) -> anyhow::Result<(Secret, Vec<String>)> {
    let mut event_types = vec![TypeSpec {
        type_name: "flight.delayed".into(),
        schema: None,
    }];
    for k in 1..args.rules {
        event_types.push(TypeSpec {
            type_name: format!("flight.event{k}"),
            schema: None,
        });
    }
    let airline = client
        .register_entity(&RegisterEntity {
            id: "airline".into(),
            name: "Airline".into(),
            command_url: "http://127.0.0.1:9/unused".into(),
            event_types,
            command_types: vec![],
            oauth: None,
        })
        .await?;
    client
        .register_entity(&RegisterEntity {
            id: "hotel".into(),
            name: "Hotel".into(),
            command_url: hotel_url.into(),
            event_types: vec![],
            command_types: vec![TypeSpec {
                type_name: "room.hold".into(),
                schema: None,
            }],
            oauth: None,
        })
        .await?;
    let secret =
        Secret::parse(&airline.secret.unwrap_or_default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rules = args.rules;
    let subjects: Vec<anyhow::Result<String>> = futures::stream::iter(0..args.customers)
        .map(|i| {
            let client = client.clone();
            async move {
                let c = client.create_customer().await?;
                let subject = format!("ff-{i}");
                client
                    .link(
                        &c.id,
                        &LinkRequest {
                            entity_id: "airline".into(),
                            subject: subject.clone(),
                        },
                    )
                    .await?;
                client
                    .link(
                        &c.id,
                        &LinkRequest {
                            entity_id: "hotel".into(),
                            subject: format!("guest-{i}"),
                        },
                    )
                    .await?;
                for k in 0..rules {
                    let (event_type, condition) = if k == 0 {
                        (
                            "flight.delayed".to_owned(),
                            Some("data.delay_minutes > 60".to_owned()),
                        )
                    } else {
                        (format!("flight.event{k}"), None)
                    };
                    client
                        .create_rule(&c.id, &RuleSpec {
                            name: format!("rule {k}"),
                            when: Trigger { entity: "airline".into(), event_type, condition },
                            then: Action {
                                entity: "hotel".into(),
                                command_type: "room.hold".into(),
                                data: json!({"arrival": "data.new_arrival", "flight": "data.flight",
                                             "note": "'late by ' + string(data.delay_minutes)"}),
                            },
                        })
                        .await?;
                }
                Ok(subject)
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let subjects = subjects.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok((secret, subjects))
}

fn event_body(id: &str, subject: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0", "id": id, "source": "airline", "type": "flight.delayed",
        "subject": subject, "time": "2026-11-28T18:00:00Z", "datacontenttype": "application/json",
        "data": {"delay_minutes": 95, "flight": "XY123", "new_arrival": "2026-11-28T23:40:00Z",
                 "gate": "B12", "reason": "late inbound aircraft"}
    }))
    .unwrap_or_default()
}

struct LoadResult {
    ok: usize,
    seconds: f64,
    latency: Histogram<u64>,
}

/// Sends `n` requests at `concurrency`, each built by `make(i)`; measures 2xx latency.
async fn load<F>(
    n: usize,
    concurrency: usize,
    make: F,
    on_ok: impl Fn(usize, Instant, &[u8]) + Sync,
) -> LoadResult
where
    F: Fn(usize) -> reqwest::RequestBuilder + Sync,
{
    let latency = Mutex::new(histogram());
    let ok = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(concurrency, |i| {
            let rb = make(i);
            let (latency, ok, on_ok) = (&latency, &ok, &on_ok);
            async move {
                let t = Instant::now();
                if let Ok(resp) = rb.send().await {
                    let success = resp.status().is_success();
                    if let Ok(body) = resp.bytes().await {
                        if success {
                            let us = t.elapsed().as_micros() as u64;
                            let _ = latency
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .record(us.max(1));
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            on_ok(i, t, &body);
                        }
                    }
                }
            }
        })
        .await;
    LoadResult {
        ok: ok.into_inner(),
        seconds: started.elapsed().as_secs_f64(),
        latency: latency.into_inner().unwrap_or_else(|p| p.into_inner()),
    }
}

struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_etcd(bin: &str) -> anyhow::Result<Etcd> {
    // Same disk as the Custos node's data: both under the system temp directory.
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{client}");
    let child = Command::new(bin)
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{peer}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let etcd = Etcd {
        child,
        url,
        _dir: dir,
    };
    let http = reqwest::Client::new();
    let health = format!("{}/health", etcd.url);
    poll::until("etcd health", Duration::from_secs(30), || {
        let (http, health) = (http.clone(), health.clone());
        async move {
            http.get(health)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await?;
    Ok(etcd)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let receiver = Receiver::start(vec![], 200)?;
    let node = Node::start(NodeOptions {
        allow_private_targets: true,
        retry_schedule_secs: vec![0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        log_level: "warn".into(),
        // Extra top-level config keys for experiments, e.g. "profile_arbiters = 1".
        extra_toml: std::env::var("BENCH_EXTRA_TOML").unwrap_or_default(),
        snapshot_every: std::env::var("BENCH_SNAPSHOT_EVERY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000),
        // The shipped Raft timings, as a user gets them.
        raft_timings: None,
        ..NodeOptions::default()
    })
    .await?;
    let admin = node.admin();
    eprintln!(
        "setting up {} customers x {} rules ...",
        args.customers, args.rules
    );
    let t = Instant::now();
    let (secret, subjects) = setup(&admin, &args, &receiver.url).await?;
    eprintln!("setup took {:.1}s", t.elapsed().as_secs_f64());

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let sent_at: Mutex<HashMap<String, Instant>> = Mutex::new(HashMap::new());
    let mut bodies = Vec::with_capacity(args.events);
    let mut rng = rand::thread_rng();
    for i in 0..args.events {
        let subject = &subjects[rng.gen_range(0..subjects.len())];
        bodies.push((
            format!("bench-{i}"),
            event_body(&format!("bench-{i}"), subject),
        ));
    }
    let avg_body = bodies.iter().map(|(_, b)| b.len()).sum::<usize>() / bodies.len().max(1);
    eprintln!(
        "sending {} events at concurrency {} ...",
        args.events, args.concurrency
    );
    let custos = load(
        args.events,
        args.concurrency,
        |i| signed_event_request(&http, &node.url, &secret, &bodies[i].0, bodies[i].1.clone()),
        |_, t, body| {
            if let Ok(r) = serde_json::from_slice::<EventReceipt>(body) {
                let mut m = sent_at.lock().unwrap_or_else(|p| p.into_inner());
                for c in r.commands {
                    m.insert(c, t);
                }
            }
        },
    )
    .await;
    let sent_at = sent_at.into_inner().unwrap_or_else(|p| p.into_inner());
    let expected = sent_at.len();
    receiver
        .wait_delivered(expected, Duration::from_secs(300))
        .await?;
    let received = receiver.received();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    let mut e2e = histogram();
    for r in received.iter().filter(|r| r.answered == 200) {
        *per_id.entry(r.webhook_id.as_str()).or_default() += 1;
        if let Some(t0) = sent_at.get(&r.webhook_id) {
            let _ = e2e.record((r.at.duration_since(*t0).as_micros() as u64).max(1));
        }
    }
    let exactly_once =
        sent_at.keys().all(|k| per_id.get(k.as_str()) == Some(&1)) && per_id.len() == expected;

    let etcd = match start_etcd(&args.etcd).await {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("etcd comparison skipped: {e:#}");
            None
        }
    };
    let etcd_result = match &etcd {
        Some(e) => {
            let value = B64.encode(vec![b'x'; avg_body]);
            let url = format!("{}/v3/kv/put", e.url);
            eprintln!(
                "putting {} values of {avg_body} bytes into etcd ...",
                args.events
            );
            Some(
                load(
                    args.events,
                    args.concurrency,
                    |i| {
                        let key = B64.encode(format!("bench/{i}"));
                        http.post(&url).json(&json!({"key": key, "value": value}))
                    },
                    |_, _, _| {},
                )
                .await,
            )
        }
        None => None,
    };

    let custos_rate = custos.ok as f64 / custos.seconds;
    println!("| measure | Custos | etcd (1 member) |");
    println!("| --- | --- | --- |");
    let etcd_rate = etcd_result.as_ref().map(|r| r.ok as f64 / r.seconds);
    println!(
        "| writes/s (events accepted / puts) | {:.0} | {} |",
        custos_rate,
        etcd_rate.map(|r| format!("{r:.0}")).unwrap_or("-".into())
    );
    let fmt_etcd = |q: f64| {
        etcd_result
            .as_ref()
            .map(|r| format!("{:.2}", ms(&r.latency, q)))
            .unwrap_or("-".into())
    };
    println!(
        "| p50 POST -> 2xx (ms) | {:.2} | {} |",
        ms(&custos.latency, 0.5),
        fmt_etcd(0.5)
    );
    println!(
        "| p99 POST -> 2xx (ms) | {:.2} | {} |",
        ms(&custos.latency, 0.99),
        fmt_etcd(0.99)
    );
    println!(
        "| p50 event POST -> command at receiver (ms) | {:.2} | |",
        ms(&e2e, 0.5)
    );
    println!(
        "| p99 event POST -> command at receiver (ms) | {:.2} | |",
        ms(&e2e, 0.99)
    );
    println!(
        "| events ok / sent | {} / {} | {} |",
        custos.ok,
        args.events,
        etcd_result
            .as_ref()
            .map(|r| format!("{} / {}", r.ok, args.events))
            .unwrap_or("-".into())
    );
    println!(
        "| commands delivered exactly once | {} of {} ({}) | |",
        per_id.len(),
        expected,
        if exactly_once { "yes" } else { "NO" }
    );
    if let Some(r) = etcd_rate {
        println!(
            "| Custos events/s / etcd puts/s | {:.2} | |",
            custos_rate / r
        );
    }
    println!(
        "\n{} customers x {} rules, {} events of {} bytes at concurrency {}",
        args.customers, args.rules, args.events, avg_body, args.concurrency
    );
    anyhow::ensure!(
        exactly_once,
        "some commands were not delivered exactly once"
    );
    anyhow::ensure!(custos.ok == args.events, "some events were not accepted");
    Ok(())
}
