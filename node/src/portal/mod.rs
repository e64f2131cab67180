//! The customer portal: accounts, the entity catalog with OAuth linking, the rule builder,
//! activity, data export and deletion, recommendations. Handlers decode the form, check the
//! session and its CSRF token, call one service, and render a page or redirect (POST, then
//! redirect, then GET), carrying a one-time message in a short-lived cookie.

pub mod pages;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use custos_api::types::{Action, ActivityKind, RuleSpec, Trigger, TryRule};
use custos_raft::records::SessionRecord;
use futures::future::LocalBoxFuture;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ServiceError;
use crate::service::Vault;
use pages::{Chrome, Flash, RuleForm, Section};

/// The session cookie.
pub const SESSION_COOKIE: &str = "custos_session";
/// The pre-session CSRF cookie of the sign-in and sign-up forms (double submit).
const FORM_COOKIE: &str = "custos_form";
/// The one-time message cookie.
const FLASH_COOKIE: &str = "custos_flash";
/// Largest form body.
const MAX_FORM_BYTES: usize = 64 * 1024;
/// Sign-in attempts between two sweeps of the limiters' refilled keys.
const LIMITER_SWEEP: u64 = 1024;
/// Activity lines read for one page of the timeline.
const ACTIVITY_PAGE: usize = 200;

/// The portal's per-node settings and sign-in limiter.
pub struct Portal {
    /// Attempts per email address (guards one account against guessing).
    per_email: DefaultKeyedRateLimiter<String>,
    /// Attempts per client address (ten times looser: many people share an address).
    per_address: DefaultKeyedRateLimiter<String>,
    /// Attempts so far, to sweep the limiters every `LIMITER_SWEEP`.
    attempts: AtomicU64,
    /// Cookies are `Secure` when the vault is served over HTTPS.
    secure: bool,
    session_ttl_ms: i64,
}

impl std::fmt::Debug for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portal")
            .field("secure", &self.secure)
            .finish()
    }
}

impl Portal {
    /// Settings from config; `secure` when the public URL is HTTPS.
    pub fn new(config: &crate::config::PortalConfig, secure: bool) -> Arc<Self> {
        let n = config.sign_in_per_minute.max(1);
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        Arc::new(Portal {
            per_email: RateLimiter::keyed(quota(n)),
            per_address: RateLimiter::keyed(quota(n.saturating_mul(10))),
            attempts: AtomicU64::new(0),
            secure,
            session_ttl_ms: (config.session_hours * 3_600_000.0) as i64,
        })
    }

    fn cookie<'c>(&self, name: &'c str, value: String, max_age_secs: i64) -> Cookie<'c> {
        Cookie::build(name, value)
            .path("/")
            .http_only(true)
            .secure(self.secure)
            // Lax: the session must survive the top-level return from an entity's sign-in.
            .same_site(SameSite::Lax)
            .max_age(actix_web::cookie::time::Duration::seconds(max_age_secs))
            .finish()
    }
}

/// The rate-limit key of a client address: an IPv6 client usually holds a whole /64.
fn client_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        // An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d.
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => v6
            .to_ipv4_mapped()
            .map(|v4| v4.to_string())
            .unwrap_or_default(),
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

fn sha(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Marks every cookie a response sets `Secure` when the vault is served over HTTPS, so that
/// none (the one-time message's included, whose words a network attacker could otherwise
/// plant over plain HTTP) is sent or taken over HTTP. Wraps the client API, forwarded
/// answers included.
pub async fn secure_cookies(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let secure = req
        .app_data::<web::Data<Portal>>()
        .is_some_and(|p| p.secure);
    let mut res = next.call(req).await?;
    if secure {
        let headers = res.headers_mut();
        // Browsers that reached the vault over HTTPS keep to it (no first plain request a
        // network attacker could answer with a planted cookie).
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            header::HeaderValue::from_static("max-age=31536000"),
        );
        let set: Vec<header::HeaderValue> = headers.get_all(header::SET_COOKIE).cloned().collect();
        if !set.is_empty() {
            headers.remove(header::SET_COOKIE);
            for value in set {
                let marked = value
                    .to_str()
                    .ok()
                    .and_then(|v| Cookie::parse(v.to_owned()).ok())
                    .and_then(|mut c| {
                        c.set_secure(true);
                        if c.name().starts_with(COOKIE_STEM) {
                            c.set_name(format!("{HOST_PREFIX}{}", c.name()));
                            c.set_path("/");
                            c.unset_domain();
                        }
                        header::HeaderValue::from_str(&c.to_string()).ok()
                    });
                headers.append(header::SET_COOKIE, marked.unwrap_or(value));
            }
        }
    }
    Ok(res)
}

