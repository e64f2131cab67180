//! Rule recommendations from engagement: which rule templates customers with similar
//! engagements keep, scored by a graph random walk with popularity damping (RP3beta), with
//! confidences calibrated on held-out data and k-anonymous supports.
//!
//! Pure code over item ids; [`eval`] runs it on the IFTTT rule dataset beside the popularity
//! and item co-occurrence baselines.

pub mod eval;
pub mod vault;

use std::hash::{Hash, Hasher};

use custos_raft::records::RankerRecord;

/// A map keyed by dense item id. FxHash rather than the default SipHash: several times
/// faster on `u32` keys, and the ids are the trainer's own (never chosen by a caller), so
/// hash flooding does not apply.
pub type IdMap<V> = rustc_hash::FxHashMap<u32, V>;

/// A set of dense item ids (see [`IdMap`]).
pub type IdSet = rustc_hash::FxHashSet<u32>;

/// Users' kept items (rule templates), as dense ids.
#[derive(Debug, Clone, Default)]
pub struct Interactions {
    /// Each user's items, deduplicated.
    pub users: Vec<Vec<u32>>,
    /// Number of distinct items.
    pub n_items: usize,
}

impl Interactions {
    /// How many users keep each item.
    pub fn popularity(&self) -> Vec<u32> {
        let mut pop = vec![0u32; self.n_items];
        for items in &self.users {
            for &i in items {
                pop[i as usize] += 1;
            }
        }
        pop
    }
}

/// A way to score candidate items for a user.
pub trait Scorer {
    /// Raw scores of items the user does not have, best first, at most `k`.
    fn top(&self, user_items: &[u32], k: usize) -> Vec<(u32, f64)>;
}

fn top_k(scores: IdMap<f64>, user_items: &[u32], k: usize) -> Vec<(u32, f64)> {
    let mut v: Vec<(u32, f64)> = scores
        .into_iter()
        .filter(|(i, s)| *s > 0.0 && !user_items.contains(i))
        .collect();
    // Ties broken by id so results are reproducible.
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

/// Sums the rows of the user's items: the shared step of the co-occurrence scorers.
fn sum_rows(rows: &[IdMap<f64>], user_items: &[u32], k: usize) -> Vec<(u32, f64)> {
    let mut scores: IdMap<f64> = IdMap::default();
    for &i in user_items {
        for (&j, &w) in &rows[i as usize] {
            *scores.entry(j).or_insert(0.0) += w;
        }
    }
    top_k(scores, user_items, k)
}

/// One validation user: the items kept for fitting, and those held out.
pub type Holdout = (Vec<u32>, IdSet);

/// A held-out split: each user with at least 3 items has about a fifth of them (chosen by a
/// fixed hash of user and item) held out. Returns every user's kept items, and
/// (user's position, (kept, held out)) for the users with both.
pub fn holdout<K: Hash>(users: &[(K, Vec<u32>)]) -> (Vec<Vec<u32>>, Vec<(usize, Holdout)>) {
    holdout_salted(users, ())
}

/// [`holdout`] with the hash salted, so a second split of the kept items holds out other
/// items than the first (`()` gives the unsalted split).
pub fn holdout_salted<K: Hash, S: Hash>(
    users: &[(K, Vec<u32>)],
    salt: S,
) -> (Vec<Vec<u32>>, Vec<(usize, Holdout)>) {
    let mut fit = Vec::with_capacity(users.len());
    let mut val = Vec::new();
    for (n, (user, items)) in users.iter().enumerate() {
        let (held, kept): (Vec<u32>, Vec<u32>) = if items.len() >= 3 {
            items.iter().partition(|i| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (&salt, user, **i).hash(&mut h);
                h.finish().is_multiple_of(5)
            })
        } else {
            (Vec::new(), items.clone())
        };
        if !held.is_empty() && !kept.is_empty() {
            val.push((n, (kept.clone(), held.into_iter().collect())));
            fit.push(kept);
        } else {
            fit.push(items.clone());
        }
    }
    (fit, val)
}

/// (calibration feature, hit) of every top-10 recommendation for the held-out users.
pub fn calibration_samples(model: &dyn Scorer, val: &[(Vec<u32>, IdSet)]) -> Vec<(f64, bool)> {
    let mut samples = Vec::new();
    for (kept, held) in val {
        let top = model.top(kept, 10);
        let best = top.first().map(|t| t.1).unwrap_or(0.0);
        for (rank, (i, s)) in top.iter().enumerate() {
            samples.push((calibration_feature(*s, best, rank), held.contains(i)));
        }
    }
    samples
}

/// Baseline: the most kept items.
#[derive(Debug)]
pub struct Popularity {
    ranked: Vec<(u32, f64)>,
}

impl Popularity {
    /// Counts items over the population.
    pub fn fit(data: &Interactions) -> Self {
        let n = data.users.len().max(1) as f64;
        let mut ranked: Vec<(u32, f64)> = data
            .popularity()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (i as u32, f64::from(c) / n))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Popularity { ranked }
    }
}

impl Scorer for Popularity {
    fn top(&self, user_items: &[u32], k: usize) -> Vec<(u32, f64)> {
        self.ranked
            .iter()
            .filter(|(i, _)| !user_items.contains(i))
            .take(k)
            .copied()
            .collect()
    }
}

