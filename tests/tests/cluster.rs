//! Clusters of real `custos` processes on loopback: joining, any call from any node, status,
//! leader failover, pause, full restart, node removal, and a node with the wrong secret; and
//! in network namespaces (root), a node cut off from the meta group's leader.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use custos_api::types::*;
use custos_tests::cluster::Cluster;
use custos_tests::node::{Node, NodeOptions};
use custos_tests::poll;
use custos_tests::receiver::Receiver;
use custos_tests::scenario::{delayed, retry, Scenario};

const WAIT: Duration = Duration::from_secs(30);

/// Sends one event to node `via` until it is accepted (a failover answers 503 meanwhile);
/// answers its command ids.
async fn send_until_accepted(
    c: &Cluster,
    via: usize,
    s: &Scenario,
    id: &str,
    customer: usize,
) -> anyhow::Result<Vec<String>> {
    let event = s.event(id, &s.customers[customer]);
    let client = c.nodes[via - 1].anonymous();
    let last = std::sync::Mutex::new(String::new());
    let accepted = poll::until(&format!("{id} accepted via node {via}"), WAIT, || async {
        match client.send_event(&s.airline, &event).await {
            Ok(r) if r.status == EventStatus::Accepted || r.status == EventStatus::Duplicate => {
                Some(r.commands)
            }
            other => {
                *last.lock().unwrap_or_else(|p| p.into_inner()) = format!("{other:?}");
                None
            }
        }
    })
    .await;
    accepted.map_err(|e| {
        anyhow::anyhow!(
            "{e}; last answer: {}",
            last.lock().map(|l| l.clone()).unwrap_or_default()
        )
    })
}

/// Every command id arrived, each with one content only.
fn check_deliveries(rx: &Receiver, expected: &[String]) -> anyhow::Result<usize> {
    let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
    let mut duplicates = 0;
    for r in rx.received() {
        if let Some(first) = bodies.get(&r.webhook_id) {
            anyhow::ensure!(
                first == &r.body,
                "command {} arrived with two contents",
                r.webhook_id
            );
            duplicates += 1;
        } else {
            bodies.insert(r.webhook_id.clone(), r.body.clone());
        }
    }
    for id in expected {
        anyhow::ensure!(bodies.contains_key(id), "command {id} never arrived");
    }
    Ok(duplicates)
}

/// Events this node relayed to other nodes' groups, and the peer requests that carried them
/// (from its `/metrics`).
async fn relayed(url: &str) -> anyhow::Result<(f64, f64)> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("custos_relayed_events"),
        value("custos_relayed_event_batches"),
    ))
}

