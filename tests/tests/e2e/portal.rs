//! The customer portal: a real Chromium over WebDriver, and the security checks over HTTP.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use custos_api::types::*;
use custos_api::ErrorCode;
use custos_tests::browser::{location, Browser};
use custos_tests::entity::EntitySim;
use custos_tests::node::{Node, NodeOptions};
use custos_tests::poll;
use fantoccini::{Client as WebDriver, ClientBuilder, Locator};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// A `chromedriver` process on a free loopback port.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    async fn start() -> anyhow::Result<ChromeDriver> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting chromedriver (Debian package chromium-driver; scripts/setup installs it)",
            )?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let status = format!("{url}/status");
        poll::until("chromedriver ready", WAIT, || {
            let (http, status) = (http.clone(), status.clone());
            async move {
                let v: Value = http.get(&status).send().await.ok()?.json().await.ok()?;
                v["value"]["ready"].as_bool().filter(|r| *r)
            }
        })
        .await?;
        Ok(ChromeDriver { child, url })
    }

    async fn browser(&self) -> anyhow::Result<WebDriver> {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1100,1500"]
            }),
        );
        let http = hyper_util::client::legacy::connect::HttpConnector::new();
        Ok(ClientBuilder::new(http)
            .capabilities(caps)
            .connect(&self.url)
            .await?)
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes numbered screenshots of each page to one folder.
struct Screenshots {
    dir: std::path::PathBuf,
    n: u32,
}

impl Screenshots {
    fn new(name: &str) -> anyhow::Result<Screenshots> {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        println!("screenshots in {}", dir.display());
        Ok(Screenshots { dir, n: 0 })
    }

    async fn take(&mut self, b: &WebDriver, what: &str) -> anyhow::Result<()> {
        self.n += 1;
        let png = b.screenshot().await?;
        std::fs::write(self.dir.join(format!("{:02}-{what}.png", self.n)), png)?;
        Ok(())
    }
}

/// Finds `css`, waiting for it: a click that navigates returns before the next page has loaded.
async fn find(b: &WebDriver, css: &str) -> anyhow::Result<fantoccini::elements::Element> {
    Ok(b.wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await?)
}

async fn fill(b: &WebDriver, css: &str, text: &str) -> anyhow::Result<()> {
    let el = find(b, css).await?;
    el.clear().await?;
    el.send_keys(text).await?;
    Ok(())
}

async fn click(b: &WebDriver, css: &str) -> anyhow::Result<()> {
    find(b, css).await?.click().await?;
    Ok(())
}

async fn page_text(b: &WebDriver) -> anyhow::Result<String> {
    Ok(b.find(Locator::Css("body")).await?.text().await?)
}

/// Waits for the page (after a click navigated) to show `needle`; answers its text.
async fn wait_text(b: &WebDriver, needle: &str) -> anyhow::Result<String> {
    poll::until(&format!("a page showing {needle:?}"), WAIT, || {
        let b = b.clone();
        async move { page_text(&b).await.ok().filter(|t| t.contains(needle)) }
    })
    .await
}

/// Links `entity` through its own sign-in page, starting from the portal's catalog.
async fn link_in_browser(
    b: &WebDriver,
    shots: &mut Screenshots,
    node: &Node,
    name: &str,
    password: &str,
) -> anyhow::Result<()> {
    b.goto(&format!("{}/portal/catalog", node.url)).await?;
    click(b, &format!("button[aria-label='Link {name}']")).await?;
    wait_text(b, &format!("Sign in to {name}")).await?;
    shots
        .take(b, &format!("signin-{}", name.replace(' ', "-")))
        .await?;
    fill(b, "#username", "alice").await?;
    fill(b, "#password", password).await?;
    click(b, "button[type=submit]").await?;
    wait_text(b, "Linked ").await?;
    Ok(())
}

