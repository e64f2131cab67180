"""Model families for the recommender, compared on the shipped path's shape (not through the API).

Each IFTTT user of the authors' split keeps the templates of their training rules and links
the entities those rules name; only templates and links at least k = 10 users share exist
(k-anonymity); a user is offered templates they do not keep whose entities they linked, or
all but one. Families are compared on validation (a fifth of each user's training templates
held out, with the links only those templates use); the ranker families are fitted on half of
the validation users and every family is scored on the other half. The test columns use the
authors' test split and are reported, never used to choose.
"""

import collections
import hashlib
import math
import sys

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

K = 10
DATA = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/ifttt-recrules"
# Only the families whose name contains this (all when empty): each row takes minutes.
ONLY = sys.argv[2] if len(sys.argv) > 2 else ""


def derive_channels(names):
    """The channel split of node/src/recommend/eval.rs (derive_channels)."""
    parts = set()
    for n in names:
        if n.startswith("trigger_") and "_action_" in n:
            t, a = n[len("trigger_"):].split("_action_", 1)
            parts.update((t, a))
    firsts_before, under_two = collections.defaultdict(set), collections.Counter()
    for p in parts:
        w = p.split("_")
        if len(w) >= 3:
            firsts_before[w[1]].add(w[0])
            under_two[(w[0], w[1])] += 1
    channels = {p.split("_")[0] for p in parts}
    for (a, b), n in under_two.items():
        if n >= 2 and len(firsts_before[b]) <= 2:
            channels.add(a + "_" + b)
    return channels


def split_part(part, channels):
    w = part.split("_")
    for n in range(min(2, len(w) - 1), 0, -1):
        if "_".join(w[:n]) in channels:
            return "_".join(w[:n]), "_".join(w[n:])
    return w[0], "_".join(w[1:])


def load():
    names = {}
    for line in open(f"{DATA}/rules"):
        i, n = line.rstrip("\n").split("\t")
        names[int(i)] = n
    channels = derive_channels(names.values())
    template = {}
    for i, n in names.items():
        t, a = n[len("trigger_"):].split("_action_", 1)
        template[i] = split_part(t, channels) + split_part(a, channels)

    def pairs(f):
        d = collections.defaultdict(list)
        for line in open(f"{DATA}/{f}"):
            u, r, _ = line.split("\t")
            d[int(u)].append(int(r))
        return d

    train, test = pairs("trainset"), pairs("testset")
    ids = {}
    users = []
    for u in sorted(train):
        tr = sorted({ids.setdefault(template[r], len(ids)) for r in train[u]})
        te = {ids.setdefault(template[r], len(ids)) for r in test.get(u, [])} - set(tr)
        users.append((u, tr, te))
    keys = [None] * len(ids)
    for k, v in ids.items():
        keys[v] = k
    return users, keys


def stable(*parts):
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:12], 16)


users, keys = load()


def entities(items):
    return {e for i in items for e in (keys[i][0], keys[i][2])}


def without_rss(items):
    return not any(keys[i][0] == "feed" for i in items)


def build(fit, links):
    """Columns: templates, then links, each kept only when at least K users have it."""
    pop = collections.Counter(i for it in fit for i in it)
    lpop = collections.Counter(e for ls in links for e in ls)
    tcols = [i for i in range(len(keys)) if pop[i] >= K]
    col = {("t", i): n for n, i in enumerate(tcols)}
    for e in sorted(e for e, c in lpop.items() if c >= K):
        col[("l", e)] = len(col)
    x = np.zeros((len(fit), len(col)))
    deg = np.zeros(len(fit))
    for u, (it, ls) in enumerate(zip(fit, links)):
        for c in [col.get(("t", i)) for i in it] + [col.get(("l", e)) for e in ls]:
            if c is not None:
                x[u, c] = 1
        deg[u] = len(it) + len(ls)
    return x, tcols, col, deg


def row(items, links, col):
    x = np.zeros(len(col))
    for c in [col.get(("t", i)) for i in items] + [col.get(("l", e)) for e in links]:
        if c is not None:
            x[c] = 1
    return x


