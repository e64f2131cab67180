//! A `custos serve` process for tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use custos_api::client::Client;

use crate::poll;

/// The admin token every test node uses.
pub const ADMIN_TOKEN: &str = "adm_test_token_0123456789";

/// The `custos` binary: `$CUSTOS_BIN`, else next to the test binary's target directory.
pub fn custos_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CUSTOS_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<tool> -> target/<profile>/custos
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("custos"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!("custos binary not found in {candidates:?}: cargo build --release --bin custos")
        })
}

/// Settings for a test node, written to its config file.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Allow delivery to loopback (the receivers are on loopback).
    pub allow_private_targets: bool,
    /// Waits before each delivery attempt, in seconds.
    pub retry_schedule_secs: Vec<f64>,
    /// Log filter.
    pub log_level: String,
    /// Raft entries between snapshots, at least.
    pub snapshot_every: u64,
    /// Bytes of log between snapshots per byte of the last snapshot, at least (0: entries alone).
    pub snapshot_log_to_state: f64,
    /// Extra top-level TOML keys for the config file.
    pub extra_toml: String,
    /// Extra keys of its `[delivery]` table (besides the schedule, no jitter and a 5 s
    /// timeout, which a key here replaces).
    pub delivery_toml: String,
    /// Peer addresses of members to join (empty: a cluster of its own).
    pub join: Vec<String>,
    /// The cluster secret (`CUSTOS_CLUSTER_SECRET`); a first node generates one when unset.
    pub cluster_secret: Option<String>,
    /// Raft heartbeat and election timeout range (ms); `None`: the shipped defaults.
    pub raft_timings: Option<(u64, u64, u64)>,
    /// How long a proposal may take to commit (ms); `None`: the shipped default.
    pub propose_timeout_ms: Option<u64>,
    /// Run inside this network namespace, listening on this address (ports 7700 and 7701).
    pub netns: Option<(String, std::net::Ipv4Addr)>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            allow_private_targets: true,
            retry_schedule_secs: vec![0.0, 0.2, 0.2, 0.2],
            log_level: "info,openraft=warn,custos::http=warn".into(),
            snapshot_every: 20_000,
            snapshot_log_to_state: 1.0,
            extra_toml: String::new(),
            delivery_toml: String::new(),
            join: Vec::new(),
            cluster_secret: None,
            raft_timings: Some((50, 150, 300)),
            propose_timeout_ms: None,
            netns: None,
        }
    }
}

/// A running node.
pub struct Node {
    child: Option<Child>,
    /// Its data directory (kept across restarts).
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// Its client API base URL.
    pub url: String,
    /// Its peer address.
    pub peer: String,
    /// Its node id.
    pub id: u64,
    /// How it was started.
    pub options: NodeOptions,
}

#[derive(serde::Deserialize)]
struct Ready {
    node_id: u64,
    api: String,
    peer: String,
    pid: u32,
    tls: bool,
}