#[tokio::test]
async fn portal_in_a_real_browser_from_sign_up_to_a_delivered_command() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let airline = EntitySim::start("airline", &node).await?;
    let hotel = EntitySim::start("hotel", &node).await?;
    let driver = ChromeDriver::start().await?;
    let b = driver.browser().await?;
    let mut shots = Screenshots::new("portal-screenshots")?;
    let outcome = async {
        // Sign up.
        b.goto(&format!("{}/portal/signup", node.url)).await?;
        shots.take(&b, "signup").await?;
        fill(&b, "#email", "alice@example.com").await?;
        fill(&b, "#password", "a long enough password").await?;
        click(&b, "button[type=submit]").await?;
        wait_text(&b, "Your vault").await?;
        shots.take(&b, "overview").await?;

        // Link the airline and the hotel through their own sign-in pages.
        b.goto(&format!("{}/portal/catalog", node.url)).await?;
        shots.take(&b, "catalog").await?;
        link_in_browser(&b, &mut shots, &node, "Example Air", "alice-air").await?;
        link_in_browser(&b, &mut shots, &node, "Example Hotel", "alice-hotel").await?;
        shots.take(&b, "catalog-linked").await?;

        // Build the delay -> room-hold rule, try it, save it.
        b.goto(&format!("{}/portal/rules", node.url)).await?;
        fill(&b, "#name", "Hold my room when my flight is late").await?;
        find(&b, "#trigger")
            .await?
            .select_by_value("airline|flight.delayed")
            .await?;
        fill(&b, "#condition", "data.delay_minutes > 60").await?;
        find(&b, "#target")
            .await?
            .select_by_value("hotel|room.hold")
            .await?;
        fill(&b, "#map_key_0", "arrival").await?;
        fill(&b, "#map_expr_0", "data.new_arrival").await?;
        fill(&b, "#map_key_1", "flight").await?;
        fill(&b, "#map_expr_1", "data.flight").await?;
        fill(
            &b,
            "#sample",
            r#"{"delay_minutes": 95, "new_arrival": "2026-12-01T23:10:00Z", "flight": "EA 12"}"#,
        )
        .await?;
        shots.take(&b, "rule-builder").await?;
        click(&b, "button[value=try]").await?;
        wait_text(&b, "Try it: result").await?;
        let tried = find(&b, "#try-command").await?.text().await?;
        let command: Value = serde_json::from_str(&tried)?;
        anyhow::ensure!(command["type"] == "room.hold", "{command}");
        anyhow::ensure!(
            command["data"] == json!({"arrival": "2026-12-01T23:10:00Z", "flight": "EA 12"}),
            "{command}"
        );
        anyhow::ensure!(command["subject"] == "guest-77", "{command}");
        shots.take(&b, "rule-tried").await?;
        click(&b, "button[value=save]").await?;
        wait_text(&b, "Saved rule").await?;
        shots.take(&b, "rules").await?;
        anyhow::ensure!(
            reqwest::get(format!("{}/commands", hotel.url))
                .await?
                .json::<Vec<Value>>()
                .await?
                .is_empty(),
            "trying a rule must not send anything"
        );

        // The airline emits the event from its own page; the activity shows the delivered command.
        b.goto(&airline.url).await?;
        find(&b, "#username")
            .await?
            .select_by_value("alice")
            .await?;
        find(&b, "#type")
            .await?
            .select_by_value("flight.delayed")
            .await?;
        fill(
            &b,
            "#data",
            r#"{"delay_minutes": 95, "new_arrival": "2026-12-01T23:10:00Z", "flight": "EA 12"}"#,
        )
        .await?;
        shots.take(&b, "airline-emits").await?;
        click(&b, "button[type=submit]").await?;
        wait_text(&b, "The vault answered: \"accepted\"").await?;
        let activity = format!("{}/portal/activity", node.url);
        poll::until("delivered in the activity", WAIT, || {
            let (b, activity) = (b.clone(), activity.clone());
            async move {
                b.goto(&activity).await.ok()?;
                page_text(&b).await.ok().filter(|t| t.contains("delivered"))
            }
        })
        .await?;
        shots.take(&b, "activity").await?;
        let timeline = page_text(&b).await?;
        anyhow::ensure!(
            timeline.contains("Rule “Hold my room when my flight is late” matched"),
            "{timeline}"
        );
        let received: Vec<Value> = reqwest::get(format!("{}/commands", hotel.url))
            .await?
            .json()
            .await?;
        anyhow::ensure!(received.len() == 1, "{received:?}");
        anyhow::ensure!(received[0]["verified"] == true, "{received:?}");
        anyhow::ensure!(
            received[0]["command"]["data"]
                == json!({"arrival": "2026-12-01T23:10:00Z", "flight": "EA 12"}),
            "{received:?}"
        );

        b.goto(&format!("{}/portal/activity?kind=events", node.url))
            .await?;
        let events_only = wait_text(&b, "Flight delayed").await?;
        anyhow::ensure!(!events_only.contains("Delivery attempt"), "{events_only}");
        b.goto(&format!("{}/portal/data", node.url)).await?;
        shots.take(&b, "data").await?;
        b.goto(&format!("{}/portal", node.url)).await?;
        shots.take(&b, "overview-after").await?;
        // Readable on a phone: one column, nothing wider than the screen.
        b.set_window_size(390, 844).await?;
        b.goto(&format!("{}/portal/activity", node.url)).await?;
        let overflow: Value = b
            .execute(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
                vec![],
            )
            .await?;
        let overflow = overflow
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("page width not measured: {overflow}"))?;
        anyhow::ensure!(overflow <= 0, "wider than a phone by {overflow} px");
        shots.take(&b, "phone-activity").await?;
        Ok(())
    }
    .await;
    if outcome.is_err() {
        let _ = shots.take(&b, "failure").await;
    }
    b.close().await?;
    outcome
}

