//! OAuth 2.0 and OpenID Connect providers: metadata discovery (OpenID Connect Discovery 1.0,
//! RFC 8414), client authentication at the token endpoint (RFC 6749 §2.3.1), ID token
//! validation against the provider's JWKS (OpenID Connect Core §3.1.3.7), userinfo. Every
//! answer is read through the outbound guard and size-bounded; keys and metadata are cached
//! per provider, bounded, and refetched on rotation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use custos_raft::records::ClientAuth;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::outbound::{error_chain, read_limited, Outbound, OutboundError, ReadError};

/// The largest metadata document, token or userinfo answer read (a few KiB in practice).
pub const MAX_PROVIDER_ANSWER: usize = 64 * 1024;
/// The largest key set read (a handful of RSA keys is a few KiB).
const MAX_KEY_SET: usize = 256 * 1024;
/// Keys kept from one key set.
const MAX_KEYS: usize = 32;
/// How long discovered metadata and key sets are used before they are read again.
const REFRESH_AFTER: Duration = Duration::from_secs(3600);
/// An ID token naming an unknown key makes the key set be read again, at most this often per
/// provider (a rotated key is picked up; forged key ids cannot make the vault hammer it).
const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(30);
/// Providers whose metadata and keys are cached; the least recently read go first.
const MAX_CACHED: usize = 512;
/// Clock skew tolerated on `exp`, `iat` and `nbf`.
const LEEWAY_SECS: u64 = 60;
/// An ID token issued longer ago than this is refused (it answers a code exchanged just now).
const MAX_ID_TOKEN_AGE_SECS: i64 = 10 * 60;

/// Asymmetric JWS algorithms accepted for ID tokens. `none` and the HMAC family are not:
/// a symmetric token would be keyed with the client secret, which every node holds.
const ID_TOKEN_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why talking to a provider failed. The text is for the operator and the customer: it never
/// carries how far a connection got (that is logged).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No answer (refused, timed out, reset); the detail is logged only.
    #[error("the provider's {what} could not be reached")]
    Unreachable {
        /// Which endpoint.
        what: &'static str,
    },
    /// The URL may not be requested.
    #[error("the provider's {what} may not be requested: {source}")]
    Forbidden {
        /// Which endpoint.
        what: &'static str,
        /// The guard's reason.
        source: OutboundError,
    },
    /// An answer over its size limit (read no further).
    #[error("the provider's {what} answer is larger than {max} bytes")]
    TooLarge {
        /// Which endpoint.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// An answer that is not what the standard says.
    #[error("the provider's {what} answer is not usable: {why}")]
    BadAnswer {
        /// Which endpoint.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// The metadata names another issuer than the one it was read for.
    #[error("the provider's metadata names issuer {got:?}, not {expected:?}")]
    IssuerMismatch {
        /// The issuer registered.
        expected: String,
        /// The issuer in the document.
        got: String,
    },
    /// The provider answered with an OAuth error.
    #[error("the provider refused: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        /// The `error` code.
        error: String,
        /// Its `error_description`, cleaned and shortened.
        description: Option<String>,
    },
    /// The ID token does not hold.
    #[error("the ID token is not valid: {0}")]
    IdToken(String),
}

/// A provider's metadata (OpenID Connect Discovery 1.0 §3, RFC 8414 §2): only what the
/// vault uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderMetadata {
    /// Its issuer identifier.
    pub issuer: String,
    /// Where customers sign in.
    pub authorization_endpoint: String,
    /// Where codes are exchanged.
    pub token_endpoint: String,
    /// OpenID Connect userinfo.
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
    /// The ID token signing keys.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// RFC 7009 revocation.
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    /// How clients may authenticate (absent: `client_secret_basic` only).
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    /// RFC 9207: every authorization response carries `iss`.
    #[serde(default)]
    pub authorization_response_iss_parameter_supported: bool,
    /// True when read from `/.well-known/openid-configuration`.
    #[serde(skip)]
    pub openid: bool,
}

/// The vault's credentials at a provider's token endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ClientCredentials<'a> {
    /// Client id.
    pub id: &'a str,
    /// Client secret, for a confidential client.
    pub secret: Option<&'a str>,
    /// How to present them.
    pub auth: ClientAuth,
}

