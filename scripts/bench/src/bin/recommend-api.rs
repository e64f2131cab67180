//! The recommender evaluated as customers get it: through the public API of a real node, with
//! the shipped settings unless told otherwise. Every IFTTT user of the RecRules split becomes
//! a customer who linked the channels of their training rules and keeps those rules; the node
//! trains its own model (`POST /v1/recommendations/train`); each customer's
//! `GET /v1/customers/{id}/recommendations` is scored against their held-out rules.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use custos_api::client::Client;
use custos_api::types::*;
use custos_node::recommend::eval::{self, Metrics, Template};
use custos_tests::node::{Node, NodeOptions};
use futures::StreamExt;
use serde_json::json;

/// Evaluate recommendations through the API on the IFTTT split.
#[derive(Debug, Parser)]
struct Args {
    /// The dataset folder (rules, trainset, testset).
    #[arg(long, default_value = "../shared/data/ifttt-recrules")]
    data: PathBuf,
    /// Extra top-level config keys for the node, e.g. `recommend_threshold = 0.0` (the
    /// default: none, the shipped settings).
    #[arg(long, default_value = "")]
    config: String,
    /// Requests in flight while loading customers and reading recommendations.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

/// An id from a channel, trigger or action name (ids are `[A-Za-z0-9._:-]{1,128}`; a name
/// the channel split leaves empty becomes `any`).
fn id_of(name: &str) -> String {
    if name.is_empty() {
        return "any".into();
    }
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(120)
        .collect()
}

/// A template as the API names it: (when entity, event type, then entity, command type).
type Key = (String, String, String, String);

fn key_of(t: &Template) -> Key {
    (
        id_of(&t.source),
        id_of(&t.event_type),
        id_of(&t.target),
        id_of(&t.command_type),
    )
}

/// The key of a template the API served.
fn served_key(t: &RuleTemplate) -> Key {
    (
        t.when_entity.clone(),
        t.event_type.clone(),
        t.then_entity.clone(),
        t.command_type.clone(),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = eval::load(&args.data).with_context(|| format!("{}", args.data.display()))?;
    let names: Vec<&str> = data.rules.values().map(String::as_str).collect();
    let channels = eval::derive_channels(&names);
    let templates: HashMap<u64, Key> = data
        .rules
        .iter()
        .filter_map(|(id, name)| eval::template(name, &channels).map(|t| (*id, key_of(&t))))
        .collect();

    // Entities: one per channel, with the triggers and actions any rule of the split uses.
    let mut entities: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for (when, event, then, command) in templates.values() {
        entities
            .entry(when.clone())
            .or_default()
            .0
            .insert(event.clone());
        entities
            .entry(then.clone())
            .or_default()
            .1
            .insert(command.clone());
    }
    let node = Node::start(NodeOptions {
        allow_private_targets: false,
        log_level: "warn".into(),
        raft_timings: None,
        extra_toml: args.config.clone(),
        ..NodeOptions::default()
    })
    .await?;
    let admin = node.admin();
    let started = Instant::now();
    for (i, (id, (events, commands))) in entities.iter().enumerate() {
        let spec = |names: &BTreeSet<String>| {
            names
                .iter()
                .take(custos_api::limits::MAX_TYPES_PER_ENTITY)
                .map(|n| TypeSpec {
                    type_name: n.clone(),
                    schema: None,
                })
                .collect::<Vec<_>>()
        };
        admin
            .register_entity(&RegisterEntity {
                id: id.clone(),
                name: id.clone(),
                command_url: format!("https://entity-{i}.example/commands"),
                event_types: spec(events),
                command_types: spec(commands),
                oauth: None,
            })
            .await
            .with_context(|| format!("registering {id}"))?;
    }

    // Customers: linked to their training rules' channels, keeping those rules.
    let users: Vec<(u64, Vec<Key>, HashSet<Key>)> = data
        .train
        .iter()
        .map(|(u, rules)| {
            let mut kept: Vec<Key> = rules
                .iter()
                .filter_map(|r| templates.get(r).cloned())
                .collect();
            kept.sort();
            kept.dedup();
            let held: HashSet<Key> = data
                .test
                .get(u)
                .into_iter()
                .flatten()
                .filter_map(|r| templates.get(r).cloned())
                .collect();
            (*u, kept, held)
        })
        .collect();
    let refused = std::sync::atomic::AtomicUsize::new(0);
    let loaded: Vec<anyhow::Result<(u64, String)>> = futures::stream::iter(users.iter())
        .map(|(u, kept, _)| {
            let (admin, refused) = (admin.clone(), &refused);
            async move {
                let c = admin.create_customer().await?;
                let mut linked: BTreeSet<&String> = BTreeSet::new();
                for (when, _, then, _) in kept {
                    linked.insert(when);
                    linked.insert(then);
                }
                for e in linked {
                    let link = LinkRequest {
                        entity_id: e.clone(),
                        subject: format!("user-{u}"),
                    };
                    admin.link(&c.id, &link).await?;
                }
                for (n, (when, event, then, command)) in kept.iter().enumerate() {
                    let rule = RuleSpec {
                        name: format!("rule {n}"),
                        when: Trigger {
                            entity: when.clone(),
                            event_type: event.clone(),
                            condition: None,
                        },
                        then: Action {
                            entity: then.clone(),
                            command_type: command.clone(),
                            data: json!({}),
                        },
                    };
                    if admin.create_rule(&c.id, &rule).await.is_err() {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Ok((*u, c.id))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let ids: HashMap<u64, String> = loaded.into_iter().collect::<anyhow::Result<_>>()?;
    let load_secs = started.elapsed().as_secs_f64();

    let trained = Instant::now();
    let model = admin.train_recommender().await?;
    let train_secs = trained.elapsed().as_secs_f64();

    // Read every customer's recommendations and score them.
    let reading = Instant::now();
    let lists: Vec<anyhow::Result<(u64, RecommendationList)>> = futures::stream::iter(ids.iter())
        .map(|(u, id)| {
            let admin: Client = admin.clone();
            async move { Ok((*u, admin.recommendations(id).await?)) }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let lists: HashMap<u64, RecommendationList> =
        lists.into_iter().collect::<anyhow::Result<_>>()?;
    let read_secs = reading.elapsed().as_secs_f64();
    let rss = |u: &u64| {
        data.train
            .get(u)
            .into_iter()
            .chain(data.test.get(u))
            .flatten()
            .any(|r| {
                data.rules
                    .get(r)
                    .is_some_and(|n| n.starts_with("trigger_feed_"))
            })
    };
    let mut sums = [(Metrics::default(), 0usize); 2];
    let mut shown_users = 0usize;
    let mut rich_users = (0usize, 0usize);
    let mut bins = [(0usize, 0.0f64, 0usize); 10];
    // Composed recommendations (rules fewer than k customers keep, made from a trigger and an
    // action many keep; their reason says "your rules use"): shown, kept, and users they hit.
    let mut composed = (0usize, 0usize, 0usize);
    for (u, _, held) in &users {
        let Some(list) = lists.get(u) else { continue };
        let top: Vec<&Recommendation> = list.items.iter().take(10).collect();
        if !top.is_empty() {
            shown_users += 1;
        }
        if data.train.get(u).is_some_and(|r| r.len() >= 10) {
            rich_users.0 += 1;
            if !top.is_empty() {
                rich_users.1 += 1;
            }
        }
        // Held-out templates as dense ids, for the shared metric code.
        let mut dense: HashMap<Key, u32> = HashMap::new();
        for k in held {
            let n = dense.len() as u32;
            dense.entry(k.clone()).or_insert(n);
        }
        let relevant: custos_node::recommend::IdSet = dense.values().copied().collect();
        let ranked: Vec<u32> = top
            .iter()
            .map(|r| {
                dense
                    .get(&served_key(&r.template))
                    .copied()
                    .unwrap_or(u32::MAX)
            })
            .collect();
        for r in &top {
            let k = served_key(&r.template);
            let b = ((r.confidence * 10.0) as usize).min(9);
            bins[b].0 += 1;
            bins[b].1 += r.confidence;
            bins[b].2 += usize::from(held.contains(&k));
        }
        let is_composed = |r: &Recommendation| r.reason.contains("; your rules use ");
        composed.0 += top.iter().filter(|r| is_composed(r)).count();
        composed.1 += top
            .iter()
            .filter(|r| is_composed(r) && held.contains(&served_key(&r.template)))
            .count();
        composed.2 += usize::from(
            top.iter()
                .any(|r| is_composed(r) && held.contains(&served_key(&r.template))),
        );
        let m = eval::metrics_for(&ranked, &relevant, 10);
        for (slot, counted) in [(0, true), (1, !rss(u))] {
            if counted {
                sums[slot].0.p += m.p;
                sums[slot].0.r += m.r;
                sums[slot].0.hr += m.hr;
                sums[slot].0.ndcg += m.ndcg;
                sums[slot].1 += 1;
            }
        }
    }
    let shown: usize = bins.iter().map(|b| b.0).sum();
    let ece: f64 = bins
        .iter()
        .filter(|b| b.0 > 0)
        .map(|(n, conf, kept)| {
            let (n_f, kept_f) = (*n as f64, *kept as f64);
            (n_f / shown.max(1) as f64) * (conf / n_f - kept_f / n_f).abs()
        })
        .sum();
    let kept_share: f64 = bins.iter().map(|b| b.2).sum::<usize>() as f64 / shown.max(1) as f64;
    let mean = |(m, n): (Metrics, usize)| {
        let n = n.max(1) as f64;
        (m.p / n, m.r / n, m.hr / n, m.ndcg / n)
    };
    let (p, r, hr, ndcg) = mean(sums[0]);
    let (_, _, hr_no_rss, _) = mean(sums[1]);
    println!(
        "config: {}",
        if args.config.is_empty() {
            "shipped defaults"
        } else {
            args.config.trim()
        }
    );
    println!(
        "{} customers ({} without an RSS-feed rule), {} entities, {} rules refused; load {:.0} s, \
         training {:.1} s (model v{}: {} customers, {} templates, {} pairs, k = {}), threshold {}; \
         every customer's list read in {:.1} s ({} at a time)",
        users.len(),
        sums[1].1,
        entities.len(),
        refused.load(std::sync::atomic::Ordering::Relaxed),
        load_secs,
        train_secs,
        model.version,
        model.customers,
        model.templates,
        model.pairs,
        model.min_support,
        lists.values().next().map_or(0.0, |l| l.threshold),
        read_secs,
        args.concurrency,
    );
    println!("| shown anything | with 10+ rules shown anything | P@10 | R@10 | HR@10 | HR@10 without RSS | NDCG@10 | kept share of shown | ECE |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {:.3} | {:.3} | {p:.3} | {r:.3} | {hr:.3} | {hr_no_rss:.3} | {ndcg:.3} | {} | {} |",
        shown_users as f64 / users.len().max(1) as f64,
        rich_users.1 as f64 / rich_users.0.max(1) as f64,
        // Nothing shown: no share and no calibration error to speak of.
        if shown == 0 {
            "-".to_owned()
        } else {
            format!("{kept_share:.3}")
        },
        if shown == 0 {
            "-".to_owned()
        } else {
            format!("{ece:.3}")
        },
    );
    println!(
        "\ncomposed (rules fewer than k keep): {} shown, {} of them kept (held out), {} customers with one kept",
        composed.0, composed.1, composed.2
    );
    println!();
    println!("| confidence shown | recommendations | mean confidence | kept (held out) |");
    println!("| --- | --- | --- | --- |");
    for (i, (n, conf, kept)) in bins.iter().enumerate().filter(|(_, b)| b.0 > 0) {
        println!(
            "| {:.1}-{:.1} | {n} | {:.3} | {:.3} |",
            i as f64 / 10.0,
            (i + 1) as f64 / 10.0,
            conf / *n as f64,
            *kept as f64 / *n as f64
        );
    }
    // What a higher threshold would serve: the node serves its most likely ten at or above the
    // threshold, so at t it serves exactly those of these lists at or above t.
    let served_at = lists.values().next().map_or(0.0, |l| l.threshold);
    println!();
    println!("| threshold | customers with 10+ rules shown one | kept share of shown | shown per customer shown one |");
    println!("| --- | --- | --- | --- |");
    for t in [0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6] {
        if t < served_at {
            continue;
        }
        let (mut rich, mut rich_shown, mut n, mut kept, mut customers) = (0, 0, 0, 0, 0);
        for (u, _, held) in &users {
            let Some(list) = lists.get(u) else { continue };
            let at: Vec<&Recommendation> = list
                .items
                .iter()
                .take(10)
                .filter(|r| r.confidence >= t)
                .collect();
            if data.train.get(u).is_some_and(|r| r.len() >= 10) {
                rich += 1;
                rich_shown += usize::from(!at.is_empty());
            }
            customers += usize::from(!at.is_empty());
            n += at.len();
            kept += at
                .iter()
                .filter(|r| held.contains(&served_key(&r.template)))
                .count();
        }
        println!(
            "| {t} | {:.3} | {:.3} | {:.2} |",
            rich_shown as f64 / f64::from(rich.max(1)),
            kept as f64 / n.max(1) as f64,
            n as f64 / customers.max(1) as f64
        );
    }
    Ok(())
}
