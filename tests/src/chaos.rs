//! Chaos: a cluster of real processes, each in its own network namespace, under a workload
//! of signed events, rule and link changes and reads, while faults are injected: kill -9 of
//! a leader, SIGSTOP/SIGCONT, a leader cut off from the majority, a split of the nodes, and a
//! full restart. At the end it checks, and prints one summary line:
//!
//! - every event answered 202 "accepted" has all its commands delivered at least once (or
//!   cancelled because the customer withdrew them meanwhile: unlinked the target, linked it
//!   as another account, or deleted the rule), and no command id ever
//!   arrived with two contents (duplicates are counted: at least once);
//! - no command reached an entity after the unlink that removed it was acknowledged;
//! - the history of rule and link writes and reads, per customer, is linearizable
//!   (`stateright`'s tester; a call that timed out counts as maybe applied);
//! - the cluster healed: every group has a leader and its voters the same applied state.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use custos_api::client::Client;
use custos_api::types::*;
use custos_api::ErrorCode;
use rand::Rng;
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

use crate::cluster::Cluster;
use crate::node::NodeOptions;
use crate::poll;
use crate::receiver::{Received, Receiver};
use crate::scenario::{self, Scenario};

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Nodes (3 to 7).
    pub nodes: usize,
    /// How long the workload runs (the faults are spread over it).
    pub duration: Duration,
    /// Customers receiving events.
    pub customers: usize,
    /// Concurrent event senders.
    pub senders: usize,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        ChaosOptions {
            nodes: 3,
            duration: Duration::from_secs(90),
            customers: 24,
            senders: 4,
        }
    }
}

/// What a run found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Nodes.
    pub nodes: usize,
    /// Seconds the workload ran.
    pub seconds: u64,
    /// Faults injected, in order.
    pub faults: Vec<String>,
    /// Events sent (distinct ids).
    pub events: u64,
    /// Events answered 202 accepted (first time or as a duplicate).
    pub accepted: u64,
    /// Events never confirmed (every try failed or timed out): maybe applied.
    pub unconfirmed: u64,
    /// Commands of accepted events.
    pub commands: u64,
    /// Of those, cancelled because the customer withdrew them meanwhile (an unlink, a relink
    /// as another account, the rule's deletion: the workload deletes rules its events match).
    pub cancelled: u64,
    /// Of those, never delivered (nor cancelled by an unlink).
    pub undelivered: u64,
    /// Extra deliveries of a command id (at least once).
    pub duplicates: u64,
    /// Command ids that arrived with two contents.
    pub conflicting: u64,
    /// Commands that reached an entity after their unlink was acknowledged.
    pub after_unlink: u64,
    /// Rule and link operations recorded for the linearizability check.
    pub history_ops: u64,
    /// Of those, rule adds that got no answer and no read saw, left out of the check.
    pub dropped_adds: u64,
    /// Calls without an answer the checker still had to place (each multiplies its search).
    pub open_calls: u64,
    /// Whether every history was linearizable (`None`: the checker did not finish in time).
    pub linearizable: Option<bool>,
    /// Whether the cluster converged after healing.
    pub converged: bool,
    /// Longest time from killing a group's leader to the next 202 for its customers (ms).
    pub failover_ms: Vec<u64>,
    /// What the vault says of the first few undelivered commands (to diagnose a failure).
    pub notes: Vec<String>,
    /// Seconds spent healing: convergence, then the last deliveries.
    pub heal_seconds: u64,
}

impl Report {
    /// True when every check passed.
    pub fn ok(&self) -> bool {
        self.undelivered == 0
            && self.conflicting == 0
            && self.after_unlink == 0
            && self.linearizable == Some(true)
            && self.converged
            && self.accepted > 0
    }

    /// The one summary line.
    pub fn line(&self) -> String {
        format!(
            "chaos {}: nodes={} seconds={} faults=[{}] events={} accepted={} unconfirmed={} \
             commands={} cancelled_by_customer={} undelivered={} duplicates={} conflicting={} after_unlink={} \
             history_ops={} dropped_adds={} open_calls={} linearizable={} converged={} \
             failover_ms={:?} heal_s={}",
            if self.ok() { "PASS" } else { "FAIL" },
            self.nodes,
            self.seconds,
            self.faults.join(","),
            self.events,
            self.accepted,
            self.unconfirmed,
            self.commands,
            self.cancelled,
            self.undelivered,
            self.duplicates,
            self.conflicting,
            self.after_unlink,
            self.history_ops,
            self.dropped_adds,
            self.open_calls,
            match self.linearizable {
                Some(true) => "yes",
                Some(false) => "no",
                None => "undecided",
            },
            if self.converged { "yes" } else { "no" },
            self.failover_ms,
            self.heal_seconds,
        ) + &self
            .notes
            .iter()
            .map(|n| format!("\n  undelivered {n}"))
            .collect::<String>()
    }
}

