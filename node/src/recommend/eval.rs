//! Offline evaluation on the IFTTT rules dataset (RecRules' split): `custos recommend-eval`.
//!
//! Rules map to templates: the trigger channel is the source entity, the trigger the event
//! type, the action channel the target entity, the action the command type. Users are
//! customers with their trainset rules; their testset rules are predicted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use super::{
    calibration_feature, calibration_samples, holdout, Calibrator, IdSet, Interactions, ItemCosine,
    Popularity, Rp3Beta, Scorer,
};

/// Why the data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// A line is not in the expected format.
    #[error("{file} line {line}: {why}")]
    Format {
        /// File.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// The dataset: rule names and the two splits (user -> rule ids).
#[derive(Debug, Default)]
pub struct Dataset {
    /// rule id -> `trigger_<channel>_<trigger>_action_<channel>_<action>`.
    pub rules: HashMap<u64, String>,
    /// The authors' training split.
    pub train: BTreeMap<u64, Vec<u64>>,
    /// The authors' test split.
    pub test: BTreeMap<u64, Vec<u64>>,
}

fn read_pairs(path: &Path) -> Result<BTreeMap<u64, Vec<u64>>, EvalError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io(name.clone(), e))?;
    let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut f = line.split('\t');
        let parse = |v: Option<&str>| v.and_then(|s| s.trim().parse::<u64>().ok());
        let (Some(user), Some(rule)) = (parse(f.next()), parse(f.next())) else {
            return Err(EvalError::Format {
                file: name,
                line: n + 1,
                why: "want user<TAB>rule<TAB>1".into(),
            });
        };
        let items = out.entry(user).or_default();
        if !items.contains(&rule) {
            items.push(rule);
        }
    }
    Ok(out)
}

/// Reads `rules`, `trainset` and `testset` from `dir`.
pub fn load(dir: &Path) -> Result<Dataset, EvalError> {
    let rules_path = dir.join("rules");
    let name = rules_path.display().to_string();
    let text = std::fs::read_to_string(&rules_path).map_err(|e| EvalError::Io(name.clone(), e))?;
    let mut rules = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let mut f = line.splitn(2, '\t');
        match (
            f.next().and_then(|s| s.trim().parse::<u64>().ok()),
            f.next(),
        ) {
            (Some(id), Some(r)) => {
                rules.insert(id, r.trim().to_owned());
            }
            _ if line.trim().is_empty() => {}
            _ => {
                return Err(EvalError::Format {
                    file: name,
                    line: n + 1,
                    why: "want id<TAB>name".into(),
                })
            }
        }
    }
    Ok(Dataset {
        rules,
        train: read_pairs(&dir.join("trainset"))?,
        test: read_pairs(&dir.join("testset"))?,
    })
}

/// A rule as a vault template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Trigger channel = source entity.
    pub source: String,
    /// Trigger = event type.
    pub event_type: String,
    /// Action channel = target entity.
    pub target: String,
    /// Action = command type.
    pub command_type: String,
}

/// Channels derived from the names. A channel is the first word of a trigger or action part,
/// extended by the second word when that word is specific to few first words (it follows at
/// most two of them, as `drive` in `google_drive` or `photos` in `android_photos`/`ios_photos`)
/// and the two-word prefix starts at least two distinct parts. Generic second words (`new`,
/// `create`, `any`, ...) follow many channels and so stay in the trigger or action name.
pub fn derive_channels(names: &[&str]) -> HashSet<String> {
    let mut parts: HashSet<&str> = HashSet::new();
    for n in names {
        if let Some((t, a)) = n
            .strip_prefix("trigger_")
            .and_then(|r| r.split_once("_action_"))
        {
            parts.insert(t);
            parts.insert(a);
        }
    }
    let mut firsts_before: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut under_two: HashMap<(&str, &str), usize> = HashMap::new();
    for p in &parts {
        let mut w = p.split('_');
        if let (Some(a), Some(b), Some(_)) = (w.next(), w.next(), w.next()) {
            firsts_before.entry(b).or_default().insert(a);
            *under_two.entry((a, b)).or_default() += 1;
        }
    }
    let mut channels: HashSet<String> = parts
        .iter()
        .filter_map(|p| p.split('_').next().map(str::to_owned))
        .collect();
    for ((a, b), n) in under_two {
        if n >= 2 && firsts_before.get(b).is_some_and(|f| f.len() <= 2) {
            channels.insert(format!("{a}_{b}"));
        }
    }
    channels
}

fn split_part(part: &str, channels: &HashSet<String>) -> (String, String) {
    let words: Vec<&str> = part.split('_').collect();
    for len in (1..=2.min(words.len().saturating_sub(1))).rev() {
        let c = words[..len].join("_");
        if channels.contains(&c) {
            return (c, words[len..].join("_"));
        }
    }
    match part.split_once('_') {
        Some((c, rest)) => (c.to_owned(), rest.to_owned()),
        None => (part.to_owned(), String::new()),
    }
}