/// What every portal cookie's name starts with.
const COOKIE_STEM: &str = "custos_";
/// Over HTTPS the portal's cookies are `__Host-` cookies: a browser takes one only from this
/// origin over HTTPS, for every path, and without a domain, so neither a network attacker
/// (over plain HTTP) nor a sibling subdomain can plant a session or form cookie of its own
/// (which would sign the customer into the attacker's account, and link the customer's
/// accounts into it).
const HOST_PREFIX: &str = "__Host-";

/// The portal cookie `name` (`custos_...`) of this request: under its `__Host-` name when the
/// vault is served over HTTPS (a cookie under the plain name is then ignored).
pub fn request_cookie(req: &HttpRequest, name: &str) -> Option<Cookie<'static>> {
    let secure = req
        .app_data::<web::Data<Portal>>()
        .is_some_and(|p| p.secure);
    if secure {
        req.cookie(&format!("{HOST_PREFIX}{name}"))
    } else {
        req.cookie(name)
    }
}

/// A 303 to `location`.
pub fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

/// A 303 to `location` with a one-time message.
pub fn see_other_flash(location: &str, flash: Result<String, String>) -> HttpResponse {
    let value = match flash {
        Ok(m) => format!("ok:{m}"),
        Err(m) => format!("error:{m}"),
    };
    let value: String = value.chars().take(300).collect();
    // Base64 survives any cookie decoding on the way back.
    let cookie = Cookie::build(FLASH_COOKIE, B64URL.encode(value))
        .path("/portal")
        .http_only(true)
        .same_site(SameSite::Lax)
        .max_age(actix_web::cookie::time::Duration::seconds(60))
        .finish();
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .cookie(cookie)
        .finish()
}

fn take_flash(req: &HttpRequest) -> Option<Flash> {
    let c = request_cookie(req, FLASH_COOKIE)?;
    let raw = String::from_utf8(B64URL.decode(c.value()).ok()?).ok()?;
    match raw.split_once(':') {
        Some(("ok", m)) => Some(Flash::Ok(m.to_owned())),
        Some(("error", m)) => Some(Flash::Error(m.to_owned())),
        _ => None,
    }
}

/// The live session of this request's cookie, if any.
pub async fn session_of(vault: &Vault, req: &HttpRequest) -> Option<SessionRecord> {
    let c = request_cookie(req, SESSION_COOKIE)?;
    vault.session(c.value()).await.ok().flatten()
}

/// The Content-Security-Policy of every portal response. (No `form-action 'self'`: linking
/// posts a form whose answer redirects to the entity's sign-in, which it would block.)
const PORTAL_CSP: &str =
    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

/// Gives every portal response (and the OAuth callback's), not only its HTML pages, the
/// headers a page carries: redirects, refusals in plain text, the stylesheet, the export,
/// the router's own errors.
pub async fn portal_headers(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    // The path as sent and as the router reads it (percent-decoded: `/%70ortal/...`).
    let is_portal =
        |path: &str| path == "/" || path.starts_with("/portal") || path.starts_with("/v1/oauth/");
    let portal = is_portal(req.path()) || is_portal(req.match_info().as_str());
    let mut res = next.call(req).await?;
    if portal {
        let headers = res.headers_mut();
        for (name, value) in [
            (header::CONTENT_SECURITY_POLICY, PORTAL_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ] {
            if !headers.contains_key(&name) {
                headers.insert(name, header::HeaderValue::from_static(value));
            }
        }
    }
    Ok(res)
}

/// An HTML page, with the headers every portal page carries.
fn html(
    status: actix_web::http::StatusCode,
    req: &HttpRequest,
    body: maud::Markup,
) -> HttpResponse {
    let mut resp = HttpResponse::build(status);
    resp.content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, PORTAL_CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-store"));
    if request_cookie(req, FLASH_COOKIE).is_some() {
        let mut gone = Cookie::build(FLASH_COOKIE, "").path("/portal").finish();
        gone.make_removal();
        resp.cookie(gone);
    }
    resp.body(body.into_string())
}

fn page(
    req: &HttpRequest,
    title: &str,
    s: &SessionRecord,
    section: Section,
    content: maud::Markup,
) -> HttpResponse {
    let chrome = Chrome {
        email: Some(&s.email),
        csrf: &s.csrf,
        section,
        flash: take_flash(req),
    };
    html(
        actix_web::http::StatusCode::OK,
        req,
        pages::layout(title, &chrome, content),
    )
}

/// A submitted form, as ordered pairs.
struct Fields(Vec<(String, String)>);

impl Fields {
    fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }
}