/// Every ordered pair of items the users keep together: per item, each other item with how
/// many users keep both and the sum over them of 1 / their item count.
fn pair_sums(data: &Interactions) -> Vec<IdMap<(u32, f64)>> {
    let mut rows: Vec<IdMap<(u32, f64)>> = vec![IdMap::default(); data.n_items];
    for items in &data.users {
        let w = 1.0 / items.len().max(1) as f64;
        for &i in items {
            let row = &mut rows[i as usize];
            for &j in items {
                if i != j {
                    let e = row.entry(j).or_insert((0, 0.0));
                    e.0 += 1;
                    e.1 += w;
                }
            }
        }
    }
    rows
}

/// Baseline: item co-occurrence, cosine-normalised, summed over the user's items.
#[derive(Debug)]
pub struct ItemCosine {
    sim: Vec<IdMap<f64>>,
}

impl ItemCosine {
    /// Builds cosine similarities from co-occurrence counts.
    pub fn fit(data: &Interactions) -> Self {
        let pop = data.popularity();
        let sim = pair_sums(data)
            .into_iter()
            .enumerate()
            .map(|(i, row)| {
                row.into_iter()
                    .map(|(j, (c, _))| {
                        let norm = (f64::from(pop[i]) * f64::from(pop[j as usize])).sqrt();
                        (j, f64::from(c) / norm.max(1.0))
                    })
                    .collect()
            })
            .collect();
        ItemCosine { sim }
    }
}

impl Scorer for ItemCosine {
    fn top(&self, user_items: &[u32], k: usize) -> Vec<(u32, f64)> {
        sum_rows(&self.sim, user_items, k)
    }
}

/// RP3beta (Paudel et al., 2017): the probability of reaching item j in a three-step random
/// walk item -> user -> item from the user's items, divided by popularity(j)^beta so popular
/// items do not crowd out specific ones. Supports below `min_support` users are dropped, so a
/// recommendation never rests on fewer than `min_support` other customers (k-anonymity).
#[derive(Debug)]
pub struct Rp3Beta {
    walk: Vec<IdMap<f64>>,
    support: Vec<IdMap<u32>>,
    popularity: Vec<u32>,
    /// Popularity damping.
    pub beta: f64,
}

/// A co-occurring pair: (from, to, users keeping both, sum over them of 1 / their item count).
pub type Pair = (u32, u32, u32, f64);

/// Aggregates of a population: item popularity and the pairs kept by at least `min_support`
/// users.
pub fn aggregates(data: &Interactions, min_support: u32) -> (Vec<u32>, Vec<Pair>) {
    let mut pairs = Vec::new();
    for (i, row) in pair_sums(data).iter().enumerate() {
        for (&j, &(c, w)) in row {
            if c >= min_support {
                pairs.push((i as u32, j, c, w));
            }
        }
    }
    pairs.sort_by_key(|p| (p.0, p.1));
    (data.popularity(), pairs)
}

impl Rp3Beta {
    /// Builds the walk probabilities.
    pub fn fit(data: &Interactions, beta: f64, min_support: u32) -> Self {
        let (popularity, pairs) = aggregates(data, min_support);
        Self::from_aggregates(popularity, &pairs, beta)
    }

    /// Builds the model from stored aggregates (see [`aggregates`]).
    pub fn from_aggregates(
        popularity: Vec<u32>,
        pairs: &[(u32, u32, u32, f64)],
        beta: f64,
    ) -> Self {
        let n = popularity.len();
        let mut walk = vec![IdMap::default(); n];
        let mut support = vec![IdMap::default(); n];
        for &(i, j, c, w) in pairs {
            let (Some(pi), Some(pj)) = (popularity.get(i as usize), popularity.get(j as usize))
            else {
                continue;
            };
            // A pair without walk weight (a rule part's, see `vault`) counts customers only.
            if w > 0.0 {
                let p = w / (f64::from((*pi).max(1)) * f64::from((*pj).max(1)).powf(beta));
                walk[i as usize].insert(j, p);
            }
            support[i as usize].insert(j, c);
        }
        Rp3Beta {
            walk,
            support,
            popularity,
            beta,
        }
    }

    /// How many customers keep both `from` and `to`.
    pub fn support(&self, from: u32, to: u32) -> u32 {
        self.support
            .get(from as usize)
            .and_then(|r| r.get(&to))
            .copied()
            .unwrap_or(0)
    }

    /// How many customers keep `item`.
    pub fn popularity(&self, item: u32) -> u32 {
        self.popularity.get(item as usize).copied().unwrap_or(0)
    }

    /// What the user's items say of every item they reach, in one pass over their rows: the
    /// walk's score, the cosine similarity summed, how many of the user's items co-occur with
    /// it (in at least k customers), and the largest share of an item's customers who also keep
    /// it. The user's own items are left out.
    pub fn evidence(&self, user_items: &[u32]) -> IdMap<Evidence> {
        let mut out: IdMap<Evidence> = IdMap::default();
        for &i in user_items {
            let (Some(walk), Some(support)) =
                (self.walk.get(i as usize), self.support.get(i as usize))
            else {
                continue;
            };
            let pop_i = f64::from(self.popularity(i).max(1));
            for (&j, &p) in walk {
                let c = f64::from(support.get(&j).copied().unwrap_or(0));
                let e = out.entry(j).or_default();
                e.walk += p;
                e.cosine += c / (pop_i * f64::from(self.popularity(j).max(1))).sqrt();
                e.items += 1;
                e.frequency = e.frequency.max(c / pop_i);
            }
        }
        out.retain(|j, _| !user_items.contains(j));
        out
    }