/// A customer links a company that runs a standard OpenID provider, one this project did not
/// write (oidc-provider-mock), through its own sign-in page in the browser.
#[tokio::test]
async fn portal_links_at_a_third_party_openid_provider_in_a_real_browser() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let provider = custos_tests::oidc_mock::OidcMock::start().await?;
    let (client_id, client_secret) = provider
        .register_client(&format!("{}/v1/oauth/callback/bank", node.url))
        .await?;
    node.admin()
        .register_entity(&RegisterEntity {
            id: "bank".into(),
            name: "Example Bank".into(),
            command_url: "http://127.0.0.1:9/commands".into(),
            event_types: vec![],
            command_types: vec![],
            oauth: Some(OAuthEndpoints {
                issuer: Some(provider.issuer.clone()),
                client_id,
                client_secret: Some(client_secret),
                ..Default::default()
            }),
        })
        .await?;
    let driver = ChromeDriver::start().await?;
    let b = driver.browser().await?;
    let mut shots = Screenshots::new("portal-screenshots-openid")?;
    let outcome = async {
        b.goto(&format!("{}/portal/signup", node.url)).await?;
        fill(&b, "#email", "bob@example.com").await?;
        fill(&b, "#password", "another long password").await?;
        click(&b, "button[type=submit]").await?;
        wait_text(&b, "Your vault").await?;
        b.goto(&format!("{}/portal/catalog", node.url)).await?;
        click(&b, "button[aria-label='Link Example Bank']").await?;
        // The provider's own page: it takes the subject the customer is at the bank.
        fill(&b, "input[name=sub]", "bob@bank").await?;
        shots.take(&b, "signin-openid-provider").await?;
        click(&b, "button[type=submit]:not([name])").await?;
        wait_text(&b, "Linked bank as bob@bank").await?;
        shots.take(&b, "catalog-linked-openid").await?;
        Ok(())
    }
    .await;
    if outcome.is_err() {
        let _ = shots.take(&b, "failure-openid").await;
    }
    b.close().await?;
    outcome
}

