//! Recommendations in the vault: training from the customers' rules (aggregates only, stored
//! through Raft so every node serves the same model) and serving them to one customer.

use std::collections::{BTreeMap, HashMap, HashSet};

use custos_api::types::{Action, Recommendation, RuleSpec, RuleTemplate, Trigger};
use custos_raft::records::{ModelRecord, RuleRecord, TemplateStat};

use super::{aggregates, calibration_feature, holdout, Calibrator, Interactions, Rp3Beta, Scorer};

/// Fewest validation samples for the isotonic calibration to be used instead of the
/// conditional frequency.
const MIN_CALIBRATION_SAMPLES: usize = 200;

/// The template key of a rule: `source.event_type>target.command_type`.
pub fn template_key(r: &RuleRecord) -> String {
    format!(
        "{}.{}>{}.{}",
        r.when_entity, r.when_event_type, r.then_entity, r.then_command_type
    )
}

/// The model item of a customer's link to an entity: an engagement input, never recommended.
fn link_key(entity: &str) -> String {
    format!("link:{entity}")
}

/// The model item of an event type a customer receives (`source.type`): an engagement input.
fn event_key(source_type: &str) -> String {
    format!("event:{source_type}")
}

/// Events received longer ago than this no longer count as engagement.
pub const ENGAGEMENT_RECENCY_MS: i64 = 90 * 86_400_000;

/// What the recommender learns from: every customer's rules, links and recently received
/// event types (`source.type`), and how many customers dismissed each template.
#[derive(Debug, Default)]
pub struct Population {
    /// (customer, rule).
    pub rules: Vec<(String, RuleRecord)>,
    /// (customer, entity).
    pub links: Vec<(String, String)>,
    /// (customer, `source.type`).
    pub received: Vec<(String, String)>,
    /// Template key -> customers who dismissed it.
    pub dismissals: HashMap<String, u32>,
}

