//! `custos entity-sim`: a reference entity to link against and to watch commands arrive.
//!
//! It plays a company's system: its own user accounts and sign-in page, an OpenID Connect
//! provider (discovery, a JWKS, ES256-signed ID tokens, a confidential client authenticated
//! with `client_secret_basic` or `client_secret_post`, authorization code with PKCE S256,
//! RFC 9207 `iss` on the redirect, refresh tokens, userinfo, revocation), a
//! command receiver that verifies Standard Webhooks signatures and lists what it received, and
//! a way to emit signed events about one of its users. Presets: airline, hotel, car-rental.
//! State is in memory: it is a simulator, restarted freely.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use custos_api::oauth::pkce_challenge;
use custos_api::types::{RegisterEntity, TypeSpec};
use custos_api::webhook::{self, Secret, SignedHeaders};
use custos_api::CloudEvent;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long an authorization code may be exchanged.
const CODE_TTL: Duration = Duration::from_millis(custos_api::oauth::LINK_TTL_MS as u64);
/// The vault's client id at the simulator.
const CLIENT_ID: &str = "custos";
/// Most commands kept for listing.
const MAX_RECEIVED: usize = 1000;

/// A company to play.
#[derive(Debug, Clone)]
pub struct Preset {
    /// Entity id in the vault.
    pub id: &'static str,
    /// Display name.
    pub name: &'static str,
    /// Event types it sends.
    pub event_types: &'static [&'static str],
    /// Command types it accepts.
    pub command_types: &'static [&'static str],
    /// Demo accounts: (username, password, subject id at this company).
    pub users: &'static [(&'static str, &'static str, &'static str)],
}

/// A contact centre's events (Amazon Connect contact events, Cases).
const CONTACT_EVENTS: &[&str] = &[
    "contact.disconnected",
    "contact.connected_to_agent",
    "case.created",
];
/// A contact centre's commands (a scheduled callback, a comment on a case, routing).
const CONTACT_COMMANDS: &[&str] = &[
    "callback.schedule",
    "case.comment.add",
    "routing.next_contact",
];

/// The built-in presets.
pub const PRESETS: &[Preset] = &[
    Preset {
        id: "airline",
        name: "Example Air",
        event_types: &["flight.delayed", "flight.cancelled", "flight.landed"],
        command_types: &["seat.hold", "meal.change"],
        users: &[
            ("alice", "alice-air", "FF-1001"),
            ("bob", "bob-air", "FF-1002"),
        ],
    },
    Preset {
        id: "hotel",
        name: "Example Hotel",
        event_types: &["stay.checked_in", "stay.checked_out"],
        command_types: &["room.hold", "room.release", "late.checkin"],
        users: &[
            ("alice", "alice-hotel", "guest-77"),
            ("bob", "bob-hotel", "guest-78"),
        ],
    },
    // Contact centres, the source document's own example (claims 9 and 16). Event and command
    // names follow Amazon Connect's public contact events (EventBridge "Amazon Connect Contact
    // Event": `eventType` INITIATED / CONNECTED_TO_AGENT / DISCONNECTED, `contactId`,
    // `channel`, `queueInfo`, `disconnectReason`, contact attributes) and its Cases and
    // outbound-contact APIs (case created, a comment on a case, a scheduled callback).
    Preset {
        id: "air-contact",
        name: "Example Air Contact Centre",
        event_types: CONTACT_EVENTS,
        command_types: CONTACT_COMMANDS,
        users: &[
            ("alice", "alice-aircc", "cust-a-1001"),
            ("bob", "bob-aircc", "cust-a-1002"),
        ],
    },
    Preset {
        id: "hotel-contact",
        name: "Example Hotel Contact Centre",
        event_types: CONTACT_EVENTS,
        command_types: CONTACT_COMMANDS,
        users: &[
            ("alice", "alice-hotelcc", "profile-77"),
            ("bob", "bob-hotelcc", "profile-78"),
        ],
    },
    Preset {
        id: "car-rental",
        name: "Example Cars",
        event_types: &["car.returned", "car.picked_up"],
        command_types: &["rental.extend", "rental.hold"],
        users: &[
            ("alice", "alice-car", "renter-5"),
            ("bob", "bob-car", "renter-6"),
        ],
    },
];