/// Splits a rule name into its template with the derived channels.
pub fn template(name: &str, channels: &HashSet<String>) -> Option<Template> {
    let (t, a) = name.strip_prefix("trigger_")?.split_once("_action_")?;
    let (source, event_type) = split_part(t, channels);
    let (target, command_type) = split_part(a, channels);
    Some(Template {
        source,
        event_type,
        target,
        command_type,
    })
}

/// Ranking quality at one cut-off.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metrics {
    /// Precision.
    pub p: f64,
    /// Recall.
    pub r: f64,
    /// Hit rate: share of users with at least one held-out item in the list.
    pub hr: f64,
    /// Normalised discounted cumulative gain.
    pub ndcg: f64,
}

/// P, R, HR and NDCG of one ranked list against the held-out items, at cut-off `k`.
pub fn metrics_for(ranked: &[u32], relevant: &IdSet, k: usize) -> Metrics {
    let hits: Vec<bool> = ranked
        .iter()
        .take(k)
        .map(|i| relevant.contains(i))
        .collect();
    let n_hits = hits.iter().filter(|h| **h).count() as f64;
    let dcg: f64 = hits
        .iter()
        .enumerate()
        .filter(|(_, h)| **h)
        .map(|(r, _)| 1.0 / (r as f64 + 2.0).log2())
        .sum();
    let idcg: f64 = (0..relevant.len().min(k))
        .map(|r| 1.0 / (r as f64 + 2.0).log2())
        .sum();
    Metrics {
        p: n_hits / k as f64,
        r: if relevant.is_empty() {
            0.0
        } else {
            n_hits / relevant.len() as f64
        },
        hr: if n_hits > 0.0 { 1.0 } else { 0.0 },
        ndcg: if idcg > 0.0 { dcg / idcg } else { 0.0 },
    }
}

/// Mean metrics of a scorer over users, at cut-offs 5 and 10.
fn evaluate(scorer: &dyn Scorer, users: &[(Vec<u32>, IdSet)]) -> [Metrics; 2] {
    let mut sums = [Metrics::default(); 2];
    for (train, test) in users {
        let ranked: Vec<u32> = scorer.top(train, 10).into_iter().map(|(i, _)| i).collect();
        for (slot, k) in [(0, 5), (1, 10)] {
            let m = metrics_for(&ranked, test, k);
            sums[slot].p += m.p;
            sums[slot].r += m.r;
            sums[slot].hr += m.hr;
            sums[slot].ndcg += m.ndcg;
        }
    }
    let n = users.len().max(1) as f64;
    sums.map(|m| Metrics {
        p: m.p / n,
        r: m.r / n,
        hr: m.hr / n,
        ndcg: m.ndcg / n,
    })
}

/// Options of an evaluation run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Supports below this many users are not used (1 = as the published baselines).
    pub min_support: u32,
    /// Evaluate at most this many test users (0 = all), for quick runs.
    pub max_users: usize,
}

/// The evaluation's results.
#[derive(Debug)]
pub struct Report {
    /// The chosen popularity damping.
    pub beta: f64,
    /// (method, stratum) -> [at 5, at 10].
    pub rows: Vec<(String, String, [Metrics; 2])>,
    /// (bucket low, bucket high, recommendations, mean predicted, observed precision).
    pub calibration: Vec<(f64, f64, usize, f64, f64)>,
    /// Expected calibration error.
    pub ece: f64,
    /// Users evaluated, and those without an RSS-feed rule.
    pub users: (usize, usize),
    /// Channels derived.
    pub channels: usize,
    /// Example templates (for the reader).
    pub examples: Vec<Template>,
}