def rp3beta(x, deg, beta):
    c = x.T @ x
    w = (x / deg[:, None]).T @ x
    w[c < K] = 0
    np.fill_diagonal(w, 0)
    pop = np.maximum(x.sum(0), 1)
    return w / (pop[:, None] * pop[None, :] ** beta)


def ease(x, lam):
    g = x.T @ x
    d = np.diag(g).copy()
    g[g < K] = 0
    np.fill_diagonal(g, d + lam)
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0)
    return b


def cosine(x):
    c = x.T @ x
    pop = np.diag(c).copy()
    c[c < K] = 0
    np.fill_diagonal(c, 0)
    return c / np.sqrt(np.maximum(np.outer(pop, pop), 1))


class World:
    """The models fitted on one population, and each query user's candidates."""

    def __init__(self, fit, links):
        self.x, self.tcols, self.col, deg = build(fit, links)
        self.pop = self.x.sum(0)
        c = self.x.T @ self.x
        c[c < K] = 0
        np.fill_diagonal(c, 0)
        self.support = c
        self.walk = rp3beta(self.x, deg, 0.6)
        self.cos = cosine(self.x)
        self.deg = deg
        self.cache = {}

    def usable(self, scores, items, linked, limit=200):
        """Candidates in score order: not kept, at most one entity unlinked."""
        out = []
        for c in np.argsort(-scores[: len(self.tcols)], kind="stable"):
            if scores[c] <= 0 or len(out) == limit:
                break
            t = self.tcols[c]
            if t in items:
                continue
            if sum(e not in linked for e in (keys[t][0], keys[t][2])) <= 1:
                out.append((c, t))
        return out

    def features(self, items, linked):
        """The vault's 16 ranker features (node/src/recommend/vault.rs, candidates)."""
        key = (tuple(items), tuple(sorted(linked)))
        if key not in self.cache:
            self.cache[key] = self.compute_features(items, linked)
        return self.cache[key]

    def compute_features(self, items, linked):
        x = row(items, linked, self.col)
        n = len(self.tcols)
        walk, cos = (x @ self.walk)[:n], (x @ self.cos)[:n]
        n_items = (x @ (self.support > 0))[:n]
        freq = ((x[:, None] * self.support) / np.maximum(self.pop, 1)[:, None]).max(0)[:n]
        mine = [keys[i] for i in items]
        out = []
        cands = self.usable(walk, set(items), linked)
        best_walk = max([walk[c] for c, _ in cands] + [1e-12])
        best_cos = max([cos[c] for c, _ in cands] + [1e-12])
        for rank, (c, t) in enumerate(cands):
            k = keys[t]
            unlinked = [e for e in (k[0], k[2]) if e not in linked]
            prior = 0.0
            if unlinked and ("l", unlinked[0]) in self.col:
                prior = float(x @ self.cos[:, self.col[("l", unlinked[0])]])
            count = lambda f: math.log1p(sum(1 for m in mine if f(m)))
            out.append((t, [
                math.log(walk[c] + 1e-9), walk[c] / best_walk, math.log(rank + 2),
                math.log(max(cos[c], 1e-9)), cos[c] / best_cos, math.log1p(self.pop[c]),
                len(unlinked), prior, math.log1p(n_items[c]), freq[c], math.log1p(len(mine)),
                count(lambda m: m[:2] == k[:2]), count(lambda m: m[2:] == k[2:]),
                count(lambda m: m[0] == k[0]), count(lambda m: m[2] == k[2]),
                count(lambda m: (m[0], m[2]) == (k[0], k[2])),
            ]))
        return out


def metrics(lists, queries):
    hr, hr_plain, ndcg = [], [], []
    for ranked, (items, held) in zip(lists, queries):
        hits = [t in held for t in ranked[:10]]
        hr.append(any(hits))
        if without_rss(list(items) + list(held)):
            hr_plain.append(any(hits))
        dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(held), 10)))
        ndcg.append(dcg / idcg if idcg else 0)
    return np.mean(hr), np.mean(hr_plain), np.mean(ndcg)