    /// The cosine similarity of two items' customers (0 for a pair under k customers).
    pub fn cosine(&self, a: u32, b: u32) -> f64 {
        let c = f64::from(self.support(a, b));
        c / (f64::from(self.popularity(a).max(1)) * f64::from(self.popularity(b).max(1))).sqrt()
    }

    /// The cosine similarities of the user's items to every item `wanted` accepts, summed
    /// (items reached only through pairs of at least k customers).
    pub fn cosine_sums(&self, user_items: &[u32], wanted: &dyn Fn(u32) -> bool) -> IdMap<f64> {
        let mut out: IdMap<f64> = IdMap::default();
        for &i in user_items {
            let Some(row) = self.support.get(i as usize) else {
                continue;
            };
            let pop_i = f64::from(self.popularity(i).max(1));
            for (&j, &c) in row {
                if wanted(j) {
                    *out.entry(j).or_default() +=
                        f64::from(c) / (pop_i * f64::from(self.popularity(j).max(1))).sqrt();
                }
            }
        }
        out
    }

    /// The user's item whose customers go most with `to` (highest cosine), if any does.
    pub fn closest(&self, user_items: &[u32], to: u32) -> Option<u32> {
        user_items
            .iter()
            .map(|&i| (i, self.cosine(i, to)))
            .filter(|(_, c)| *c > 0.0)
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i)
    }

    /// The user's item that contributes most to `to`'s score: the reason shown.
    pub fn strongest_reason(&self, user_items: &[u32], to: u32) -> Option<u32> {
        user_items
            .iter()
            .filter_map(|&i| self.walk[i as usize].get(&to).map(|p| (i, *p)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
    }
}

impl Scorer for Rp3Beta {
    fn top(&self, user_items: &[u32], k: usize) -> Vec<(u32, f64)> {
        sum_rows(&self.walk, user_items, k)
    }
}

/// What a user's items say of one item they reach (see [`Rp3Beta::evidence`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Evidence {
    /// RP3beta's score.
    pub walk: f64,
    /// Cosine similarities summed.
    pub cosine: f64,
    /// How many of the user's items co-occur with it.
    pub items: u32,
    /// The largest share of one of the user's items' customers who also keep it.
    pub frequency: f64,
}

/// A logistic regression from a candidate's features and their pairwise products to the
/// probability that the customer keeps it: the ranking and the confidence in one, fitted on
/// held-out data, so what is served is calibrated by construction. The products let one
/// feature's weight depend on another (a strong walk score counts for less when the rule needs
/// a link); they won over the features alone on validation (see the README). Each sample may
/// carry a fixed offset added to its log-odds (the dismissal signal) and a weight (not-kept
/// samples are subsampled), which is why this is fitted here (Newton's method with an L2
/// penalty on standardised features) rather than by a library.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranker {
    record: RankerRecord,
}

/// One training sample of the [`Ranker`].
#[derive(Debug, Clone, PartialEq)]
pub struct RankerSample {
    /// The candidate's features.
    pub features: Vec<f64>,
    /// Added to the log-odds.
    pub offset: f64,
    /// Whether the customer kept it.
    pub kept: bool,
    /// How many samples this one stands for.
    pub weight: f64,
}

/// Fewest samples of the warm start's subsample (see [`Ranker::fit`]).
const WARM_START_SAMPLES: usize = 2_000;

/// The two standardisations of the ranker's features: of the features, then of their
/// expansion.
struct Standardised<'a> {
    means: &'a [f64],
    scales: &'a [f64],
    mean2: &'a [f64],
    scale2: &'a [f64],
}