/// Bytes of the current snapshots of this node's replicas, built or installed, before or
/// since a restart (from its `/metrics`).
async fn snapshot_bytes(url: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("custos_snapshot_bytes{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test]
async fn any_node_serves_any_call_and_the_status_shows_the_cluster() -> anyhow::Result<()> {
    let rx = Receiver::start(vec![], 200)?;
    // Sharded over 16 data groups (the default is one): placement and leader spreading.
    let options = NodeOptions {
        extra_toml: "[cluster]\ndata_groups = 16".into(),
        ..NodeOptions::default()
    };
    let c = Cluster::start(3, options, false).await?;
    let admins: Vec<_> = (1..=3).map(|i| c.admin(i)).collect();
    let s = Scenario::setup(&admins, &rx.url, 6).await?;

    // Polled: the manager moves leaders right after placement, and a group being handed over
    // has no leader for a moment.
    let status = poll::until(
        "every node up, every group led by one of 3 voters",
        WAIT,
        || async {
            let status = c.status().await.ok()?;
            let settled = status.nodes.iter().all(|n| n.up && n.state == "active")
                && status
                    .groups
                    .iter()
                    .all(|g| g.voters.len() == 3 && g.leader.is_some());
            settled.then_some(status)
        },
    )
    .await?;
    assert_eq!(status.nodes.len(), 3);
    assert_eq!(status.groups.len(), 17, "the meta group and 16 data groups");
    // Leaders are spread: no node leads more than ceil(16 / 3) data groups. The manager moves
    // leaderships after placement, so this is polled for (a freshly placed cluster may still
    // have every leader on the first node).
    let leads_of = |status: &ClusterStatus| {
        let mut leads: HashMap<u64, usize> = HashMap::new();
        for g in status.groups.iter().filter(|g| g.id != 0) {
            *leads.entry(g.leader.unwrap_or(0)).or_default() += 1;
        }
        leads
    };
    let last = std::sync::Mutex::new(HashMap::new());
    poll::until("leaders spread over the nodes", WAIT, || async {
        let leads = leads_of(&c.status().await.ok()?);
        let spread = leads.values().all(|n| *n <= 6);
        *last.lock().unwrap_or_else(|p| p.into_inner()) = leads;
        spread.then_some(())
    })
    .await
    .with_context(|| format!("{:?}", last.lock().map(|l| l.clone()).unwrap_or_default()))?;

    // Every event through every node, for every customer: accepted once, delivered.
    let mut expected = Vec::new();
    for (i, _) in s.customers.iter().enumerate() {
        for via in 1..=3 {
            let id = format!("e-{i}-{via}");
            expected.extend(send_until_accepted(&c, via, &s, &id, i).await?);
        }
    }
    // A burst through one node: the events whose group another node leads are relayed to
    // that leader in batches (fewer peer requests than events), each answered as the leader
    // would answer it.
    let relayed_before = relayed(&c.nodes[1].url).await?;
    const BURST: usize = 120;
    let burst = (0..BURST).map(|k| {
        let (s, c) = (&s, &c);
        async move {
            let id = format!("burst-{k}");
            send_until_accepted(c, 2, s, &id, k % s.customers.len()).await
        }
    });
    for commands in futures::future::join_all(burst).await {
        expected.extend(commands?);
    }
    let relayed_after = relayed(&c.nodes[1].url).await?;
    let (events, batches) = (
        relayed_after.0 - relayed_before.0,
        relayed_after.1 - relayed_before.1,
    );
    eprintln!("{events} events relayed in {batches} peer requests");
    assert!(
        events > 0.0 && batches < events,
        "{events} events relayed in {batches} peer requests"
    );
    // Through every node, relayed or not, the same answers: a duplicate names the first
    // one's commands, a bad signature and a wrong media type are refused with their codes.
    let first = s.event("e-0-1", &s.customers[0]);
    let wrong_key = s.event("forged", &s.customers[0]);
    for node in &c.nodes {
        let client = node.anonymous();
        let again = client.send_event(&s.airline, &first).await?;
        assert_eq!(again.status, EventStatus::Duplicate);
        assert_eq!(again.commands.len(), 1);
        let refused = client.send_event(&s.hotel, &wrong_key).await;
        assert_eq!(
            refused.err().and_then(|e| e.code()),
            Some(custos_api::ErrorCode::BadSignature)
        );
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/events", node.url))
            .header("content-type", "text/plain")
            .body(serde_json::to_vec(&first)?)
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), 415);
        let media = resp.headers().get("content-type").map(|v| v.as_bytes());
        assert_eq!(
            media,
            Some(&b"application/problem+json"[..]),
            "relayed headers"
        );
        let problem: custos_api::Problem = resp.json().await?;
        assert_eq!(problem.code, custos_api::ErrorCode::UnsupportedMediaType);
    }
    rx.wait_delivered(expected.len(), WAIT).await?;
    assert_eq!(
        check_deliveries(&rx, &expected)?,
        0,
        "no duplicate without a fault"
    );
    // Reads answer the same whichever node is asked (forwarded to the group's leader).
    let cust = &s.customers[0];
    for i in 1..=3 {
        let me = c.nodes[i - 1].admin().with_token(&cust.token);
        let activity = me.activity(&cust.id, 100, None).await?;
        assert_eq!(
            activity
                .items
                .iter()
                .filter(|a| matches!(a.kind, ActivityKind::EventReceived { .. }))
                .count(),
            3 + BURST / s.customers.len()
        );
        assert_eq!(me.rules(&cust.id).await?.len(), 1);
    }
    // The admin list of deliveries spans every group.
    let page = c.admin(2).deliveries(DeliveryStatus::Delivered).await?;
    assert!(!page.items.is_empty());

    // A node with another cluster secret is refused, and says why.
    let stranger = NodeOptions {
        cluster_secret: Some("not-the-cluster-secret-0123456789".into()),
        join: vec![c.nodes[0].peer.clone()],
        ..NodeOptions::default()
    };
    let err = match Node::start(stranger).await {
        Ok(_) => anyhow::bail!("a node with the wrong secret joined"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("cluster secret"), "{err}");
    assert_eq!(c.status().await?.nodes.len(), 3, "nothing changed");
    Ok(())
}

/// The first customer unlinks the hotel through node `via`; with when the answer came.
async fn unlink_hotel(c: &Cluster, via: usize, s: &Scenario) -> (anyhow::Result<()>, Instant) {
    let cust = &s.customers[0];
    let me = c.nodes[via - 1].admin().with_token(&cust.token);
    let unlinked = me.unlink(&cust.id, "hotel").await.map_err(Into::into);
    (unlinked, Instant::now())
}

#[tokio::test]
async fn an_unlink_through_a_follower_is_answered_once_the_leaders_attempt_has_finished(
) -> anyhow::Result<()> {
    let rx = Receiver::start(vec![], 200)?;
    // A forwarded call is given the commit deadline and 2 s (3 s here); the hotel takes 4 s
    // to answer each command (within the test nodes' 5 s delivery timeout, so the attempt ends
    // with the hotel's answer), so the leader's wait for its attempt outlasts that deadline.
    let options = NodeOptions {
        propose_timeout_ms: Some(1000),
        ..NodeOptions::default()
    };
    let c = Cluster::start(3, options, false).await?;
    let admins: Vec<_> = (1..=3).map(|i| c.admin(i)).collect();
    let s = Scenario::setup(&admins, &rx.url, 1).await?;
    let leader = c.leader_of(1).await?;
    let follower = if leader == 1 { 2 } else { 1 };
    rx.set_hold(Duration::from_secs(4));
    send_until_accepted(&c, leader, &s, "slow-1", 0).await?;
    rx.wait_received(1, WAIT).await?;
    let (unlinked, acknowledged) = unlink_hotel(&c, follower, &s).await;
    unlinked?;
    assert!(
        rx.first_answered_by(acknowledged),
        "the unlink was acknowledged while the leader's attempt was still sending"
    );
    Ok(())
}

#[tokio::test]
async fn an_unlink_after_a_failover_waits_for_the_attempt_the_old_leader_was_sending(
) -> anyhow::Result<()> {
    let rx = Receiver::start(vec![], 200)?;
    let c = Cluster::start(3, NodeOptions::default(), false).await?;
    let admins: Vec<_> = (1..=3).map(|i| c.admin(i)).collect();
    let s = Scenario::setup(&admins, &rx.url, 1).await?;
    c.wait_placed(WAIT).await?;
    let old = c.leader_of(1).await?;
    // The hotel holds the old leader's attempt 4 s; it answers later ones at once.
    rx.set_hold(Duration::from_secs(4));
    send_until_accepted(&c, old, &s, "held-1", 0).await?;
    rx.wait_received(1, WAIT).await?;
    rx.set_hold(Duration::ZERO);
    // The old leader stops with its attempt under way, and another node takes the group over
    // (its worker sends the command again, answered at once).
    c.nodes[old - 1].signal("STOP")?;
    let live = if old == 1 { 2 } else { 1 };
    let old_id = c.nodes[old - 1].id;
    let new = poll::until("another leader of the data group", WAIT, || async {
        let status = c.nodes[live - 1].admin().cluster_status().await.ok()?;
        let group = status.groups.iter().find(|g| g.id == 1)?;
        c.index_of(group.leader.filter(|l| *l != old_id)?)
    })
    .await?;
    let (unlinked, acknowledged) = unlink_hotel(&c, new, &s).await;
    c.nodes[old - 1].signal("CONT")?;
    unlinked?;
    // The new leader never saw the old one's attempt, yet it answered only after that attempt
    // could no longer be sending.
    assert!(
        rx.first_answered_by(acknowledged),
        "the unlink was acknowledged while the old leader's attempt was still sending"
    );
    Ok(())
}

/// The status code of a request sent as written: `path` byte for byte (an HTTP client would
/// resolve its `..` before sending).
async fn status_of_raw_get(url: &str, path: &str) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await?;
    let head = String::from_utf8_lossy(&answer);
    head.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status line: {head}"))
}