/// A recommendation that needs one more link: the portal sends the customer through the
/// entity's sign-in, links it, then adds the rule, in one flow.
#[tokio::test]
async fn a_recommendation_needing_a_link_is_linked_then_added_in_one_flow() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let _airline = EntitySim::start("airline", &node).await?;
    let _hotel = EntitySim::start("hotel", &node).await?;
    let admin = node.admin();
    let rule = super::delay_rule();
    for i in 0..12 {
        let c = admin.create_customer().await?;
        for (entity, subject) in [("airline", format!("ff-{i}")), ("hotel", format!("g-{i}"))] {
            admin
                .link(
                    &c.id,
                    &LinkRequest {
                        entity_id: entity.into(),
                        subject,
                    },
                )
                .await?;
        }
        admin.with_token(&c.token).create_rule(&c.id, &rule).await?;
    }
    admin.train_recommender().await?;

    // Bob links only the airline.
    let mut bob = Browser::new(&node.url)?;
    bob.sign_up("bob@example.com").await?;
    let csrf = bob.csrf("/portal/catalog").await?;
    let (_, authorize_url) = bob.post("/portal/link/airline", &[("csrf", &csrf)]).await?;
    let back = sign_in_at_entity(&authorize_url, "bob", "bob-air").await?;
    bob.get(&back).await?;
    // The overview recommends the rule, saying the hotel must be linked for it.
    let (_, _, overview) = bob.get("/portal").await?;
    assert!(
        overview.contains("Link Example Hotel and add this rule"),
        "{overview}"
    );
    let rec_id = overview
        .split("/portal/recommendations/")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .context("no recommendation")?
        .to_owned();
    let csrf = bob.csrf("/portal").await?;
    let (status, authorize_url) = bob
        .post(
            &format!("/portal/recommendations/{rec_id}/link"),
            &[("csrf", &csrf)],
        )
        .await?;
    assert_eq!(status, 303, "{authorize_url}");
    let back = sign_in_at_entity(&authorize_url, "bob", "bob-hotel").await?;
    let (_, to, _) = bob.get(&back).await?;
    assert_eq!(to, "/portal/catalog");
    let flash = bob.flash("/portal/catalog").await?;
    assert!(
        flash.contains("Linked hotel as guest-78") && flash.contains("Added rule"),
        "{flash}"
    );
    let (_, _, rules) = bob.get("/portal/rules").await?;
    assert!(rules.contains("room.hold"), "{rules}");
    Ok(())
}

/// Follows an entity's sign-in for `user`; answers the vault callback URL it redirects to.
pub(crate) async fn sign_in_at_entity(
    authorize_url: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<String> {
    let url = url::Url::parse(authorize_url)?;
    let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
    let base = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default())
        + &url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?
        .post(format!("{base}/oauth/authorize"))
        .form(&[
            ("username", user),
            ("password", password),
            ("client_id", q["client_id"].as_str()),
            ("redirect_uri", q["redirect_uri"].as_str()),
            ("state", q["state"].as_str()),
            ("code_challenge", q["code_challenge"].as_str()),
            (
                "nonce",
                q.get("nonce").map(String::as_str).unwrap_or_default(),
            ),
            (
                "scope",
                q.get("scope").map(String::as_str).unwrap_or_default(),
            ),
        ])
        .send()
        .await?;
    let back = location(&r);
    anyhow::ensure!(
        back.contains("/v1/oauth/callback"),
        "no redirect back: {back}"
    );
    Ok(back)
}

/// Swaps the `code` of one callback URL into another's (a code issued for someone else).
fn with_code_of(callback: &str, other: &str) -> anyhow::Result<String> {
    let a = url::Url::parse(callback)?;
    let b = url::Url::parse(other)?;
    let state = a
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned());
    let code = b
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned());
    let iss = a
        .query_pairs()
        .find(|(k, _)| k == "iss")
        .map(|(_, v)| v.into_owned());
    let mut out = a.clone();
    out.query_pairs_mut()
        .clear()
        .append_pair("code", &code.unwrap_or_default())
        .append_pair("state", &state.unwrap_or_default())
        .append_pair("iss", &iss.unwrap_or_default());
    Ok(out.to_string())
}