/// Finds a preset by id.
pub fn preset(id: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.id == id)
}

struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    openid: bool,
    subject: String,
    issued: Instant,
}

/// The ES256 key the simulator signs ID tokens with (made at start, published at `/oauth/jwks`).
struct IdTokenKey {
    kid: String,
    pkcs8: Vec<u8>,
    jwk: serde_json::Value,
}

impl IdTokenKey {
    fn generate() -> Self {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
        use base64::Engine as _;
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING as ALG};
        let rng = ring::rand::SystemRandom::new();
        // Key generation only fails if the OS has no randomness; nothing works then.
        #[allow(clippy::expect_used)]
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ALG, &rng)
            .expect("random key")
            .as_ref()
            .to_vec();
        #[allow(clippy::expect_used)]
        let pair = EcdsaKeyPair::from_pkcs8(&ALG, &pkcs8, &rng).expect("key just made");
        let point = pair.public_key().as_ref();
        let kid = custos_api::oauth::random_token(8);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65]),
        });
        IdTokenKey { kid, pkcs8, jwk }
    }

    fn sign(&self, claims: &serde_json::Value) -> Option<String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(
            &header,
            claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8),
        )
        .ok()
    }
}

/// A command as received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceivedCommand {
    /// `webhook-id`.
    pub id: String,
    /// True when the signature verified with this entity's secret.
    pub verified: bool,
    /// The CloudEvent.
    pub command: serde_json::Value,
}

/// The simulator's state.
pub struct Sim {
    preset: &'static Preset,
    /// Where it is served (`http://host:port`): its issuer identifier.
    base: String,
    secret: Mutex<Option<Secret>>,
    vault: Option<String>,
    /// The vault's client secret here (made at start).
    client_secret: String,
    id_token_key: IdTokenKey,
    users: Mutex<HashMap<String, (String, String)>>,
    codes: Mutex<HashMap<String, Grant>>,
    tokens: Mutex<HashMap<String, String>>,
    refresh_tokens: Mutex<HashMap<String, String>>,
    received: Mutex<Vec<ReceivedCommand>>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("preset", &self.preset.id)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn random_token(prefix: &str) -> String {
    format!("{prefix}{}", custos_api::oauth::random_token(24))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width, initial-scale=1\"><title>{t}</title><style>body{{font-family:\
         system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}\
         label{{display:block;margin-top:.8rem}}input{{font-size:1rem;padding:.4rem;width:100%}}\
         button{{margin-top:1rem;font-size:1rem;padding:.5rem 1.2rem}}</style></head><body>\
         <h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    ))
}

fn oauth_error(status: u16, error: &str, description: &str) -> HttpResponse {
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or_default())
        .json(serde_json::json!({"error": error, "error_description": description}))
}

impl Sim {
    /// A simulator for `preset` served at `base`, verifying and signing with `secret`, sending
    /// events to `vault`.
    pub fn new(
        preset: &'static Preset,
        base: &str,
        secret: Option<Secret>,
        vault: Option<String>,
    ) -> Self {
        Sim {
            preset,
            base: base.trim_end_matches('/').to_owned(),
            secret: Mutex::new(secret),
            vault,
            client_secret: custos_api::oauth::random_token(24),
            id_token_key: IdTokenKey::generate(),
            refresh_tokens: Mutex::new(HashMap::new()),
            users: Mutex::new(
                preset
                    .users
                    .iter()
                    .map(|(u, p, s)| ((*u).to_owned(), ((*p).to_owned(), (*s).to_owned())))
                    .collect(),
            ),
            codes: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            received: Mutex::new(Vec::new()),
        }
    }