#[tokio::test]
async fn a_client_call_never_reaches_the_peer_routes_through_a_forwarding_node(
) -> anyhow::Result<()> {
    let c = Cluster::start(2, NodeOptions::default(), false).await?;
    let leader = c.leader_of(0).await?;
    let follower = if leader == 1 { 2 } else { 1 };
    let url = &c.nodes[follower - 1].url;
    // An entity call is forwarded to the meta leader's peer port; an URL parser there would
    // make each of these `/peer/status`, a peer route, called with this node's peer token.
    for path in [
        "/v1/entities/x/../../../peer/status",
        "/v1/entities/x/%2e%2e/%2E%2E/../peer/status",
        "/v1/entities/x\\..\\..\\..\\peer\\status",
    ] {
        assert_eq!(status_of_raw_get(url, path).await?, 400, "{path}");
    }
    // The same calls in their normal form are served.
    assert_eq!(status_of_raw_get(url, "/v1/entities").await?, 401);
    assert_eq!(status_of_raw_get(url, "/peer/status").await?, 404);
    Ok(())
}

#[tokio::test]
async fn removing_a_live_node_while_another_is_down_leaves_the_groups_writable(
) -> anyhow::Result<()> {
    let rx = Receiver::start(vec![], 200)?;
    let mut c = Cluster::start(3, NodeOptions::default(), false).await?;
    let s = Scenario::setup(&[c.admin(1)], &rx.url, 1).await?;
    c.wait_placed(WAIT).await?;
    // Node 3 dies; node 2, alive, is removed: the placement now wants {1, 3}. Made voters of
    // every group, {1, 3} could never commit the change (3 is gone), and openraft takes no
    // change after an uncommitted one: no group could take a write again.
    c.nodes[2].kill()?;
    let (admin, two) = (c.admin(1), c.nodes[1].id);
    retry(|| admin.remove_node(two)).await?;
    poll::until("the voters change waits for node 3", WAIT, || async {
        c.nodes[..2]
            .iter()
            .any(|n| n.log().contains("voters change waits"))
            .then_some(())
    })
    .await?;
    // Nodes 1 and 2 still make a majority of every group: events are taken and delivered.
    let mut expected = Vec::new();
    for via in [1, 2] {
        expected
            .extend(send_until_accepted(&c, via, &s, &format!("while-3-is-down-{via}"), 0).await?);
    }
    rx.wait_delivered(expected.len(), WAIT).await?;
    check_deliveries(&rx, &expected)?;
    // Node 3 back: the removal goes through.
    c.nodes[2].restart_unready().await?;
    let removed = c.nodes[1].id;
    poll::until("node 2 removed", Duration::from_secs(90), || async {
        let st = c.admin(1).cluster_status().await.ok()?;
        let out = st
            .groups
            .iter()
            .all(|g| !g.voters.contains(&removed) && !g.learners.contains(&removed));
        (out && !st.groups.is_empty()).then_some(())
    })
    .await?;
    Ok(())
}