def ece(lists, queries):
    bins = collections.defaultdict(lambda: [0, 0.0, 0])
    for ranked, (_, held) in zip(lists, queries):
        for t, p in ranked[:10]:
            b = bins[min(int(p * 10), 9)]
            b[0] += 1
            b[1] += p
            b[2] += t in held
    n = sum(b[0] for b in bins.values())
    return sum(abs(b[1] - b[2]) for b in bins.values()) / n


# Validation: a fifth of each user's training templates held out, with the links only they use.
fit, val = [], []
for u, tr, _ in users:
    held = [i for i in tr if stable(u, i) % 5 == 0] if len(tr) >= 3 else []
    kept = [i for i in tr if i not in held]
    if held and kept:
        fit.append(kept)
        val.append((u, kept, set(held)))
    else:
        fit.append(tr)
val_world = World(fit, [entities(f) for f in fit])
# Ranker families learn on half the validation users; everything is scored on the other half.
learn = [(k, h) for u, k, h in val if stable("learn", u) % 2 == 0]
score = [(k, h) for u, k, h in val if stable("learn", u) % 2 == 1]
full = [tr for _, tr, _ in users]
test_world = World(full, [entities(f) for f in full])
test = [(tr, te) for _, tr, te in users]


def by_scores(matrix):
    def rank(world, queries):
        out = []
        m = matrix(world)
        for items, _ in queries:
            linked = entities(items)
            s = row(items, linked, world.col) @ m
            out.append([t for _, t in world.usable(s, set(items), linked, 10)])
        return out
    return rank


def ranked(world, queries, probability):
    """Each query user's candidates with their probability (from their features), best first."""
    out = []
    for items, _ in queries:
        cands = world.features(items, entities(items))
        if not cands:
            out.append([])
            continue
        p = probability([f for _, f in cands])
        out.append(sorted(zip([t for t, _ in cands], p), key=lambda z: -z[1]))
    return out


def ranker(make, worlds=None):
    """A ranker family fitted on validation candidates; `worlds` replaces the validation and
    test worlds (a family with features of its own)."""
    val_w, test_w = worlds or (val_world, test_world)

    def fitted(world, queries, model):
        return ranked(world, queries, lambda fs: model.predict_proba(np.array(fs))[:, 1])

    samples = [(f, t in h) for items, h in learn for t, f in val_w.features(items, entities(items))]
    x = np.array([f for f, _ in samples])
    y = np.array([hit for _, hit in samples])
    model = make().fit(x, y)
    # The test ranker is fitted the same way on every validation user (as the vault does).
    every = [(f, t in h) for _, items, h in val for t, f in val_w.features(items, entities(items))]
    test_model = make().fit(np.array([f for f, _ in every]), np.array([hit for _, hit in every]))
    return lambda world, queries: (fitted(val_w, queries, model) if world is val_world
                                   else fitted(test_w, queries, test_model))


class HalvesWorld(World):
    """The vault's 16 features and two more (not shipped): how strongly the user's items go
    with the candidate's trigger (entity and event type) and with its action (entity and
    command type), each a sum of cosines between the user's items and the users keeping any
    rule with that trigger (or action); only halves and pairs at least K users share count."""

    def __init__(self, fit, links):
        super().__init__(fit, links)
        self.halves = []
        for part in (lambda k: k[:2], lambda k: k[2:]):
            users = collections.Counter(h for it in fit for h in {part(keys[i]) for i in it})
            col = {h: n for n, h in enumerate(h for h, c in users.items() if c >= K)}
            has = np.zeros((len(fit), len(col)))
            for u, it in enumerate(fit):
                for i in it:
                    if part(keys[i]) in col:
                        has[u, col[part(keys[i])]] = 1
            c = self.x.T @ has
            c[c < K] = 0
            self.halves.append((part, col, c / np.sqrt(np.maximum(np.outer(self.x.sum(0), has.sum(0)), 1))))

    def compute_features(self, items, linked):
        x = row(items, linked, self.col)
        sums = [(part, col, x @ cos) for part, col, cos in self.halves]
        return [(t, f + [math.log((s[col[part(keys[t])]] if part(keys[t]) in col else 0) + 1e-6)
                         for part, col, s in sums])
                for t, f in super().compute_features(items, linked)]