    /// The registration this entity asks the vault for: its OpenID provider by issuer, with
    /// the client secret the vault authenticates with.
    pub fn registration(&self) -> RegisterEntity {
        let base = &self.base;
        let types = |ts: &[&str]| {
            ts.iter()
                .map(|t| TypeSpec {
                    type_name: (*t).to_owned(),
                    schema: None,
                })
                .collect()
        };
        RegisterEntity {
            id: self.preset.id.into(),
            name: self.preset.name.into(),
            command_url: format!("{base}/commands"),
            event_types: types(self.preset.event_types),
            command_types: types(self.preset.command_types),
            oauth: Some(custos_api::types::OAuthEndpoints {
                issuer: Some(base.clone()),
                client_id: CLIENT_ID.into(),
                client_secret: Some(self.client_secret.clone()),
                ..Default::default()
            }),
        }
    }

    /// Uses `secret` as the vault's client secret here instead of a random one.
    pub fn with_client_secret(mut self, secret: &str) -> Self {
        self.client_secret = secret.to_owned();
        self
    }

    /// Sets the signing secret (after registering with the vault).
    pub fn set_secret(&self, secret: Secret) {
        *lock(&self.secret) = Some(secret);
    }
}

/// `GET /oauth/authorize` query.
#[derive(Debug, Deserialize)]
struct AuthorizeQuery {
    response_type: Option<String>,
    client_id: Option<String>,
    redirect_uri: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    nonce: Option<String>,
    scope: Option<String>,
}

/// An OAuth error answer (RFC 6749 §5.2).
#[derive(Debug)]
struct OAuthError(u16, &'static str, &'static str);

impl OAuthError {
    fn response(&self) -> HttpResponse {
        oauth_error(self.0, self.1, self.2)
    }
}

/// A checked authorization request.
struct AuthRequest {
    client: String,
    redirect: String,
    state: String,
    challenge: String,
    nonce: String,
    scope: String,
}

fn check_authorize(q: &AuthorizeQuery) -> Result<AuthRequest, OAuthError> {
    let bad = |d: &'static str| Err(OAuthError(400, "invalid_request", d));
    if q.response_type.as_deref() != Some("code") {
        return Err(OAuthError(
            400,
            "unsupported_response_type",
            "response_type must be code",
        ));
    }
    let (Some(client), Some(redirect), Some(state)) = (&q.client_id, &q.redirect_uri, &q.state)
    else {
        return bad("client_id, redirect_uri and state are required");
    };
    let Some(challenge) = q
        .code_challenge
        .as_ref()
        .filter(|c| (43..=128).contains(&c.len()))
    else {
        return bad("PKCE is required: code_challenge of 43 to 128 characters");
    };
    if q.code_challenge_method.as_deref() != Some("S256") {
        return bad("code_challenge_method must be S256");
    }
    let (nonce, scope) = (
        q.nonce.clone().unwrap_or_default(),
        q.scope.clone().unwrap_or_default(),
    );
    if url::Url::parse(redirect).is_err()
        || redirect.len() > 2048
        || state.len() > 512
        || client.len() > 256
        || nonce.len() > 512
        || scope.len() > 512
    {
        return bad("malformed redirect_uri, state, client_id, nonce or scope");
    }
    Ok(AuthRequest {
        client: client.clone(),
        redirect: redirect.clone(),
        state: state.clone(),
        challenge: challenge.clone(),
        nonce,
        scope,
    })
}