/// Stops `node`, deletes its database (its `node-id` file stays), starts it again and answers
/// why it did not start (empty if it did).
async fn restart_without_its_database(node: &mut Node) -> anyhow::Result<String> {
    node.stop().await?;
    std::fs::remove_dir_all(node.data_dir.join("db"))?;
    anyhow::ensure!(
        node.data_dir.join("node-id").exists(),
        "its id file is kept"
    );
    Ok(node
        .restart_unready()
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default())
}

#[tokio::test]
async fn a_node_whose_database_was_lost_is_not_taken_back_under_its_id() -> anyhow::Result<()> {
    let mut c = Cluster::start(2, NodeOptions::default(), false).await?;
    c.wait_placed(WAIT).await?;
    // Node 2's database goes; its `node-id` file stays (a disk replaced under the data
    // directory's other files, a volume mounted at `db` only).
    let id = c.nodes[1].id;
    // Taken back, it would vote in its groups with none of the entries it acknowledged.
    let refused = restart_without_its_database(&mut c.nodes[1]).await?;
    assert!(
        refused.contains(&format!("it cannot rejoin as node {id}")),
        "node 2 came back: {refused}"
    );
    // The first node, started without --join: it would create a second cluster under its id,
    // at its address, with its secret.
    let first = c.nodes[0].id;
    let refused = restart_without_its_database(&mut c.nodes[0]).await?;
    assert!(
        refused.contains(&format!("it would create a new cluster as node {first}")),
        "node 1 started a new cluster: {refused}"
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_leader_fails_over_and_a_full_restart_converges() -> anyhow::Result<()> {
    let rx = Receiver::start(vec![], 200)?;
    let mut c = Cluster::start(3, NodeOptions::default(), false).await?;
    let admins: Vec<_> = (1..=3).map(|i| c.admin(i)).collect();
    let s = Scenario::setup(&admins, &rx.url, 3).await?;
    let mut expected = Vec::new();
    expected.extend(send_until_accepted(&c, 1, &s, "before", 0).await?);

    // Kill -9 the leader of customer 0's group; its events are accepted again shortly.
    let group = c.admin(1).customer(&s.customers[0].id).await?.group;
    let victim = c.leader_of(group).await?;
    c.nodes[victim - 1].kill()?;
    let via = if victim == 1 { 2 } else { 1 };
    let started = Instant::now();
    expected.extend(send_until_accepted(&c, via, &s, "after-kill", 0).await?);
    let failover = started.elapsed();
    println!("event accepted again {failover:?} after killing node {victim}");
    // The killed node comes back with the same data directory and catches up.
    c.nodes[victim - 1].restart().await?;
    c.wait_converged(Duration::from_secs(60)).await?;

    // Pause a node (SIGSTOP): the others carry on; it catches up when resumed.
    let paused = c.leader_of(1).await?;
    c.nodes[paused - 1].signal("STOP")?;
    let via = if paused == 3 { 2 } else { 3 };
    for i in 0..3 {
        expected.extend(send_until_accepted(&c, via, &s, &format!("paused-{i}"), i).await?);
    }
    c.nodes[paused - 1].signal("CONT")?;

    // Every node down at once, then up again (each needs the others for quorum).
    for n in &mut c.nodes {
        n.kill()?;
    }
    for n in &mut c.nodes {
        n.restart_unready().await?;
    }
    c.wait_converged(Duration::from_secs(90)).await?;
    for i in 0..3 {
        expected
            .extend(send_until_accepted(&c, 1 + i % 3, &s, &format!("restarted-{i}"), i).await?);
    }
    poll::until("every command delivered", WAIT, || async {
        check_deliveries(&rx, &expected).ok()
    })
    .await?;
    let dups = check_deliveries(&rx, &expected)?;
    println!("{} commands delivered, {dups} duplicates", expected.len());
    c.wait_converged(Duration::from_secs(60)).await?;
    Ok(())
}

#[tokio::test]
async fn a_removed_node_hands_over_its_replicas_and_a_restarted_member_rejoins(
) -> anyhow::Result<()> {
    let rx = Receiver::start(vec![], 200)?;
    // Snapshots every few entries (whatever their bytes) and no log kept behind them: a
    // joining node catches up from streamed snapshots.
    let opts = NodeOptions {
        snapshot_every: 20,
        snapshot_log_to_state: 0.0,
        ..NodeOptions::default()
    };
    let mut c = Cluster::start(3, opts.clone(), false).await?;
    let admins: Vec<_> = (1..=3).map(|i| c.admin(i)).collect();
    let s = Scenario::setup(&admins, &rx.url, 2).await?;
    // A restarted member (same flags, its --join included) is the same node.
    let id = c.nodes[2].id;
    c.nodes[2].stop().await?;
    c.nodes[2].restart().await?;
    assert_eq!(c.nodes[2].id, id, "rejoining keeps the node id");
    c.wait_placed(WAIT).await?;
    // Every member holds a snapshot (each node checks its replicas once a second) and purged
    // the log behind it: the fourth node cannot catch up from the log alone.
    for n in &c.nodes {
        poll::until("a snapshot built", WAIT, || async {
            (snapshot_bytes(&n.url).await.ok()? > 0.0).then_some(())
        })
        .await?;
    }
    // A fourth node joins; then node 3 is removed: its replicas and leaderships move away.
    let o = NodeOptions {
        cluster_secret: Some(c.nodes[0].cluster_secret()?),
        join: vec![c.nodes[1].peer.clone()],
        ..opts
    };
    c.nodes.push(Node::start(o).await?);
    c.wait_placed(Duration::from_secs(60)).await?;
    // Its replicas hold the same state as the others' (installed from snapshots).
    c.wait_converged(Duration::from_secs(60)).await?;
    let snapshots = std::fs::read_dir(c.nodes[3].data_dir.join("snapshots"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
        .count();
    assert!(snapshots > 0, "the new node received snapshots");
    let removed = c.nodes[2].id;
    c.admin(1).remove_node(removed).await?;
    let status = poll::until("node removed", Duration::from_secs(90), || async {
        let st = c.status().await.ok()?;
        let gone = st
            .nodes
            .iter()
            .any(|n| n.id == removed && n.state == "removed");
        let held = st
            .groups
            .iter()
            .any(|g| g.voters.contains(&removed) || g.learners.contains(&removed));
        (gone && !held).then_some(st)
    })
    .await?;
    let _ = status;
    // The removed node deleted its data replicas once their leader had it out (asked, not
    // taken from a report that may trail the membership).
    poll::until("the removed node's replicas deleted", WAIT, || async {
        c.nodes[2]
            .log()
            .contains("this node no longer holds the group; deleting its replica")
            .then_some(())
    })
    .await?;
    let status = c.wait_placed(WAIT).await?;
    assert!(status.groups.iter().all(|g| g.leader != Some(removed)));
    // The cluster keeps serving, through every remaining node.
    let mut expected = Vec::new();
    for via in [1, 2, 4] {
        expected.extend(send_until_accepted(&c, via, &s, &format!("after-remove-{via}"), 0).await?);
    }
    rx.wait_delivered(expected.len(), WAIT).await?;
    check_deliveries(&rx, &expected)?;
    Ok(())
}

#[tokio::test]
async fn the_first_node_removed_right_after_a_second_joined_hands_everything_over(
) -> anyhow::Result<()> {
    let rx = Receiver::start(vec![], 200)?;
    let mut c = Cluster::start(1, NodeOptions::default(), false).await?;
    let s = Scenario::setup(&[c.admin(1)], &rx.url, 1).await?;
    // The second node's id is pinned (`--node-id`): its join registers it under that id.
    let o = NodeOptions {
        cluster_secret: Some(c.nodes[0].cluster_secret()?),
        join: vec![c.nodes[0].peer.clone()],
        extra_toml: "node_id = 7\n".into(),
        ..NodeOptions::default()
    };
    c.nodes.push(Node::start(o).await?);
    assert_eq!(c.nodes[1].id, 7);
    // Removed at once. (Node 2 is usually a voter by the time it answers as ready; when it is
    // not, the leader makes it one first: `cluster::manager` unit test
    // `a_leader_with_no_wanted_voter_makes_the_caught_up_ones_voters_first`.)
    let (first, second) = (c.nodes[0].id, c.nodes[1].id);
    c.admin(1).remove_node(first).await?;
    poll::until(
        "node 1 removed, node 2 holding every group",
        Duration::from_secs(90),
        || async {
            let st = c.admin(2).cluster_status().await.ok()?;
            let gone = st
                .nodes
                .iter()
                .any(|n| n.id == first && n.state == "removed");
            let moved = st
                .groups
                .iter()
                .all(|g| g.voters == [second] && g.leader == Some(second));
            (gone && moved).then_some(())
        },
    )
    .await?;
    // Node 2 alone serves the customers node 1 held.
    let expected = send_until_accepted(&c, 2, &s, "after-move", 0).await?;
    rx.wait_delivered(expected.len(), WAIT).await?;
    check_deliveries(&rx, &expected)?;
    Ok(())
}

#[tokio::test]
async fn peers_talk_over_tls_when_peer_certificates_are_configured() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = custos_tests::tls::make(dir.path())?;
    let opts = NodeOptions {
        extra_toml: format!(
            "[peer_tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            certs.cert, certs.key, certs.ca
        ),
        ..NodeOptions::default()
    };
    let rx = Receiver::start(vec![], 200)?;
    let c = Cluster::start(3, opts, false).await?;
    let admins: Vec<_> = (1..=3).map(|i| c.admin(i)).collect();
    let s = Scenario::setup(&admins, &rx.url, 3).await?;
    let mut expected = Vec::new();
    for via in 1..=3 {
        expected.extend(send_until_accepted(&c, via, &s, &format!("tls-{via}"), via - 1).await?);
    }
    rx.wait_delivered(expected.len(), WAIT).await?;
    // The peer port speaks TLS only: plain HTTP gets nowhere.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/peer/status", c.nodes[0].peer))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
    Ok(())
}

#[tokio::test]
async fn the_portal_works_through_any_node() -> anyhow::Result<()> {
    use custos_tests::browser::Browser;
    let c = Cluster::start(3, NodeOptions::default(), false).await?;
    // Sign-up through node 2: the account (meta group) and the customer (its data group) are
    // made in two steps under one intent; the session cookie names the customer's slot.
    let mut b = Browser::new(&c.nodes[1].url)?;
    b.sign_up("ada@example.com").await?;
    for node in &c.nodes {
        b.base = node.url.clone();
        let (status, _, body) = b.get("/portal/activity").await?;
        assert_eq!(status, 200, "{}", node.url);
        assert!(
            body.contains("ada@example.com"),
            "signed in at {}",
            node.url
        );
    }
    // The email is taken whichever node is asked.
    let mut other = Browser::new(&c.nodes[2].url)?;
    let csrf = other.csrf("/portal/signup").await?;
    other
        .post(
            "/portal/signup",
            &[
                ("csrf", &csrf),
                ("email", "ADA@example.com"),
                ("password", "another long password"),
            ],
        )
        .await?;
    assert!(other.flash("/portal/signup").await?.contains("exists"));
    // Signing in on node 3 (the password checked against the meta group's account there).
    let mut again = Browser::new(&c.nodes[2].url)?;
    assert_eq!(again.sign_in("ada@example.com").await?, "/portal");
    // Signing out everywhere through node 1 ends both sessions.
    b.base = c.nodes[0].url.clone();
    let csrf = b.csrf("/portal/data").await?;
    let (status, _) = b
        .post("/portal/signout-everywhere", &[("csrf", &csrf)])
        .await?;
    assert_eq!(status, 303);
    let (status, loc, _) = again.get("/portal/activity").await?;
    assert_eq!((status, loc.as_str()), (303, "/portal/signin"));
    Ok(())
}

/// A node whose replica of the routing index is behind (here: cut off from the meta group's
/// leader) never records an event as ignored for a subject a customer has linked: it confirms
/// with the leader first, answers 503 while it cannot, and the event is accepted once it can.
/// (Recorded as ignored, the event would be lost for good: its retries are duplicates.)
#[tokio::test]
async fn a_node_behind_on_the_routing_index_does_not_ignore_a_linked_subjects_event(
) -> anyhow::Result<()> {
    use custos_raft::shard::ShardMap;
    // Several data groups: a node then looks an event up in its own replica of the routing
    // index, and records an unclaimed one in the group its subject hashes to, if it leads it.
    const DATA_GROUPS: u32 = 4;
    let options = NodeOptions {
        extra_toml: format!("[cluster]\ndata_groups = {DATA_GROUPS}"),
        ..NodeOptions::default()
    };
    let c = Cluster::start(3, options, true).await?;
    let net = c.net.as_ref().context("namespaces")?;
    let rx = Receiver::start_on(&format!("{}:0", net.host_ip), vec![], 200)?;
    let admins: Vec<_> = (1..=3).map(|i| c.admin(i)).collect();
    let s = Scenario::setup(&admins, &rx.url, 1).await?;
    // The node cut off: not the meta leader, leading some data groups (polled: the manager
    // spreads leaders after placement).
    let (meta, behind, led) = poll::until(
        "a node that leads data groups but not the meta group",
        WAIT,
        || async {
            let status = c.status().await.ok()?;
            let meta = c.index_of(status.groups.iter().find(|g| g.id == 0)?.leader?)?;
            let led = |i: usize| -> Vec<u32> {
                let id = c.nodes[i - 1].id;
                status
                    .groups
                    .iter()
                    .filter(|g| g.id != 0 && g.leader == Some(id))
                    .map(|g| g.id)
                    .collect()
            };
            let behind = (1..=3)
                .filter(|i| *i != meta)
                .max_by_key(|i| led(*i).len())?;
            let settled = status.groups.iter().all(|g| g.leader.is_some());
            (settled && !led(behind).is_empty()).then(|| (meta, behind, led(behind)))
        },
    )
    .await?;
    let via = (1..=3)
        .find(|i| *i != meta && *i != behind)
        .context("a third node")?;
    let map = ShardMap::initial(DATA_GROUPS);
    net.cut(behind, meta)?;
    // Customers link new airline subjects through the third node; the cut node's replica of
    // the meta group hears of none of these claims. The customers are in groups the cut node
    // does not lead (their linkings claim in the meta group from their group's leader), and
    // the subjects hash to groups it leads, so it would record their events itself.
    const CUSTOMERS: usize = 4;
    let admin = c.admin(via);
    let spec = custos_tests::scenario::rule();
    let mut subjects = Vec::with_capacity(CUSTOMERS);
    let mut k = 0;
    while subjects.len() < CUSTOMERS {
        let cust = retry(|| admin.create_customer()).await?;
        if led.contains(&map.group_of(&cust.id)) {
            continue;
        }
        let subject = loop {
            k += 1;
            let subject = format!("NEW-{k}");
            if led.contains(&map.group_of(&format!("airline\0{subject}"))) {
                break subject;
            }
        };
        for (entity, subject) in [("airline", subject.clone()), ("hotel", format!("G-{k}"))] {
            let req = LinkRequest {
                entity_id: entity.into(),
                subject,
            };
            retry(|| admin.link(&cust.id, &req)).await?;
        }
        let me = admin.with_token(&cust.token);
        retry(|| me.create_rule(&cust.id, &spec)).await?;
        subjects.push(subject);
    }
    // Sent to the node behind: 503 (or accepted, had it learnt the claim), never ignored.
    let client = c.nodes[behind - 1].anonymous();
    for (i, subject) in subjects.iter().enumerate() {
        let event = delayed(&format!("behind-{i}"), subject);
        match client.send_event(&s.airline, &event).await {
            Ok(r) => assert_eq!(
                r.status,
                EventStatus::Accepted,
                "{subject}, linked before it was sent: {r:?}"
            ),
            Err(e) if e.code() == Some(custos_api::ErrorCode::Unavailable) => {}
            Err(e) => return Err(e).context(subject.clone()),
        }
    }
    net.heal()?;
    // Healed: each event is accepted (once), its command delivered once.
    let mut expected = Vec::new();
    for (i, subject) in subjects.iter().enumerate() {
        let event = delayed(&format!("behind-{i}"), subject);
        let commands = poll::until(&format!("behind-{i} accepted"), WAIT, || async {
            match client.send_event(&s.airline, &event).await {
                Ok(r) if r.status != EventStatus::Ignored => Some(Ok(r.commands)),
                Ok(r) => Some(Err(anyhow::anyhow!(
                    "{subject} ignored after healing: {r:?}"
                ))),
                Err(_) => None,
            }
        })
        .await??;
        assert_eq!(commands.len(), 1, "{subject}");
        expected.extend(commands);
    }
    // Each command arrives with one content. Once: not asserted, since healing moves
    // leaderships (the cut-off node campaigned meanwhile), and an attempt a deposed leader
    // made may be made again by the new one (same id, same content).
    let delivered = poll::until("every command delivered", WAIT, || async {
        check_deliveries(&rx, &expected).ok()
    })
    .await;
    check_deliveries(&rx, &expected).context(format!("{delivered:?}"))?;
    Ok(())
}