/// A token endpoint's successful answer (RFC 6749 §5.1, OpenID Connect Core §3.1.3.3).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenAnswer {
    /// The access token.
    #[serde(default)]
    pub access_token: Option<String>,
    /// A refresh token, when issued.
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// The ID token, from an OpenID provider.
    #[serde(default)]
    pub id_token: Option<String>,
    /// A simple provider's customer id (not standard; used only without an ID token or
    /// userinfo).
    #[serde(default)]
    pub subject: Option<String>,
    /// The same under the name OpenID uses.
    #[serde(default)]
    pub sub: Option<String>,
}

/// What an ID token must say (OpenID Connect Core §3.1.3.7).
#[derive(Debug, Clone, Copy)]
pub struct IdTokenExpectations<'a> {
    /// `iss`.
    pub issuer: &'a str,
    /// Must be in `aud` (and be `azp` when there are several audiences).
    pub client_id: &'a str,
    /// `nonce` sent with the authorization request.
    pub nonce: &'a str,
    /// Now, in seconds since the epoch.
    pub now_secs: i64,
}

/// How the vault authenticates at a token endpoint, from the provider's advertised methods:
/// with a secret, `client_secret_basic` unless only `client_secret_post` is offered; without
/// one, a public client (refused when the provider lists methods and `none` is not one).
pub fn choose_client_auth(
    has_secret: bool,
    supported: Option<&[String]>,
) -> Result<ClientAuth, String> {
    let offers = |m: &str| supported.is_none_or(|s| s.iter().any(|x| x == m));
    match (has_secret, supported) {
        (false, Some(s)) if !s.iter().any(|m| m == "none") => Err(format!(
            "the provider does not accept public clients (it offers {}): give a client_secret",
            s.join(", ")
        )),
        (false, _) => Ok(ClientAuth::None),
        (true, _) if offers("client_secret_basic") => Ok(ClientAuth::Basic),
        (true, _) if offers("client_secret_post") => Ok(ClientAuth::Post),
        (true, _) => {
            Err("the provider offers neither client_secret_basic nor client_secret_post".to_owned())
        }
    }
}

/// The metadata URLs to try for `issuer`: OpenID Connect's, then RFC 8414's (which puts the
/// well-known part between the host and the issuer's path).
pub fn metadata_urls(issuer: &str) -> Result<[(String, bool); 2], String> {
    let url = url::Url::parse(issuer).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "https" | "http")
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err("must be an http(s) URL without query or fragment".into());
    }
    let trimmed = issuer.trim_end_matches('/');
    let path = url.path().trim_end_matches('/');
    let origin = url.origin().ascii_serialization();
    Ok([
        (format!("{trimmed}/.well-known/openid-configuration"), true),
        (
            format!("{origin}/.well-known/oauth-authorization-server{path}"),
            false,
        ),
    ])
}

/// Reads `url`'s JSON through the guard, at most `max` bytes.
async fn get_json<T: DeserializeOwned>(
    outbound: &Outbound,
    what: &'static str,
    url: &str,
    bearer: Option<&str>,
    max: usize,
) -> Result<T, ProviderError> {
    let mut request = outbound
        .get(url)
        .map_err(|source| ProviderError::Forbidden { what, source })?
        .header("accept", "application/json");
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let resp = request.send().await.map_err(|e| unreachable(what, &e))?;
    let status = resp.status();
    let body = read_body(resp, what, max).await?;
    if !status.is_success() {
        return Err(ProviderError::BadAnswer {
            what,
            why: format!("status {}", status.as_u16()),
        });
    }
    serde_json::from_slice(&body).map_err(|e| ProviderError::BadAnswer {
        what,
        why: e.to_string(),
    })
}

fn unreachable(what: &'static str, e: &reqwest::Error) -> ProviderError {
    tracing::warn!(what, error = %error_chain(e), "provider unreachable");
    ProviderError::Unreachable { what }
}

async fn read_body(
    resp: reqwest::Response,
    what: &'static str,
    max: usize,
) -> Result<Vec<u8>, ProviderError> {
    read_limited(resp, max).await.map_err(|e| match e {
        ReadError::TooLarge => ProviderError::TooLarge { what, max },
        ReadError::Broken(e) => unreachable(what, &e),
    })
}