async fn authorize_form(sim: web::Data<Sim>, q: web::Query<AuthorizeQuery>) -> HttpResponse {
    let AuthRequest {
        client,
        redirect,
        state,
        challenge,
        nonce,
        scope,
    } = match check_authorize(&q) {
        Ok(v) => v,
        Err(e) => return e.response(),
    };
    let hidden =
        |n: &str, v: &str| format!("<input type=\"hidden\" name=\"{n}\" value=\"{}\">", esc(v));
    page(
        &format!("Sign in to {}", sim.preset.name),
        &format!(
            "<p>{client} asks to link your {name} account.</p>\
             <form method=\"post\" action=\"/oauth/authorize\">{h1}{h2}{h3}{h4}{h5}{h6}\
             <label for=\"username\">Username</label><input id=\"username\" name=\"username\" autocomplete=\"username\" required>\
             <label for=\"password\">Password</label><input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\
             <button type=\"submit\">Sign in and allow</button></form>",
            client = esc(&client),
            name = esc(sim.preset.name),
            h1 = hidden("client_id", &client),
            h2 = hidden("redirect_uri", &redirect),
            h3 = hidden("state", &state),
            h4 = hidden("code_challenge", &challenge),
            h5 = hidden("nonce", &nonce),
            h6 = hidden("scope", &scope),
        ),
    )
}

/// The sign-in form.
#[derive(Debug, Deserialize)]
struct SignIn {
    username: String,
    password: String,
    client_id: String,
    redirect_uri: String,
    state: String,
    code_challenge: String,
    #[serde(default)]
    nonce: String,
    #[serde(default)]
    scope: String,
}

async fn authorize_submit(sim: web::Data<Sim>, form: web::Form<SignIn>) -> HttpResponse {
    let f = form.into_inner();
    let q = AuthorizeQuery {
        response_type: Some("code".into()),
        client_id: Some(f.client_id.clone()),
        redirect_uri: Some(f.redirect_uri.clone()),
        state: Some(f.state.clone()),
        code_challenge: Some(f.code_challenge.clone()),
        code_challenge_method: Some("S256".into()),
        nonce: Some(f.nonce.clone()),
        scope: Some(f.scope.clone()),
    };
    if let Err(e) = check_authorize(&q) {
        return e.response();
    }
    let subject = lock(&sim.users)
        .get(&f.username)
        .filter(|(pw, _)| same_secret(pw, &f.password))
        .map(|(_, s)| s.clone());
    let Some(subject) = subject else {
        return page(
            "Sign-in failed",
            "<p>Wrong username or password. Go back and try again.</p>",
        );
    };
    let code = random_token("code_");
    let mut codes = lock(&sim.codes);
    codes.retain(|_, g| g.issued.elapsed() < CODE_TTL);
    codes.insert(
        code.clone(),
        Grant {
            client_id: f.client_id,
            redirect_uri: f.redirect_uri.clone(),
            challenge: f.code_challenge,
            nonce: Some(f.nonce).filter(|n| !n.is_empty()),
            openid: f.scope.split(' ').any(|s| s == "openid"),
            subject,
            issued: Instant::now(),
        },
    );
    let mut target = match url::Url::parse(&f.redirect_uri) {
        Ok(u) => u,
        Err(_) => return oauth_error(400, "invalid_request", "malformed redirect_uri"),
    };
    target
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &f.state)
        .append_pair("iss", &sim.base);
    HttpResponse::Found()
        .insert_header(("location", target.to_string()))
        .finish()
}

/// `POST /oauth/token` form.
#[derive(Debug, Deserialize)]
struct TokenRequest {
    grant_type: String,
    code: Option<String>,
    redirect_uri: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    code_verifier: Option<String>,
}

/// The client's id and secret from HTTP Basic (RFC 6749 §2.3.1: each part form-encoded) or
/// from the form.
fn client_credentials(req: &HttpRequest, t: &TokenRequest) -> (Option<String>, Option<String>) {
    use base64::Engine as _;
    let basic = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    match basic.as_deref().and_then(|b| b.split_once(':')) {
        Some((id, secret)) => (decode(id), decode(secret)),
        None => (t.client_id.clone(), t.client_secret.clone()),
    }
}