class ComposedWorld(World):
    """The shipped candidates and features (node/src/recommend/vault.rs, candidates): the
    walk's candidates, then up to 50 composed ones (a trigger part the user keeps with an
    action part, or a trigger part with an action part they keep, each part kept by at least
    K users and both by at least K users together, as a template fewer than K users keep), and
    four more features: whether it is
    composed, how strongly the user's items go with its trigger part and with its action part
    (cosines summed), and how strongly the two parts go together."""

    COMPOSED = 50

    def __init__(self, fit, links):
        super().__init__(fit, links)
        self.part_index = []
        has = []
        for part in (lambda k: k[:2], lambda k: k[2:]):
            users = collections.Counter(h for it in fit for h in {part(keys[i]) for i in it})
            index = {h: n for n, h in enumerate(sorted(h for h, c in users.items() if c >= K))}
            m = np.zeros((len(fit), len(index)))
            for u, it in enumerate(fit):
                for i in it:
                    if part(keys[i]) in index:
                        m[u, index[part(keys[i])]] = 1
            self.part_index.append(index)
            has.append(m)

        def cosines(a, b):
            c = a.T @ b
            c[c < K] = 0
            return c / np.sqrt(np.maximum(np.outer(a.sum(0), b.sum(0)), 1))

        self.to_trigger, self.to_action = cosines(self.x, has[0]), cosines(self.x, has[1])
        self.together = cosines(has[0], has[1])
        self.triggers = sorted(self.part_index[0], key=self.part_index[0].get)
        self.actions = sorted(self.part_index[1], key=self.part_index[1].get)
        self.template_id = {k: i for i, k in enumerate(keys)}
        self.kept_by = collections.Counter(i for it in fit for i in it)

    def compute_features(self, items, linked):
        base = super().compute_features(items, linked)
        x = row(items, linked, self.col)
        sums = (x @ self.to_trigger, x @ self.to_action)
        strength = lambda side, h: math.log(max(sums[side][self.part_index[side][h]], 1e-6)) \
            if h in self.part_index[side] else math.log(1e-6)
        together = lambda t, a: math.log(max(self.together[self.part_index[0][t], self.part_index[1][a]], 1e-6)) \
            if t in self.part_index[0] and a in self.part_index[1] else math.log(1e-6)
        out = [(t, f + [0.0, strength(0, keys[t][:2]), strength(1, keys[t][2:]),
                        together(keys[t][:2], keys[t][2:])]) for t, f in base]
        mine = [keys[i] for i in items]
        own = ({m[:2] for m in mine}, {m[2:] for m in mine})
        pairs = []
        for ti, t in enumerate(self.triggers):
            for ai, a in enumerate(self.actions):
                if (t in own[0] or a in own[1]) and self.together[ti, ai] > 0:
                    pairs.append((-(math.log(sums[0][ti] + 1e-6) + math.log(sums[1][ai] + 1e-6)
                                    + together(t, a)), ti, ai))
        pairs.sort()
        count = lambda f: math.log1p(sum(1 for m in mine if f(m)))
        composed = 0
        for _, ti, ai in pairs:
            if composed == self.COMPOSED:
                break
            k = self.triggers[ti] + self.actions[ai]
            t = self.template_id.get(k, k)
            if t in items or (isinstance(t, int) and self.kept_by[t] >= K):
                continue
            unlinked = [e for e in (k[0], k[2]) if e not in linked]
            if len(unlinked) > 1:
                continue
            prior = 0.0
            if unlinked and ("l", unlinked[0]) in self.col:
                prior = float(x @ self.cos[:, self.col[("l", unlinked[0])]])
            out.append((t, [
                math.log(1e-9), 0.0, math.log(200 + composed + 2), math.log(1e-9), 0.0, 0.0,
                len(unlinked), prior, 0.0, 0.0, math.log1p(len(mine)),
                count(lambda m: m[:2] == k[:2]), count(lambda m: m[2:] == k[2:]),
                count(lambda m: m[0] == k[0]), count(lambda m: m[2] == k[2]),
                count(lambda m: (m[0], m[2]) == (k[0], k[2])),
                1.0, strength(0, k[:2]), strength(1, k[2:]), together(k[:2], k[2:]),
            ]))
            composed += 1
        return out