/// Why a portal request was turned away before its handler ran.
#[derive(Debug, thiserror::Error)]
pub enum Reject {
    /// No live session: go and sign in.
    #[error("sign in first")]
    SignIn,
    /// The form's CSRF token is missing or not this session's.
    #[error("this form has expired or did not come from the portal (CSRF check failed)")]
    Csrf,
    /// The body is not a form.
    #[error("not a form: {0}")]
    Form(String),
}

impl actix_web::ResponseError for Reject {
    fn status_code(&self) -> actix_web::http::StatusCode {
        match self {
            Reject::SignIn => actix_web::http::StatusCode::SEE_OTHER,
            Reject::Csrf => actix_web::http::StatusCode::FORBIDDEN,
            Reject::Form(_) => actix_web::http::StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Reject::SignIn => see_other("/portal/signin"),
            other => HttpResponse::build(other.status_code())
                .content_type("text/plain; charset=utf-8")
                .body(format!("{other}. Go back, reload the page and try again.")),
        }
    }
}

/// The signed-in browser's session; without one, the request is sent to sign in.
pub struct Signed(pub SessionRecord);

impl actix_web::FromRequest for Signed {
    type Error = Reject;
    type Future = LocalBoxFuture<'static, Result<Self, Reject>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let vault = req.app_data::<web::Data<Vault>>().ok_or(Reject::SignIn)?;
            session_of(vault, &req)
                .await
                .map(Signed)
                .ok_or(Reject::SignIn)
        })
    }
}

/// A form from a signed-in browser carrying that session's CSRF token.
pub struct SignedForm {
    session: SessionRecord,
    fields: Fields,
}

impl actix_web::FromRequest for SignedForm {
    type Error = Reject;
    type Future = LocalBoxFuture<'static, Result<Self, Reject>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let form = web::Form::<Vec<(String, String)>>::from_request(req, payload);
        let req = req.clone();
        Box::pin(async move {
            let fields = Fields(
                form.await
                    .map_err(|e| Reject::Form(e.to_string()))?
                    .into_inner(),
            );
            let Signed(session) =
                Signed::from_request(&req, &mut actix_web::dev::Payload::None).await?;
            // Compare digests so the comparison's timing does not depend on the token.
            if sha(fields.get("csrf")) != sha(&session.csrf) {
                return Err(Reject::Csrf);
            }
            Ok(SignedForm { session, fields })
        })
    }
}

/// What a person is told: the refusal's own words; internals stay in the logs.
pub fn problem_text(e: &ServiceError) -> String {
    match e {
        ServiceError::Refused { detail, .. } => {
            let mut c = detail.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>() + ".")
                .unwrap_or_default()
        }
        other => {
            tracing::warn!(error = %other, "portal request failed");
            "The vault could not do this right now; please try again.".into()
        }
    }
}

// ---- accounts -----------------------------------------------------------------------------

async fn account_page(req: HttpRequest, signup: bool) -> HttpResponse {
    let csrf = custos_api::oauth::random_token(24);
    let chrome = Chrome {
        email: None,
        csrf: &csrf,
        section: Section::Account,
        flash: take_flash(&req),
    };
    let title = if signup { "Create account" } else { "Sign in" };
    let mut resp = html(
        actix_web::http::StatusCode::OK,
        &req,
        pages::layout(title, &chrome, pages::account_form(signup, &csrf, "")),
    );
    // Over HTTPS a `__Host-` cookie ([`secure_cookies`]): else a network attacker could set
    // it, and with it sign the customer into the attacker's account (login CSRF).
    let cookie = Cookie::build(FORM_COOKIE, csrf)
        .path("/portal")
        .http_only(true)
        .same_site(SameSite::Strict)
        .finish();
    let _ = resp.add_cookie(&cookie);
    resp
}

async fn signin_form(req: HttpRequest) -> HttpResponse {
    account_page(req, false).await
}

async fn signup_form(req: HttpRequest) -> HttpResponse {
    account_page(req, true).await
}