impl Standardised<'_> {
    /// A sample's standardised expansion, after a 1 for the intercept, into `z`.
    fn expand(&self, s: &RankerSample, x: &mut Vec<f64>, z: &mut [f64]) {
        Ranker::expand(self.means, self.scales, &s.features, x);
        z[0] = 1.0;
        for (k, v) in x.iter().enumerate() {
            z[k + 1] = (v - self.mean2[k]) / self.scale2[k];
        }
    }

    /// A sample's log-odds under weights `w` (its expansion left in `z`).
    fn logit(&self, s: &RankerSample, w: &[f64], x: &mut Vec<f64>, z: &mut [f64]) -> f64 {
        self.expand(s, x, z);
        s.offset + z.iter().zip(w).map(|(a, b)| a * b).sum::<f64>()
    }

    /// The gradient and Hessian of the unpenalised loss at `w` (the Hessian whole, though
    /// summed on its lower triangle).
    fn gradient_and_hessian(
        &self,
        samples: &[RankerSample],
        w: &[f64],
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let dim = w.len();
        let (mut x, mut z) = (Vec::new(), vec![0.0; dim]);
        let mut cols = vec![0.0; dim * HESSIAN_BLOCK];
        let mut grad = vec![0.0; dim];
        // Lower triangle only; mirrored at the end.
        let mut hess = vec![vec![0.0; dim]; dim];
        for block in samples.chunks(HESSIAN_BLOCK) {
            // The block's expansions, one column per feature (scaled by the square root of
            // each sample's curvature), so each Hessian entry takes a whole block in one dot
            // product instead of being read and written once per sample.
            for (k, s) in block.iter().enumerate() {
                let p = sigmoid(self.logit(s, w, &mut x, &mut z));
                let r = s.weight * (p - if s.kept { 1.0 } else { 0.0 });
                let root = (s.weight * p * (1.0 - p)).sqrt();
                for (a, (g, za)) in grad.iter_mut().zip(&z).enumerate() {
                    *g += r * za;
                    cols[a * HESSIAN_BLOCK + k] = root * za;
                }
            }
            // A short block's unused rows stay zero from here on: they add nothing.
            if block.len() < HESSIAN_BLOCK {
                for col in cols.chunks_exact_mut(HESSIAN_BLOCK) {
                    col[block.len()..].fill(0.0);
                }
            }
            for (a, row) in hess.iter_mut().enumerate() {
                let ca = &cols[a * HESSIAN_BLOCK..(a + 1) * HESSIAN_BLOCK];
                for (b, h) in row[..=a].iter_mut().enumerate() {
                    *h += dot(ca, &cols[b * HESSIAN_BLOCK..(b + 1) * HESSIAN_BLOCK]);
                }
            }
        }
        for a in 0..dim {
            let (upper, lower) = hess.split_at_mut(a);
            for (b, row_b) in upper.iter_mut().enumerate() {
                row_b[a] = lower[0][b];
            }
        }
        (grad, hess)
    }

    /// The penalised logistic loss of weights `w`.
    fn loss(&self, samples: &[RankerSample], l2: f64, w: &[f64]) -> f64 {
        let (mut x, mut z) = (Vec::new(), vec![0.0; w.len()]);
        let data: f64 = samples
            .iter()
            .map(|s| {
                let logit = self.logit(s, w, &mut x, &mut z);
                // -log sigmoid(logit) if kept, -log(1 - sigmoid(logit)) if not.
                let signed = if s.kept { -logit } else { logit };
                s.weight * (signed.max(0.0) + (-signed.abs()).exp().ln_1p())
            })
            .sum();
        data + l2 / 2.0 * w.iter().skip(1).map(|v| v * v).sum::<f64>()
    }
}

/// Samples whose Hessian terms [`newton`] adds in one pass.
const HESSIAN_BLOCK: usize = 32;

/// The dot product of two equal-length slices, in four running sums (which the compiler can
/// keep in vector registers; one running sum must be added in order).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut sums = [0.0; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a4.zip(b4) {
        for k in 0..4 {
            sums[k] += x[k] * y[k];
        }
    }
    sums.iter().sum::<f64>() + tail
}

/// Newton's method for the penalised logistic loss on the standardised expansion, from `w`,
/// each step halved until the loss does not grow (a start far from the optimum can overshoot),
/// until Newton's step moves no weight by 1e-6 (at most 30 steps). None if a step cannot be
/// solved.
fn newton(samples: &[RankerSample], st: &Standardised<'_>, l2: f64, w: &mut [f64]) -> Option<()> {
    let dim = w.len();
    let mut loss = st.loss(samples, l2, w);
    for _ in 0..30 {
        let (mut grad, mut hess) = st.gradient_and_hessian(samples, w);
        // The penalty, on every weight but the intercept.
        for (a, (g, row)) in grad.iter_mut().zip(hess.iter_mut()).enumerate().skip(1) {
            *g += l2 * w[a];
            row[a] += l2;
        }
        let step = solve_symmetric(hess, grad)?;
        let mut scale = 1.0;
        let mut next: Vec<f64> = Vec::with_capacity(dim);
        let mut accepted = false;
        for _ in 0..20 {
            next.clear();
            next.extend(w.iter().zip(&step).map(|(wk, d)| wk - scale * d));
            let next_loss = st.loss(samples, l2, &next);
            if next_loss <= loss || !loss.is_finite() {
                loss = next_loss;
                accepted = true;
                break;
            }
            scale /= 2.0;
        }
        if !accepted {
            // No step lowers the loss: at the optimum, to rounding.
            break;
        }
        w.copy_from_slice(&next);
        // Converged when Newton's own step is tiny, not when a step shortened by the line
        // search happens to be.
        if step.iter().fold(0.0f64, |m, d| m.max(d.abs())) < 1e-6 {
            break;
        }
    }
    Some(())
}

impl Ranker {
    /// A ranker from its stored form.
    pub fn from_record(record: RankerRecord) -> Self {
        Ranker { record }
    }

    /// Its stored form.
    pub fn record(&self) -> &RankerRecord {
        &self.record
    }