/// Reads and checks a provider's metadata: OpenID Connect discovery first, RFC 8414 if that
/// finds nothing. The document must name the issuer it was read for, and its endpoints must
/// pass the outbound guard.
pub async fn discover(
    outbound: &Outbound,
    issuer: &str,
) -> Result<ProviderMetadata, ProviderError> {
    let urls = metadata_urls(issuer).map_err(|why| ProviderError::BadAnswer {
        what: "issuer",
        why,
    })?;
    let mut last = None;
    for (url, openid) in urls {
        match get_json::<ProviderMetadata>(outbound, "metadata", &url, None, MAX_PROVIDER_ANSWER)
            .await
        {
            Ok(mut m) => {
                if m.issuer != issuer {
                    return Err(ProviderError::IssuerMismatch {
                        expected: issuer.to_owned(),
                        got: m.issuer.chars().take(200).collect(),
                    });
                }
                m.openid = openid;
                check_endpoints(outbound, &m)?;
                return Ok(m);
            }
            // Another answer than "not here" is the provider's real one: no second guess.
            Err(e @ ProviderError::BadAnswer { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(ProviderError::Unreachable { what: "metadata" }))
}

fn check_endpoints(outbound: &Outbound, m: &ProviderMetadata) -> Result<(), ProviderError> {
    let bad = |what: &'static str, why: String| ProviderError::BadAnswer { what, why };
    // The customer's browser opens the authorization endpoint; only its shape is checked.
    url::Url::parse(&m.authorization_endpoint)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| {
            bad(
                "metadata",
                "authorization_endpoint is not an http(s) URL".into(),
            )
        })?;
    for (what, url) in [
        ("token endpoint", Some(&m.token_endpoint)),
        ("userinfo endpoint", m.userinfo_endpoint.as_ref()),
        ("key set", m.jwks_uri.as_ref()),
        ("revocation endpoint", m.revocation_endpoint.as_ref()),
    ] {
        if let Some(u) = url {
            if u.len() > 2048 {
                return Err(bad("metadata", format!("{what} URL is too long")));
            }
            outbound
                .check(u)
                .map_err(|source| ProviderError::Forbidden { what, source })?;
        }
    }
    Ok(())
}

/// POSTs a form to a token or revocation endpoint with the client's authentication.
async fn post_form(
    outbound: &Outbound,
    what: &'static str,
    url: &str,
    client: ClientCredentials<'_>,
    form: &[(&str, &str)],
) -> Result<(reqwest::StatusCode, Vec<u8>), ProviderError> {
    let mut fields: Vec<(&str, &str)> = form.to_vec();
    let mut request = outbound
        .post(url)
        .map_err(|source| ProviderError::Forbidden { what, source })?
        .header("accept", "application/json");
    match (client.auth, client.secret) {
        (ClientAuth::Basic, Some(secret)) => {
            // RFC 6749 §2.3.1: both parts form-encoded before they are joined and encoded.
            let enc =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let basic = B64.encode(format!("{}:{}", enc(client.id), enc(secret)));
            request = request.header("authorization", format!("Basic {basic}"));
        }
        (ClientAuth::Post, Some(secret)) => {
            fields.push(("client_id", client.id));
            fields.push(("client_secret", secret));
        }
        _ => fields.push(("client_id", client.id)),
    }
    let resp = request
        .form(&fields)
        .send()
        .await
        .map_err(|e| unreachable(what, &e))?;
    let status = resp.status();
    Ok((status, read_body(resp, what, MAX_PROVIDER_ANSWER).await?))
}

/// An OAuth error answer's `error` and `error_description` (RFC 6749 §5.2), made safe to show:
/// printable, short.
fn refusal(status: reqwest::StatusCode, body: &[u8]) -> ProviderError {
    #[derive(Deserialize)]
    struct OAuthErrorAnswer {
        error: Option<String>,
        error_description: Option<String>,
    }
    let parsed: Option<OAuthErrorAnswer> = serde_json::from_slice(body).ok();
    let clean = |s: String| -> String {
        s.chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect::<String>()
    };
    let (error, description) = match parsed {
        Some(a) => (a.error, a.error_description),
        None => (None, None),
    };
    ProviderError::Refused {
        error: error
            .map(clean)
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| format!("status {}", status.as_u16())),
        description: description.map(clean).filter(|d| !d.is_empty()),
    }
}

/// Exchanges an authorization code (RFC 6749 §4.1.3, with the PKCE verifier of RFC 7636).
pub async fn exchange_code(
    outbound: &Outbound,
    token_url: &str,
    client: ClientCredentials<'_>,
    code: &str,
    redirect_uri: &str,
    verifier: &str,
) -> Result<TokenAnswer, ProviderError> {
    let (status, body) = post_form(
        outbound,
        "token endpoint",
        token_url,
        client,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier),
        ],
    )
    .await?;
    if !status.is_success() {
        return Err(refusal(status, &body));
    }
    serde_json::from_slice(&body).map_err(|e| ProviderError::BadAnswer {
        what: "token endpoint",
        why: e.to_string(),
    })
}

