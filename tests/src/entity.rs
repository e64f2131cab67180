//! A `custos entity-sim` process: a reference entity registered with a test node.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::node::{custos_bin, Node, ADMIN_TOKEN};
use crate::poll;

/// The vault's client secret at the `preset` simulator (tests talk to its token endpoint too).
pub fn client_secret(preset: &str) -> String {
    format!("sim-client-secret-{preset}")
}

/// A running reference entity.
pub struct EntitySim {
    child: Child,
    /// Its base URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl EntitySim {
    /// Starts the `preset` entity, registered with `node` (which issues its secret).
    pub async fn start(preset: &str, node: &Node) -> anyhow::Result<EntitySim> {
        let dir = tempfile::tempdir()?;
        let ready = dir.path().join("ready.json");
        let log = std::fs::File::create(dir.path().join("sim.log"))?;
        let mut cmd = Command::new(custos_bin()?);
        cmd.args([
            "entity-sim",
            "--preset",
            preset,
            "--listen",
            "127.0.0.1:0",
            "--register",
        ])
        .arg("--vault")
        .arg(&node.url)
        .arg("--token")
        .arg(ADMIN_TOKEN)
        .arg("--ready-file")
        .arg(&ready)
        .arg("--client-secret")
        .arg(client_secret(preset))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CUSTOS_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().context("starting custos entity-sim")?;
        let log_path = dir.path().join("sim.log");
        let addr: String = poll::until("entity-sim ready", Duration::from_secs(30), || {
            let f = ready.clone();
            async move {
                let v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(f).ok()?).ok()?;
                v["addr"].as_str().map(str::to_owned)
            }
        })
        .await
        .with_context(|| std::fs::read_to_string(&log_path).unwrap_or_default())?;
        Ok(EntitySim {
            child,
            url: format!("http://{addr}"),
            _dir: dir,
        })
    }
}

impl Drop for EntitySim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