async fn account_submit(
    vault: web::Data<Vault>,
    portal: web::Data<Portal>,
    req: HttpRequest,
    form: web::Form<Vec<(String, String)>>,
    signup: bool,
) -> HttpResponse {
    let f = Fields(form.into_inner());
    let back = if signup {
        "/portal/signup"
    } else {
        "/portal/signin"
    };
    let form_cookie = request_cookie(&req, FORM_COOKIE)
        .map(|c| c.value().to_owned())
        .unwrap_or_default();
    if form_cookie.is_empty() || sha(&form_cookie) != sha(f.get("csrf")) {
        return see_other_flash(back, Err("The form expired; please try again.".into()));
    }
    let email = f.get("email").trim().to_lowercase();
    let addr = crate::forward::client_ip(&req)
        .map(client_key)
        .unwrap_or_default();
    // Every so often forget the keys whose quota has refilled: the limiter then holds only
    // keys attempted within the last minute, each a bounded email or an address.
    if portal
        .attempts
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(LIMITER_SWEEP)
    {
        portal.per_email.retain_recent();
        portal.per_address.retain_recent();
    }
    // Only a well-formed email (at most 254 bytes) becomes a key; others fail below anyway.
    let email_key = crate::service::portal::normalise_email(&email).ok();
    if portal.per_address.check_key(&addr).is_err()
        || email_key.is_some_and(|k| portal.per_email.check_key(&k).is_err())
    {
        return see_other_flash(
            back,
            Err("Too many attempts. Wait a minute and try again.".into()),
        );
    }
    let result = if signup {
        vault
            .sign_up(&email, f.get("password"), portal.session_ttl_ms)
            .await
    } else {
        vault
            .sign_in(&email, f.get("password"), portal.session_ttl_ms)
            .await
    };
    match result {
        Ok(signed) => {
            let mut resp = see_other("/portal");
            let _ = resp.add_cookie(&portal.cookie(
                SESSION_COOKIE,
                signed.token,
                portal.session_ttl_ms / 1000,
            ));
            resp
        }
        Err(e) => see_other_flash(back, Err(problem_text(&e))),
    }
}

async fn signin_submit(
    vault: web::Data<Vault>,
    portal: web::Data<Portal>,
    req: HttpRequest,
    form: web::Form<Vec<(String, String)>>,
) -> HttpResponse {
    account_submit(vault, portal, req, form, false).await
}

async fn signup_submit(
    vault: web::Data<Vault>,
    portal: web::Data<Portal>,
    req: HttpRequest,
    form: web::Form<Vec<(String, String)>>,
) -> HttpResponse {
    account_submit(vault, portal, req, form, true).await
}

fn signed_out(portal: &Portal, location: &str, message: &str) -> HttpResponse {
    let mut resp = see_other_flash(location, Ok(message.into()));
    let mut gone = portal.cookie(SESSION_COOKIE, String::new(), 0);
    gone.make_removal();
    let _ = resp.add_cookie(&gone);
    resp
}

async fn signout(
    vault: web::Data<Vault>,
    portal: web::Data<Portal>,
    req: HttpRequest,
    _form: SignedForm,
) -> HttpResponse {
    if let Some(c) = request_cookie(&req, SESSION_COOKIE) {
        if let Err(e) = vault.sign_out(c.value()).await {
            return see_other_flash("/portal", Err(problem_text(&e)));
        }
    }
    signed_out(&portal, "/portal/signin", "Signed out.")
}

async fn signout_everywhere(
    vault: web::Data<Vault>,
    portal: web::Data<Portal>,
    SignedForm { session: s, .. }: SignedForm,
) -> HttpResponse {
    match vault.sign_out_everywhere(&s.customer_id).await {
        Ok(()) => signed_out(&portal, "/portal/signin", "Signed out on every device."),
        Err(e) => see_other_flash("/portal/data", Err(problem_text(&e))),
    }
}

// ---- pages --------------------------------------------------------------------------------

async fn home(vault: web::Data<Vault>, req: HttpRequest, Signed(s): Signed) -> HttpResponse {
    let loaded = async {
        Ok::<_, ServiceError>((
            vault.customer(&s.customer_id).await?,
            vault.entities().await?,
            vault.rules(&s.customer_id).await?,
            vault.recommendations(&s.customer_id).await?,
        ))
    }
    .await;
    match loaded {
        Ok((c, entities, rules, recs)) => page(
            &req,
            "Overview",
            &s,
            Section::Home,
            pages::home(&c, &entities, &rules, &recs, &s.csrf),
        ),
        Err(e) => error_page(&req, &s, &e),
    }
}