/// Trains a model on a population.
pub fn train(
    pop: Population,
    version: u64,
    now_ms: i64,
    beta: f64,
    min_support: u32,
) -> ModelRecord {
    let Population {
        rules,
        links,
        received,
        dismissals,
    } = pop;
    let mut by_customer: BTreeMap<String, (Vec<RuleRecord>, Vec<String>)> = BTreeMap::new();
    for (c, r) in rules {
        by_customer.entry(c).or_default().0.push(r);
    }
    for (c, e) in links {
        by_customer.entry(c).or_default().1.push(link_key(&e));
    }
    for (c, t) in received {
        by_customer.entry(c).or_default().1.push(event_key(&t));
    }
    let mut index: HashMap<String, u32> = HashMap::new();
    let mut keys: Vec<String> = Vec::new();
    // (template, condition, data) -> customers using that exact version.
    let mut versions: HashMap<(u32, Option<String>, String), u32> = HashMap::new();
    let mut intern = |key: String| {
        *index.entry(key.clone()).or_insert_with(|| {
            keys.push(key);
            (keys.len() - 1) as u32
        })
    };
    // Per customer: its template items, and its link items (engagement inputs).
    let mut users: Vec<(String, Vec<u32>)> = Vec::new();
    let mut link_items: Vec<Vec<u32>> = Vec::new();
    for (customer, (rules, links)) in &by_customer {
        let mut items: Vec<u32> = Vec::new();
        for r in rules {
            let id = intern(template_key(r));
            if !items.contains(&id) {
                items.push(id);
                *versions
                    .entry((id, r.condition.clone(), r.data_json.clone()))
                    .or_default() += 1;
            }
        }
        users.push((customer.clone(), items));
        link_items.push(links.iter().map(|k| intern(k.clone())).collect());
    }
    let n_items = keys.len();

    // Calibration on held-out templates (never links): a fifth of each customer's (customers
    // with >= 3); the links stay as inputs.
    let (mut fit_users, val) = holdout(&users);
    for (items, links) in fit_users.iter_mut().zip(&link_items) {
        items.extend(links);
    }
    let val: Vec<_> = val
        .into_iter()
        .map(|(n, (mut kept, held))| {
            kept.extend(&link_items[n]);
            // The entities this customer linked: what is served is filtered by them.
            let linked: HashSet<&str> = link_items[n]
                .iter()
                .filter_map(|i| keys.get(*i as usize)?.strip_prefix("link:"))
                .collect();
            (kept, held, linked)
        })
        .collect();
    let val_model = Rp3Beta::fit(
        &Interactions {
            users: fit_users,
            n_items,
        },
        beta,
        min_support,
    );
    // The dismissal factor is part of what is served, so the calibration sees it too.
    let mut template_customers = vec![0u32; n_items];
    for (_, items) in &users {
        for i in items {
            template_customers[*i as usize] += 1;
        }
    }
    let shares: Vec<f64> = keys
        .iter()
        .zip(&template_customers)
        .map(|(key, n)| {
            let d = dismissals.get(key).copied().filter(|d| *d >= min_support);
            kept_share(*n, d.unwrap_or(0))
        })
        .collect();
    let samples = served_samples(&val_model, &val, &keys, &shares);
    let calibration = if samples.len() >= MIN_CALIBRATION_SAMPLES {
        Calibrator::fit(samples).steps().to_vec()
    } else {
        Vec::new()
    };

    let full = Interactions {
        users: users
            .into_iter()
            .zip(link_items)
            .map(|((_, mut items), links)| {
                items.extend(links);
                items
            })
            .collect(),
        n_items,
    };
    let (popularity, pairs) = aggregates(&full, min_support);
    // k-anonymity in what is stored and replicated, not only in what is shown: an item (a
    // template, a link, an event type) fewer than k customers have is not in the model at all,
    // neither its name nor its count; pairs already need k customers. Ids are renumbered densely.
    let mut new_id = vec![u32::MAX; n_items];
    let mut next = 0u32;
    for (i, p) in popularity.iter().enumerate() {
        if *p >= min_support {
            new_id[i] = next;
            next += 1;
        }
    }
    let pairs: Vec<(u32, u32, u32, f64)> = pairs
        .into_iter()
        .filter_map(|(a, b, n, w)| {
            let (a, b) = (new_id[a as usize], new_id[b as usize]);
            (a != u32::MAX && b != u32::MAX).then_some((a, b, n, w))
        })
        .collect();
    let mut best_version: HashMap<u32, (u32, Option<String>, String)> = HashMap::new();
    for ((id, cond, data), n) in versions {
        let e = best_version.entry(id).or_insert((0, None, String::new()));
        // Most customers first; ties broken by text so every node picks the same.
        if n > e.0 || (n == e.0 && (cond.clone(), data.clone()) < (e.1.clone(), e.2.clone())) {
            *e = (n, cond, data);
        }
    }
    let templates = keys
        .into_iter()
        .enumerate()
        .filter(|(i, _)| new_id[*i] != u32::MAX)
        .map(|(i, key)| {
            let agreed = best_version
                .get(&(i as u32))
                .filter(|(n, _, _)| *n >= min_support);
            TemplateStat {
                // Dismissals count once k customers dismissed it (no exact small counts).
                dismissed: dismissals
                    .get(&key)
                    .copied()
                    .filter(|d| *d >= min_support)
                    .unwrap_or(0),
                key,
                customers: popularity[i],
                condition: agreed.and_then(|(_, c, _)| c.clone()),
                data_json: agreed.map(|(_, _, d)| d.clone()),
            }
        })
        .collect();
    ModelRecord {
        version,
        trained_ms: now_ms,
        customers: full.users.len() as u32,
        beta,
        min_support,
        templates,
        pairs,
        calibration,
    }
}