#[tokio::test]
async fn nobody_puts_words_in_the_portal_and_every_answer_carries_its_headers() -> anyhow::Result<()>
{
    let node = Node::start(NodeOptions::default()).await?;
    let _hotel = EntitySim::start("hotel", &node).await?;
    let mut alice = Browser::new(&node.url)?;
    alice.sign_up("alice@example.com").await?;
    // A link anyone can send a signed-in customer: no state is checked on the error path, so
    // only a registered entity and an RFC 6749 code are shown.
    let (status, loc, _) = alice
        .get("/v1/oauth/callback/Your-vault-is-locked.Call-0100?error=please_reset_your_password")
        .await?;
    assert_eq!((status, loc.as_str()), (303, "/portal/catalog"));
    let shown = alice.flash("/portal/catalog").await?;
    assert_eq!(shown, "The entity answered an error.", "{shown}");
    alice
        .get("/v1/oauth/callback/hotel?error=access_denied")
        .await?;
    let shown = alice.flash("/portal/catalog").await?;
    // (The flash starts with a capital.)
    assert_eq!(shown, "Hotel answered access_denied.", "{shown}");
    // Redirects and plain-text refusals carry the portal's headers too, not only its pages.
    let raw = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    for path in [
        "/",
        "/portal",
        "/portal/static/portal.css",
        "/%70ortal/export.json",
    ] {
        let r = raw.get(format!("{}{path}", node.url)).send().await?;
        let csp = r
            .headers()
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp:?}");
        assert_eq!(
            r.headers()
                .get("x-content-type-options")
                .map(|v| v.as_bytes()),
            Some(&b"nosniff"[..]),
            "{path}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn portal_refuses_forgery_replay_and_cross_customer_access() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let hotel = EntitySim::start("hotel", &node).await?;
    let airline = EntitySim::start("airline", &node).await?;
    let admin = node.admin();
    let raw = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;

    // Accounts: sign-up needs the form's own token; a signed-in form needs the session's.
    let mut alice = Browser::new(&node.url)?;
    let (status, loc) = alice
        .post(
            "/portal/signup",
            &[
                ("email", "a@example.com"),
                ("password", "a long enough password"),
            ],
        )
        .await?;
    assert_eq!(
        (status, loc.as_str()),
        (303, "/portal/signup"),
        "no form token"
    );
    assert!(alice.flash("/portal/signup").await?.contains("expired"));
    alice.sign_up("alice@example.com").await?;
    // A second customer, before the sign-in attempts below use up the rate limit.
    let mut carol = Browser::new(&node.url)?;
    carol.sign_up("carol@example.com").await?;
    let csrf = alice.csrf("/portal/rules").await?;
    let (status, _) = alice
        .post("/portal/rules", &[("name", "x"), ("action", "save")])
        .await?;
    assert_eq!(status, 403, "a form without the CSRF token");
    let (status, _) = alice
        .post("/portal/unlink/hotel", &[("csrf", "forged-token")])
        .await?;
    assert_eq!(status, 403, "a form with a wrong CSRF token");
    let (status, loc, _) = Browser::new(&node.url)?.get("/portal/activity").await?;
    assert_eq!(
        (status, loc.as_str()),
        (303, "/portal/signin"),
        "signed out"
    );

    // A duplicate email, a short password, a wrong password, then the rate limit.
    let mut other = Browser::new(&node.url)?;
    let csrf_other = other.csrf("/portal/signup").await?;
    other
        .post(
            "/portal/signup",
            &[
                ("csrf", &csrf_other),
                ("email", "ALICE@example.com"),
                ("password", "another long password"),
            ],
        )
        .await?;
    assert!(other.flash("/portal/signup").await?.contains("exists"));
    let csrf_other = other.csrf("/portal/signup").await?;
    other
        .post(
            "/portal/signup",
            &[
                ("csrf", &csrf_other),
                ("email", "b@example.com"),
                ("password", "short"),
            ],
        )
        .await?;
    assert!(other.flash("/portal/signup").await?.contains("10"));
    let mut limited = false;
    for _ in 0..12 {
        let csrf_other = other.csrf("/portal/signin").await?;
        other
            .post(
                "/portal/signin",
                &[
                    ("csrf", &csrf_other),
                    ("email", "bob@example.com"),
                    ("password", "not his password"),
                ],
            )
            .await?;
        let msg = other.flash("/portal/signin").await?;
        if msg.contains("Too many") {
            limited = true;
            break;
        }
        assert!(
            msg.contains("wrong email or password") || msg.contains("Wrong email or password"),
            "{msg}"
        );
    }
    assert!(limited, "sign-in attempts are rate limited");

    // OAuth from the portal: the state is bound to the signed-in customer and single-use.
    let (status, authorize_url) = alice.post("/portal/link/hotel", &[("csrf", &csrf)]).await?;
    assert_eq!(status, 303);
    let callback = sign_in_at_entity(&authorize_url, "alice", "alice-hotel").await?;
    // Finishing it from another browser (no session, or another customer's) is refused.
    let (status, _, _) = Browser::new(&node.url)?.get(&callback).await?;
    assert_eq!(status, 403, "no session");
    // Refused before anything was written: the state is not spent, Alice's browser finishes.
    let (status, loc, _) = alice.get(&callback).await?;
    assert_eq!((status, loc.as_str()), (303, "/portal/catalog"));
    assert!(alice
        .flash("/portal/catalog")
        .await?
        .contains("Linked hotel as guest-77"));
    let (_, loc, _) = alice.get(&callback).await?;
    assert_eq!(
        loc, "/portal/catalog",
        "a replayed state returns to the portal..."
    );
    assert!(
        alice
            .flash("/portal/catalog")
            .await?
            .contains("already used"),
        "...and is refused"
    );
    let active: Value = reqwest::get(format!("{}/oauth/active", hotel.url))
        .await?
        .json()
        .await?;
    assert_eq!(active["subjects"], json!(["guest-77"]));
    // Linked again as another account at the hotel: the first account's grant is revoked.
    let (_, authorize_url) = alice.post("/portal/link/hotel", &[("csrf", &csrf)]).await?;
    let callback = sign_in_at_entity(&authorize_url, "bob", "bob-hotel").await?;
    let (_, loc, _) = alice.get(&callback).await?;
    assert_eq!(loc, "/portal/catalog");
    assert!(alice
        .flash("/portal/catalog")
        .await?
        .contains("Linked hotel as guest-78"));
    let active: Value = reqwest::get(format!("{}/oauth/active", hotel.url))
        .await?
        .json()
        .await?;
    assert_eq!(
        active["subjects"],
        json!(["guest-78"]),
        "guest-77's revoked"
    );
    // Another customer signing in at the hotel as the account Alice links is refused, and
    // Alice's grant stays live at the hotel: the refused linking's tokens are dropped, not
    // revoked (revoking them would end Alice's grant at a provider that ends every grant of a
    // user and client at once, as the hotel does).
    let carol_csrf = carol.csrf("/portal/catalog").await?;
    let (_, authorize_url) = carol
        .post("/portal/link/hotel", &[("csrf", &carol_csrf)])
        .await?;
    let callback = sign_in_at_entity(&authorize_url, "bob", "bob-hotel").await?;
    let (_, loc, _) = carol.get(&callback).await?;
    assert_eq!(loc, "/portal/catalog");
    let refused = carol.flash("/portal/catalog").await?;
    assert!(!refused.contains("Linked hotel"), "{refused}");
    let active: Value = reqwest::get(format!("{}/oauth/active", hotel.url))
        .await?
        .json()
        .await?;
    assert!(
        active["subjects"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s == "guest-78")),
        "Alice's grant is still live: {active}"
    );

    // The API path: a wrong state, a code issued for another customer's linking.
    let c1 = admin.create_customer().await?;
    let c2 = admin.create_customer().await?;
    let r = raw
        .get(format!(
            "{}/v1/oauth/callback/airline?code=x&state=forged",
            node.url
        ))
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    let start1 = admin.authorize_link(&c1.id, "airline").await?;
    let start2 = admin.authorize_link(&c2.id, "airline").await?;
    let back1 = sign_in_at_entity(&start1.authorize_url, "alice", "alice-air").await?;
    let back2 = sign_in_at_entity(&start2.authorize_url, "bob", "bob-air").await?;
    let r = raw.get(with_code_of(&back1, &back2)?).send().await?;
    assert_eq!(r.status(), 403, "bob's code with alice's state fails PKCE");
    let problem: Value = r.json().await?;
    assert_eq!(problem["code"], "forbidden", "{problem}");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("airline refused the sign-in: invalid_grant")
            && detail.contains("code_verifier does not match"),
        "the customer is told why: {detail}"
    );
    let c1_links = admin.customer(&c1.id).await?.links;
    assert!(c1_links.is_empty(), "nothing linked: {c1_links:?}");
    // A token request without the PKCE verifier is refused by the entity.
    let r = raw
        .post(format!("{}/oauth/token", airline.url))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", "whatever"),
            ("client_id", "custos"),
            (
                "client_secret",
                &custos_tests::entity::client_secret("airline"),
            ),
        ])
        .send()
        .await?;
    assert_eq!(r.status(), 400);

    // One customer cannot read or change another's profile by changing ids.
    let them = admin.with_token(&c2.token);
    for err in [
        them.activity(&c1.id, 10, None)
            .await
            .map(|_| ())
            .expect_err("activity"),
        them.rules(&c1.id).await.map(|_| ()).expect_err("rules"),
    ] {
        assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    }
    let r = raw
        .get(format!("{}/v1/customers/{}/export", node.url, c1.id))
        .bearer_auth(&c2.token)
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    let r = raw
        .delete(format!("{}/v1/customers/{}", node.url, c1.id))
        .bearer_auth(&c2.token)
        .send()
        .await?;
    assert_eq!(r.status(), 403);

    // Sign out everywhere ends every session.
    let mut alice_phone = Browser::new(&node.url)?;
    assert_eq!(alice_phone.sign_in("alice@example.com").await?, "/portal");
    let (status, _, _) = alice_phone.get("/portal/activity").await?;
    assert_eq!(status, 200);
    // The data page shows the customer's id (the API and CLI name the profile by it).
    let (_, _, data_page) = alice_phone.get("/portal/data").await?;
    assert!(
        data_page.contains(r#"id="customer-id">cus_"#),
        "{data_page}"
    );
    let csrf_phone = alice_phone.csrf("/portal/data").await?;
    alice_phone
        .post("/portal/signout-everywhere", &[("csrf", &csrf_phone)])
        .await?;
    let (_, loc, _) = alice.get("/portal/activity").await?;
    assert_eq!(loc, "/portal/signin", "the laptop's session ended too");

    // Unlink revokes at the entity; erasure removes the customer everywhere.
    let mut alice = Browser::new(&node.url)?;
    assert_eq!(alice.sign_in("alice@example.com").await?, "/portal");
    let csrf = alice.csrf("/portal/catalog").await?;
    let (status, _) = alice
        .post("/portal/unlink/hotel", &[("csrf", &csrf)])
        .await?;
    assert_eq!(status, 303);
    let active: Value = reqwest::get(format!("{}/oauth/active", hotel.url))
        .await?
        .json()
        .await?;
    assert_eq!(active["subjects"], json!([]), "revoked at the hotel");
    let (status, _, body) = alice.get("/portal/export.json").await?;
    assert_eq!(status, 200);
    let export: CustomerExport = serde_json::from_str(&body)?;
    assert_eq!(export.email.as_deref(), Some("alice@example.com"));
    assert!(export
        .activity
        .iter()
        .any(|i| matches!(&i.kind, ActivityKind::Unlinked { entity_id } if entity_id == "hotel")));
    let id = export.customer.id.clone();
    let (_, loc) = alice
        .post("/portal/delete", &[("csrf", &csrf), ("confirm", "no")])
        .await?;
    assert_eq!(loc, "/portal/data", "needs the confirmation");
    let (_, loc) = alice
        .post("/portal/delete", &[("csrf", &csrf), ("confirm", "DELETE")])
        .await?;
    assert_eq!(loc, "/portal/signup");
    let err = admin.customer(&id).await.expect_err("erased");
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let mut again = Browser::new(&node.url)?;
    again.sign_in("alice@example.com").await?;
    assert!(again
        .flash("/portal/signin")
        .await?
        .to_lowercase()
        .contains("wrong email or password"));
    Ok(())
}