impl Node {
    /// Starts a node in a fresh temporary data directory.
    pub async fn start(options: NodeOptions) -> anyhow::Result<Node> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_path_buf();
        let mut node = Node {
            child: None,
            data_dir: dir,
            _tmp: Some(tmp),
            url: String::new(),
            peer: String::new(),
            id: 0,
            options,
        };
        node.spawn().await?;
        Ok(node)
    }

    fn write_config(&self) -> anyhow::Result<PathBuf> {
        let o = &self.options;
        let schedule: Vec<String> = o
            .retry_schedule_secs
            .iter()
            .map(|s| format!("{s:?}"))
            .collect();
        let (listen, peer) = match &o.netns {
            Some((_, ip)) => (format!("{ip}:7700"), format!("{ip}:7701")),
            // A restart keeps its addresses, as a deployed node does (members know it there).
            None if !self.peer.is_empty() => (
                self.url
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .to_owned(),
                self.peer.clone(),
            ),
            None => ("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned()),
        };
        let mut timings = match o.raft_timings {
            Some((hb, lo, hi)) => format!(
                "heartbeat_ms = {hb}\nelection_timeout_min_ms = {lo}\nelection_timeout_max_ms = {hi}\n"
            ),
            None => String::new(),
        };
        if let Some(ms) = o.propose_timeout_ms {
            timings.push_str(&format!("propose_timeout_ms = {ms}\n"));
        }
        let join: Vec<String> = o.join.iter().map(|j| format!("{j:?}")).collect();
        let text = format!(
            "listen = \"{listen}\"\n\
             peer_listen = \"{peer}\"\n\
             join = [{}]\n\
             allow_private_targets = {}\n\
             log_level = {:?}\n\
             {}\n\
             [delivery]\n\
             retry_schedule_secs = [{}]\n\
             jitter = 0.0\n\
             {}\
             [raft]\n\
             {timings}\
             snapshot_every = {}\n\
             snapshot_log_to_state = {}\n\
             keep_logs_after_snapshot = {}\n",
            join.join(", "),
            o.allow_private_targets,
            o.log_level,
            o.extra_toml,
            schedule.join(", "),
            if o.delivery_toml.contains("timeout_secs") {
                o.delivery_toml.clone()
            } else {
                format!("timeout_secs = 5\n{}", o.delivery_toml)
            },
            o.snapshot_every,
            o.snapshot_log_to_state,
            if o.snapshot_every < 20_000 { 0 } else { 1000 }
        );
        let path = self.data_dir.join("custos.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.spawn_inner(true).await
    }

    /// Starts a node in a fresh temporary data directory and kills it (SIGKILL) `after` its
    /// process started, ready or not: a first start cut short. `restart` starts it again.
    pub async fn start_killed_after(options: NodeOptions, after: Duration) -> anyhow::Result<Node> {
        let tmp = tempfile::tempdir()?;
        let mut node = Node {
            child: None,
            data_dir: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
            url: String::new(),
            peer: String::new(),
            id: 0,
            options,
        };
        node.launch()?;
        tokio::time::sleep(after).await;
        node.kill()?;
        Ok(node)
    }

    /// Starts the process (not waiting for anything); answers where it writes `node.json`.
    fn launch(&mut self) -> anyhow::Result<PathBuf> {
        let config = self.write_config()?;
        let ready_file = self.data_dir.join("node.json");
        let _ = std::fs::remove_file(&ready_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("node.log"))?;
        let mut cmd = match &self.options.netns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                // `ip netns exec` execs the program: the child's pid is custos' own.
                c.args(["netns", "exec", ns]).arg(custos_bin()?);
                c
            }
            None => Command::new(custos_bin()?),
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("CUSTOS_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Only the variables we mean: a stray CUSTOS_* would be read as configuration.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CUSTOS_") && k != "CUSTOS_ADMIN_TOKEN" {
                cmd.env_remove(k);
            }
        }
        if let Some(s) = &self.options.cluster_secret {
            cmd.env("CUSTOS_CLUSTER_SECRET", s);
        }
        let child = cmd.spawn().context("starting custos")?;
        self.child = Some(child);
        Ok(ready_file)
    }

    async fn spawn_inner(&mut self, wait_ready: bool) -> anyhow::Result<()> {
        let ready_file = self.launch()?;
        let exited = std::sync::atomic::AtomicBool::new(false);
        let ready: Option<Ready> = poll::until("node.json", Duration::from_secs(60), || {
            let f = ready_file.clone();
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    exited.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let gone = exited.load(std::sync::atomic::Ordering::Relaxed);
            async move {
                if gone {
                    return Some(None);
                }
                let text = std::fs::read_to_string(f).ok()?;
                serde_json::from_str(&text).ok().map(Some)
            }
        })
        .await
        .with_context(|| format!("node log:\n{}", self.log()))?;
        let Some(ready) = ready else {
            anyhow::bail!("custos exited during start; its log:\n{}", self.log());
        };
        anyhow::ensure!(
            Some(ready.pid) == self.child.as_ref().map(Child::id),
            "node.json is from another process"
        );
        let scheme = if ready.tls { "https" } else { "http" };
        self.url = format!("{scheme}://{}", ready.api);
        self.peer = ready.peer;
        self.id = ready.node_id;
        if !wait_ready {
            return Ok(());
        }
        // Readiness only: the TLS tests check the certificate themselves.
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()?;
        let url = format!("{}/readyz", self.url);
        poll::until("readyz 200", Duration::from_secs(30), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await?;
        Ok(())
    }

    /// A client with the admin token.
    pub fn admin(&self) -> Client {
        Client::new(self.url.clone(), Some(ADMIN_TOKEN.to_owned()))
    }

    /// A client with no token.
    pub fn anonymous(&self) -> Client {
        Client::new(self.url.clone(), None)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("node.log")).unwrap_or_default()
    }

    /// The cluster secret this node uses (given, or generated into its data directory).
    pub fn cluster_secret(&self) -> anyhow::Result<String> {
        match &self.options.cluster_secret {
            Some(s) => Ok(s.clone()),
            None => Ok(
                std::fs::read_to_string(self.data_dir.join("cluster-secret"))?
                    .trim()
                    .to_owned(),
            ),
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("not running")?;
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
        Ok(())
    }

    /// Starts the process again without waiting for readiness (a node whose groups have no
    /// quorum yet is not ready); waits for its addresses only.
    pub async fn restart_unready(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "stop or kill the node first");
        self.spawn_inner(false).await
    }

    /// Kills the process with SIGKILL: no graceful anything.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Stops the process with SIGTERM and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()?;
            anyhow::ensure!(status.success(), "kill -TERM failed");
            poll::until("node exit", Duration::from_secs(30), || {
                let done = c.try_wait().ok().flatten().is_some();
                async move { done.then_some(()) }
            })
            .await?;
        }
        Ok(())
    }

    /// Starts the process again on the same data directory (new ports).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "stop or kill the node first");
        self.spawn().await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