/// Keeps the rows of at most about `max_customers` of a group's customers: when it has more,
/// the customers whose id hashes into the first `max_customers / customers` of the range, so
/// every training picks the same ones and a customer's rules, links and engagement stay
/// together. k-anonymity holds on the sample (a count of k in it is k in the whole).
pub fn sample_training(input: &mut crate::cluster::wire::TrainingInput, max_customers: u32) {
    let customers: HashSet<&str> = input
        .rules
        .iter()
        .map(|(c, _)| c.as_str())
        .chain(input.links.iter().map(|(c, _)| c.as_str()))
        .collect();
    let n = customers.len() as u64;
    if n <= u64::from(max_customers) {
        return;
    }
    let cut = u64::from(max_customers) * (u64::MAX / n);
    let keep = |c: &str| {
        use sha2::Digest as _;
        let h = sha2::Sha256::digest(c.as_bytes());
        u64::from_be_bytes(h[..8].try_into().unwrap_or_default()) < cut
    };
    input.rules.retain(|(c, _)| keep(c));
    input.links.retain(|(c, _)| keep(c));
    input.engagements.retain(|(c, _, _, _)| keep(c));
    // Dismissal counts are the group's, not per customer: scaled to the sample like the rest.
    for d in input.dismissals.values_mut() {
        *d = (u64::from(*d) * u64::from(max_customers) / n) as u32;
    }
}

/// The share of customers who kept a template rather than dismissed it (smoothed).
fn kept_share(customers: u32, dismissed: u32) -> f64 {
    f64::from(customers + 1) / f64::from(customers + dismissed + 1)
}

/// A share rounded to 5%, so a reason does not give away exact counts.
pub fn coarse_percent(part: u32, whole: u32) -> u32 {
    let pct = 100.0 * f64::from(part) / f64::from(whole.max(1));
    ((pct / 5.0).round() * 5.0) as u32
}

/// A count as a bucket ("10+", "50+", "1,000+"...), so a reason does not give away how many
/// customers exactly keep something.
pub fn coarse_count(n: u32) -> String {
    const BUCKETS: [(u32, &str); 9] = [
        (100_000, "100,000+"),
        (10_000, "10,000+"),
        (1_000, "1,000+"),
        (500, "500+"),
        (100, "100+"),
        (50, "50+"),
        (20, "20+"),
        (10, "10+"),
        (2, "a few"),
    ];
    BUCKETS
        .iter()
        .find(|(b, _)| n >= *b)
        .map_or("a few", |(_, label)| label)
        .to_owned()
}

/// How many of the walk's best items are looked at before keeping those a customer can use
/// (between entities they linked).
const CANDIDATES: usize = 200;
/// Most recommendations served to one customer: the calibration is fitted on lists this long.
const SERVED: usize = 10;

/// (calibration feature, kept) of what would be served to the validation customers: the same
/// candidates, ranks and link filter as [`Served::recommend`], ten per customer, so
/// the confidence is calibrated on the values customers are shown.
fn served_samples(
    model: &Rp3Beta,
    val: &[(Vec<u32>, HashSet<u32>, HashSet<&str>)],
    keys: &[String],
    shares: &[f64],
) -> Vec<(f64, bool)> {
    let mut samples = Vec::new();
    for (kept, held, linked) in val {
        let top = model.top(kept, CANDIDATES);
        let best = top.first().map(|t| t.1).unwrap_or(0.0);
        // Served: rules between linked entities, and rules needing one more link (every
        // entity in the training data is registered, so linkable).
        let usable = top.iter().enumerate().filter(|(_, (i, _))| {
            keys.get(*i as usize)
                .and_then(|k| parse_key(k))
                .is_some_and(|t| {
                    let unlinked = [&t.when_entity, &t.then_entity]
                        .iter()
                        .filter(|e| !linked.contains(e.as_str()))
                        .count();
                    unlinked <= 1
                })
        });
        for (rank, (i, score)) in usable.take(SERVED) {
            let share = shares.get(*i as usize).copied().unwrap_or(1.0);
            samples.push((
                calibration_feature(*score, best, rank) * share,
                held.contains(i),
            ));
        }
    }
    samples
}

/// A stored model ready to serve.
pub struct Served {
    /// The stored record.
    pub record: ModelRecord,
    model: Rp3Beta,
    calibrator: Calibrator,
    index: HashMap<String, u32>,
    /// The entities the model's templates name.
    entities: Vec<String>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("version", &self.record.version)
            .finish()
    }
}