fn error_page(req: &HttpRequest, s: &SessionRecord, e: &ServiceError) -> HttpResponse {
    let mut resp = page(
        req,
        "Something went wrong",
        s,
        Section::Home,
        maud::html! { h1 { "Something went wrong" } p { (problem_text(e)) } },
    );
    // The page is for people; its status is for everything else (proxies, logs, tests).
    resp.head_mut().status = actix_web::ResponseError::status_code(e);
    resp
}

/// `GET /portal/catalog` query.
#[derive(Debug, Deserialize)]
struct CatalogQuery {
    #[serde(default)]
    q: String,
}

async fn catalog(
    vault: web::Data<Vault>,
    req: HttpRequest,
    q: web::Query<CatalogQuery>,
    Signed(s): Signed,
) -> HttpResponse {
    let query: String = q.q.chars().take(100).collect();
    match async {
        Ok::<_, ServiceError>((
            vault.entities().await?,
            vault.customer(&s.customer_id).await?,
        ))
    }
    .await
    {
        Ok((entities, c)) => page(
            &req,
            "Companies",
            &s,
            Section::Catalog,
            pages::catalog(&entities, &c, &query, &s.csrf),
        ),
        Err(e) => error_page(&req, &s, &e),
    }
}

async fn link(
    vault: web::Data<Vault>,
    entity: web::Path<String>,
    SignedForm { session: s, .. }: SignedForm,
) -> HttpResponse {
    match vault.authorize_link(&s.customer_id, &entity, true).await {
        Ok(a) => see_other(&a.authorize_url),
        Err(e) => see_other_flash("/portal/catalog", Err(problem_text(&e))),
    }
}

async fn unlink(
    vault: web::Data<Vault>,
    entity: web::Path<String>,
    SignedForm { session: s, .. }: SignedForm,
) -> HttpResponse {
    match vault.unlink(&s.customer_id, &entity).await {
        Ok(()) => see_other_flash(
            "/portal/catalog",
            Ok(format!(
                "Unlinked {entity}: the vault no longer acts on its events for you."
            )),
        ),
        Err(e) => see_other_flash("/portal/catalog", Err(problem_text(&e))),
    }
}

/// Recent events to try a rule on: (event id, label).
async fn recent_events(vault: &Vault, customer: &str) -> Vec<(String, String)> {
    let Ok(page) = vault.activity(customer, None, ACTIVITY_PAGE).await else {
        return Vec::new();
    };
    page.items
        .into_iter()
        .filter_map(|i| match i.kind {
            ActivityKind::EventReceived {
                event_id,
                source,
                event_type,
                ..
            } => Some((
                event_id.clone(),
                format!(
                    "{} from {source} at {} ({event_id})",
                    pages::plain(&event_type),
                    i.at
                ),
            )),
            _ => None,
        })
        .take(20)
        .collect()
}

async fn rules_page(
    vault: &Vault,
    req: &HttpRequest,
    s: &SessionRecord,
    form: &RuleForm,
    tried: Option<&custos_api::types::TryOutcome>,
) -> HttpResponse {
    let loaded = async {
        Ok::<_, ServiceError>((
            vault.rules(&s.customer_id).await?,
            vault.entities().await?,
            vault.customer(&s.customer_id).await?,
        ))
    }
    .await;
    match loaded {
        Ok((rules, entities, c)) => {
            let recent = recent_events(vault, &s.customer_id).await;
            page(
                req,
                "Rules",
                s,
                Section::Rules,
                pages::rules(&rules, &entities, &c, &recent, form, tried, &s.csrf),
            )
        }
        Err(e) => error_page(req, s, &e),
    }
}

async fn rules(vault: web::Data<Vault>, req: HttpRequest, Signed(s): Signed) -> HttpResponse {
    rules_page(&vault, &req, &s, &RuleForm::default(), None).await
}