/// Compares two secrets' digests without an early exit.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn token(
    sim: web::Data<Sim>,
    req: HttpRequest,
    form: web::Form<TokenRequest>,
) -> HttpResponse {
    let t = form.into_inner();
    if t.grant_type != "authorization_code" {
        return oauth_error(400, "unsupported_grant_type", "only authorization_code");
    }
    let (client_id, client_secret) = client_credentials(&req, &t);
    if client_id.as_deref() != Some(CLIENT_ID)
        || !client_secret.is_some_and(|s| same_secret(&s, &sim.client_secret))
    {
        return oauth_error(
            401,
            "invalid_client",
            "unknown client or wrong client secret",
        );
    }
    // A code is single-use: taken out whatever happens next.
    let grant = t.code.as_deref().and_then(|c| lock(&sim.codes).remove(c));
    let Some(grant) = grant.filter(|g| g.issued.elapsed() < CODE_TTL) else {
        return oauth_error(400, "invalid_grant", "unknown, used or expired code");
    };
    if t.redirect_uri.as_deref() != Some(grant.redirect_uri.as_str())
        || client_id.as_deref() != Some(grant.client_id.as_str())
    {
        return oauth_error(
            400,
            "invalid_grant",
            "redirect_uri or client_id does not match",
        );
    }
    let Some(verifier) = t.code_verifier.filter(|v| (43..=128).contains(&v.len())) else {
        return oauth_error(400, "invalid_request", "code_verifier is required");
    };
    if pkce_challenge(&verifier) != grant.challenge {
        return oauth_error(
            400,
            "invalid_grant",
            "code_verifier does not match the challenge",
        );
    }
    let access = random_token("at_");
    let refresh = random_token("rt_");
    lock(&sim.tokens).insert(access.clone(), grant.subject.clone());
    lock(&sim.refresh_tokens).insert(refresh.clone(), grant.subject.clone());
    let mut answer = serde_json::json!({
        "access_token": access, "token_type": "Bearer", "expires_in": 3600,
        "refresh_token": refresh,
    });
    if grant.openid {
        let now = webhook::unix_now();
        let mut claims = serde_json::json!({
            "iss": sim.base, "sub": grant.subject, "aud": grant.client_id,
            "iat": now, "exp": now + 300,
        });
        if let Some(n) = grant.nonce {
            claims["nonce"] = n.into();
        }
        match sim.id_token_key.sign(&claims) {
            Some(jwt) => answer["id_token"] = jwt.into(),
            None => return oauth_error(500, "server_error", "could not sign the ID token"),
        }
    }
    HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(answer)
}

/// `GET /.well-known/openid-configuration` (OpenID Connect Discovery 1.0).
async fn discovery(sim: web::Data<Sim>) -> HttpResponse {
    let b = &sim.base;
    HttpResponse::Ok().json(serde_json::json!({
        "issuer": b,
        "authorization_endpoint": format!("{b}/oauth/authorize"),
        "token_endpoint": format!("{b}/oauth/token"),
        "userinfo_endpoint": format!("{b}/oauth/userinfo"),
        "jwks_uri": format!("{b}/oauth/jwks"),
        "revocation_endpoint": format!("{b}/oauth/revoke"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "scopes_supported": ["openid"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": true,
    }))
}

/// `GET /oauth/jwks`: the ID token signing key.
async fn jwks(sim: web::Data<Sim>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "keys": [sim.id_token_key.jwk] }))
}