impl Served {
    /// Rebuilds the scorer from the stored aggregates.
    pub fn new(record: ModelRecord) -> Self {
        let popularity = record.templates.iter().map(|t| t.customers).collect();
        let model = Rp3Beta::from_aggregates(popularity, &record.pairs, record.beta);
        let calibrator = Calibrator::from_steps(record.calibration.clone());
        let index = record
            .templates
            .iter()
            .enumerate()
            .map(|(i, t)| (t.key.clone(), i as u32))
            .collect();
        let entities: std::collections::BTreeSet<String> = record
            .templates
            .iter()
            .filter_map(|t| parse_key(&t.key))
            .flat_map(|t| [t.when_entity, t.then_entity])
            .collect();
        let entities = entities.into_iter().collect();
        Served {
            record,
            model,
            calibrator,
            index,
            entities,
        }
    }

    /// The entities the model's templates name (what a recommendation may need linked).
    pub fn entities(&self) -> impl Iterator<Item = &str> {
        self.entities.iter().map(String::as_str)
    }

    /// Recommendations for a customer who keeps `kept`, links `linked` and recently received
    /// `received` (`source.type`), at or above `threshold`, best first; only templates between
    /// entities the customer has linked.
    pub fn recommend(
        &self,
        kept: &[RuleRecord],
        linked: &[String],
        linkable: &HashSet<String>,
        received: &[String],
        dismissed: &HashSet<String>,
        threshold: f64,
    ) -> Vec<Recommendation> {
        let items: Vec<u32> = kept
            .iter()
            .map(template_key)
            .chain(linked.iter().map(|e| link_key(e)))
            .chain(received.iter().map(|t| event_key(t)))
            .filter_map(|k| self.index.get(&k).copied())
            .collect();
        let top = self.model.top(&items, CANDIDATES);
        let best = top.first().map(|t| t.1).unwrap_or(0.0);
        let mut out = Vec::new();
        for (rank, (j, score)) in top.into_iter().enumerate() {
            if out.len() == SERVED {
                break;
            }
            let Some(t) = self.record.templates.get(j as usize) else {
                continue;
            };
            if dismissed.contains(&t.key) {
                continue;
            }
            // Only what the customer can use, checked before any scoring work.
            let Some(template) = parse_key(&t.key) else {
                continue;
            };
            // Rules between linked entities, and rules that need one more link to an entity the
            // customer can link ("link Z to use it").
            let unlinked: Vec<&String> = [&template.when_entity, &template.then_entity]
                .into_iter()
                .filter(|e| !linked.contains(e))
                .collect();
            let needs_link = match unlinked.as_slice() {
                [] => None,
                [one] if linkable.contains(*one) => Some((*one).clone()),
                _ => continue,
            };
            let Some(from) = self.model.strongest_reason(&items, j) else {
                continue;
            };
            let (support, base) = (self.model.support(from, j), self.model.popularity(from));
            let frequency = f64::from(support) / f64::from(base + 1);
            // Dismissals are a negative signal: the share of customers who kept the template
            // rather than dismissed it. It scales the feature before the calibration (which was
            // fitted on features scaled the same way), so the confidence served is calibrated
            // after every adjustment.
            let share = kept_share(t.customers, t.dismissed);
            let confidence = if self.calibrator.is_fitted() {
                self.calibrator
                    .confidence(calibration_feature(score, best, rank) * share)
            } else {
                frequency * share
            };
            if confidence < threshold {
                continue;
            }
            let from_key = self
                .record
                .templates
                .get(from as usize)
                .map(|f| f.key.as_str())
                .unwrap_or("");
            let data = t
                .data_json
                .as_deref()
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or_else(|| serde_json::json!({}));
            out.push(Recommendation {
                id: encode_id(&t.key),
                confidence: (confidence * 1000.0).round() / 1000.0,
                reason: format!(
                    "kept by about {}% of the {} customers who {}",
                    coarse_percent(support, base),
                    coarse_count(base),
                    if let Some(entity) = from_key.strip_prefix("link:") {
                        format!("link {entity}")
                    } else if let Some(t) = from_key.strip_prefix("event:") {
                        format!("receive {t}")
                    } else {
                        format!("keep {}", from_key.replace('>', " -> "))
                    }
                ),
                rule: RuleSpec {
                    name: format!(
                        "{} {} -> {} {}",
                        template.when_entity,
                        template.event_type,
                        template.then_entity,
                        template.command_type
                    ),
                    when: Trigger {
                        entity: template.when_entity.clone(),
                        event_type: template.event_type.clone(),
                        condition: t.condition.clone(),
                    },
                    then: Action {
                        entity: template.then_entity.clone(),
                        command_type: template.command_type.clone(),
                        data,
                    },
                },
                template,
                needs_link,
                model_version: self.record.version,
            });
        }
        out
    }
}

