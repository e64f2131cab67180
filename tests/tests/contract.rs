//! The API contract: a real node checked against its own OpenAPI document by tools this
//! project did not write (openapi-spec-validator, then Schemathesis with every check and the
//! stateful phase), with a bounded number of generated requests. `scripts/contract` runs the
//! same longer against any node.

use std::process::Command;

use custos_tests::node::{Node, NodeOptions, ADMIN_TOKEN};

#[tokio::test(flavor = "multi_thread")]
async fn the_node_keeps_its_openapi_contract_under_generated_requests() -> anyhow::Result<()> {
    // The shipped outbound policy: private addresses are refused (422 forbidden_target).
    let node = Node::start(NodeOptions {
        allow_private_targets: false,
        ..NodeOptions::default()
    })
    .await?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/contract");
    let url = node.url.clone();
    let scratch = tempfile::tempdir()?;
    let cwd = scratch.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(script)
            .args([&url, ADMIN_TOKEN, "--max-examples", "25", "--seed", "1"])
            .current_dir(cwd)
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{stderr}\nnode log:\n{}",
        node.log()
    );
    // It ran: requests were generated and every one passed.
    assert!(
        stdout.contains("generated") && stdout.contains("passed"),
        "{stdout}"
    );
    assert!(!stdout.contains("🚫"), "a phase errored:\n{stdout}");
    Ok(())
}