/// Runs the whole evaluation: tuning and calibration on a validation split carved from the
/// trainset, figures on the testset.
pub fn run(data: &Dataset, opts: &EvalOptions) -> Report {
    let names: Vec<&str> = data.rules.values().map(String::as_str).collect();
    let channels = derive_channels(&names);
    let is_rss = |rule: &u64| {
        data.rules
            .get(rule)
            .is_some_and(|n| n.starts_with("trigger_feed_"))
    };

    let mut index: HashMap<u64, u32> = HashMap::new();
    let mut id = |r: u64| {
        let n = index.len() as u32;
        *index.entry(r).or_insert(n)
    };
    let train: Vec<(u64, Vec<u32>)> = data
        .train
        .iter()
        .map(|(u, rs)| (*u, rs.iter().map(|r| id(*r)).collect()))
        .collect();
    let test: HashMap<u64, Vec<u32>> = data
        .test
        .iter()
        .map(|(u, rs)| (*u, rs.iter().map(|r| id(*r)).collect()))
        .collect();
    let n_items = index.len();

    // Validation: hold out about a fifth of each trainset user's rules (users with >= 3).
    let (fit_users, val_users) = holdout(&train);
    let val_users: Vec<_> = val_users.into_iter().map(|(_, v)| v).collect();
    let fit = Interactions {
        users: fit_users,
        n_items,
    };
    let mut best = (0.0, f64::MIN);
    for step in 0..=10 {
        let beta = f64::from(step) / 10.0;
        let m = evaluate(&Rp3Beta::fit(&fit, beta, opts.min_support), &val_users);
        if m[1].ndcg > best.1 {
            best = (beta, m[1].ndcg);
        }
    }
    let beta = best.0;
    let val_model = Rp3Beta::fit(&fit, beta, opts.min_support);
    let samples = calibration_samples(&val_model, &val_users);
    let calibrator = Calibrator::fit(samples);

    // Test: fit on the whole trainset.
    let full = Interactions {
        users: train.iter().map(|(_, i)| i.clone()).collect(),
        n_items,
    };
    let mut users: Vec<(u64, Vec<u32>, IdSet)> = train
        .iter()
        .filter_map(|(u, items)| {
            let t = test.get(u)?;
            Some((*u, items.clone(), t.iter().copied().collect()))
        })
        .collect();
    if opts.max_users > 0 {
        users.truncate(opts.max_users);
    }
    let no_rss: Vec<(Vec<u32>, IdSet)> = users
        .iter()
        .filter(|(u, _, _)| {
            let all = data
                .train
                .get(u)
                .into_iter()
                .chain(data.test.get(u))
                .flatten();
            !all.clone().any(is_rss)
        })
        .map(|(_, a, b)| (a.clone(), b.clone()))
        .collect();
    let all: Vec<(Vec<u32>, IdSet)> = users
        .iter()
        .map(|(_, a, b)| (a.clone(), b.clone()))
        .collect();

    let model = Rp3Beta::fit(&full, beta, opts.min_support);
    let k_anon = Rp3Beta::fit(&full, beta, opts.min_support.max(10));
    let scorers: Vec<(String, Box<dyn Scorer>)> = vec![
        ("popularity".into(), Box::new(Popularity::fit(&full))),
        (
            "item co-occurrence (cosine)".into(),
            Box::new(ItemCosine::fit(&full)),
        ),
        (format!("RP3beta (beta {beta:.1})"), Box::new(model)),
        (
            format!("RP3beta, k-anonymity {}", opts.min_support.max(10)),
            Box::new(k_anon),
        ),
    ];
    let mut rows = Vec::new();
    for (name, s) in &scorers {
        rows.push((
            name.clone(),
            "all users".to_owned(),
            evaluate(s.as_ref(), &all),
        ));
        rows.push((
            name.clone(),
            "users without RSS rules".to_owned(),
            evaluate(s.as_ref(), &no_rss),
        ));
    }

    // Calibration on the testset, for the RP3beta recommendations.
    let model = &scorers[2].1;
    let mut buckets = vec![(0usize, 0.0f64, 0usize); 10];
    for (train_items, held) in &all {
        let top = model.top(train_items, 10);
        let top_score = top.first().map(|t| t.1).unwrap_or(0.0);
        for (rank, (i, s)) in top.iter().enumerate() {
            let c = calibrator.confidence(calibration_feature(*s, top_score, rank));
            let b = ((c * 10.0) as usize).min(9);
            buckets[b].0 += 1;
            buckets[b].1 += c;
            buckets[b].2 += usize::from(held.contains(i));
        }
    }
    let total: usize = buckets.iter().map(|b| b.0).sum();
    let mut calibration = Vec::new();
    let mut ece = 0.0;
    for (b, (n, sum_c, hits)) in buckets.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        let (pred, obs) = (sum_c / *n as f64, *hits as f64 / *n as f64);
        ece += (*n as f64 / total.max(1) as f64) * (pred - obs).abs();
        calibration.push((b as f64 / 10.0, (b + 1) as f64 / 10.0, *n, pred, obs));
    }
    let examples = data
        .rules
        .values()
        .take(3)
        .filter_map(|n| template(n, &channels))
        .collect();
    Report {
        beta,
        rows,
        calibration,
        ece,
        users: (all.len(), no_rss.len()),
        channels: channels.len(),
        examples,
    }
}

