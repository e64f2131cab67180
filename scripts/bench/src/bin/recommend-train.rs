//! Training time and memory of the recommender at scale: the function the node's trainer runs
//! (`custos_node::recommend::vault::train`), on a synthetic population of N customers shaped
//! like the IFTTT data (5 rules each from a long-tailed catalogue, segments of related
//! templates, links to the rules' entities). Not through the API: loading a million customers
//! through it is the throughput benchmark's job; this measures the training step alone.
//!
//! As in the node, the population arrives one data group at a time and each group keeps a
//! deterministic sample of its customers when it holds more than its share of
//! `recommend_max_customers` (`sample_training`), so the whole population is never in memory.

use std::collections::HashMap;
use std::time::Instant;

use clap::Parser;
use custos_node::cluster::wire::TrainingInput;
use custos_node::recommend::vault::{sample_training, train, Population};
use custos_raft::records::RuleRecord;
use rand::{Rng, SeedableRng};

/// Train the recommender on a synthetic population and report time and peak memory.
#[derive(Debug, Parser)]
struct Args {
    /// Customers.
    #[arg(long, default_value_t = 10_000)]
    customers: usize,
    /// Rules per customer.
    #[arg(long, default_value_t = 5)]
    rules: usize,
    /// Distinct templates in the catalogue.
    #[arg(long, default_value_t = 2_000)]
    templates: usize,
    /// The node's `recommend_max_customers` (its default).
    #[arg(long, default_value_t = 200_000)]
    max_customers: u32,
    /// Data groups the customers are spread over (the node's default).
    #[arg(long, default_value_t = 16)]
    groups: usize,
}

/// Peak resident memory of this process so far, in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn main() {
    let args = Args::parse();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let entities = 200usize;
    // Template t: source entity t % entities, target (t * 7 + 1) % entities.
    let template = |t: usize| {
        (
            format!("e{}", t % entities),
            format!("event{}", t % 13),
            format!("e{}", (t * 7 + 1) % entities),
            format!("command{}", t % 11),
        )
    };
    let started = Instant::now();
    let mut rules = Vec::new();
    let mut links = Vec::new();
    let per_group = args.customers.div_ceil(args.groups.max(1));
    let group_cap = args.max_customers.div_ceil(args.groups.max(1) as u32);
    let mut group = TrainingInput::default();
    for c in 0..args.customers {
        let customer = format!("cus_{c:012}");
        // A segment of 50 related templates, drawn long-tailed (a few popular ones).
        let segment = rng.gen_range(0..args.templates / 50) * 50;
        let mut linked = Vec::new();
        for r in 0..args.rules {
            let offset = ((rng.gen::<f64>().powi(3)) * 50.0) as usize;
            let t = (segment + offset) % args.templates;
            let (we, wt, te, tc) = template(t);
            linked.push(we.clone());
            linked.push(te.clone());
            group.rules.push((
                customer.clone(),
                RuleRecord {
                    id: format!("rul_{c}_{r}"),
                    name: "rule".into(),
                    when_entity: we,
                    when_event_type: wt,
                    condition: None,
                    then_entity: te,
                    then_command_type: tc,
                    data_json: "{}".into(),
                    created_ms: 0,
                },
            ));
        }
        linked.sort();
        linked.dedup();
        group
            .links
            .extend(linked.into_iter().map(|e| (customer.clone(), e)));
        // A group's rows are read, sampled, and handed over before the next group's.
        if (c + 1) % per_group == 0 || c + 1 == args.customers {
            sample_training(&mut group, group_cap);
            rules.append(&mut group.rules);
            links.append(&mut group.links);
        }
    }
    let sampled: std::collections::HashSet<&String> = rules.iter().map(|(c, _)| c).collect();
    let sampled = sampled.len();
    let built = started.elapsed().as_secs_f64();
    let before = peak_rss_mib();
    let t = Instant::now();
    let shipped = custos_node::config::Config::default();
    let model = train(
        Population {
            rules,
            links,
            received: Vec::new(),
            dismissals: HashMap::new(),
        },
        1,
        0,
        shipped.recommend_beta,
        shipped.recommend_min_customers,
    );
    let secs = t.elapsed().as_secs_f64();
    let stored = custos_raft::codec::encode(&model).map_or(0, |b| b.len());
    println!(
        "| {} | {} | {} | {:.1} s | {:.0} MiB | {:.0} MiB | {} | {} | {} | {:.1} MiB | (population built in {built:.1} s)",
        args.customers,
        args.customers * args.rules,
        sampled,
        secs,
        before,
        peak_rss_mib(),
        model.templates.len(),
        model.pairs.len(),
        if model.ranker.is_some() { "yes" } else { "no" },
        stored as f64 / 1048576.0,
    );
}