def als_items(x, factors, reg, alpha, iters=15):
    """Item factors of implicit-feedback matrix factorisation (alternating least squares, each
    kept entry weighted 1 + alpha, every other 1), from the k-anonymous columns only."""
    rng = np.random.default_rng(0)
    users_f = rng.normal(0, 0.01, (x.shape[0], factors))
    items_f = rng.normal(0, 0.01, (x.shape[1], factors))

    def solve(a, b):
        gram = b.T @ b + reg * np.eye(factors)
        out = np.zeros((a.shape[0], factors))
        for r in range(a.shape[0]):
            kept = b[np.flatnonzero(a[r])]
            out[r] = np.linalg.solve(gram + alpha * kept.T @ kept, (1 + alpha) * kept.sum(0))
        return out

    for _ in range(iters):
        users_f = solve(x, items_f)
        items_f = solve(x.T, users_f)
    return items_f


class FactorScores:
    """Three more features after a world's own (not shipped): the user's matrix-factorisation
    score of the candidate (the user's factors solved from their items against fixed item
    factors, as a node would at serving time), that score less the best candidate's, and its
    rank among the candidates. A candidate no user keeps (a composed rule) has no factors: it
    gets the lowest score of the user's list."""

    def __init__(self, fit, links, factors=32, reg=10.0, alpha=10.0):
        super().__init__(fit, links)
        self.items_f = als_items(self.x, factors, reg, alpha)
        self.gram = self.items_f.T @ self.items_f + reg * np.eye(factors)
        self.alpha = alpha
        self.factor_index = {t: c for c, t in enumerate(self.tcols)}

    def compute_features(self, items, linked):
        base = super().compute_features(items, linked)
        if not base:
            return base
        kept = self.items_f[np.flatnonzero(row(items, linked, self.col))]
        user = np.linalg.solve(self.gram + self.alpha * kept.T @ kept, (1 + self.alpha) * kept.sum(0))
        s = {t: float(self.items_f[self.factor_index[t]] @ user) for t, _ in base if t in self.factor_index}
        floor = min(s.values(), default=0.0)
        s = {t: s.get(t, floor) for t, _ in base}
        best = max(s.values())
        rank = {t: r for r, t in enumerate(sorted(s, key=lambda t: -s[t]))}
        return [(t, f + [s[t], s[t] - best, math.log(rank[t] + 2)]) for t, f in base]


class FactorWorld(FactorScores, World):
    """The vault's 16 features and the factors' three."""


STOP = {"new", "a", "an", "the", "to", "by", "you", "your", "any", "from", "in", "on", "of", "with",
        "for", "is", "at", "or", "and", "my", "me", "i", "it", "as", "up"}


def name_words(k):
    return [w for part in (k[1], k[3]) for w in part.split("_") if w and w not in STOP]


def name_vectors():
    """Each template's event and command type names as TF-IDF vectors of their words (the
    entity catalogue is public: no customer's data), and the vocabulary and weights that make
    them (for rules that are not templates: composed ones)."""
    vocab, counts = {}, []
    for k in keys:
        counts.append(collections.Counter(vocab.setdefault(w, len(vocab)) for w in name_words(k)))
    m = np.zeros((len(keys), len(vocab)))
    for i, c in enumerate(counts):
        for w, n in c.items():
            m[i, w] = n
    idf = np.log((len(keys) + 1) / ((m > 0).sum(0) + 1)) + 1
    m *= idf
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12), vocab, idf


NAMES, NAME_VOCAB, NAME_IDF = name_vectors()


def name_vector(t):
    """A candidate's name vector: a template's row, or a composed rule's (a key tuple) made
    the same way."""
    if not isinstance(t, tuple):
        return NAMES[t]
    v = np.zeros(len(NAME_VOCAB))
    for w in name_words(t):
        if w in NAME_VOCAB:
            v[NAME_VOCAB[w]] += 1
    v *= NAME_IDF
    return v / max(np.linalg.norm(v), 1e-12)