impl Report {
    /// The report as Markdown tables.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} test users ({} without an RSS-feed rule); {} channels derived; popularity damping chosen on validation: beta = {:.1}\n",
            self.users.0, self.users.1, self.channels, self.beta
        );
        let _ = writeln!(
            s,
            "| method | users | P@5 | R@5 | HR@5 | NDCG@5 | P@10 | R@10 | HR@10 | NDCG@10 |"
        );
        let _ = writeln!(
            s,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (m, who, [a, b]) in &self.rows {
            let _ = writeln!(
                s,
                "| {m} | {who} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                a.p, a.r, a.hr, a.ndcg, b.p, b.r, b.hr, b.ndcg
            );
        }
        let _ = writeln!(
            s,
            "\nCalibration of RP3beta's confidence on the testset (top-10 lists):\n"
        );
        let _ = writeln!(
            s,
            "| predicted confidence | recommendations | mean predicted | observed precision |"
        );
        let _ = writeln!(s, "| --- | --- | --- | --- |");
        for (lo, hi, n, pred, obs) in &self.calibration {
            let _ = writeln!(s, "| {lo:.1}-{hi:.1} | {n} | {pred:.3} | {obs:.3} |");
        }
        let _ = writeln!(s, "\nExpected calibration error: {:.3}", self.ece);
        for t in &self.examples {
            let _ = writeln!(
                s,
                "example template: {}.{} -> {}.{}",
                t.source, t.event_type, t.target, t.command_type
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_rule_names_with_derived_channels() {
        let names = [
            "trigger_android_photos_new_screenshot_action_dropbox_add_file_from_url",
            "trigger_android_photos_new_photo_action_dropbox_add_file_from_url",
            "trigger_android_photos_any_new_photo_action_google_drive_upload_file",
            "trigger_feed_new_feed_item_action_google_drive_append_to_doc",
            "trigger_feed_new_item_matches_action_google_drive_create_doc",
            "trigger_feed_any_item_action_dropbox_add_text",
            "trigger_feed_any_item_action_evernote_add_note",
            "trigger_feed_new_feed_item_action_evernote_add_to_notebook",
            "trigger_feed_new_feed_item_action_box_add_file",
            "trigger_pocket_new_item_action_box_add_file",
            "trigger_gmail_new_email_action_box_add_file",
        ];
        let ch = derive_channels(&names);
        let t = template(names[0], &ch).expect("splits");
        assert_eq!(t.source, "android_photos");
        assert_eq!(t.event_type, "new_screenshot");
        assert_eq!(t.target, "dropbox");
        assert_eq!(t.command_type, "add_file_from_url");
        let t = template(names[3], &ch).expect("splits");
        assert_eq!(
            (t.source.as_str(), t.target.as_str()),
            ("feed", "google_drive")
        );
    }

    #[test]
    fn metrics_by_hand() {
        let rel: IdSet = [1, 9].into_iter().collect();
        let m = metrics_for(&[1, 2, 3, 4, 5], &rel, 5);
        assert!((m.p - 0.2).abs() < 1e-9);
        assert!((m.r - 0.5).abs() < 1e-9);
        assert!((m.hr - 1.0).abs() < 1e-9);
        let idcg = 1.0 + 1.0 / 3f64.log2();
        assert!((m.ndcg - 1.0 / idcg).abs() < 1e-9);
    }

    /// The loader and the whole run on a small dataset written in the IFTTT files' format.
    #[test]
    fn evaluation_runs_on_a_small_slice() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let names = [
            "trigger_airline_flight_delayed_action_hotel_room_hold",
            "trigger_airline_flight_landed_action_taxi_book_ride",
            "trigger_feed_new_item_action_email_send",
            "trigger_bank_call_ended_action_insurer_callback",
        ];
        let rules: String = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{}\t{n}\n", i + 1))
            .collect();
        std::fs::write(dir.path().join("rules"), rules)?;
        let (mut train, mut test) = (String::new(), String::new());
        for u in 0..60u32 {
            // Everyone keeps rule 1; two thirds also keep rule 2; the held-out rule is 2 for
            // a third of the users who lack it in train, and 4 for some.
            train.push_str(&format!("{u}\t1\t1.0\n"));
            if u % 3 != 0 {
                train.push_str(&format!("{u}\t2\t1.0\n"));
                if u % 2 == 0 {
                    train.push_str(&format!("{u}\t3\t1.0\n"));
                }
            } else {
                test.push_str(&format!("{u}\t2\t1.0\n"));
            }
            if u % 5 == 0 {
                test.push_str(&format!("{u}\t4\t1.0\n"));
            }
        }
        std::fs::write(dir.path().join("trainset"), train)?;
        std::fs::write(dir.path().join("testset"), test)?;
        let data = load(dir.path())?;
        let report = run(
            &data,
            &EvalOptions {
                min_support: 1,
                max_users: 0,
            },
        );
        let rp3 = report
            .rows
            .iter()
            .find(|r| r.0.starts_with("RP3beta ("))
            .ok_or("no row")?;
        assert!(rp3.2[1].hr > 0.5, "the planted rule is found: {:?}", rp3.2);
        assert!(report.users.0 > 0 && report.users.1 > 0);
        assert!(report.to_markdown().contains("| popularity | all users |"));
        Ok(())
    }
}
