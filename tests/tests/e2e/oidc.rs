//! Linking through standard OpenID Connect providers: a third-party one (oidc-provider-mock),
//! the reference entity, and a provider whose answers are wrong on purpose.

use std::collections::HashMap;

use custos_api::client::Client;
use custos_api::types::*;
use custos_api::ErrorCode;
use custos_tests::entity::EntitySim;
use custos_tests::node::{Node, NodeOptions};
use custos_tests::oidc_mock::OidcMock;
use custos_tests::provider::{Answer, Provider};
use serde_json::Value;

fn query(url: &str) -> anyhow::Result<HashMap<String, String>> {
    Ok(url::Url::parse(url)?.query_pairs().into_owned().collect())
}

fn raw() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

async fn register_by_issuer(
    admin: &Client,
    id: &str,
    issuer: &str,
    client_id: &str,
    client_secret: Option<&str>,
) -> Result<Entity, custos_api::client::ClientError> {
    admin
        .register_entity(&RegisterEntity {
            id: id.into(),
            name: id.into(),
            command_url: "http://127.0.0.1:9/commands".into(),
            event_types: vec![],
            command_types: vec![],
            oauth: Some(OAuthEndpoints {
                issuer: Some(issuer.into()),
                client_id: client_id.into(),
                client_secret: client_secret.map(str::to_owned),
                ..Default::default()
            }),
        })
        .await
}

