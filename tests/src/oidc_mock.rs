//! A third-party OpenID Connect provider as a process: `oidc-provider-mock` from PyPI (built on
//! Authlib), started by `scripts/oidc-provider` on a free loopback port, clients registered
//! through its registration endpoint.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::poll;

/// A running provider.
pub struct OidcMock {
    child: Child,
    /// Its issuer identifier.
    pub issuer: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl OidcMock {
    /// Starts the provider, requiring clients to register (so it checks redirect URIs and
    /// client secrets as a production provider does).
    pub async fn start() -> anyhow::Result<OidcMock> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("provider.log");
        let out = std::fs::File::create(&log)?;
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/oidc-provider");
        let child = Command::new(script)
            .args([
                "--port",
                &port.to_string(),
                "--require-registration",
                "true",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting scripts/oidc-provider")?;
        let issuer = format!("http://127.0.0.1:{port}");
        let mock = OidcMock {
            child,
            issuer: issuer.clone(),
            log,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        // The first run installs the provider into its venv, hence the long wait.
        poll::until(
            "oidc-provider-mock serving",
            Duration::from_secs(180),
            || {
                let (http, url) = (
                    http.clone(),
                    format!("{issuer}/.well-known/openid-configuration"),
                );
                async move {
                    let r = http.get(url).send().await.ok()?;
                    r.status().is_success().then_some(())
                }
            },
        )
        .await
        .with_context(|| mock.log())?;
        Ok(mock)
    }

    /// Registers a confidential client (`client_secret_basic`) allowed to redirect to
    /// `redirect_uri`; answers its id and secret.
    pub async fn register_client(&self, redirect_uri: &str) -> anyhow::Result<(String, String)> {
        let v: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/oauth2/clients", self.issuer))
            .json(&serde_json::json!({ "redirect_uris": [redirect_uri] }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let field = |n: &str| {
            v[n].as_str()
                .map(str::to_owned)
                .with_context(|| format!("no {n} in {v}"))
        };
        Ok((field("client_id")?, field("client_secret")?))
    }

    /// Signs in at the provider as `subject` (its sign-in form takes any subject) for the
    /// authorization request `authorize_url`; answers where the provider sends the browser.
    pub async fn sign_in(&self, authorize_url: &str, subject: &str) -> anyhow::Result<String> {
        let r = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?
            .post(authorize_url)
            .form(&[("sub", subject)])
            .send()
            .await?;
        let status = r.status();
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        location
            .with_context(|| format!("no redirect from the provider ({status}): {}", self.log()))
    }

    /// The provider's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OidcMock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