    /// The features standardised, then their pairwise products (squares included).
    fn expand(means: &[f64], scales: &[f64], features: &[f64], out: &mut Vec<f64>) {
        out.clear();
        out.extend(
            features
                .iter()
                .zip(means.iter().zip(scales))
                .map(|(f, (m, s))| (f - m) / s),
        );
        let n = out.len();
        for a in 0..n {
            for b in a..n {
                out.push(out[a] * out[b]);
            }
        }
    }

    /// Fits on samples whose features all have `n` values; `l2` penalises the standardised
    /// weights (not the intercept). None without both kept and not-kept samples.
    pub fn fit(samples: &[RankerSample], n: usize, l2: f64) -> Option<Self> {
        let kept = samples.iter().filter(|s| s.kept).count();
        if kept == 0 || kept == samples.len() || samples.iter().any(|s| s.features.len() != n) {
            return None;
        }
        let total: f64 = samples.iter().map(|s| s.weight).sum();
        let (means, scales) = moments(
            samples.iter().map(|s| (s.features.as_slice(), s.weight)),
            n,
            total,
        );
        // The expanded features are standardised too, so the penalty treats them alike.
        let mut x = Vec::new();
        let dim_expanded = n + n * (n + 1) / 2;
        let (mean2, scale2) = {
            let mut sum = vec![0.0; dim_expanded];
            let mut sq = vec![0.0; dim_expanded];
            for s in samples {
                Self::expand(&means, &scales, &s.features, &mut x);
                for ((a, b), v) in sum.iter_mut().zip(sq.iter_mut()).zip(&x) {
                    *a += s.weight * v;
                    *b += s.weight * v * v;
                }
            }
            let mean: Vec<f64> = sum.iter().map(|a| a / total).collect();
            let scale: Vec<f64> = sq
                .iter()
                .zip(&mean)
                .map(|(b, m)| (b / total - m * m).max(0.0).sqrt().max(1e-9))
                .collect();
            (mean, scale)
        };
        let dim = dim_expanded + 1;
        let standard = Standardised {
            means: &means,
            scales: &scales,
            mean2: &mean2,
            scale2: &scale2,
        };
        // A start from a fit on every eighth sample (each counted eight times): most of
        // Newton's steps are taken there, at an eighth of the cost, and a few on all of them
        // finish.
        let mut w = vec![0.0; dim];
        if samples.len() >= 8 * WARM_START_SAMPLES {
            let every_eighth: Vec<RankerSample> = samples
                .iter()
                .step_by(8)
                .map(|s| RankerSample {
                    weight: s.weight * 8.0,
                    ..s.clone()
                })
                .collect();
            // Should the subsample's fit fail, all the samples start from zero.
            if newton(&every_eighth, &standard, l2, &mut w).is_none() {
                w.iter_mut().for_each(|v| *v = 0.0);
            }
        }
        newton(samples, &standard, l2, &mut w)?;
        // The second standardisation folded into the weights.
        let mut weights = vec![w[0]];
        for k in 0..dim_expanded {
            weights[0] -= w[k + 1] * mean2[k] / scale2[k];
            weights.push(w[k + 1] / scale2[k]);
        }
        weights.iter().all(|x| x.is_finite()).then_some(Ranker {
            record: RankerRecord {
                means,
                scales,
                weights,
            },
        })
    }

    /// The probability that a candidate with these features (and log-odds offset) is kept.
    pub fn probability(&self, features: &[f64], offset: f64) -> f64 {
        sigmoid(self.log_odds(features) + offset)
    }

    /// The log-odds that a candidate with these features is kept (no offset).
    pub fn log_odds(&self, features: &[f64]) -> f64 {
        let r = &self.record;
        let Some((bias, w)) = r.weights.split_first() else {
            return f64::NEG_INFINITY;
        };
        if features.len() != r.means.len() {
            return f64::NEG_INFINITY;
        }
        let mut x = Vec::with_capacity(w.len());
        Self::expand(&r.means, &r.scales, features, &mut x);
        bias + w.iter().zip(&x).map(|(a, b)| a * b).sum::<f64>()
    }

    /// This ranker with its log-odds mapped to `slope * log_odds + intercept` (offsets are
    /// still added after): the weights scaled and the intercept moved, so the stored form and
    /// serving stay the same.
    pub fn shifted(mut self, slope: f64, intercept: f64) -> Self {
        for w in &mut self.record.weights {
            *w *= slope;
        }
        if let Some(bias) = self.record.weights.first_mut() {
            *bias += intercept;
        }
        self
    }
}

/// One sample of [`fit_log_odds_map`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogOddsSample {
    /// A ranker's log-odds for the candidate.
    pub log_odds: f64,
    /// Added after the map (the dismissal signal).
    pub offset: f64,
    /// Whether the customer kept it.
    pub kept: bool,
    /// How many samples this one stands for.
    pub weight: f64,
}