/// Revokes a token (RFC 7009).
pub async fn revoke(
    outbound: &Outbound,
    revoke_url: &str,
    client: ClientCredentials<'_>,
    token: &str,
    hint: &str,
) -> Result<(), ProviderError> {
    let (status, body) = post_form(
        outbound,
        "revocation endpoint",
        revoke_url,
        client,
        &[("token", token), ("token_type_hint", hint)],
    )
    .await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(refusal(status, &body))
    }
}

/// The customer's `sub` from the userinfo endpoint (OpenID Connect Core §5.3).
pub async fn userinfo_subject(
    outbound: &Outbound,
    userinfo_url: &str,
    access_token: &str,
) -> Result<String, ProviderError> {
    #[derive(Deserialize)]
    struct UserInfo {
        sub: String,
    }
    let info: UserInfo = get_json(
        outbound,
        "userinfo endpoint",
        userinfo_url,
        Some(access_token),
        MAX_PROVIDER_ANSWER,
    )
    .await?;
    Ok(info.sub)
}

/// The claims of an ID token the vault reads.
#[derive(Debug, Deserialize)]
struct IdClaims {
    sub: String,
    iat: i64,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    azp: Option<String>,
}

/// `aud`: several, or one (already checked by the JWT validation; only the count matters).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    Many(Vec<String>),
    One(serde::de::IgnoredAny),
}

/// The keys of a published key set this vault can read (at most [`MAX_KEYS`]): a key with an
/// algorithm, curve or type the JWT library does not know is left out, not the whole set
/// (providers publish keys for other uses, and new algorithms, beside their signing keys).
fn usable_keys(raw: serde_json::Value) -> JwkSet {
    let keys = match raw.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys
            .iter()
            .take(MAX_KEYS)
            .filter_map(|k| serde_json::from_value(k.clone()).ok())
            .collect(),
        _ => Vec::new(),
    };
    JwkSet { keys }
}

