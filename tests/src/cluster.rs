//! A cluster sandbox: several `custos` processes joined into one cluster, either on loopback
//! (kill, pause, restart) or each in its own network namespace on a private bridge, where
//! partitions are made with iptables inside the namespaces. Everything polls until the
//! cluster reports what is wanted; nothing sleeps blindly.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use custos_api::client::Client;
use custos_api::types::ClusterStatus;

use crate::node::{Node, NodeOptions};
use crate::poll;

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A private network: a bridge in the host's namespace and one namespace per node, each with
/// a veth into the bridge. Removed when dropped.
pub struct Net {
    tag: String,
    bridge: String,
    /// The host's address on the bridge (receivers listen here).
    pub host_ip: Ipv4Addr,
    subnet: u8,
    namespaces: Vec<String>,
}

impl Net {
    /// Removes what runs killed before their cleanup left behind (namespaces and bridges named
    /// after a process that no longer exists).
    fn sweep() {
        let dead = |name: &str| -> bool {
            let digits: String = name
                .trim_start_matches("cx")
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            !digits.is_empty() && !std::path::Path::new(&format!("/proc/{digits}")).exists()
        };
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with("cx") && dead(name) {
                    let _ = Command::new("ip").args(["netns", "del", name]).output();
                }
            }
        }
        if let Ok(out) = Command::new("ip").args(["-br", "link"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with("cx") && name.ends_with('b') && dead(name) {
                    let _ = Command::new("iptables")
                        .args(["-D", "FORWARD", "-i", name, "-o", name, "-j", "ACCEPT"])
                        .output();
                    let _ = Command::new("ip").args(["link", "del", name]).output();
                }
            }
        }
        // FORWARD rules of bridges already gone (runs before their Drop removed the rule).
        if let Ok(out) = Command::new("iptables").args(["-S", "FORWARD"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let ["-A", "FORWARD", "-i", i, "-o", o, "-j", "ACCEPT"] = words.as_slice() {
                    if i == o && i.starts_with("cx") && dead(i) {
                        let _ = Command::new("iptables")
                            .args(["-D", "FORWARD", "-i", i, "-o", o, "-j", "ACCEPT"])
                            .output();
                    }
                }
            }
        }
    }

    /// Creates the bridge and `n` namespaces (needs root, `ip` and `iptables`).
    pub fn create(n: usize) -> anyhow::Result<Net> {
        Self::sweep();
        let pid = std::process::id();
        let tag = format!("cx{pid}");
        let subnet = 100 + (pid % 100) as u8;
        let bridge = format!("{tag}b");
        let host_ip = Ipv4Addr::new(10, subnet, 0, 1);
        let mut net = Net {
            tag,
            bridge: bridge.clone(),
            host_ip,
            subnet,
            namespaces: Vec::new(),
        };
        sh(&["ip", "link", "add", &bridge, "type", "bridge"])
            .context("network namespaces need root and iproute2")?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &bridge,
        ])?;
        sh(&["ip", "link", "set", &bridge, "up"])?;
        // Where bridged traffic passes the host's FORWARD chain (Docker sets it to DROP),
        // let this bridge's own traffic through.
        sh(&[
            "iptables", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
        ])?;
        for i in 1..=n {
            net.add_namespace(i)?;
        }
        Ok(net)
    }

    fn add_namespace(&mut self, i: usize) -> anyhow::Result<()> {
        let ns = format!("{}n{i}", self.tag);
        let host_end = format!("{}v{i}", self.tag);
        sh(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        sh(&[
            "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        sh(&["ip", "link", "set", &host_end, "master", &self.bridge])?;
        sh(&["ip", "link", "set", &host_end, "up"])?;
        let ip = self.ip(i);
        for cmd in [
            vec!["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            vec!["ip", "link", "set", "eth0", "up"],
            vec!["ip", "link", "set", "lo", "up"],
        ] {
            let mut full = vec!["ip", "netns", "exec", &ns];
            full.extend(cmd.iter().map(|s| &**s));
            sh(&full)?;
        }
        Ok(())
    }

    /// Node `i`'s namespace (1-based).
    pub fn namespace(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    /// Node `i`'s address (1-based).
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 10 + i as u8)
    }

    /// Drops all traffic between node `a` and node `b` (both ways).
    pub fn cut(&self, a: usize, b: usize) -> anyhow::Result<()> {
        for (x, y) in [(a, b), (b, a)] {
            let (ns, peer) = (self.namespace(x), self.ip(y).to_string());
            sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &peer, "-j", "DROP",
            ])?;
            sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &peer, "-j", "DROP",
            ])?;
        }
        Ok(())
    }

    /// Splits the nodes into `side` and the rest: no traffic crosses.
    pub fn split(&self, side: &[usize], all: usize) -> anyhow::Result<()> {
        for a in side {
            for b in (1..=all).filter(|b| !side.contains(b)) {
                self.cut(*a, b)?;
            }
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&self) -> anyhow::Result<()> {
        for ns in &self.namespaces {
            sh(&["ip", "netns", "exec", ns, "iptables", "-F"])?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        // The bridge's FORWARD rule too, or the host's chain gains one per run.
        let _ = Command::new("iptables")
            .args([
                "-D",
                "FORWARD",
                "-i",
                &self.bridge,
                "-o",
                &self.bridge,
                "-j",
                "ACCEPT",
            ])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// One line per node and group, for failure messages.
pub fn summary(s: Option<ClusterStatus>) -> String {
    let Some(s) = s else {
        return "no status".into();
    };
    let mut out = String::from("last status:\n");
    for n in &s.nodes {
        out += &format!("  node {} {} up={}\n", n.id, n.state, n.up);
    }
    for g in &s.groups {
        let replicas: Vec<String> = g
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "{}:{}/{:?}/{:?}/{}",
                    r.node,
                    r.role.as_deref().unwrap_or("down"),
                    r.applied_index,
                    r.lag,
                    r.digest.as_deref().unwrap_or("-")
                )
            })
            .collect();
        out += &format!(
            "  group {} leader {:?} term {} voters {:?} learners {:?} target {:?} {}\n",
            g.id,
            g.leader,
            g.term,
            g.voters,
            g.learners,
            g.target,
            replicas.join(" ")
        );
    }
    out
}

