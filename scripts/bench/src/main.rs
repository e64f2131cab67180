//! Load generator: signed events at a fixed concurrency against a real node (or a cluster of
//! real nodes on loopback, requests spread over them) with N customers and M rules each, a
//! local receiver counting commands, and an etcd of as many members measured the same way in
//! the same run. `--down` stops one node after the setup, to measure a cluster missing one.

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
use custos_tests::cluster::Cluster;
use custos_tests::node::{Node, NodeOptions};
use custos_tests::poll;
use custos_tests::receiver::Receiver;
use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::json;

mod procfs;
use procfs::{cpu_seconds, nodes_rss, read_syscalls, thread_cpu, thread_cpu_between};

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
    /// Nodes (and etcd members): 1, or a cluster of 3 to 7 on loopback.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Kill one node (-9; not the first) after the setup and measure with the rest.
    #[arg(long)]
    down: bool,
    /// Wait after the setup until every profile actor has passivated (`profile_idle_secs`,
    /// 120 s by default), so events find their profiles cold, as most do at a million
    /// customers: the cold path, measured at a smaller setup's cost.
    #[arg(long)]
    cold: bool,
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
    children: Vec<Child>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts an etcd of `members` members on loopback (data on the same disk as the nodes').
async fn start_etcd(bin: &str, members: usize) -> anyhow::Result<Etcd> {
    let dir = tempfile::tempdir()?;
    let ports: Vec<(u16, u16)> = (0..members)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut children = Vec::new();
    let mut urls = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let url = format!("http://127.0.0.1:{client}");
        let child = Command::new(bin)
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(dir.path().join(format!("m{i}")))
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
            .args(["--initial-cluster", &initial])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        children.push(child);
        urls.push(url);
    }
    let etcd = Etcd {
        children,
        urls,
        _dir: dir,
    };
    let http = reqwest::Client::new();
    for url in &etcd.urls {
        let health = format!("{url}/health");
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
    }
    Ok(etcd)
}