#[tokio::test]
async fn a_failed_delivery_is_retried_from_the_portal_by_its_owner_only() -> anyhow::Result<()> {
    use custos_tests::receiver::Receiver;
    let node = Node::start(NodeOptions {
        retry_schedule_secs: vec![0.0, 0.1],
        ..NodeOptions::default()
    })
    .await?;
    let hotel_rx = Receiver::start(vec![], 500)?;
    let admin = node.admin();
    let airline = super::register(
        &admin,
        "airline",
        "http://127.0.0.1:9/unused",
        vec![super::type_spec("flight.delayed", None)],
        vec![],
    )
    .await?;
    super::register(
        &admin,
        "hotel",
        &hotel_rx.url,
        vec![],
        vec![super::type_spec("room.hold", None)],
    )
    .await?;
    // A portal customer, linked by the operator, with the delay rule.
    let mut alice = Browser::new(&node.url)?;
    alice.sign_up("alice@example.com").await?;
    let (_, _, body) = alice.get("/portal/export.json").await?;
    let id = serde_json::from_str::<CustomerExport>(&body)?.customer.id;
    for (entity_id, subject) in [("airline", "FF-1234"), ("hotel", "guest-77")] {
        admin
            .link(
                &id,
                &LinkRequest {
                    entity_id: entity_id.into(),
                    subject: subject.into(),
                },
            )
            .await?;
    }
    admin.create_rule(&id, &super::delay_rule()).await?;
    let receipt = node
        .anonymous()
        .send_event(&airline, &super::delayed("r-1", "FF-1234", 90))
        .await?;
    let command = receipt.commands[0].clone();
    super::delivery_status(&admin, &command, DeliveryStatus::Failed).await?;

    // The timeline offers Retry on the failed delivery.
    let (_, _, page) = alice.get("/portal/activity?kind=deliveries").await?;
    let retry = format!("/portal/deliveries/{command}/retry");
    assert!(page.contains(&retry), "{page}");
    // Another customer cannot retry it, even knowing its id.
    let mut bob = Browser::new(&node.url)?;
    bob.sign_up("bob@example.com").await?;
    let bob_csrf = bob.csrf("/portal/activity").await?;
    bob.post(&retry, &[("csrf", &bob_csrf)]).await?;
    assert!(bob.flash("/portal/activity").await?.contains("not found"));
    assert_eq!(
        admin.delivery(&command).await?.status,
        DeliveryStatus::Failed
    );
    // Its owner can; once the hotel answers again, it is delivered.
    hotel_rx.set_status(200);
    let csrf = alice.csrf("/portal/activity").await?;
    let (status, _) = alice.post(&retry, &[("csrf", &csrf)]).await?;
    assert_eq!(status, 303);
    assert!(alice
        .flash("/portal/activity")
        .await?
        .contains("queued again"));
    super::delivery_status(&admin, &command, DeliveryStatus::Delivered).await?;

    // A long history pages: the newest lines first, then "Older activity".
    // 100 events make at least 200 lines (event + match) before any delivery result.
    for n in 0..100 {
        node.anonymous()
            .send_event(&airline, &super::delayed(&format!("p-{n}"), "FF-1234", 90))
            .await?;
    }
    hotel_rx.wait_received(102, super::WAIT).await?;
    let (_, _, newest) = alice.get("/portal/activity").await?;
    assert!(
        !newest.contains("Linked "),
        "the oldest lines are not on the first page"
    );
    let at = newest
        .find("/portal/activity?kind=")
        .ok_or_else(|| anyhow::anyhow!("no link to older activity"))?;
    let older = newest[at..]
        .split('"')
        .next()
        .unwrap_or_default()
        .replace("&amp;", "&");
    let (status, _, page) = alice.get(&older).await?;
    assert_eq!(status, 200);
    assert!(
        page.contains("Linked "),
        "the first links are on the older page"
    );

    // The API's forms of the same: try the rule on a past event, export, erase.
    let tried = admin
        .try_rule(
            &id,
            &TryRule {
                rule: super::delay_rule(),
                event_id: Some("r-1".into()),
                sample_data: None,
            },
        )
        .await?;
    assert!(tried.matched, "{tried:?}");
    let command = tried.command.unwrap_or_default();
    assert_eq!(command["subject"], "guest-77");
    assert_eq!(
        command["data"],
        json!({"arrival": "2026-11-28T23:40:00Z", "flight": "XY123"})
    );
    let export = admin.export(&id).await?;
    assert_eq!(export.deliveries.len(), 101);
    assert_eq!(export.events.len(), 101);
    admin.erase_customer(&id).await?;
    let err = admin.customer(&id).await.expect_err("erased");
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    // Within a bounded time nothing erased remains in the data directory: not in the Raft
    // logs, the snapshots, nor RocksDB's files (node.log, the test's capture of the node's
    // output, aside).
    let needles = [id.clone(), "alice@example.com".into(), "guest-77".into()];
    let dir = node.data_dir.clone();
    let gone = poll::until(
        "the erased customer gone from disk",
        Duration::from_secs(60),
        || {
            let found = custos_tests::files::containing(&dir, &needles, &["node.log"]);
            async move { found.is_empty().then_some(()) }
        },
    )
    .await;
    if let Err(e) = gone {
        anyhow::bail!(
            "{e}: still in {:?}",
            custos_tests::files::containing(&dir, &needles, &["node.log"])
        );
    }
    Ok(())
}