/// A running cluster.
pub struct Cluster {
    /// Its nodes, by index (node `i` is `nodes[i - 1]`; ids are assigned in join order).
    pub nodes: Vec<Node>,
    /// The private network, when the nodes run in namespaces.
    pub net: Option<Net>,
}

impl Cluster {
    /// Starts `n` nodes: the first makes the cluster, the others join it; waits until every
    /// group has `min(3, n)` voters and a leader.
    pub async fn start(
        n: usize,
        options: NodeOptions,
        namespaces: bool,
    ) -> anyhow::Result<Cluster> {
        let net = if namespaces {
            Some(Net::create(n)?)
        } else {
            None
        };
        let mut first_opts = options.clone();
        if let Some(net) = &net {
            first_opts.netns = Some((net.namespace(1), net.ip(1)));
        }
        let first = Node::start(first_opts).await?;
        let secret = first.cluster_secret()?;
        let mut nodes = vec![first];
        for i in 2..=n {
            let mut o = options.clone();
            o.cluster_secret = Some(secret.clone());
            o.join = vec![nodes[0].peer.clone()];
            if let Some(net) = &net {
                o.netns = Some((net.namespace(i), net.ip(i)));
            }
            nodes.push(Node::start(o).await?);
        }
        let cluster = Cluster { nodes, net };
        cluster.wait_placed(Duration::from_secs(90)).await?;
        Ok(cluster)
    }

    /// An admin client of node `i` (1-based).
    pub fn admin(&self, i: usize) -> Client {
        self.nodes[i - 1].admin()
    }

    /// The cluster's status, asked of the first node that answers.
    pub async fn status(&self) -> anyhow::Result<ClusterStatus> {
        let mut last = None;
        for n in &self.nodes {
            match n.admin().cluster_status().await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow::anyhow!("no node answered: {last:?}"))
    }

    /// Waits until every group has its target voters, a leader, and no lag.
    pub async fn wait_placed(&self, within: Duration) -> anyhow::Result<ClusterStatus> {
        let last = std::sync::Mutex::new(None);
        let found = poll::until("every group placed with a leader", within, || async {
            let s = self.status().await.ok()?;
            let ok = s.groups.iter().all(|g| {
                let mut target = g.target.clone();
                target.sort_unstable();
                g.leader.is_some()
                    && (g.id == 0 || g.voters == target)
                    && g.replicas.iter().all(|r| r.lag == Some(0))
            });
            let out = ok.then(|| s.clone());
            *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
            out
        })
        .await;
        found.with_context(|| summary(last.lock().ok().and_then(|l| l.clone())))
    }

    /// Waits until every group has a leader, its voters agree on the applied state (same
    /// index, same digest), and every node answers.
    pub async fn wait_converged(&self, within: Duration) -> anyhow::Result<ClusterStatus> {
        let last = std::sync::Mutex::new(None);
        let found = poll::until("every group converged", within, || async {
            let s = self.admin(1).cluster_digests().await.ok()?;
            *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
            if s.nodes.iter().any(|n| n.state == "active" && !n.up) {
                return None;
            }
            let ok = s.groups.iter().all(|g| {
                let digests: BTreeSet<&str> = g
                    .replicas
                    .iter()
                    .filter(|r| g.voters.contains(&r.node))
                    .filter_map(|r| r.digest.as_deref())
                    .collect();
                g.leader.is_some() && digests.len() == 1
            });
            ok.then_some(s)
        })
        .await;
        found.with_context(|| summary(last.lock().ok().and_then(|l| l.clone())))
    }

    /// Node index (1-based) of the node with `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id).map(|i| i + 1)
    }

    /// The node leading `group`, by index (1-based), as the cluster reports it.
    /// The index of `group`'s leader as the status says now, if it names one of ours.
    pub async fn leader_now(&self, group: u32) -> Option<usize> {
        let s = self.status().await.ok()?;
        let id = s.groups.iter().find(|g| g.id == group)?.leader?;
        self.index_of(id)
    }

    /// The index of `group`'s leader, waited for (up to 30 s).
    pub async fn leader_of(&self, group: u32) -> anyhow::Result<usize> {
        // Polled: asked mid-election (the manager moves leaders after placement), a group
        // has no leader for a moment.
        crate::poll::until(
            &format!("group {group} to have a leader"),
            Duration::from_secs(30),
            || self.leader_now(group),
        )
        .await
    }
}