/// Calls in one object's history.
const HISTORY_CALLS: usize = 40;

// ---- the sequential specifications ------------------------------------------------------------

/// A customer's rules, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Rules(BTreeSet<String>);

/// An operation on a customer's rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RuleOp {
    /// Save a rule with this (unique) name.
    Add(String),
    /// Delete the rule with this name.
    Delete(String),
    /// List the rules.
    Read,
}

/// What a rule operation answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RuleRet {
    /// Saved.
    Added,
    /// Deleted.
    Deleted,
    /// Not there.
    NotFound,
    /// The rules' names.
    Names(BTreeSet<String>),
}

impl SequentialSpec for Rules {
    type Op = RuleOp;
    type Ret = RuleRet;

    fn invoke(&mut self, op: &RuleOp) -> RuleRet {
        match op {
            RuleOp::Add(n) => {
                self.0.insert(n.clone());
                RuleRet::Added
            }
            RuleOp::Delete(n) => {
                if self.0.remove(n) {
                    RuleRet::Deleted
                } else {
                    RuleRet::NotFound
                }
            }
            RuleOp::Read => RuleRet::Names(self.0.clone()),
        }
    }
}

/// Whether a customer links the car-rental company (the entity toggled).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CarLink(bool);

/// An operation on the car link.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LinkOp {
    /// Link.
    Link,
    /// Unlink.
    Unlink,
    /// Read the customer's links.
    Read,
}

/// What a link operation answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LinkRet {
    /// Done.
    Done,
    /// Unlink of a link that was not there.
    NotFound,
    /// Whether the car-rental company is linked.
    Linked(bool),
}

impl SequentialSpec for CarLink {
    type Op = LinkOp;
    type Ret = LinkRet;

    fn invoke(&mut self, op: &LinkOp) -> LinkRet {
        match op {
            LinkOp::Link => {
                self.0 = true;
                LinkRet::Done
            }
            LinkOp::Unlink => {
                if std::mem::replace(&mut self.0, false) {
                    LinkRet::Done
                } else {
                    LinkRet::NotFound
                }
            }
            LinkOp::Read => LinkRet::Linked(self.0),
        }
    }
}

/// One recorded step of a history: (thread, op) invoked, or (thread, ret) returned.
#[derive(Debug, Clone)]
enum Step<Op, Ret> {
    Invoke(u64, Op),
    Return(u64, Ret),
}

/// A history being recorded (in real-time order: appended under one lock).
struct History<Op, Ret> {
    steps: Mutex<Vec<Step<Op, Ret>>>,
}

impl<Op, Ret> History<Op, Ret> {
    fn new() -> Self {
        History {
            steps: Mutex::new(Vec::new()),
        }
    }

    fn push(&self, s: Step<Op, Ret>) {
        self.steps.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }

    /// Takes back `thread`'s open call: for a read that got no answer, which constrains
    /// nothing, so the checker need not place it (each open call multiplies its search).
    fn retract(&self, thread: u64) {
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = steps
            .iter()
            .rposition(|s| matches!(s, Step::Invoke(t, _) if *t == thread))
        {
            steps.remove(at);
        }
    }

    fn take(&self) -> Vec<Step<Op, Ret>> {
        std::mem::take(&mut *self.steps.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Which steps are calls that got no answer: a thread's call is answered by the next return
/// of that thread (a thread has one call open at a time, and one left unanswered is its last).
fn unanswered<Op, Ret>(steps: &[Step<Op, Ret>]) -> Vec<bool> {
    let mut returns_later: HashSet<u64> = HashSet::new();
    let mut open = vec![false; steps.len()];
    for (k, s) in steps.iter().enumerate().rev() {
        match s {
            Step::Return(t, _) => {
                returns_later.insert(*t);
            }
            Step::Invoke(t, _) => open[k] = !returns_later.remove(t),
        }
    }
    open
}

/// `steps` without the rule adds that got no answer and whose name no read returned. Such an
/// add may be placed after everything else (it never returned), where it changes no answer:
/// names are unique and only answered adds are deleted. Like a retracted read it constrains
/// nothing, and each open call multiplies the checker's search.
fn without_unseen_adds(steps: Vec<Step<RuleOp, RuleRet>>) -> Vec<Step<RuleOp, RuleRet>> {
    let open = unanswered(&steps);
    let seen: HashSet<String> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Return(_, RuleRet::Names(n)) => Some(n.iter().cloned()),
            _ => None,
        })
        .flatten()
        .collect();
    steps
        .into_iter()
        .zip(open)
        .filter(|(s, open)| {
            !(*open && matches!(s, Step::Invoke(_, RuleOp::Add(name)) if !seen.contains(name)))
        })
        .map(|(s, _)| s)
        .collect()
}

/// How many calls `steps` holds, and how many of them got no answer.
fn calls<Op, Ret>(steps: &[Step<Op, Ret>]) -> (u64, u64) {
    let open = unanswered(steps);
    steps
        .iter()
        .zip(open)
        .fold((0, 0), |(all, left), (s, open)| match s {
            Step::Invoke(..) => (all + 1, left + u64::from(open)),
            Step::Return(..) => (all, left),
        })
}

fn add(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0 + b.0, a.1 + b.1)
}