fn bearer(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

async fn userinfo(sim: web::Data<Sim>, req: HttpRequest) -> HttpResponse {
    match bearer(&req).and_then(|t| lock(&sim.tokens).get(&t).cloned()) {
        Some(sub) => HttpResponse::Ok().json(serde_json::json!({"sub": sub})),
        None => oauth_error(401, "invalid_token", "unknown or revoked token"),
    }
}

/// `POST /oauth/revoke` form (RFC 7009).
#[derive(Debug, Deserialize)]
struct Revoke {
    token: String,
}

async fn revoke(sim: web::Data<Sim>, form: web::Form<Revoke>) -> HttpResponse {
    lock(&sim.tokens).remove(&form.token);
    // Revoking a refresh token ends the grant: its subject's access tokens go too.
    if let Some(subject) = lock(&sim.refresh_tokens).remove(&form.token) {
        lock(&sim.tokens).retain(|_, s| *s != subject);
    }
    // RFC 7009: 200 whether or not the token was known.
    HttpResponse::Ok().finish()
}

/// `GET /oauth/active`: the subjects holding live access tokens (so an operator, or a test,
/// can see that unlinking at the vault revoked the token here).
async fn active_tokens(sim: web::Data<Sim>) -> HttpResponse {
    let mut subjects: Vec<String> = lock(&sim.tokens).values().cloned().collect();
    subjects.sort();
    HttpResponse::Ok().json(serde_json::json!({ "subjects": subjects }))
}

async fn receive_command(sim: web::Data<Sim>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    let headers = SignedHeaders {
        id: h(webhook::HEADER_ID),
        timestamp: h(webhook::HEADER_TIMESTAMP),
        signature: h(webhook::HEADER_SIGNATURE),
    };
    let secret = lock(&sim.secret).clone();
    let verified = secret
        .as_ref()
        .is_some_and(|s| webhook::verify(&[s], headers, &body, webhook::unix_now()).is_ok());
    if !verified {
        return HttpResponse::Unauthorized().json(serde_json::json!({"error": "bad signature"}));
    }
    let command: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut received = lock(&sim.received);
    let id = headers.id.unwrap_or_default().to_owned();
    // Idempotent by webhook-id: a retry of a command already taken is acknowledged again.
    if !received.iter().any(|r| r.id == id) {
        if received.len() >= MAX_RECEIVED {
            received.remove(0);
        }
        received.push(ReceivedCommand {
            id,
            verified,
            command,
        });
    }
    HttpResponse::NoContent().finish()
}

async fn list_commands(sim: web::Data<Sim>) -> HttpResponse {
    HttpResponse::Ok().json(&*lock(&sim.received))
}

/// `POST /emit`: send an event about one of this company's users to the vault.
#[derive(Debug, Deserialize)]
pub struct Emit {
    /// The user (by username) the event is about.
    pub username: String,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Event data.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// Signs and sends an event about one of this company's users; answers the vault's receipt,
/// or an HTTP status and why not.
async fn send(sim: &Sim, e: Emit) -> Result<custos_api::types::EventReceipt, (u16, String)> {
    let Some(subject) = lock(&sim.users).get(&e.username).map(|(_, s)| s.clone()) else {
        return Err((404, "no such user".into()));
    };
    if !sim.preset.event_types.contains(&e.event_type.as_str()) {
        return Err((400, "not one of this company's event types".into()));
    }
    let (Some(vault), Some(secret)) = (sim.vault.clone(), lock(&sim.secret).clone()) else {
        return Err((409, "start with --vault and a secret".into()));
    };
    let mut ev = CloudEvent::new(random_token("evt_"), sim.preset.id, e.event_type);
    ev.subject = Some(subject);
    ev.time = Some(custos_api::types::rfc3339_ms(
        custos_api::types::unix_now_ms(),
    ));
    ev.data = Some(e.data);
    let client = custos_api::client::Client::new(vault, None);
    client
        .send_event(&secret, &ev)
        .await
        .map_err(|err| (502, err.to_string()))
}

async fn emit(sim: web::Data<Sim>, body: web::Json<Emit>) -> HttpResponse {
    match send(&sim, body.into_inner()).await {
        Ok(receipt) => HttpResponse::Ok().json(receipt),
        Err((status, error)) => {
            HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or_default())
                .json(serde_json::json!({ "error": error }))
        }
    }
}

/// The home page's "send an event" form.
#[derive(Debug, Deserialize)]
struct EmitForm {
    username: String,
    #[serde(rename = "type")]
    event_type: String,
    data: String,
}

async fn emit_form(sim: web::Data<Sim>, form: web::Form<EmitForm>) -> HttpResponse {
    let f = form.into_inner();
    let data = if f.data.trim().is_empty() {
        serde_json::json!({})
    } else {
        match serde_json::from_str(&f.data) {
            Ok(v) => v,
            Err(e) => {
                return page(
                    "Not sent",
                    &format!(
                        "<p>The data is not JSON: {}</p><p><a href=\"/\">Back</a></p>",
                        esc(&e.to_string())
                    ),
                )
            }
        }
    };
    let e = Emit {
        username: f.username,
        event_type: f.event_type,
        data,
    };
    match send(&sim, e).await {
        Ok(r) => {
            page(
                "Sent",
                &format!(
                "<p>The vault answered: <strong>{}</strong>{}.</p><p><a href=\"/\">Back</a></p>",
                esc(&serde_json::to_string(&r.status).unwrap_or_default()),
                r.reason.map(|x| format!(" ({})", esc(&x))).unwrap_or_default()
            ),
            )
        }
        Err((_, error)) => page(
            "Not sent",
            &format!("<p>{}</p><p><a href=\"/\">Back</a></p>", esc(&error)),
        ),
    }
}

async fn home(sim: web::Data<Sim>) -> HttpResponse {
    let users: String = lock(&sim.users)
        .iter()
        .map(|(u, (_, s))| format!("<li>{} (subject {})</li>", esc(u), esc(s)))
        .collect();
    let commands: String = lock(&sim.received)
        .iter()
        .rev()
        .map(|r| {
            format!(
                "<li><code>{}</code> {}</li>",
                esc(&r.id),
                esc(&r.command.to_string())
            )
        })
        .collect();
    let options = |items: Vec<String>| -> String {
        items
            .iter()
            .map(|v| format!("<option value=\"{0}\">{0}</option>", esc(v)))
            .collect()
    };
    let usernames = options(lock(&sim.users).keys().cloned().collect());
    let types = options(
        sim.preset
            .event_types
            .iter()
            .map(|t| (*t).to_owned())
            .collect(),
    );
    page(
        sim.preset.name,
        &format!(
            "<h2>Accounts</h2><ul>{users}</ul>\
             <h2>Send an event to the vault</h2><form method=\"post\" action=\"/emit-form\">\
             <label for=\"username\">About</label><select id=\"username\" name=\"username\">{usernames}</select>\
             <label for=\"type\">Event</label><select id=\"type\" name=\"type\">{types}</select>\
             <label for=\"data\">Data (JSON)</label><textarea id=\"data\" name=\"data\" rows=\"4\" style=\"width:100%\">{{}}</textarea>\
             <button type=\"submit\">Send signed event</button></form>\
             <h2>Commands received (verified)</h2><ul>{commands}</ul>"
        ),
    )
}

/// Why an entity already registered under the preset's id cannot be taken over as it is:
/// its types or OAuth endpoints differ from what this simulator serves (e.g. it was
/// registered by hand, or by a simulator listening elsewhere). `None` when they agree.
pub fn registration_mismatch(
    existing: &custos_api::types::Entity,
    wanted: &custos_api::types::RegisterEntity,
) -> Option<String> {
    let names = |t: &[custos_api::types::TypeSpec]| {
        let mut n: Vec<String> = t.iter().map(|t| t.type_name.clone()).collect();
        n.sort();
        n
    };
    if names(&existing.event_types) != names(&wanted.event_types) {
        return Some("its event types differ".into());
    }
    if names(&existing.command_types) != names(&wanted.command_types) {
        return Some("its command types differ".into());
    }
    match (&existing.oauth, &wanted.oauth) {
        (None, Some(_)) => Some("it has no OAuth provider, so customers could not link it".into()),
        (Some(a), Some(b)) if a.issuer != b.issuer => Some(format!(
            "its OAuth provider is {} (this simulator is {})",
            a.issuer
                .as_deref()
                .or(a.authorize_url.as_deref())
                .unwrap_or_default(),
            b.issuer.as_deref().unwrap_or_default()
        )),
        _ => None,
    }
}

/// Registers this entity with the vault and keeps the secret for signing and verifying. An
/// entity registered earlier under the same id is taken over (endpoint pointed here, secret
/// rotated) only when its types and OAuth endpoints are the ones this simulator serves;
/// otherwise this stops and says why, rather than leave an entity customers cannot link.
pub async fn register(sim: &Sim, vault: &str, admin_token: &str) -> Result<(), String> {
    let client = custos_api::client::Client::new(vault, Some(admin_token.to_owned()));
    let command_url = format!("{}/commands", sim.base);
    let wanted = sim.registration();
    let entity = match client.register_entity(&wanted).await {
        Ok(e) => e,
        Err(e) if e.code() == Some(custos_api::ErrorCode::Conflict) => {
            let existing = client
                .entity(sim.preset.id)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(why) = registration_mismatch(&existing, &wanted) {
                return Err(format!(
                    "entity {id} is already registered in this vault and {why}; the simulator \
                     will not take it over. Start the vault with a fresh data directory, or run \
                     the simulator on the address it was registered from",
                    id = sim.preset.id
                ));
            }
            // This run's client secret replaces the last one (rotation).
            let update = custos_api::types::UpdateEntity {
                command_url: Some(command_url),
                oauth_client_secret: Some(sim.client_secret.clone()),
                ..Default::default()
            };
            client
                .update_entity(sim.preset.id, &update)
                .await
                .map_err(|e| e.to_string())?;
            client
                .rotate_secret(sim.preset.id)
                .await
                .map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    let secret =
        Secret::parse(entity.secret.as_deref().unwrap_or_default()).map_err(|e| e.to_string())?;
    sim.set_secret(secret);
    Ok(())
}

/// Registers the simulator's routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(home))
        .route(
            "/.well-known/openid-configuration",
            web::get().to(discovery),
        )
        .route("/oauth/jwks", web::get().to(jwks))
        .route("/oauth/authorize", web::get().to(authorize_form))
        .route("/oauth/authorize", web::post().to(authorize_submit))
        .route("/oauth/token", web::post().to(token))
        .route("/oauth/userinfo", web::get().to(userinfo))
        .route("/oauth/revoke", web::post().to(revoke))
        .route("/oauth/active", web::get().to(active_tokens))
        .route("/commands", web::post().to(receive_command))
        .route("/commands", web::get().to(list_commands))
        .route("/emit", web::post().to(emit))
        .route("/emit-form", web::post().to(emit_form));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entity_registered_otherwise_is_not_taken_over() {
        let airline = preset("airline").expect("preset");
        let sim = Sim::new(airline, "http://127.0.0.1:7801", None, None);
        let wanted = sim.registration();
        let as_registered = |r: &RegisterEntity| custos_api::types::Entity {
            id: r.id.clone(),
            name: r.name.clone(),
            command_url: r.command_url.clone(),
            endpoint_enabled: true,
            event_types: r.event_types.clone(),
            command_types: r.command_types.clone(),
            created_at: String::new(),
            secret: None,
            previous_secret_valid_until: None,
            oauth: r.oauth.clone(),
        };
        assert_eq!(
            registration_mismatch(&as_registered(&wanted), &wanted),
            None
        );
        // The README walkthrough's airline: by hand, no OAuth, one event type.
        let mut by_hand = as_registered(&wanted);
        by_hand.oauth = None;
        let why = registration_mismatch(&by_hand, &wanted).expect("refused");
        assert!(why.contains("no OAuth"), "{why}");
        by_hand.event_types.truncate(1);
        assert!(registration_mismatch(&by_hand, &wanted).is_some());
        // Registered by a simulator on another port: its issuer is there.
        let elsewhere =
            as_registered(&Sim::new(airline, "http://127.0.0.1:9999", None, None).registration());
        let why = registration_mismatch(&elsewhere, &wanted).expect("refused");
        assert!(why.contains("9999"), "{why}");
    }

    #[test]
    fn presets_exist() {
        for id in [
            "airline",
            "hotel",
            "car-rental",
            "air-contact",
            "hotel-contact",
        ] {
            assert!(preset(id).is_some());
        }
    }
}