fn parse_key(key: &str) -> Option<RuleTemplate> {
    let (when, then) = key.split_once('>')?;
    let (we, wt) = when.split_once('.')?;
    let (te, tc) = then.split_once('.')?;
    Some(RuleTemplate {
        when_entity: we.into(),
        event_type: wt.into(),
        then_entity: te.into(),
        command_type: tc.into(),
    })
}

/// A recommendation's id: its template key, hex-encoded (URL-safe).
pub fn encode_id(key: &str) -> String {
    hex::encode(key)
}

/// The template key of a recommendation id.
pub fn decode_id(id: &str) -> Option<String> {
    if id.len() > 1024 {
        return None;
    }
    String::from_utf8(hex::decode(id).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(customer: u32, when: &str, then: &str, cond: Option<&str>) -> (String, RuleRecord) {
        (
            format!("c{customer}"),
            RuleRecord {
                id: format!("r{customer}{when}"),
                name: "n".into(),
                when_entity: "airline".into(),
                when_event_type: when.into(),
                condition: cond.map(str::to_owned),
                then_entity: "hotel".into(),
                then_command_type: then.into(),
                data_json: r#"{"x":"data.x"}"#.into(),
                created_ms: 0,
            },
        )
    }

    #[test]
    fn a_segment_rule_is_recommended_with_a_reason_and_the_agreed_condition() {
        let mut rules = Vec::new();
        for c in 0..40 {
            rules.push(rule(
                c,
                "flight.delayed",
                "room.hold",
                Some("data.delay_minutes > 60"),
            ));
            if c < 30 {
                rules.push(rule(c, "flight.cancelled", "room.release", None));
            }
        }
        // Three customers share a rare pattern: never shown with k = 10.
        for c in 0..3 {
            rules.push(rule(c, "flight.boarded", "room.prepare", None));
        }
        let model = train(
            Population {
                rules: rules.clone(),
                ..Default::default()
            },
            1,
            0,
            0.2,
            10,
        );
        let served = Served::new(model);
        let kept = vec![rule(35, "flight.delayed", "room.hold", None).1];
        let linked = vec!["airline".to_owned(), "hotel".to_owned()];
        let recs = served.recommend(&kept, &linked, &HashSet::new(), &[], &HashSet::new(), 0.5);
        assert_eq!(recs.len(), 1, "{recs:?}");
        let r = &recs[0];
        assert_eq!(r.template.event_type, "flight.cancelled");
        assert!(
            r.confidence >= 0.7 && r.confidence <= 0.8,
            "{}",
            r.confidence
        );
        assert!(r.reason.contains("75%"), "{}", r.reason);
        assert_eq!(
            decode_id(&r.id).as_deref(),
            Some("airline.flight.cancelled>hotel.room.release")
        );
        assert!(
            r.reason.contains("about 75% of the 20+ customers"),
            "{}",
            r.reason
        );
        // The rare pattern is not in the model at all: no pair, no name, no count below k.
        assert!(served.record.pairs.iter().all(|p| p.2 >= 10));
        assert!(
            served
                .record
                .templates
                .iter()
                .all(|t| t.customers >= 10 && !t.key.contains("flight.boarded")),
            "{:?}",
            served.record.templates
        );
        assert_eq!(coarse_count(14), "10+");
        assert_eq!(coarse_count(1_234), "1,000+");
        assert_eq!(coarse_percent(11, 14), 80);
        // Dismissed: gone.
        let dismissed: HashSet<String> =
            [decode_id(&r.id).unwrap_or_default()].into_iter().collect();
        assert!(served
            .recommend(&kept, &linked, &HashSet::new(), &[], &dismissed, 0.5)
            .is_empty());
        // Many other customers dismissed it: its confidence falls below the threshold.
        let many: HashMap<String, u32> =
            [("airline.flight.cancelled>hotel.room.release".to_owned(), 30)].into();
        let served = Served::new(train(
            Population {
                rules,
                dismissals: many,
                ..Default::default()
            },
            2,
            0,
            0.2,
            10,
        ));
        assert!(served
            .recommend(&kept, &linked, &HashSet::new(), &[], &HashSet::new(), 0.5)
            .is_empty());
    }

    #[test]
    fn a_large_group_trains_on_a_stable_sample_of_whole_customers() {
        let mut input = crate::cluster::wire::TrainingInput::default();
        for c in 0..2000 {
            let (r, rule) = rule(c, "flight.delayed", "room.hold", None);
            input.rules.push((r.clone(), rule));
            input.links.push((r.clone(), "airline".into()));
            input
                .engagements
                .push((r, "airline.flight.delayed".into(), 1, 0));
        }
        input.dismissals.insert("t".into(), 400);
        let mut small = input.clone();
        sample_training(&mut small, 5000);
        assert_eq!(small.rules.len(), 2000, "under the cap: everything");
        let mut sampled = input.clone();
        sample_training(&mut sampled, 200);
        let kept: HashSet<&String> = sampled.rules.iter().map(|(c, _)| c).collect();
        assert!((140..=260).contains(&kept.len()), "{}", kept.len());
        // Whole customers: their links and engagement come with their rules.
        assert!(sampled.links.iter().all(|(c, _)| kept.contains(c)));
        assert_eq!(sampled.links.len(), kept.len());
        assert_eq!(sampled.engagements.len(), kept.len());
        assert_eq!(sampled.dismissals["t"], 40);
        // The same customers every time.
        let mut again = input;
        sample_training(&mut again, 200);
        assert_eq!(again.rules, sampled.rules);
    }

    #[test]
    fn links_are_engagement_inputs_and_unlinked_targets_are_not_recommended() {
        let mut rules = Vec::new();
        let mut links = Vec::new();
        for c in 0..20 {
            links.push((format!("c{c}"), "airline".to_owned()));
            links.push((format!("c{c}"), "hotel".to_owned()));
            if c < 16 {
                rules.push(rule(c, "flight.delayed", "room.hold", None));
            }
        }
        let served = Served::new(train(
            Population {
                rules,
                links,
                ..Default::default()
            },
            1,
            0,
            0.2,
            10,
        ));
        let both = vec!["airline".to_owned(), "hotel".to_owned()];
        // No rules yet: recommended from the links alone, with the link as the reason.
        let none = HashSet::new();
        let recs = served.recommend(&[], &both, &none, &[], &none, 0.5);
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert!(recs[0].reason.contains("who link"), "{}", recs[0].reason);
        assert_eq!(recs[0].needs_link, None);
        // Without the hotel linked, a rule targeting it needs one more link: recommended as
        // such when the hotel can be linked, not at all otherwise.
        let hotel: HashSet<String> = ["hotel".to_owned()].into();
        let recs = served.recommend(&[], &both[..1], &hotel, &[], &none, 0.0);
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0].needs_link.as_deref(), Some("hotel"));
        assert!(served
            .recommend(&[], &both[..1], &none, &[], &none, 0.0)
            .is_empty());
        // Two links missing: not recommended.
        assert!(served
            .recommend(&[], &[], &hotel, &[], &none, 0.0)
            .is_empty());
    }

    #[test]
    fn received_event_types_are_engagement_inputs() {
        let mut rules = Vec::new();
        let mut received = Vec::new();
        for c in 0..20 {
            received.push((format!("c{c}"), "airline.flight.delayed".to_owned()));
            if c < 16 {
                rules.push(rule(c, "flight.delayed", "room.hold", None));
            }
        }
        let pop = Population {
            rules,
            received,
            ..Default::default()
        };
        let served = Served::new(train(pop, 1, 0, 0.2, 10));
        let both = vec!["airline".to_owned(), "hotel".to_owned()];
        let recs = served.recommend(
            &[],
            &both,
            &HashSet::new(),
            &["airline.flight.delayed".to_owned()],
            &HashSet::new(),
            0.5,
        );
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert!(
            recs[0]
                .reason
                .contains("who receive airline.flight.delayed"),
            "{}",
            recs[0].reason
        );
    }
}