/// Profile actors alive on the nodes (`custos_active_profiles`), summed.
async fn active_profiles(http: &reqwest::Client, urls: &[String]) -> f64 {
    let mut total = 0.0;
    for u in urls {
        let Ok(r) = http.get(format!("{u}/metrics")).send().await else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        total += text
            .lines()
            .find(|l| l.starts_with("custos_active_profiles "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    total
}

/// Counters summed over the nodes' `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counters {
    wal_syncs: f64,
    log_appends: f64,
    proposer_entries: f64,
    proposer_changes: f64,
    /// Peer requests carrying events to their group's leader, and the events in them.
    relayed_batches: f64,
    relayed_events: f64,
    /// Keys the state machines wrote (puts and deletes), on every replica.
    keys_written: f64,
    /// Snapshots the replicas built, and the bytes they wrote.
    snapshots_built: f64,
    snapshot_bytes: f64,
    /// RocksDB's memory (gauges, bytes): block cache, memtables, table readers.
    rocksdb_memory: [f64; 3],
}

async fn counters(http: &reqwest::Client, urls: &[String]) -> Counters {
    let mut totals = Counters::default();
    for u in urls {
        let Ok(r) = http.get(format!("{u}/metrics")).send().await else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        for line in text.lines() {
            let value = || {
                line.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            if line.starts_with("custos_wal_syncs ") {
                totals.wal_syncs += value();
            } else if line.starts_with("custos_log_appends_flushed ") {
                totals.log_appends += value();
            } else if line.starts_with("custos_proposer_entries{") {
                totals.proposer_entries += value();
            } else if line.starts_with("custos_proposer_changes{") {
                totals.proposer_changes += value();
            } else if line.starts_with("custos_relayed_event_batches ") {
                totals.relayed_batches += value();
            } else if line.starts_with("custos_relayed_events ") {
                totals.relayed_events += value();
            } else if line.starts_with("custos_state_keys_written ") {
                totals.keys_written += value();
            } else if line.starts_with("custos_snapshots_built{") {
                totals.snapshots_built += value();
            } else if line.starts_with("custos_snapshot_bytes_written{") {
                totals.snapshot_bytes += value();
            } else if line.starts_with("custos_rocksdb_block_cache_bytes ") {
                totals.rocksdb_memory[0] += value();
            } else if line.starts_with("custos_rocksdb_memtable_bytes ") {
                totals.rocksdb_memory[1] += value();
            } else if line.starts_with("custos_rocksdb_table_readers_bytes ") {
                totals.rocksdb_memory[2] += value();
            }
        }
    }
    totals
}

/// The counters once every replica has applied the deliveries' results: the key count stays
/// the same over five readings 100 ms apart (nothing else writes after the load).
async fn settled_counters(http: &reqwest::Client, urls: &[String]) -> anyhow::Result<Counters> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = counters(http, urls).await;
    let mut unchanged = 0;
    while unchanged < 5 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the deliveries' results were still being applied after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counters(http, urls).await;
        unchanged = if now.keys_written == last.keys_written {
            unchanged + 1
        } else {
            0
        };
        last = now;
    }
    Ok(last)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.nodes == 1 || (3..=7).contains(&args.nodes),
        "--nodes: 1, or 3 to 7"
    );
    let receiver = Receiver::start(vec![], 200)?;
    let options = NodeOptions {
        allow_private_targets: true,
        retry_schedule_secs: vec![0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        log_level: "warn".into(),
        // Extra top-level config keys for experiments, e.g. "profile_arbiters = 1".
        extra_toml: std::env::var("BENCH_EXTRA_TOML").unwrap_or_default(),
        snapshot_every: std::env::var("BENCH_SNAPSHOT_EVERY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000),
        snapshot_log_to_state: std::env::var("BENCH_SNAPSHOT_LOG_TO_STATE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1.0),
        // The shipped Raft timings, as a user gets them.
        raft_timings: None,
        ..NodeOptions::default()
    };
    let mut cluster = if args.nodes == 1 {
        Cluster {
            nodes: vec![Node::start(options).await?],
            net: None,
        }
    } else {
        Cluster::start(args.nodes, options, false).await?
    };
    let admin = cluster.nodes[0].admin();
    eprintln!(
        "setting up {} customers x {} rules ...",
        args.customers, args.rules
    );
    let t = Instant::now();
    let pids: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    let rss_empty = nodes_rss(&pids);
    let cpu_empty = cpu_seconds(&pids);
    let (secret, subjects) = setup(&admin, &args, &receiver.url).await?;
    let (setup_secs, setup_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds(&pids) - cpu_empty);
    eprintln!("setup took {setup_secs:.1}s");
    if args.down {
        anyhow::ensure!(args.nodes >= 3, "--down needs a cluster");
        let last = cluster.nodes.len() - 1;
        cluster.nodes[last].kill()?;
        cluster.nodes.truncate(last);
        // Its groups elect new leaders; wait until every group is served again.
        poll::until("groups led again", Duration::from_secs(60), || async {
            let r = reqwest::get(format!("{}/readyz", cluster.nodes[0].url))
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        // Under the node's 5 s keep-alive, as in `custos_api::client`.
        .pool_idle_timeout(Duration::from_secs(4))
        .build()?;
    if args.cold {
        eprintln!("waiting for every profile to passivate ...");
        poll::until("profiles passivated", Duration::from_secs(900), || async {
            (active_profiles(&http, &urls).await == 0.0).then_some(())
        })
        .await?;
    }
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
    let before = counters(&http, &urls).await;
    let pids: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    let (rss_before, profiles_before) = (nodes_rss(&pids), active_profiles(&http, &urls).await);
    let cpu_before = cpu_seconds(&pids);
    let threads_before = thread_cpu(&pids);
    let reads_before = read_syscalls(&pids);
    let custos = load(
        args.events,
        args.concurrency,
        |i| {
            let url = &urls[i % urls.len()];
            signed_event_request(&http, url, &secret, &bodies[i].0, bodies[i].1.clone())
        },
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
    let file_reads = read_syscalls(&pids).saturating_sub(reads_before);
    let after = counters(&http, &urls).await;
    let (rss_after, profiles_after) = (nodes_rss(&pids), active_profiles(&http, &urls).await);
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
    let settled = settled_counters(&http, &urls).await?;
    let cpu_custos = cpu_seconds(&pids) - cpu_before;
    let by_thread = thread_cpu_between(&threads_before, &thread_cpu(&pids), cpu_custos);

    let etcd = match start_etcd(&args.etcd, args.nodes).await {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("etcd comparison skipped: {e:#}");
            None
        }
    };
    let etcd_result = match &etcd {
        Some(e) => {
            let value = B64.encode(vec![b'x'; avg_body]);
            let put_urls: Vec<String> = e.urls.iter().map(|u| format!("{u}/v3/kv/put")).collect();
            eprintln!(
                "putting {} values of {avg_body} bytes into etcd ...",
                args.events
            );
            let pids: Vec<u32> = e.children.iter().map(Child::id).collect();
            let cpu_before = cpu_seconds(&pids);
            let result = load(
                args.events,
                args.concurrency,
                |i| {
                    let key = B64.encode(format!("bench/{i}"));
                    http.post(&put_urls[i % put_urls.len()])
                        .json(&json!({"key": key, "value": value}))
                },
                |_, _, _| {},
            )
            .await;
            Some((result, cpu_seconds(&pids) - cpu_before))
        }
        None => None,
    };

    let custos_rate = custos.ok as f64 / custos.seconds;
    let members = if args.nodes == 1 {
        "1 member".to_owned()
    } else {
        format!("{} members", args.nodes)
    };
    let custos_label = match (args.nodes, args.down) {
        (1, _) => "Custos (1 node)".to_owned(),
        (n, false) => format!("Custos ({n} nodes)"),
        (n, true) => format!("Custos ({n} nodes, 1 down)"),
    };
    println!("| measure | {custos_label} | etcd ({members}) |");
    println!("| --- | --- | --- |");
    let etcd_cpu = etcd_result.as_ref().map(|(r, cpu)| (r.ok, *cpu));
    let etcd_result = etcd_result.map(|(r, _)| r);
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
    // CPU per write is steadier than writes/s on a shared machine: it does not depend on
    // what else ran meanwhile. Custos's includes delivering the command.
    println!(
        "| CPU per write (ms, all nodes or members; Custos's includes the command's delivery) | {:.3} | {} |",
        cpu_custos * 1000.0 / custos.ok.max(1) as f64,
        etcd_cpu
            .map(|(ok, cpu)| format!("{:.3}", cpu * 1000.0 / ok.max(1) as f64))
            .unwrap_or("-".into())
    );
    let by_thread: Vec<String> = by_thread
        .iter()
        .map(|(kind, secs)| {
            format!(
                "{kind} {secs:.1} s ({:.0}%)",
                secs * 100.0 / cpu_custos.max(f64::EPSILON)
            )
        })
        .collect();
    println!(
        "| node CPU by thread over the events and their deliveries | {} | |",
        by_thread.join("; ")
    );
    println!(
        "| file reads per event (all nodes; table blocks not in RocksDB's block cache) | {:.1} | |",
        file_reads as f64 / custos.ok.max(1) as f64
    );
    let syncs = after.wal_syncs - before.wal_syncs;
    let entries = after.proposer_entries - before.proposer_entries;
    if syncs > 0.0 && entries > 0.0 {
        println!(
            "| WAL syncs per 1,000 events (all nodes) | {:.1} | |",
            syncs * 1000.0 / custos.ok.max(1) as f64
        );
        println!(
            "| log appends per WAL sync | {:.1} | |",
            (after.log_appends - before.log_appends) / syncs
        );
        println!(
            "| changes per Raft entry (proposer batches) | {:.1} | |",
            (after.proposer_changes - before.proposer_changes) / entries
        );
    }
    let relayed = after.relayed_events - before.relayed_events;
    if relayed > 0.0 {
        println!(
            "| events relayed to the leader / per relay request | {relayed:.0} / {:.1} | |",
            relayed / (after.relayed_batches - before.relayed_batches).max(1.0)
        );
    }
    println!(
        "| state keys written per event, its delivery's record included (per node) | {:.1} | |",
        (settled.keys_written - before.keys_written) / (custos.ok.max(1) * urls.len()) as f64
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    // Counters start at zero with the nodes: what they held before the events is the setup's.
    println!(
        "| setup: seconds / node CPU seconds (all nodes) | {setup_secs:.0} / {setup_cpu:.0} | |"
    );
    println!(
        "| snapshots built, setup / events (all nodes) | {:.0} / {:.0} | |",
        before.snapshots_built,
        settled.snapshots_built - before.snapshots_built
    );
    println!(
        "| snapshot MiB written, setup / events (all nodes) | {:.0} / {:.0} | |",
        before.snapshot_bytes / 1048576.0,
        (settled.snapshot_bytes - before.snapshot_bytes) / 1048576.0
    );
    println!(
        "| node memory (RSS) empty / after setup / after the events (MiB) | {:.0} / {:.0} / {:.0} | |",
        mib(rss_empty),
        mib(rss_before),
        mib(rss_after)
    );
    let rocks = |c: &Counters| {
        let [cache, mem, readers] = c.rocksdb_memory.map(|b| b / 1048576.0);
        format!("{cache:.0} / {mem:.0} / {readers:.0}")
    };
    println!(
        "| of which RocksDB block cache / memtables / table readers, after setup; after the events (MiB) | {}; {} | |",
        rocks(&before),
        rocks(&settled)
    );
    println!(
        "| active (loaded) profiles after setup / after the events | {profiles_before:.0} / {profiles_after:.0} | |"
    );
    if profiles_before > 0.0 {
        println!(
            "| RSS growth over setup per active profile (bytes; an upper bound: memtables and caches grow too) | {:.0} | |",
            rss_before.saturating_sub(rss_empty) as f64 / profiles_before
        );
    }
    println!(
        "\n{} customers x {} rules, {} events of {} bytes at concurrency {}",
        args.customers, args.rules, args.events, avg_body, args.concurrency
    );
    let non_default: Vec<String> = [
        "BENCH_EXTRA_TOML",
        "BENCH_SNAPSHOT_EVERY",
        "BENCH_SNAPSHOT_LOG_TO_STATE",
    ]
    .iter()
    .filter_map(|k| Some(format!("{k}={:?}", std::env::var(k).ok()?)))
    .collect();
    if !non_default.is_empty() {
        println!("non-default settings: {}", non_default.join(", "));
    }
    anyhow::ensure!(
        exactly_once,
        "some commands were not delivered exactly once"
    );
    anyhow::ensure!(custos.ok == args.events, "some events were not accepted");
    Ok(())
}