/// Fits `P(kept) = sigmoid(slope * log_odds + intercept + offset)` to weighted samples (Platt
/// scaling, Newton's method). None without both kept and not-kept samples, or if the fit does
/// not settle on a finite, increasing map.
pub fn fit_log_odds_map(samples: &[LogOddsSample]) -> Option<(f64, f64)> {
    let usable: Vec<&LogOddsSample> = samples
        .iter()
        .filter(|s| s.log_odds.is_finite() && s.offset.is_finite())
        .collect();
    if !usable.iter().any(|s| s.kept) || usable.iter().all(|s| s.kept) {
        return None;
    }
    let (mut slope, mut intercept) = (1.0, 0.0);
    for _ in 0..50 {
        let (mut g0, mut g1, mut h00, mut h01, mut h11) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for s in &usable {
            let (z, w) = (s.log_odds, s.weight);
            let p = sigmoid(slope * z + intercept + s.offset);
            let r = w * (p - if s.kept { 1.0 } else { 0.0 });
            let v = w * p * (1.0 - p);
            g0 += r * z;
            g1 += r;
            h00 += v * z * z;
            h01 += v * z;
            h11 += v;
        }
        // A tiny ridge keeps the step defined when the log-odds hardly vary.
        let step = solve_symmetric(
            vec![vec![h00 + 1e-9, h01], vec![h01, h11 + 1e-9]],
            vec![g0, g1],
        )?;
        slope -= step[0];
        intercept -= step[1];
        if step[0].abs().max(step[1].abs()) < 1e-9 {
            break;
        }
    }
    (slope.is_finite() && intercept.is_finite() && slope > 0.0).then_some((slope, intercept))
}

/// Weighted mean and standard deviation of each of `n` features.
fn moments<'a>(
    rows: impl Iterator<Item = (&'a [f64], f64)> + Clone,
    n: usize,
    total: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0.0; n];
    for (f, w) in rows.clone() {
        for (a, x) in mean.iter_mut().zip(f) {
            *a += w * x / total;
        }
    }
    let mut var = vec![0.0; n];
    for (f, w) in rows {
        for ((a, x), m) in var.iter_mut().zip(f).zip(&mean) {
            *a += w * (x - m) * (x - m) / total;
        }
    }
    let scale = var.into_iter().map(|v| v.sqrt().max(1e-9)).collect();
    (mean, scale)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Solves `a x = b` for a symmetric positive definite `a` (Cholesky); None if it is not.
fn solve_symmetric(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for j in 0..n {
        let d = a[j][j] - (0..j).map(|k| a[j][k] * a[j][k]).sum::<f64>();
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        a[j][j] = d.sqrt();
        for i in j + 1..n {
            a[i][j] = (a[i][j] - (0..j).map(|k| a[i][k] * a[j][k]).sum::<f64>()) / a[j][j];
        }
    }
    for i in 0..n {
        b[i] = (b[i] - (0..i).map(|k| a[i][k] * b[k]).sum::<f64>()) / a[i][i];
    }
    for i in (0..n).rev() {
        b[i] = (b[i] - (i + 1..n).map(|k| a[k][i] * b[k]).sum::<f64>()) / a[i][i];
    }
    Some(b)
}

/// Maps a recommendation's features to a calibrated probability of being right: isotonic
/// regression (pool adjacent violators) of hits on the within-user score ratio and rank,
/// fitted on held-out data.
#[derive(Debug, Clone, Default)]
pub struct Calibrator {
    /// (upper bound of the feature, probability), increasing in both.
    steps: Vec<(f64, f64)>,
}

/// The feature calibrated: the item's score relative to the user's best, discounted by rank.
pub fn calibration_feature(score: f64, best: f64, rank: usize) -> f64 {
    if best <= 0.0 {
        return 0.0;
    }
    (score / best) / (1.0 + rank as f64).ln_1p()
}

impl Calibrator {
    /// Fits on (feature, hit) pairs.
    pub fn fit(mut samples: Vec<(f64, bool)>) -> Self {
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Blocks of (max feature, sum of hits, count), merged while decreasing.
        let mut blocks: Vec<(f64, f64, f64)> = Vec::new();
        for (x, hit) in samples {
            blocks.push((x, if hit { 1.0 } else { 0.0 }, 1.0));
            while blocks.len() >= 2 {
                let n = blocks.len();
                let (a, b) = (blocks[n - 2], blocks[n - 1]);
                if a.1 / a.2 >= b.1 / b.2 {
                    blocks.truncate(n - 2);
                    blocks.push((b.0, a.1 + b.1, a.2 + b.2));
                } else {
                    break;
                }
            }
        }
        Calibrator {
            steps: blocks.into_iter().map(|(x, s, n)| (x, s / n)).collect(),
        }
    }