/// Validates an ID token against a key set and answers its `sub`: the signature (an
/// asymmetric algorithm, the key named by `kid`), `iss`, `aud` (and `azp`), `exp`, `iat`,
/// `nbf` and `nonce`.
pub fn validate_id_token(
    token: &str,
    keys: &JwkSet,
    expect: IdTokenExpectations<'_>,
) -> Result<String, ProviderError> {
    let invalid = |why: &str| ProviderError::IdToken(why.to_owned());
    if token.len() > 16 * 1024 {
        return Err(invalid("longer than 16 KiB"));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed"))?;
    if !ID_TOKEN_ALGORITHMS.contains(&header.alg) {
        return Err(ProviderError::IdToken(format!(
            "signed with {:?}, which the vault does not accept",
            header.alg
        )));
    }
    let candidates: Vec<_> = keys
        .keys
        .iter()
        .filter(|k| match (&header.kid, &k.common.key_id) {
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
            (None, _) => true,
        })
        .collect();
    if candidates.is_empty() {
        return Err(invalid("signed with a key the provider does not publish"));
    }
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_SECS;
    validation.set_issuer(&[expect.issuer]);
    validation.set_audience(&[expect.client_id]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    validation.validate_nbf = true;
    let mut last = invalid("signature does not verify");
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<IdClaims>(token, &key, &validation) {
            Ok(data) => return check_claims(data.claims, expect),
            Err(e) => {
                last = id_token_error(&e);
                // A key of another type (an RSA key for an ES256 token, a token without
                // `kid`) is not this token's: the next one may be.
                if !matches!(
                    e.kind(),
                    jsonwebtoken::errors::ErrorKind::InvalidSignature
                        | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
                ) {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

fn check_claims(c: IdClaims, expect: IdTokenExpectations<'_>) -> Result<String, ProviderError> {
    let invalid = |why: &str| Err(ProviderError::IdToken(why.to_owned()));
    if let Some(Audience::Many(auds)) = &c.aud {
        if auds.len() > 1 && c.azp.as_deref() != Some(expect.client_id) {
            return invalid("several audiences and the authorized party is not this vault");
        }
    }
    if c.nonce.as_deref() != Some(expect.nonce) {
        return invalid("nonce does not match this linking (a replayed or injected token)");
    }
    if c.iat > expect.now_secs + LEEWAY_SECS as i64 {
        return invalid("issued in the future");
    }
    if c.iat < expect.now_secs - MAX_ID_TOKEN_AGE_SECS {
        return invalid("issued too long ago");
    }
    if !custos_api::limits::is_valid_subject(&c.sub) {
        return invalid("sub is not 1..=128 printable characters");
    }
    Ok(c.sub)
}

fn id_token_error(e: &jsonwebtoken::errors::Error) -> ProviderError {
    use jsonwebtoken::errors::ErrorKind as K;
    let why = match e.kind() {
        K::InvalidSignature => "signature does not verify against the provider's keys".into(),
        K::ExpiredSignature => "expired".into(),
        K::ImmatureSignature => "not valid yet (nbf)".into(),
        K::InvalidIssuer => "issued by another issuer".into(),
        K::InvalidAudience => "meant for another client (aud)".into(),
        K::MissingRequiredClaim(c) => format!("claim {c} is missing"),
        K::InvalidAlgorithm => "its algorithm does not match the key".into(),
        _ => "malformed".into(),
    };
    ProviderError::IdToken(why)
}

/// Whether a cached key set serves as it is: fresh and holding the key an ID token names, or
/// read too recently to be read again (a forged `kid` then fails against the cached keys).
fn use_cached_keys(age: Duration, knows_kid: bool) -> bool {
    (age < REFRESH_AFTER && knows_kid) || age < REFETCH_AT_MOST_EVERY
}

struct Cached<T> {
    value: Arc<T>,
    fetched: Instant,
}

/// Providers' metadata and key sets, cached per issuer and key-set URL.
#[derive(Default)]
pub struct ProviderCache {
    metadata: Mutex<HashMap<String, Cached<ProviderMetadata>>>,
    key_sets: Mutex<HashMap<String, Cached<JwkSet>>>,
}

impl std::fmt::Debug for ProviderCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderCache").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn remember<T>(map: &mut HashMap<String, Cached<T>>, key: &str, value: Arc<T>) {
    if map.len() >= MAX_CACHED && !map.contains_key(key) {
        if let Some(oldest) = map
            .iter()
            .min_by_key(|(_, c)| c.fetched)
            .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
    }
    map.insert(
        key.to_owned(),
        Cached {
            value,
            fetched: Instant::now(),
        },
    );
}

impl ProviderCache {
    /// `issuer`'s metadata, read again when older than an hour.
    pub async fn metadata(
        &self,
        outbound: &Outbound,
        issuer: &str,
    ) -> Result<Arc<ProviderMetadata>, ProviderError> {
        if let Some(c) = lock(&self.metadata).get(issuer) {
            if c.fetched.elapsed() < REFRESH_AFTER {
                return Ok(c.value.clone());
            }
        }
        self.read_metadata(outbound, issuer).await
    }

    /// `issuer`'s metadata read now (an operator registering a provider gets its current
    /// answer, not the cache's).
    pub async fn read_metadata(
        &self,
        outbound: &Outbound,
        issuer: &str,
    ) -> Result<Arc<ProviderMetadata>, ProviderError> {
        let fresh = Arc::new(discover(outbound, issuer).await?);
        remember(&mut lock(&self.metadata), issuer, fresh.clone());
        Ok(fresh)
    }

    /// The key set at `jwks_uri`, holding `kid` if the provider publishes it: read again when
    /// stale, or when `kid` is unknown and the last read is not too recent.
    pub async fn key_set(
        &self,
        outbound: &Outbound,
        jwks_uri: &str,
        kid: Option<&str>,
    ) -> Result<Arc<JwkSet>, ProviderError> {
        if let Some(c) = lock(&self.key_sets).get(jwks_uri) {
            let knows = kid.is_none_or(|k| {
                c.value
                    .keys
                    .iter()
                    .any(|j| j.common.key_id.as_deref() == Some(k))
            });
            if use_cached_keys(c.fetched.elapsed(), knows) {
                return Ok(c.value.clone());
            }
        }
        let raw: serde_json::Value =
            get_json(outbound, "key set", jwks_uri, None, MAX_KEY_SET).await?;
        let set = Arc::new(usable_keys(raw));
        remember(&mut lock(&self.key_sets), jwks_uri, set.clone());
        Ok(set)
    }

    /// Validates an ID token with the provider's current keys; answers its `sub`.
    pub async fn id_token_subject(
        &self,
        outbound: &Outbound,
        jwks_uri: &str,
        token: &str,
        expect: IdTokenExpectations<'_>,
    ) -> Result<String, ProviderError> {
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|_| ProviderError::IdToken("malformed".into()))?
            .kid;
        let keys = self.key_set(outbound, jwks_uri, kid.as_deref()).await?;
        validate_id_token(token, &keys, expect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;

    struct TestKey {
        der: Vec<u8>,
        jwks: JwkSet,
    }

    fn test_key(kid: &str) -> TestKey {
        let rng = ring::rand::SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("key")
            .as_ref()
            .to_vec();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng).expect("pair");
        let point = pair.public_key().as_ref();
        let jwks = serde_json::from_value(serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65]),
        }]}))
        .expect("jwks");
        TestKey { der, jwks }
    }

    fn sign(key: &TestKey, kid: &str, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&key.der),
        )
        .expect("sign")
    }

    /// Now: `exp` is checked against the clock.
    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn expect() -> IdTokenExpectations<'static> {
        IdTokenExpectations {
            issuer: "https://id.bank.example",
            client_id: "custos",
            nonce: "n-1",
            now_secs: now(),
        }
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({"iss": "https://id.bank.example", "aud": "custos", "sub": "alice",
            "nonce": "n-1", "iat": now(), "exp": now() + 300})
    }

    fn refused(token: &str, keys: &JwkSet) -> String {
        match validate_id_token(token, keys, expect()) {
            Ok(sub) => panic!("accepted as {sub}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_key_set_with_keys_of_other_kinds_still_validates_with_the_signing_key() {
        let key = test_key("k1");
        let signing = serde_json::to_value(&key.jwks.keys[0]).expect("jwk");
        let mut unkeyed = signing.clone();
        unkeyed.as_object_mut().expect("object").remove("kid");
        // An RSA key first (a token without `kid` is tried against every key), a key with an
        // algorithm the library does not know, an encryption curve, then the signing key.
        let raw = serde_json::json!({"keys": [
            {"kty": "RSA", "alg": "RS256", "use": "sig", "n": B64URL.encode([0xc3; 256]),
             "e": "AQAB"},
            {"kty": "EC", "crv": "P-521", "alg": "ES512", "kid": "new", "x": "AA", "y": "AA"},
            {"kty": "OKP", "crv": "X25519", "kid": "enc", "x": "AA"},
            unkeyed,
        ]});
        let set = usable_keys(raw);
        assert!(
            !set.keys.is_empty() && set.keys.len() < 4,
            "{}",
            set.keys.len()
        );
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = None;
        let token = jsonwebtoken::encode(
            &header,
            &claims(),
            &jsonwebtoken::EncodingKey::from_ec_der(&key.der),
        )
        .expect("sign");
        assert_eq!(
            validate_id_token(&token, &set, expect()).expect("valid"),
            "alice"
        );
        assert!(usable_keys(serde_json::json!({"keys": "none"}))
            .keys
            .is_empty());
    }

    #[test]
    fn a_valid_id_token_yields_its_subject() {
        let key = test_key("k1");
        let token = sign(&key, "k1", claims());
        assert_eq!(
            validate_id_token(&token, &key.jwks, expect()).expect("valid"),
            "alice"
        );
    }

    #[test]
    fn id_tokens_that_do_not_hold_are_refused_with_the_reason() {
        let key = test_key("k1");
        let with = |k: &str, v: serde_json::Value| {
            let mut c = claims();
            c[k] = v;
            sign(&key, "k1", c)
        };
        let cases = [
            (with("aud", "someone-else".into()), "another client"),
            (with("iss", "https://evil.example".into()), "another issuer"),
            (with("exp", (now() - 3600).into()), "expired"),
            (with("nonce", "n-2".into()), "nonce"),
            (with("iat", (now() + 3600).into()), "future"),
            (with("iat", (now() - 7200).into()), "too long ago"),
        ];
        for (token, why) in &cases {
            let msg = refused(token, &key.jwks);
            assert!(msg.contains(why), "{msg} should say {why}");
        }
        // Signed by another key under the same key id: the signature does not verify.
        let other = test_key("k1");
        assert!(refused(&sign(&other, "k1", claims()), &key.jwks).contains("signature"));
        // A key id the provider does not publish.
        assert!(refused(&sign(&key, "k9", claims()), &key.jwks).contains("does not publish"));
        // Several audiences without this vault as the authorized party.
        let many = with("aud", serde_json::json!(["custos", "other"]));
        assert!(refused(&many, &key.jwks).contains("authorized party"));
        // HMAC-signed (keyed with something the attacker may know) is never accepted.
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims(),
            &jsonwebtoken::EncodingKey::from_secret(b"client-secret"),
        )
        .expect("hs256");
        assert!(refused(&hs, &key.jwks).contains("does not accept"));
        assert!(refused("not.a.jwt", &key.jwks).contains("malformed"));
    }

    #[test]
    fn key_sets_are_read_again_on_rotation_but_not_hammered() {
        let s = Duration::from_secs;
        assert!(use_cached_keys(s(100), true), "fresh, knows the key");
        assert!(!use_cached_keys(s(100), false), "a rotated key: read again");
        assert!(use_cached_keys(s(5), false), "read 5 s ago: not again yet");
        assert!(!use_cached_keys(s(4000), true), "stale after an hour");
    }

    #[test]
    fn client_authentication_follows_the_metadata() {
        let list = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(choose_client_auth(true, None), Ok(ClientAuth::Basic));
        assert_eq!(
            choose_client_auth(true, Some(&list(&["client_secret_post"]))),
            Ok(ClientAuth::Post)
        );
        assert_eq!(choose_client_auth(false, None), Ok(ClientAuth::None));
        assert!(choose_client_auth(false, Some(&list(&["client_secret_basic"]))).is_err());
        assert!(choose_client_auth(true, Some(&list(&["private_key_jwt"]))).is_err());
    }

    #[test]
    fn metadata_is_looked_for_where_both_standards_put_it() {
        let [(oidc, _), (rfc, _)] = metadata_urls("https://id.example/tenant1").expect("urls");
        assert_eq!(
            oidc,
            "https://id.example/tenant1/.well-known/openid-configuration"
        );
        assert_eq!(
            rfc,
            "https://id.example/.well-known/oauth-authorization-server/tenant1"
        );
        assert!(metadata_urls("https://id.example/?x=1").is_err());
        assert!(metadata_urls("ftp://id.example").is_err());
    }

    #[test]
    fn provider_errors_are_short_and_printable() {
        let e = refusal(
            reqwest::StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"code\u001b[31m used"}"#,
        );
        assert_eq!(
            e.to_string(),
            "the provider refused: invalid_grant (code[31m used)"
        );
        let e = refusal(reqwest::StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(e.to_string(), "the provider refused: status 502");
    }
}