class NameSimilarity:
    """Two more features (not shipped) after a world's own: the largest and the mean name
    similarity of the candidate to the user's rules."""

    def compute_features(self, items, linked):
        base = super().compute_features(items, linked)
        if not base:
            return base
        sims = np.array([name_vector(t) for t, _ in base]) @ NAMES[list(items)].T
        return [(t, f + [float(sims[j].max()), float(sims[j].mean())]) for j, (t, f) in enumerate(base)]


class ComposedFactorWorld(FactorScores, ComposedWorld):
    """The shipped candidates and features (ComposedWorld) and the factors' three."""


class ComposedFactorNamesWorld(NameSimilarity, ComposedFactorWorld):
    """Composed candidates, factors and names together."""


class NamesWorld(NameSimilarity, World):
    """The vault's 16 features and the name similarities."""


class FactorNamesWorld(NameSimilarity, FactorWorld):
    """FactorWorld's features and the name similarities."""


def listwise(l2):
    """The pairwise-product ranker fitted with a per-user softmax over each user's candidates
    (the held-out ones against the rest of that user's list) instead of a logistic loss per
    candidate, with an L2 penalty `l2` on the standardised weights; a Platt map of its score
    (fitted on the same samples) gives the probability."""
    from scipy.optimize import minimize
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    def fit(samples):
        x = np.array([f for f, _, _ in samples])
        y = np.array([hit for _, hit, _ in samples], dtype=float)
        g = np.array([u for _, _, u in samples])
        expand = make_pipeline(StandardScaler(), PolynomialFeatures(2, include_bias=False), StandardScaler())
        z = expand.fit_transform(x)
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        pos = np.add.reduceat(y, starts)

        def loss(w):
            s = z @ w
            m = np.maximum.reduceat(s, starts)
            e = np.exp(s - np.repeat(m, np.diff(np.r_[starts, len(s)])))
            total = np.add.reduceat(e, starts)
            lse = m + np.log(total)
            value = np.sum(pos * lse) - y @ s + l2 / 2 * w @ w
            share = e / np.repeat(total, np.diff(np.r_[starts, len(s)]))
            grad = z.T @ (np.repeat(pos, np.diff(np.r_[starts, len(s)])) * share - y) + l2 * w
            return value, grad

        w = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": 2000}).x
        platt = LogisticRegression(C=1e6, max_iter=1000).fit((z @ w)[:, None], y.astype(bool))
        return lambda f: platt.predict_proba((expand.transform(np.array(f)) @ w)[:, None])[:, 1]

    def samples(queries):
        return [(f, t in h, n) for n, (items, h) in enumerate(queries)
                for t, f in val_world.features(items, entities(items))]

    model = fit(samples(learn))
    test_model = fit(samples([(items, h) for _, items, h in val]))
    return lambda world, queries: ranked(world, queries, model if world is val_world else test_model)


families = {}


def add(name, make):
    """Adds a family (built only when selected by ONLY)."""
    if ONLY in name:
        families[name] = make()


for beta in (0.2, 0.4, 0.6, 0.8, 1.0):
    add(f"RP3beta, beta {beta}", lambda: by_scores(lambda w, b=beta: rp3beta(w.x, w.deg, b)))
for lam in (50, 200, 500):
    add(f"EASE, lambda {lam}", lambda: by_scores(lambda w, lam=lam: ease(w.x, lam)))
add("item co-occurrence (cosine)", lambda: by_scores(lambda w: cosine(w.x)))


def standardised_logistic():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))


def pairwise_logistic(c):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler
    return lambda: make_pipeline(StandardScaler(), PolynomialFeatures(2, include_bias=False),
                                 StandardScaler(), LogisticRegression(C=c, max_iter=5000))