/// The answer to a callback URL, as a problem's `(status, code, detail)` or the link made.
async fn call_back(url: &str) -> anyhow::Result<Result<Link, (u16, String, String)>> {
    let r = raw()?.get(url).send().await?;
    let status = r.status().as_u16();
    if status == 201 {
        return Ok(Ok(r.json().await?));
    }
    let p: Value = r.json().await.unwrap_or_default();
    Ok(Err((
        status,
        p["code"].as_str().unwrap_or_default().to_owned(),
        p["detail"].as_str().unwrap_or_default().to_owned(),
    )))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_third_party_openid_provider_links_by_issuer() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let provider = OidcMock::start().await?;
    let admin = node.admin();
    let redirect_uri = format!("{}/v1/oauth/callback/bank", node.url);
    let (client_id, client_secret) = provider.register_client(&redirect_uri).await?;

    // Registered by its issuer: the endpoints come from its discovery document, the client
    // authenticates as the provider advertises, the secret is never shown again.
    let bank = register_by_issuer(
        &admin,
        "bank",
        &provider.issuer,
        &client_id,
        Some(&client_secret),
    )
    .await?;
    let oauth = bank.oauth.clone().expect("oauth");
    assert_eq!(
        oauth.authorize_url.as_deref(),
        Some(format!("{}/oauth2/authorize", provider.issuer).as_str())
    );
    assert_eq!(oauth.client_auth.as_deref(), Some("client_secret_basic"));
    assert_eq!(oauth.scopes, Some(vec!["openid".to_owned()]));
    assert_eq!(oauth.redirect_uri.as_deref(), Some(redirect_uri.as_str()));
    let shown = reqwest::Client::new()
        .get(format!("{}/v1/entities/bank", node.url))
        .bearer_auth(custos_tests::node::ADMIN_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    assert!(!shown.contains(&client_secret), "secret shown: {shown}");

    // A customer signs in at the provider and comes back linked as the ID token's subject.
    let alice = admin.create_customer().await?;
    let start = admin.authorize_link(&alice.id, "bank").await?;
    let q = query(&start.authorize_url)?;
    assert_eq!(q["scope"], "openid");
    assert!(q.contains_key("nonce"));
    let back = provider.sign_in(&start.authorize_url, "alice@bank").await?;
    assert!(back.starts_with(&redirect_uri), "{back}");
    let link = call_back(&back)
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(
        (link.entity_id.as_str(), link.subject.as_str()),
        ("bank", "alice@bank")
    );
    // Replaying the callback: the state is spent.
    let replay = call_back(&back).await?.expect_err("replayed");
    assert_eq!(replay.0, 403, "{replay:?}");
    assert!(replay.2.contains("already used"), "{replay:?}");
    assert_eq!(admin.customer(&alice.id).await?.links.len(), 1);

    // A wrong client secret (rotated at the vault, not at the provider): the provider refuses
    // and the customer is told so; nothing is linked. Rotating back makes linking work again.
    admin
        .update_entity(
            "bank",
            &UpdateEntity {
                oauth_client_secret: Some("not-the-secret".into()),
                ..Default::default()
            },
        )
        .await?;
    let bob = admin.create_customer().await?;
    let start = admin.authorize_link(&bob.id, "bank").await?;
    let back = provider.sign_in(&start.authorize_url, "bob@bank").await?;
    let refused = call_back(&back).await?.expect_err("wrong secret");
    assert_eq!(refused.0, 403, "{refused:?}");
    assert!(
        refused
            .2
            .contains("bank refused the sign-in: invalid_client"),
        "{refused:?}"
    );
    admin
        .update_entity(
            "bank",
            &UpdateEntity {
                oauth_client_secret: Some(client_secret.clone()),
                ..Default::default()
            },
        )
        .await?;
    let start = admin.authorize_link(&bob.id, "bank").await?;
    let back = provider.sign_in(&start.authorize_url, "bob@bank").await?;
    let link = call_back(&back)
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(link.subject, "bob@bank");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn id_tokens_and_providers_that_do_not_hold_link_nothing() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let admin = node.admin();
    let provider = Provider::start("cust-42")?;
    let bank =
        register_by_issuer(&admin, "bank", &provider.issuer, "custos", Some("s3cret")).await?;
    let oauth = bank.oauth.expect("oauth");
    assert_eq!(oauth.client_auth.as_deref(), Some("client_secret_post"));
    let customer = admin.create_customer().await?;

    // Each wrong answer is refused with its reason, and nothing is linked.
    let cases = [
        (Answer::WrongAudience, "meant for another client"),
        (Answer::Expired, "expired"),
        (Answer::BadSignature, "signature does not verify"),
        (Answer::WrongIssuer, "issued by another issuer"),
        (Answer::WrongNonce, "nonce does not match"),
        (Answer::NoIdToken, "openid was asked for"),
        (Answer::TenMegabytes, "larger than 65536 bytes"),
        (
            Answer::Refuse,
            "refused the sign-in: invalid_grant (the code was already used)",
        ),
    ];
    for (answer, why) in cases {
        let start = admin.authorize_link(&customer.id, "bank").await?;
        let q = query(&start.authorize_url)?;
        provider.answer(answer, &q["nonce"]);
        let back = format!(
            "{}/v1/oauth/callback/bank?code=c-{answer:?}&state={}&iss={}",
            node.url,
            q["state"],
            urlencode(&provider.issuer)
        );
        let refused = call_back(&back).await?.expect_err("refused");
        assert!(
            refused.0 == 403 && refused.2.contains(why),
            "{answer:?}: {refused:?} should say {why}"
        );
    }
    assert!(admin.customer(&customer.id).await?.links.is_empty());
    assert_eq!(
        provider.clients().last(),
        Some(&("custos".to_owned(), "s3cret".to_owned())),
        "client_secret_post, as the provider advertises"
    );

    // The callback's iss (RFC 9207) must be the provider's, and is required since its
    // metadata promises it; either way the code is sent nowhere.
    let sent = provider.codes().len();
    for iss in [Some("https://impostor.example"), None] {
        let start = admin.authorize_link(&customer.id, "bank").await?;
        let q = query(&start.authorize_url)?;
        provider.answer(Answer::Valid, &q["nonce"]);
        let mut back = format!(
            "{}/v1/oauth/callback/bank?code=c1&state={}",
            node.url, q["state"]
        );
        if let Some(i) = iss {
            back += &format!("&iss={}", urlencode(i));
        }
        let refused = call_back(&back).await?.expect_err("refused");
        assert_eq!(refused.0, 403, "{refused:?}");
        assert!(refused.2.contains("iss"), "{refused:?}");
    }
    assert_eq!(provider.codes().len(), sent, "no code reached the provider");

    // A valid answer links the ID token's subject.
    let start = admin.authorize_link(&customer.id, "bank").await?;
    let q = query(&start.authorize_url)?;
    provider.answer(Answer::Valid, &q["nonce"]);
    let back = format!(
        "{}/v1/oauth/callback/bank?code=good&state={}&iss={}",
        node.url,
        q["state"],
        urlencode(&provider.issuer)
    );
    let link = call_back(&back)
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(link.subject, "cust-42");

    // Registration checks the metadata: another issuer named, or 10 MB of it.
    provider.metadata_of_size(Some(10 * 1024 * 1024));
    let err = register_by_issuer(&admin, "big", &provider.issuer, "custos", None)
        .await
        .expect_err("10 MB metadata");
    assert_eq!(err.code(), Some(ErrorCode::ProviderUnusable), "{err}");
    assert!(err.to_string().contains("larger than"), "{err}");
    provider.metadata_of_size(None);
    let other = format!("{}/tenant", provider.issuer);
    let err = register_by_issuer(&admin, "tenant", &other, "custos", None)
        .await
        .expect_err("no metadata there");
    assert_eq!(err.code(), Some(ErrorCode::ProviderUnusable), "{err}");
    let err = register_by_issuer(&admin, "public", &provider.issuer, "custos", None)
        .await
        .expect_err("the provider lists no public clients");
    assert!(err.to_string().contains("give a client_secret"), "{err}");
    Ok(())
}

/// The mix-up attack (OAuth security BCP §4.4): a malicious registered entity sends the
/// customer who started linking with it to an honest provider, hoping the honest provider's
/// code comes back into its linking and is redeemed at its own token endpoint.
#[tokio::test(flavor = "multi_thread")]
async fn a_mix_up_attack_sends_no_code_to_the_attacker() -> anyhow::Result<()> {
    let node = Node::start(NodeOptions::default()).await?;
    let admin = node.admin();
    let hotel = EntitySim::start("hotel", &node).await?;
    let attacker = Provider::start("whoever")?;
    register_by_issuer(&admin, "evil", &attacker.issuer, "custos", Some("x")).await?;
    let customer = admin.create_customer().await?;

    // The customer starts linking with the attacker, whose authorization endpoint forwards
    // the request (state, PKCE challenge) to the hotel's sign-in.
    for redirect_to in ["hotel", "evil"] {
        let start = admin.authorize_link(&customer.id, "evil").await?;
        let q = query(&start.authorize_url)?;
        let forwarded = format!(
            "{}/oauth/authorize?response_type=code&client_id=custos&redirect_uri={}&state={}\
             &code_challenge={}&code_challenge_method=S256&scope=openid&nonce={}",
            hotel.url,
            urlencode(&format!("{}/v1/oauth/callback/{redirect_to}", node.url)),
            q["state"],
            q["code_challenge"],
            q["nonce"],
        );
        let back = super::portal::sign_in_at_entity(&forwarded, "alice", "alice-hotel").await?;
        let refused = call_back(&back).await?.expect_err("mix-up refused");
        assert_eq!(refused.0, 403, "{refused:?}");
        // On the hotel's redirect URI the linking is not the hotel's; on the attacker's, the
        // response names the hotel as its issuer.
        let why = if redirect_to == "hotel" {
            "started with evil but came back on hotel's redirect URI"
        } else {
            "comes from issuer"
        };
        assert!(refused.2.contains(why), "{refused:?}");
    }
    assert!(
        attacker.codes().is_empty(),
        "the hotel's code reached the attacker's token endpoint"
    );
    assert!(admin.customer(&customer.id).await?.links.is_empty());
    assert_eq!(
        admin
            .entity("evil")
            .await?
            .oauth
            .and_then(|o| o.client_auth),
        Some("client_secret_post".into())
    );
    Ok(())
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