/// Whether `steps` is a linearizable history of `init` (unreturned calls may or may not
/// have happened).
fn linearizable<S>(init: S, steps: Vec<Step<S::Op, S::Ret>>) -> Result<bool, String>
where
    S: SequentialSpec + Clone,
    S::Op: Clone + std::fmt::Debug,
    S::Ret: Clone + std::fmt::Debug + PartialEq,
{
    let mut t = LinearizabilityTester::new(init);
    for s in steps {
        match s {
            Step::Invoke(th, op) => {
                t.on_invoke(th, op)?;
            }
            Step::Return(th, ret) => {
                t.on_return(th, ret)?;
            }
        }
    }
    Ok(t.serialized_history().is_some())
}

// ---- the workload -------------------------------------------------------------------------------

struct Shared {
    stop: AtomicBool,
    next_thread: AtomicU64,
    /// (event id, command ids) of accepted events.
    accepted: Mutex<Vec<(String, Vec<String>)>>,
    events: AtomicU64,
    unconfirmed: AtomicU64,
    /// Per toggled customer: acknowledged unlinks and link invocations, with times.
    unlinks: Mutex<HashMap<String, Vec<(Instant, bool)>>>,
}

impl Shared {
    /// Notes, now, a link invoked (`true`) or an unlink acknowledged (`false`).
    fn mark(&self, customer: &str, linked: bool) {
        self.unlinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(customer.to_owned())
            .or_default()
            .push((Instant::now(), linked));
    }
}

fn clients(c: &Cluster, timeout: Duration) -> Vec<Client> {
    c.nodes
        .iter()
        .map(|n| n.admin().with_timeout(timeout))
        .collect()
}