/// The builder's fields (to show again), and the rule they make or what is wrong with them.
fn rule_from_form(f: &Fields) -> (RuleForm, Result<RuleSpec, String>) {
    let mut form = RuleForm {
        name: f.get("name").to_owned(),
        trigger: f.get("trigger").to_owned(),
        condition: f.get("condition").trim().to_owned(),
        target: f.get("target").to_owned(),
        mapping: Vec::new(),
        event_id: f.get("event_id").to_owned(),
        sample: f.get("sample").to_owned(),
    };
    for i in 0..custos_api::limits::MAX_MAPPING_FIELDS {
        let (k, v) = (
            f.get(&format!("map_key_{i}")),
            f.get(&format!("map_expr_{i}")),
        );
        if !k.trim().is_empty() || !v.trim().is_empty() {
            form.mapping
                .push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let spec = rule_spec(&form);
    (form, spec)
}

fn rule_spec(form: &RuleForm) -> Result<RuleSpec, String> {
    let split = |v: &str| v.split_once('|').map(|(a, b)| (a.to_owned(), b.to_owned()));
    let (Some((when_entity, event_type)), Some((then_entity, command_type))) =
        (split(&form.trigger), split(&form.target))
    else {
        return Err("Pick a trigger and a command.".into());
    };
    let mut data = serde_json::Map::new();
    for (k, v) in &form.mapping {
        if k.is_empty() || v.is_empty() {
            return Err("Each data field needs a name and a value.".into());
        }
        data.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    Ok(RuleSpec {
        name: form.name.clone(),
        when: Trigger {
            entity: when_entity,
            event_type,
            condition: (!form.condition.is_empty()).then(|| form.condition.clone()),
        },
        then: Action {
            entity: then_entity,
            command_type,
            data: serde_json::Value::Object(data),
        },
    })
}

async fn rule_submit(
    vault: web::Data<Vault>,
    req: HttpRequest,
    SignedForm {
        session: s,
        fields: f,
    }: SignedForm,
) -> HttpResponse {
    let (rule_form, spec) = rule_from_form(&f);
    let spec = match spec {
        Ok(spec) => spec,
        Err(msg) => {
            let tried = custos_api::types::TryOutcome {
                matched: false,
                reason: Some(msg),
                event: serde_json::Value::Null,
                command: None,
            };
            return rules_page(&vault, &req, &s, &rule_form, Some(&tried)).await;
        }
    };
    if f.get("action") == "try" {
        let sample = if rule_form.sample.trim().is_empty() {
            None
        } else {
            match serde_json::from_str(&rule_form.sample) {
                Ok(v) => Some(v),
                Err(e) => {
                    let tried = custos_api::types::TryOutcome {
                        matched: false,
                        reason: Some(format!("The sample is not JSON: {e}")),
                        event: serde_json::Value::Null,
                        command: None,
                    };
                    return rules_page(&vault, &req, &s, &rule_form, Some(&tried)).await;
                }
            }
        };
        let request = TryRule {
            rule: spec,
            event_id: (!rule_form.event_id.is_empty()).then(|| rule_form.event_id.clone()),
            sample_data: sample,
        };
        let tried = match vault.try_rule(&s.customer_id, request).await {
            Ok(t) => t,
            Err(e) => custos_api::types::TryOutcome {
                matched: false,
                reason: Some(problem_text(&e)),
                event: serde_json::Value::Null,
                command: None,
            },
        };
        return rules_page(&vault, &req, &s, &rule_form, Some(&tried)).await;
    }
    match vault.create_rule(&s.customer_id, spec).await {
        Ok(r) => see_other_flash("/portal/rules", Ok(format!("Saved rule “{}”.", r.name))),
        Err(e) => {
            let tried = custos_api::types::TryOutcome {
                matched: false,
                reason: Some(format!("Not saved: {}", problem_text(&e))),
                event: serde_json::Value::Null,
                command: None,
            };
            rules_page(&vault, &req, &s, &rule_form, Some(&tried)).await
        }
    }
}

async fn rule_delete(
    vault: web::Data<Vault>,
    rule_id: web::Path<String>,
    SignedForm { session: s, .. }: SignedForm,
) -> HttpResponse {
    match vault.delete_rule(&s.customer_id, &rule_id).await {
        Ok(()) => see_other_flash("/portal/rules", Ok("Rule deleted.".into())),
        Err(e) => see_other_flash("/portal/rules", Err(problem_text(&e))),
    }
}

/// `GET /portal/activity` query.
#[derive(Debug, Deserialize)]
struct ActivityQuery {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    entity: String,
    /// Cursor of the next older page.
    before: Option<String>,
}

async fn activity(
    vault: web::Data<Vault>,
    req: HttpRequest,
    q: web::Query<ActivityQuery>,
    Signed(s): Signed,
) -> HttpResponse {
    let filter = pages::ActivityFilter {
        kind: q.kind.chars().take(20).collect(),
        entity: q.entity.chars().take(128).collect(),
    };
    let before = q
        .before
        .as_deref()
        .filter(|b| !b.is_empty() && b.len() <= 200);
    let loaded = async {
        Ok::<_, ServiceError>((
            vault
                .activity(&s.customer_id, before.map(str::to_owned), ACTIVITY_PAGE)
                .await?,
            vault.entities().await?,
            vault.rules(&s.customer_id).await?,
        ))
    }
    .await;
    let (items, entities, rules) = match loaded {
        Ok(v) => v,
        Err(e) => return error_page(&req, &s, &e),
    };
    let older = items.next.map(|cursor| {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("kind", &filter.kind)
            .append_pair("entity", &filter.entity)
            .append_pair("before", &cursor)
            .finish();
        format!("/portal/activity?{query}")
    });
    let shown = pages::timeline(items.items, &filter, before.is_none());
    page(
        &req,
        "Activity",
        &s,
        Section::Activity,
        pages::activity(
            &shown,
            &entities,
            &rules,
            &filter,
            older.as_deref(),
            &s.csrf,
        ),
    )
}

async fn retry(
    vault: web::Data<Vault>,
    command_id: web::Path<String>,
    SignedForm { session: s, .. }: SignedForm,
) -> HttpResponse {
    match vault.retry_own_delivery(&s.customer_id, &command_id).await {
        Ok(_) => see_other_flash("/portal/activity", Ok("Delivery queued again.".into())),
        Err(e) => see_other_flash("/portal/activity", Err(problem_text(&e))),
    }
}

async fn data(req: HttpRequest, Signed(s): Signed) -> HttpResponse {
    page(
        &req,
        "Your data",
        &s,
        Section::Data,
        pages::data(&s.csrf, &s.customer_id),
    )
}

async fn export(vault: web::Data<Vault>, req: HttpRequest, Signed(s): Signed) -> HttpResponse {
    match vault.export(&s.customer_id).await {
        Ok(x) => HttpResponse::Ok()
            .insert_header((
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"custos-export.json\"",
            ))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(x),
        Err(e) => error_page(&req, &s, &e),
    }
}

async fn delete(
    vault: web::Data<Vault>,
    portal: web::Data<Portal>,
    SignedForm {
        session: s,
        fields: f,
    }: SignedForm,
) -> HttpResponse {
    if f.get("confirm").trim() != "DELETE" {
        return see_other_flash("/portal/data", Err("Type DELETE to confirm.".into()));
    }
    match vault.erase_customer(&s.customer_id).await {
        Ok(()) => signed_out(
            &portal,
            "/portal/signup",
            "Your vault was deleted. Nothing about you remains.",
        ),
        Err(e) => see_other_flash("/portal/data", Err(problem_text(&e))),
    }
}

async fn recommendation(
    vault: web::Data<Vault>,
    path: web::Path<(String, String)>,
    SignedForm { session: s, .. }: SignedForm,
) -> HttpResponse {
    let (rec_id, verb) = path.into_inner();
    let done = match verb.as_str() {
        "accept" => vault
            .accept_recommendation(&s.customer_id, &rec_id)
            .await
            .map(|r| format!("Added rule “{}”.", r.name)),
        "dismiss" => vault
            .dismiss_recommendation(&s.customer_id, &rec_id)
            .await
            .map(|()| "Dismissed; it will not be recommended again.".to_owned()),
        // Needs one more link: the entity's sign-in first, the rule when the customer is back.
        "link" => match vault.link_then_accept(&s.customer_id, &rec_id).await {
            Ok(a) => return see_other(&a.authorize_url),
            Err(e) => Err(e),
        },
        _ => return HttpResponse::NotFound().finish(),
    };
    see_other_flash("/portal", done.map_err(|e| problem_text(&e)))
}

async fn stylesheet() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .body(include_str!("portal.css"))
}

/// Registers the portal's routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::FormConfig::default().limit(MAX_FORM_BYTES))
        .route("/", web::get().to(|| async { see_other("/portal") }))
        .route("/portal/static/portal.css", web::get().to(stylesheet))
        .route("/portal", web::get().to(home))
        .route("/portal/signin", web::get().to(signin_form))
        .route("/portal/signin", web::post().to(signin_submit))
        .route("/portal/signup", web::get().to(signup_form))
        .route("/portal/signup", web::post().to(signup_submit))
        .route("/portal/signout", web::post().to(signout))
        .route(
            "/portal/signout-everywhere",
            web::post().to(signout_everywhere),
        )
        .route("/portal/catalog", web::get().to(catalog))
        .route("/portal/link/{entity}", web::post().to(link))
        .route("/portal/unlink/{entity}", web::post().to(unlink))
        .route("/portal/rules", web::get().to(rules))
        .route("/portal/rules", web::post().to(rule_submit))
        .route("/portal/rules/{id}/delete", web::post().to(rule_delete))
        .route("/portal/activity", web::get().to(activity))
        .route("/portal/deliveries/{id}/retry", web::post().to(retry))
        .route("/portal/data", web::get().to(data))
        .route("/portal/export.json", web::get().to(export))
        .route("/portal/delete", web::post().to(delete))
        .route(
            "/portal/recommendations/{id}/{verb}",
            web::post().to(recommendation),
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        Fields(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn the_builder_form_becomes_a_rule_spec() {
        let f = fields(&[
            ("name", "Hold my room"),
            ("trigger", "airline|flight.delayed"),
            ("condition", " data.delay_minutes > 60 "),
            ("target", "hotel|room.hold"),
            ("map_key_0", "arrival"),
            ("map_expr_0", "data.new_arrival"),
            ("map_key_1", ""),
            ("map_expr_1", ""),
        ]);
        let spec = rule_from_form(&f).1.expect("valid");
        assert_eq!(spec.when.entity, "airline");
        assert_eq!(
            spec.when.condition.as_deref(),
            Some("data.delay_minutes > 60")
        );
        assert_eq!(spec.then.command_type, "room.hold");
        assert_eq!(
            spec.then.data,
            serde_json::json!({"arrival": "data.new_arrival"})
        );
        let half = fields(&[
            ("trigger", "airline|flight.delayed"),
            ("target", "hotel|room.hold"),
            ("map_key_0", "arrival"),
        ]);
        assert!(rule_from_form(&half).1.is_err());
        assert!(rule_from_form(&fields(&[("trigger", "x")])).1.is_err());
    }

    #[test]
    fn rate_limit_keys_group_ipv6_by_64_and_unmap_ipv4() {
        let key = |s: &str| client_key(s.parse().expect("ip"));
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[actix_web::test]
    async fn every_cookie_is_secure_when_the_vault_is_served_over_https() {
        use actix_web::{middleware::from_fn, test, App};
        for secure in [true, false] {
            let portal =
                web::Data::from(Portal::new(&crate::config::PortalConfig::default(), secure));
            let app = test::init_service(
                App::new()
                    .app_data(portal)
                    .wrap(from_fn(secure_cookies))
                    .wrap(from_fn(portal_headers))
                    .route(
                        "/",
                        web::get().to(|| async { see_other_flash("/portal", Ok("Hi".into())) }),
                    ),
            )
            .await;
            let res =
                test::call_service(&app, test::TestRequest::get().uri("/").to_request()).await;
            let hsts = res
                .headers()
                .get(header::STRICT_TRANSPORT_SECURITY)
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            assert_eq!(hsts.is_some(), secure, "{hsts:?}");
            let cookie = res.response().cookies().next().expect("the flash cookie");
            let name = if secure {
                format!("__Host-{FLASH_COOKIE}")
            } else {
                FLASH_COOKIE.to_owned()
            };
            assert_eq!(cookie.name(), name);
            assert_eq!(cookie.secure(), secure.then_some(true), "secure = {secure}");
            assert_eq!(cookie.http_only(), Some(true));
            if secure {
                // A `__Host-` cookie is taken by browsers only with path `/` and no domain.
                assert_eq!(cookie.path(), Some("/"));
                assert_eq!(cookie.domain(), None);
            }
        }
    }

    #[test]
    fn over_https_only_the_host_prefixed_cookie_is_read() {
        let planted = Cookie::new(FLASH_COOKIE, B64URL.encode("ok:planted"));
        let own = Cookie::new(format!("__Host-{FLASH_COOKIE}"), B64URL.encode("ok:own"));
        for (secure, expected) in [(true, "own"), (false, "planted")] {
            let portal = Portal::new(&crate::config::PortalConfig::default(), secure);
            let req = actix_web::test::TestRequest::default()
                .app_data(web::Data::from(portal))
                .cookie(planted.clone())
                .cookie(own.clone())
                .to_http_request();
            assert_eq!(
                take_flash(&req),
                Some(Flash::Ok(expected.into())),
                "{secure}"
            );
        }
    }

    #[test]
    fn flash_messages_survive_the_cookie() {
        let resp = see_other_flash("/portal", Err("Nope: état & co".into()));
        let cookie = resp.cookies().next().expect("cookie");
        let req = actix_web::test::TestRequest::default()
            .cookie(Cookie::new(FLASH_COOKIE, cookie.value().to_owned()))
            .to_http_request();
        assert_eq!(
            take_flash(&req),
            Some(Flash::Error("Nope: état & co".into()))
        );
    }
}