add("RP3beta candidates + logistic ranker, features alone", lambda: ranker(standardised_logistic))
add("RP3beta candidates + logistic ranker, pairwise products, L2 100", lambda: ranker(pairwise_logistic(0.01)))
add("RP3beta candidates + logistic ranker, pairwise products, L2 10 (shipped until 2026-12-06)", lambda: ranker(pairwise_logistic(0.1)))
add("RP3beta candidates + pairwise products, per-user softmax, L2 10", lambda: listwise(10.0))
add("RP3beta candidates + pairwise products, per-user softmax, L2 100", lambda: listwise(100.0))
add("RP3beta candidates + logistic ranker, pairwise products, L2 10, with trigger and action scores", lambda: ranker(
    pairwise_logistic(0.1), (HalvesWorld(fit, [entities(f) for f in fit]), HalvesWorld(full, [entities(f) for f in full]))))
for label, world in (("matrix-factorisation scores (ALS, 32 factors)", FactorWorld),
                     ("rule-name similarity", NamesWorld),
                     ("both", FactorNamesWorld)):
    add(f"RP3beta candidates + logistic ranker, pairwise products, L2 10, with {label}", lambda: ranker(
        pairwise_logistic(0.1), (world(fit, [entities(f) for f in fit]), world(full, [entities(f) for f in full]))))
add("RP3beta candidates and composed candidates + logistic ranker, pairwise products, L2 10 (shipped)", lambda: ranker(
    pairwise_logistic(0.1), (ComposedWorld(fit, [entities(f) for f in fit]), ComposedWorld(full, [entities(f) for f in full]))))
add("RP3beta candidates and composed candidates + logistic ranker, pairwise products, L2 10, with factors and names", lambda: ranker(
    pairwise_logistic(0.1), (ComposedFactorNamesWorld(fit, [entities(f) for f in fit]),
                             ComposedFactorNamesWorld(full, [entities(f) for f in full]))))
add("RP3beta candidates + gradient-boosted trees", lambda: ranker(
    lambda: HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, random_state=0)))

print(f"{len(users)} users, k = {K}; validation: {len(score)} users scored, {len(learn)} to fit rankers")
print("| family | validation HR@10 | without RSS | NDCG@10 | test HR@10 | without RSS | NDCG@10 | test ECE |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name, rank in families.items():
    v, t = rank(val_world, score), rank(test_world, test)
    calibrated = bool(t) and any(isinstance(r[0], tuple) for r in t if r)
    e = f"{ece(t, test):.3f}" if calibrated else "-"
    plain = lambda ls: [[z[0] if isinstance(z, tuple) else z for z in r] for r in ls]
    (vh, vp, vn), (th, tp, tn) = metrics(plain(v), score), metrics(plain(t), test)
    print(f"| {name} | {vh:.3f} | {vp:.3f} | {vn:.3f} | {th:.3f} | {tp:.3f} | {tn:.3f} | {e} |", flush=True)

# The most any family can reach on the test split: users with a held-out template that at least
# K users keep and whose entities they linked, or all but one.
popular = collections.Counter(i for tr in full for i in tr)
reachable = [
    any(popular[t] >= K and sum(e not in entities(tr) for e in (keys[t][0], keys[t][2])) <= 1 for t in te)
    for tr, te in test
]
print(f"\nHR@10 can be at most {np.mean(reachable):.3f} on the test split (k = {K}, one link at most)")
# With composed candidates: also held-out templates fewer than K users keep whose trigger part
# and action part at least K users keep each, and both together.
part_users = [collections.Counter(h for tr in full for h in {side(keys[i]) for i in tr})
              for side in (lambda k: k[:2], lambda k: k[2:])]
both_parts = collections.Counter((a, b) for tr in full for a in {keys[i][:2] for i in tr}
                                 for b in {keys[i][2:] for i in tr})
composable = [
    any((popular[t] >= K or (part_users[0][keys[t][:2]] >= K and part_users[1][keys[t][2:]] >= K
                             and both_parts[(keys[t][:2], keys[t][2:])] >= K))
        and sum(e not in entities(tr) for e in (keys[t][0], keys[t][2])) <= 1 for t in te)
    for tr, te in test
]
print(f"with composed candidates: at most {np.mean(composable):.3f}")
# How much of that the walk's 200 candidates (what the ranker orders) already hold.
found = [any(t in te for t, _ in test_world.features(tr, entities(tr))) for tr, te in test]
print(f"test users with a held-out template among their 200 candidates: {np.mean(found):.3f}")