async fn send_events(
    shared: Arc<Shared>,
    nodes: Vec<Client>,
    s: Arc<Scenario>,
    customers: Vec<usize>,
    worker: usize,
) {
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("ev-{worker}-{n}");
        let (ci, node) = {
            let mut rng = rand::thread_rng();
            (
                customers[rng.gen_range(0..customers.len())],
                rng.gen_range(0..nodes.len()),
            )
        };
        let event = s.event(&id, &s.customers[ci]);
        shared.events.fetch_add(1, Ordering::Relaxed);
        // An entity retries with the same id until it gets an answer: the dedup makes the
        // retry the same event.
        let mut confirmed = false;
        for attempt in 0..20 {
            let via = &nodes[(node + attempt) % nodes.len()];
            match via.send_event(&s.airline, &event).await {
                Ok(r) => {
                    if matches!(r.status, EventStatus::Accepted | EventStatus::Duplicate)
                        && !r.commands.is_empty()
                    {
                        shared
                            .accepted
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((id.clone(), r.commands));
                    }
                    confirmed = true;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        if !confirmed {
            shared.unconfirmed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How many calls one object's history holds at most, and how they are spread over the run:
/// the checker's search grows fast with length and with calls left open, so histories are
/// kept short and spread so that faults fall inside them.
#[derive(Clone, Copy)]
struct Pace {
    budget: usize,
    every: Duration,
}

fn take(budget: &std::sync::atomic::AtomicUsize) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
        .is_ok()
}

/// One customer's rules under test, shared by its writers.
#[derive(Clone)]
struct RuleTarget {
    customer: scenario::Customer,
    history: Arc<History<RuleOp, RuleRet>>,
    /// Rule ids by name, of the adds that were answered.
    ids: Arc<Mutex<HashMap<String, String>>>,
    /// Calls left in the history.
    budget: Arc<std::sync::atomic::AtomicUsize>,
}

async fn rule_ops(
    shared: Arc<Shared>,
    nodes: Vec<Client>,
    target: RuleTarget,
    worker: usize,
    every: Duration,
) {
    let RuleTarget {
        customer,
        history,
        ids,
        budget,
    } = target;
    let mut thread = shared.next_thread.fetch_add(1, Ordering::Relaxed);
    let mut n = 0;
    while !shared.stop.load(Ordering::Relaxed) && take(&budget) {
        n += 1;
        let (roll, node) = {
            let mut rng = rand::thread_rng();
            (rng.gen_range(0..10), rng.gen_range(0..nodes.len()))
        };
        let me = nodes[node].with_token(&customer.token);
        let known: Vec<(String, String)> = ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Every error of a write counts as "maybe applied": the call stays open in the history.
        let ret: Option<RuleRet> = if roll < 3 && !known.is_empty() {
            let (name, id) = known[n % known.len()].clone();
            history.push(Step::Invoke(thread, RuleOp::Delete(name.clone())));
            let r = me.delete_rule(&customer.id, &id).await;
            ids.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            match r {
                Ok(()) => Some(RuleRet::Deleted),
                Err(e) if e.code() == Some(ErrorCode::NotFound) => Some(RuleRet::NotFound),
                Err(_) => None,
            }
        } else if roll < 6 && known.len() < 20 {
            let name = format!("r-{worker}-{n}");
            history.push(Step::Invoke(thread, RuleOp::Add(name.clone())));
            let mut spec = scenario::rule();
            spec.name = name.clone();
            match me.create_rule(&customer.id, &spec).await {
                Ok(rule) => {
                    ids.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name, rule.id);
                    Some(RuleRet::Added)
                }
                Err(_) => None,
            }
        } else {
            history.push(Step::Invoke(thread, RuleOp::Read));
            let Ok(rules) = me.rules(&customer.id).await else {
                history.retract(thread);
                tokio::time::sleep(every).await;
                continue;
            };
            Some(RuleRet::Names(rules.into_iter().map(|r| r.name).collect()))
        };
        match ret {
            Some(r) => history.push(Step::Return(thread, r)),
            // A thread has one call open at a time: this worker goes on as a new thread.
            None => thread = shared.next_thread.fetch_add(1, Ordering::Relaxed),
        }
        tokio::time::sleep(every).await;
    }
}

async fn link_ops(
    shared: Arc<Shared>,
    nodes: Vec<Client>,
    customer: scenario::Customer,
    car_subject: String,
    history: Arc<History<LinkOp, LinkRet>>,
    pace: Pace,
) {
    let mut thread = shared.next_thread.fetch_add(1, Ordering::Relaxed);
    let mut linked_next = false;
    let mut left = pace.budget;
    while !shared.stop.load(Ordering::Relaxed) && left > 0 {
        left -= 1;
        let node = rand::thread_rng().gen_range(0..nodes.len());
        let admin = &nodes[node];
        let read = rand::thread_rng().gen_bool(0.4);
        let ret: Option<LinkRet> = if read {
            history.push(Step::Invoke(thread, LinkOp::Read));
            let Ok(c) = admin.customer(&customer.id).await else {
                history.retract(thread);
                tokio::time::sleep(pace.every).await;
                continue;
            };
            Some(LinkRet::Linked(
                c.links.iter().any(|l| l.entity_id == "car"),
            ))
        } else if linked_next {
            history.push(Step::Invoke(thread, LinkOp::Link));
            shared.mark(&customer.id, true);
            let req = LinkRequest {
                entity_id: "car".into(),
                subject: car_subject.clone(),
            };
            match admin.link(&customer.id, &req).await {
                Ok(_) => Some(LinkRet::Done),
                Err(_) => None,
            }
        } else {
            history.push(Step::Invoke(thread, LinkOp::Unlink));
            match admin.unlink(&customer.id, "car").await {
                Ok(()) => {
                    shared.mark(&customer.id, false);
                    Some(LinkRet::Done)
                }
                Err(e) if e.code() == Some(ErrorCode::NotFound) => Some(LinkRet::NotFound),
                Err(_) => None,
            }
        };
        if !read {
            linked_next = !linked_next;
        }
        match ret {
            Some(r) => history.push(Step::Return(thread, r)),
            None => thread = shared.next_thread.fetch_add(1, Ordering::Relaxed),
        }
        tokio::time::sleep(pace.every).await;
    }
}

/// A command reached the car-rental company after an unlink was acknowledged, with no link
/// invoked between the two.
fn after_unlink(
    arrivals: &[(Instant, String)],
    unlinks: &HashMap<String, Vec<(Instant, bool)>>,
) -> u64 {
    let mut bad = 0;
    for (at, customer) in arrivals {
        let Some(marks) = unlinks.get(customer) else {
            continue;
        };
        // The latest mark before the arrival decides: an acknowledged unlink (false) with no
        // link invoked after it.
        let last = marks.iter().filter(|(t, _)| t < at).max_by_key(|(t, _)| *t);
        if matches!(last, Some((_, false))) {
            bad += 1;
        }
    }
    bad
}

// ---- faults ---------------------------------------------------------------------------------------

async fn wait_ready(c: &Cluster) -> anyhow::Result<()> {
    c.wait_placed(Duration::from_secs(120)).await.map(|_| ())
}

/// Kills the leader of `group` (-9), measures the time to the next 202 for a customer there,
/// then restarts it.
async fn kill_leader(
    c: &mut Cluster,
    s: &Scenario,
    group_customer: (u32, usize),
) -> anyhow::Result<u64> {
    let (group, ci) = group_customer;
    let victim = c.leader_of(group).await?;
    c.nodes[victim - 1].kill()?;
    let started = Instant::now();
    let via = c.nodes[if victim == 1 { 1 } else { 0 }]
        .anonymous()
        .with_timeout(Duration::from_secs(5));
    let mut n = 0;
    poll::until("a 202 after the kill", Duration::from_secs(60), || {
        n += 1;
        let event = s.event(
            &format!("failover-{}-{n}", started.elapsed().as_micros()),
            &s.customers[ci],
        );
        let via = via.clone();
        let airline = s.airline.clone();
        async move { via.send_event(&airline, &event).await.ok().map(|_| ()) }
    })
    .await?;
    let took = started.elapsed().as_millis() as u64;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.nodes[victim - 1].restart_unready().await?;
    Ok(took)
}

async fn pause(c: &mut Cluster, i: usize, secs: u64) -> anyhow::Result<()> {
    c.nodes[i - 1].signal("STOP")?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    c.nodes[i - 1].signal("CONT")?;
    Ok(())
}

async fn split(c: &Cluster, side: &[usize], secs: u64) -> anyhow::Result<()> {
    let net = c
        .net
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("partitions need network namespaces"))?;
    net.split(side, c.nodes.len())?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    net.heal()
}

async fn full_restart(c: &mut Cluster) -> anyhow::Result<()> {
    for n in &mut c.nodes {
        n.kill()?;
    }
    for n in &mut c.nodes {
        n.restart_unready().await?;
    }
    Ok(())
}

// ---- the run --------------------------------------------------------------------------------------

/// Runs the chaos scenario and answers its report (the checks are in [`Report::ok`]).
pub async fn run(opts: ChaosOptions) -> anyhow::Result<Report> {
    anyhow::ensure!((3..=7).contains(&opts.nodes), "3 to 7 nodes");
    let node_opts = NodeOptions {
        // The shipped Raft timings: failover is measured as users get it.
        raft_timings: None,
        log_level: "warn,custos_node::cluster=info".into(),
        retry_schedule_secs: vec![0.0, 1.0, 1.0, 2.0, 2.0, 5.0, 5.0, 10.0, 10.0, 20.0],
        ..NodeOptions::default()
    };
    let mut c = Cluster::start(opts.nodes, node_opts, true).await?;
    let host = c
        .net
        .as_ref()
        .map(|n| n.host_ip)
        .ok_or_else(|| anyhow::anyhow!("no network"))?;
    let hotel_rx = Receiver::start_on(&format!("{host}:0"), vec![], 200)?;
    let car_rx = Receiver::start_on(&format!("{host}:0"), vec![], 200)?;
    let setup_clients = clients(&c, Duration::from_secs(30));
    let s = Arc::new(Scenario::setup(&setup_clients, &hotel_rx.url, opts.customers).await?);
    scenario::register(&setup_clients[0], "car", &car_rx.url, &[], &["car.hold"]).await?;
    // The last quarter of the customers toggle the car link, with a rule sending to it.
    let toggled: Vec<usize> = (opts.customers * 3 / 4..opts.customers).collect();
    for i in &toggled {
        let cust = &s.customers[*i];
        let req = LinkRequest {
            entity_id: "car".into(),
            subject: format!("C-{i}"),
        };
        scenario::retry(|| setup_clients[0].link(&cust.id, &req)).await?;
        let mut spec = scenario::rule();
        spec.name = "car".into();
        spec.then.entity = "car".into();
        spec.then.command_type = "car.hold".into();
        let me = setup_clients[0].with_token(&cust.token);
        scenario::retry(|| me.create_rule(&cust.id, &spec)).await?;
    }
    wait_ready(&c).await?;

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        next_thread: AtomicU64::new(1),
        accepted: Mutex::new(Vec::new()),
        events: AtomicU64::new(0),
        unconfirmed: AtomicU64::new(0),
        unlinks: Mutex::new(HashMap::new()),
    });
    let work_clients = clients(&c, Duration::from_secs(10));
    let mut tasks = Vec::new();
    let all: Vec<usize> = (0..opts.customers).collect();
    for w in 0..opts.senders {
        tasks.push(tokio::spawn(send_events(
            shared.clone(),
            work_clients.clone(),
            s.clone(),
            all.clone(),
            w,
        )));
    }
    // Rule histories on the first six customers; link histories on the toggled ones. Each
    // short, spread over the run.
    let pace = Pace {
        budget: HISTORY_CALLS,
        every: opts.duration / HISTORY_CALLS as u32,
    };
    let mut rule_histories = Vec::new();
    for ci in 0..6.min(opts.customers) {
        let target = RuleTarget {
            customer: s.customers[ci].clone(),
            history: Arc::new(History::new()),
            ids: Arc::new(Mutex::new(HashMap::new())),
            budget: Arc::new(std::sync::atomic::AtomicUsize::new(pace.budget)),
        };
        // One client per customer, each call through a random node: an acknowledged write
        // must be seen by the next read wherever it lands (the searcher stays fast on such
        // histories; calls that time out still make them concurrent).
        tasks.push(tokio::spawn(rule_ops(
            shared.clone(),
            work_clients.clone(),
            target.clone(),
            ci * 10,
            pace.every,
        )));
        rule_histories.push(target.history);
    }
    let mut link_histories = Vec::new();
    for i in &toggled {
        let history = Arc::new(History::new());
        tasks.push(tokio::spawn(link_ops(
            shared.clone(),
            work_clients.clone(),
            s.customers[*i].clone(),
            format!("C-{i}"),
            history.clone(),
            Pace {
                budget: HISTORY_CALLS,
                every: opts.duration / HISTORY_CALLS as u32,
            },
        )));
        link_histories.push(history);
    }

    // Faults, spread over the duration.
    let started = Instant::now();
    let mut report = Report {
        nodes: opts.nodes,
        ..Report::default()
    };
    let gap = opts.duration / 6;
    let some_group = {
        let cust = &s.customers[0];
        let g = setup_clients[0].customer(&cust.id).await?.group;
        (g, 0usize)
    };
    tokio::time::sleep(gap).await;
    report
        .failover_ms
        .push(kill_leader(&mut c, &s, some_group).await?);
    report.faults.push("kill-leader".into());
    tokio::time::sleep(gap).await;
    let paused = c.leader_now(some_group.0).await.unwrap_or(2);
    pause(&mut c, paused, 4).await?;
    report.faults.push("pause".into());
    tokio::time::sleep(gap).await;
    let isolated = c.leader_now(0).await.unwrap_or(1);
    split(&c, &[isolated], 6).await?;
    report.faults.push("isolate-meta-leader".into());
    tokio::time::sleep(gap).await;
    let minority: Vec<usize> = (1..=opts.nodes / 2)
        .map(|i| 1 + (isolated + i - 1) % opts.nodes)
        .collect();
    split(&c, &minority, 6).await?;
    report.faults.push(format!(
        "split-{}/{}",
        minority.len(),
        opts.nodes - minority.len()
    ));
    tokio::time::sleep(gap).await;
    full_restart(&mut c).await?;
    report.faults.push("full-restart".into());
    let rest = opts.duration.saturating_sub(started.elapsed());
    tokio::time::sleep(rest.max(gap)).await;
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    report.seconds = started.elapsed().as_secs();

    // Heal and check.
    let healing = Instant::now();
    if let Some(net) = &c.net {
        net.heal()?;
    }
    report.converged = c.wait_converged(Duration::from_secs(120)).await.is_ok();
    let accepted = shared
        .accepted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let expected: BTreeSet<String> = accepted.iter().flat_map(|(_, c)| c.clone()).collect();
    report.events = shared.events.load(Ordering::Relaxed);
    report.accepted = accepted.len() as u64;
    report.unconfirmed = shared.unconfirmed.load(Ordering::Relaxed);
    report.commands = expected.len() as u64;
    let received = || -> Vec<Received> {
        let mut all = hotel_rx.received();
        all.extend(car_rx.received());
        all
    };
    let delivered = |got: &[Received]| -> BTreeSet<String> {
        got.iter()
            .filter(|r| (200..300).contains(&r.answered))
            .map(|r| r.webhook_id.clone())
            .collect()
    };
    // Until every command arrived or settled otherwise (cancelled by an unlink, failed).
    let settled = |id: String| {
        let admin = setup_clients[0].clone();
        async move {
            admin.delivery(&id).await.ok().is_some_and(|d| {
                matches!(d.status, DeliveryStatus::Cancelled | DeliveryStatus::Failed)
            })
        }
    };
    let _ = poll::until(
        "every accepted command delivered or settled",
        Duration::from_secs(120),
        || {
            let got = delivered(&received());
            let missing: Vec<String> = expected
                .iter()
                .filter(|id| !got.contains(*id))
                .cloned()
                .collect();
            async move {
                if missing.len() > 50 {
                    return None;
                }
                for id in missing {
                    if !settled(id).await {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    report.heal_seconds = healing.elapsed().as_secs();
    let got = received();
    let ids = delivered(&got);
    // A command not delivered because its customer withdrew it meanwhile (unlinked the
    // target, linked it as another account, deleted the rule) was cancelled, as it must be;
    // any other missing command is a failure.
    let withdrawn = |reason: &str| {
        reason.contains("unlinked")
            || reason.contains("linked another account")
            || reason.contains("deleted rule")
    };
    for id in expected.iter().filter(|id| !ids.contains(*id)) {
        match setup_clients[0].delivery(id).await {
            Ok(d)
                if d.status == DeliveryStatus::Cancelled
                    && d.reason.as_deref().is_some_and(withdrawn) =>
            {
                report.cancelled += 1;
            }
            found => {
                report.undelivered += 1;
                if report.notes.len() < 5 {
                    report.notes.push(match found {
                        Ok(d) => format!(
                            "{id}: {:?}, {} attempts, next {:?}, reason {:?}",
                            d.status,
                            d.attempts.len(),
                            d.next_attempt_at,
                            d.reason
                        ),
                        Err(e) => format!("{id}: {e}"),
                    });
                }
            }
        }
    }
    let mut bodies: HashMap<&str, &[u8]> = HashMap::new();
    for r in &got {
        match bodies.get(r.webhook_id.as_str()) {
            Some(b) if *b != r.body.as_slice() => report.conflicting += 1,
            Some(_) => report.duplicates += 1,
            None => {
                bodies.insert(&r.webhook_id, &r.body);
            }
        }
    }
    // Car commands: who they were for, when they arrived.
    let subject_to_customer: HashMap<String, String> = toggled
        .iter()
        .map(|i| (format!("C-{i}"), s.customers[*i].id.clone()))
        .collect();
    let arrivals: Vec<(Instant, String)> = car_rx
        .received()
        .iter()
        .filter_map(|r| {
            let subject = r.json()["subject"].as_str()?.to_owned();
            Some((r.at, subject_to_customer.get(&subject)?.clone()))
        })
        .collect();
    report.after_unlink = after_unlink(
        &arrivals,
        &shared.unlinks.lock().unwrap_or_else(|p| p.into_inner()),
    );
    // Linearizability, per customer and object, off the runtime and bounded in time (the
    // search is exponential in the worst case: a run it cannot finish fails).
    let rule_steps: Vec<_> = rule_histories.iter().map(|h| h.take()).collect();
    let link_steps: Vec<_> = link_histories.iter().map(|h| h.take()).collect();
    let rule_ops: u64 = rule_steps.iter().map(|s| calls(s).0).sum();
    let rule_steps: Vec<_> = rule_steps.into_iter().map(without_unseen_adds).collect();
    let (rule_left, rule_open) = rule_steps.iter().map(|s| calls(s)).fold((0, 0), add);
    let (link_ops, link_open) = link_steps.iter().map(|s| calls(s)).fold((0, 0), add);
    report.history_ops = rule_ops + link_ops;
    report.dropped_adds = rule_ops - rule_left;
    report.open_calls = rule_open + link_open;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lin: Result<bool, String> = Ok(true);
        for steps in rule_steps {
            let init = Rules(BTreeSet::from(["Hold my room".to_owned()]));
            lin = lin.and_then(|ok| Ok(ok && linearizable(init, steps)?));
        }
        for steps in link_steps {
            lin = lin.and_then(|ok| Ok(ok && linearizable(CarLink(true), steps)?));
        }
        let _ = tx.send(lin);
    });
    report.linearizable = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(ok)) => Some(ok),
        Ok(Err(e)) => anyhow::bail!("malformed history: {e}"),
        Err(_) => None,
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_accepts_a_linearizable_history_and_refuses_a_stale_read() {
        let ok = vec![
            Step::Invoke(1, RuleOp::Add("a".into())),
            Step::Invoke(2, RuleOp::Read),
            Step::Return(2, RuleRet::Names(BTreeSet::new())),
            Step::Return(1, RuleRet::Added),
            Step::Invoke(2, RuleOp::Read),
            Step::Return(2, RuleRet::Names(BTreeSet::from(["a".to_owned()]))),
        ];
        assert_eq!(linearizable(Rules::default(), ok), Ok(true));
        // A read after an acknowledged add that does not see it is not linearizable.
        let stale = vec![
            Step::Invoke(1, RuleOp::Add("a".into())),
            Step::Return(1, RuleRet::Added),
            Step::Invoke(2, RuleOp::Read),
            Step::Return(2, RuleRet::Names(BTreeSet::new())),
        ];
        assert_eq!(linearizable(Rules::default(), stale), Ok(false));
        // A timed-out add may have happened: a later read seeing it is fine, and so is one
        // not seeing it.
        for seen in [true, false] {
            let names = if seen {
                BTreeSet::from(["a".to_owned()])
            } else {
                BTreeSet::new()
            };
            let maybe = vec![
                Step::Invoke(1, RuleOp::Add("a".into())),
                Step::Invoke(2, RuleOp::Read),
                Step::Return(2, RuleRet::Names(names)),
            ];
            assert_eq!(linearizable(Rules::default(), maybe), Ok(true));
        }
    }

    #[test]
    fn an_unanswered_read_is_taken_back_and_the_rest_stays() {
        let h: History<RuleOp, RuleRet> = History::new();
        h.push(Step::Invoke(1, RuleOp::Add("a".into())));
        h.push(Step::Invoke(2, RuleOp::Read));
        h.push(Step::Return(1, RuleRet::Added));
        h.retract(2);
        let steps = h.take();
        assert_eq!(steps.len(), 2);
        assert!(matches!(steps[0], Step::Invoke(1, RuleOp::Add(_))));
        assert!(matches!(steps[1], Step::Return(1, RuleRet::Added)));
        assert_eq!(linearizable(Rules::default(), steps), Ok(true));
    }

    #[test]
    fn an_unanswered_add_no_read_saw_is_dropped_and_one_a_read_saw_stays() {
        let steps = vec![
            Step::Invoke(1, RuleOp::Add("a".into())),
            Step::Invoke(2, RuleOp::Add("b".into())),
            Step::Invoke(3, RuleOp::Add("c".into())),
            Step::Return(3, RuleRet::Added),
            // Thread 3's next call gets no answer, though its first did.
            Step::Invoke(3, RuleOp::Add("d".into())),
            Step::Invoke(4, RuleOp::Read),
            Step::Return(4, RuleRet::Names(BTreeSet::from(["b".into(), "c".into()]))),
            // A read after one that saw b misses it: not linearizable, pruned or not.
            Step::Invoke(4, RuleOp::Read),
            Step::Return(4, RuleRet::Names(BTreeSet::from(["c".into()]))),
        ];
        assert_eq!(linearizable(Rules::default(), steps.clone()), Ok(false));
        assert_eq!(calls(&steps), (6, 3));
        let pruned = without_unseen_adds(steps);
        assert_eq!(
            pruned.len(),
            7,
            "only the unanswered, unseen adds of a and d go"
        );
        assert!(!pruned
            .iter()
            .any(|s| matches!(s, Step::Invoke(_, RuleOp::Add(n)) if n == "a" || n == "d")));
        assert_eq!(calls(&pruned), (4, 1));
        assert_eq!(linearizable(Rules::default(), pruned), Ok(false));
        // Without the stale read, the pruned history is linearizable, as the whole one is.
        let fine = vec![
            Step::Invoke(1, RuleOp::Add("a".into())),
            Step::Invoke(2, RuleOp::Add("b".into())),
            Step::Invoke(4, RuleOp::Read),
            Step::Return(4, RuleRet::Names(BTreeSet::from(["b".into()]))),
        ];
        assert_eq!(linearizable(Rules::default(), fine.clone()), Ok(true));
        assert_eq!(
            linearizable(Rules::default(), without_unseen_adds(fine)),
            Ok(true)
        );
    }

    #[test]
    fn a_command_after_an_acknowledged_unlink_is_counted() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let unlinks = HashMap::from([("c".to_owned(), vec![(at(10), false), (at(50), true)])]);
        let arrivals = vec![
            (at(5), "c".to_owned()),  // before the unlink: fine
            (at(20), "c".to_owned()), // after the unlink, before the relink: counted
            (at(60), "c".to_owned()), // after the relink: fine
        ];
        assert_eq!(after_unlink(&arrivals, &unlinks), 1);
    }
}