    /// The calibrated probability for a feature value.
    pub fn confidence(&self, feature: f64) -> f64 {
        match self.steps.iter().find(|(x, _)| feature <= *x) {
            Some((_, p)) => *p,
            None => self.steps.last().map(|(_, p)| *p).unwrap_or(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 customers keep A and B; 90 of them also keep C. 3 customers keep A and D.
    fn population() -> Interactions {
        let mut users = Vec::new();
        for u in 0..100 {
            let mut items = vec![0, 1];
            if u < 90 {
                items.push(2);
            }
            users.push(items);
        }
        for _ in 0..3 {
            users.push(vec![0, 3]);
        }
        Interactions { users, n_items: 4 }
    }

    #[test]
    fn a_rule_kept_by_most_of_a_segment_is_recommended_to_the_rest() {
        let data = population();
        let model = Rp3Beta::fit(&data, 0.5, 10);
        let top = model.top(&[0, 1], 3);
        assert_eq!(top.first().map(|t| t.0), Some(2));
        assert_eq!(model.support(0, 2), 90);
        // B is the more specific reason: A is also kept by customers outside the segment.
        assert_eq!(model.strongest_reason(&[0, 1], 2), Some(1));
    }

    #[test]
    fn a_rule_kept_by_fewer_than_k_customers_is_never_recommended() {
        let data = population();
        let model = Rp3Beta::fit(&data, 0.5, 10);
        assert!(model.top(&[0, 1], 10).iter().all(|(i, _)| *i != 3));
        // With k = 1 the same pattern would show, so the filter is what hides it.
        let open = Rp3Beta::fit(&data, 0.5, 1);
        assert!(open.top(&[0, 1], 10).iter().any(|(i, _)| *i == 3));
    }

    #[test]
    fn baselines_rank_as_expected() {
        let data = population();
        assert_eq!(Popularity::fit(&data).top(&[], 1)[0].0, 0);
        assert_eq!(ItemCosine::fit(&data).top(&[0, 1], 1)[0].0, 2);
    }

    #[test]
    fn the_ranker_learns_which_feature_predicts_and_is_calibrated() {
        // Kept with probability sigmoid(2x - 1); the second feature is noise.
        let mut samples = Vec::new();
        for i in 0..4000u32 {
            let x = f64::from(i % 100) / 50.0 - 1.0;
            let noise = f64::from((i * 7919) % 97) / 97.0;
            let p = sigmoid(2.0 * x - 1.0);
            let kept = f64::from((i * 104_729) % 1000) / 1000.0 < p;
            samples.push(RankerSample {
                features: vec![x, noise],
                offset: 0.0,
                kept,
                weight: 1.0,
            });
        }
        let r = Ranker::fit(&samples, 2, 1.0).expect("fits");
        let p = |x: f64, noise: f64| r.probability(&[x, noise], 0.0);
        // What predicts moves the probability as it should; the noise barely does.
        for x in [-0.8, -0.3, 0.2, 0.7] {
            assert!(
                (p(x, 0.5) - sigmoid(2.0 * x - 1.0)).abs() < 0.08,
                "{x}: {}",
                p(x, 0.5)
            );
            assert!((p(x, 0.1) - p(x, 0.9)).abs() < 0.08);
        }
        // Calibrated: the mean predicted probability matches the share kept.
        let predicted: f64 = samples
            .iter()
            .map(|s| r.probability(&s.features, s.offset))
            .sum();
        let kept = samples.iter().filter(|s| s.kept).count() as f64;
        assert!(
            (predicted - kept).abs() / kept < 0.05,
            "{predicted} vs {kept}"
        );
        // An offset moves the log-odds: a negative one (dismissals) lowers the probability.
        assert!(r.probability(&[0.5, 0.5], -1.0) < r.probability(&[0.5, 0.5], 0.0));
        // Half the not-kept samples, each standing for two: the same ranker, near enough.
        let halved: Vec<RankerSample> = samples
            .iter()
            .enumerate()
            .filter(|(i, s)| s.kept || i % 2 == 0)
            .map(|(_, s)| RankerSample {
                weight: if s.kept { 1.0 } else { 2.0 },
                ..s.clone()
            })
            .collect();
        let h = Ranker::fit(&halved, 2, 1.0).expect("fits");
        assert!((h.probability(&[0.2, 0.5], 0.0) - p(0.2, 0.5)).abs() < 0.05);
        // Nothing to learn from one class only.
        let all_kept: Vec<RankerSample> = samples
            .iter()
            .map(|s| RankerSample {
                kept: true,
                ..s.clone()
            })
            .collect();
        assert!(Ranker::fit(&all_kept, 2, 1.0).is_none());
    }

    #[test]
    fn the_blocked_hessian_is_the_sum_of_every_samples_terms() {
        // Three features: 1 + 3 + 6 expanded columns.
        let (means, scales) = ([0.1, -0.2, 0.3], [1.0, 2.0, 0.5]);
        let (mean2, scale2) = ([0.05; 9], [1.5; 9]);
        let st = Standardised {
            means: &means,
            scales: &scales,
            mean2: &mean2,
            scale2: &scale2,
        };
        let w: Vec<f64> = (0..10).map(|k| f64::from(k) / 10.0 - 0.4).collect();
        let sample = |i: u32| RankerSample {
            features: vec![
                f64::from(i % 7) / 3.0,
                f64::from((i * 31) % 11) / 5.0 - 1.0,
                f64::from(i % 2),
            ],
            offset: f64::from(i % 3) / 10.0,
            kept: i.is_multiple_of(4),
            weight: 1.0 + f64::from(i % 5),
        };
        // Fewer than a block, one, one and a bit, and two with a short third (whose unused
        // rows must not carry the second block's values).
        for n in [
            1,
            HESSIAN_BLOCK - 1,
            HESSIAN_BLOCK,
            HESSIAN_BLOCK + 1,
            2 * HESSIAN_BLOCK + 6,
        ] {
            let samples: Vec<RankerSample> = (0..n as u32).map(sample).collect();
            let (grad, hess) = st.gradient_and_hessian(&samples, &w);
            let (mut x, mut z) = (Vec::new(), vec![0.0; w.len()]);
            let mut want_grad = vec![0.0; w.len()];
            let mut want_hess = vec![vec![0.0; w.len()]; w.len()];
            for s in &samples {
                st.expand(s, &mut x, &mut z);
                let p = sigmoid(s.offset + z.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>());
                for a in 0..w.len() {
                    want_grad[a] += s.weight * (p - f64::from(u8::from(s.kept))) * z[a];
                    for b in 0..w.len() {
                        want_hess[a][b] += s.weight * p * (1.0 - p) * z[a] * z[b];
                    }
                }
            }
            for a in 0..w.len() {
                assert!((grad[a] - want_grad[a]).abs() < 1e-9, "{n}: grad {a}");
                for b in 0..w.len() {
                    let (got, want) = (hess[a][b], want_hess[a][b]);
                    assert!(
                        (got - want).abs() < 1e-9 * want.abs().max(1.0),
                        "{n}: {a},{b}"
                    );
                }
            }
        }
        assert_eq!(dot(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &[1.0; 7]), 28.0);
    }

    #[test]
    fn a_warm_started_fit_reaches_the_same_ranker_as_one_from_zero() {
        // Enough samples for the warm start; kept with probability sigmoid(3x - y - 1).
        let samples: Vec<RankerSample> = (0..8 * WARM_START_SAMPLES as u32 + 500)
            .map(|i| {
                let x = f64::from(i % 101) / 50.0 - 1.0;
                let y = f64::from((i * 7919) % 89) / 44.0 - 1.0;
                let kept = f64::from((i * 104_729) % 1000) / 1000.0 < sigmoid(3.0 * x - y - 1.0);
                RankerSample {
                    features: vec![x, y, x * y],
                    offset: 0.0,
                    kept,
                    weight: 1.0,
                }
            })
            .collect();
        let warm = Ranker::fit(&samples, 3, 1.0).expect("fits");
        // The same samples, too few for the warm start: fitted from zero.
        let cold = Ranker::fit(&samples[..8 * WARM_START_SAMPLES - 1], 3, 1.0).expect("fits");
        for (x, y) in [(-0.8, 0.3), (0.0, 0.0), (0.5, -0.5), (0.9, 0.9)] {
            let (a, b) = (
                warm.probability(&[x, y, x * y], 0.0),
                cold.probability(&[x, y, x * y], 0.0),
            );
            assert!((a - b).abs() < 0.03, "{x}, {y}: {a} against {b}");
            assert!(
                (a - sigmoid(3.0 * x - y - 1.0)).abs() < 0.06,
                "{x}, {y}: {a}"
            );
        }
    }

    #[test]
    fn a_log_odds_map_is_recovered_and_folded_into_the_ranker() {
        // Kept with probability sigmoid(1.5 z + 0.5) of a log-odds z the ranker under-rates.
        let samples: Vec<LogOddsSample> = (0..6000u32)
            .map(|i| {
                let z = f64::from(i % 200) / 40.0 - 3.0;
                let kept = f64::from((i * 104_729) % 1000) / 1000.0 < sigmoid(1.5 * z + 0.5);
                LogOddsSample {
                    log_odds: z,
                    offset: 0.0,
                    kept,
                    weight: 1.0,
                }
            })
            .collect();
        let (slope, intercept) = fit_log_odds_map(&samples).expect("fits");
        assert!((slope - 1.5).abs() < 0.15, "{slope}");
        assert!((intercept - 0.5).abs() < 0.15, "{intercept}");
        // Folded into a ranker, the map applies to its log-odds; offsets still add after.
        let r = Ranker::from_record(RankerRecord {
            means: vec![0.0],
            scales: vec![1.0],
            weights: vec![0.2, 1.0, 0.0],
        });
        let z = r.log_odds(&[0.4]);
        let shifted = r.clone().shifted(slope, intercept);
        assert!((shifted.log_odds(&[0.4]) - (slope * z + intercept)).abs() < 1e-12);
        assert!(
            (shifted.probability(&[0.4], -1.0) - sigmoid(slope * z + intercept - 1.0)).abs()
                < 1e-12
        );
        // One class only, or a map that would reverse the order: nothing is fitted.
        let all_kept: Vec<_> = samples
            .iter()
            .map(|s| LogOddsSample { kept: true, ..*s })
            .collect();
        assert!(fit_log_odds_map(&all_kept).is_none());
        let reversed: Vec<_> = samples
            .iter()
            .map(|s| LogOddsSample {
                log_odds: -s.log_odds,
                ..*s
            })
            .collect();
        assert!(fit_log_odds_map(&reversed).is_none());
    }

    #[test]
    fn calibration_is_monotone_and_matches_frequencies() {
        let mut samples = Vec::new();
        for i in 0..1000 {
            let x = f64::from(i) / 1000.0;
            // Hit rate equals x, deterministically spread.
            samples.push((x, (i * 7919) % 1000 < i));
        }
        let c = Calibrator::fit(samples);
        let (lo, mid, hi) = (c.confidence(0.1), c.confidence(0.5), c.confidence(0.9));
        assert!(lo <= mid && mid <= hi);
        assert!((mid - 0.5).abs() < 0.2, "{mid}");
    }
}
