//! An OpenID provider the tests steer: real discovery, JWKS and token endpoints on loopback,
//! whose token answers can be made wrong on purpose (wrong audience, expired, signed by
//! another key, another issuer, 10 MB), and which records every code it is sent, so a test
//! can show that a code never reached it.

use std::sync::{Arc, Mutex};

use actix_web::{web, HttpRequest, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING as ALG};

/// What the token endpoint answers next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A valid ID token for the subject.
    Valid,
    /// `aud` is another client.
    WrongAudience,
    /// Expired an hour ago.
    Expired,
    /// Signed by a key the provider does not publish, under a published key id.
    BadSignature,
    /// `iss` is another issuer.
    WrongIssuer,
    /// The nonce of another linking.
    WrongNonce,
    /// No ID token at all.
    NoIdToken,
    /// 10 MB of JSON-looking bytes.
    TenMegabytes,
    /// `invalid_grant`, with a description.
    Refuse,
}

struct State {
    issuer: String,
    answer: Answer,
    subject: String,
    /// The nonce of the linking being finished (a test copies it from the authorize URL).
    nonce: String,
    /// Codes the token endpoint was sent.
    codes: Vec<String>,
    /// Client ids and secrets it was sent (from HTTP Basic or the form).
    clients: Vec<(String, String)>,
    metadata_bytes: Option<usize>,
}

struct Keys {
    kid: String,
    signing: Vec<u8>,
    other: Vec<u8>,
    jwk: serde_json::Value,
}

/// A running provider; stops when dropped.
pub struct Provider {
    /// Its issuer identifier (`http://127.0.0.1:port`).
    pub issuer: String,
    state: Arc<Mutex<State>>,
    handle: actix_web::dev::ServerHandle,
}

fn pkcs8() -> anyhow::Result<Vec<u8>> {
    let rng = ring::rand::SystemRandom::new();
    Ok(EcdsaKeyPair::generate_pkcs8(&ALG, &rng)
        .map_err(|_| anyhow::anyhow!("key generation"))?
        .as_ref()
        .to_vec())
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

async fn metadata(state: web::Data<Mutex<State>>) -> HttpResponse {
    let s = lock(&state);
    if let Some(n) = s.metadata_bytes {
        return HttpResponse::Ok()
            .content_type("application/json")
            .body(vec![b' '; n]);
    }
    let b = &s.issuer;
    HttpResponse::Ok().json(serde_json::json!({
        "issuer": b,
        "authorization_endpoint": format!("{b}/authorize"),
        "token_endpoint": format!("{b}/token"),
        "jwks_uri": format!("{b}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
        "authorization_response_iss_parameter_supported": true,
    }))
}

async fn jwks(keys: web::Data<Keys>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "keys": [keys.jwk] }))
}

async fn token(
    req: HttpRequest,
    form: web::Form<Vec<(String, String)>>,
    state: web::Data<Mutex<State>>,
    keys: web::Data<Keys>,
) -> HttpResponse {
    let field = |n: &str| {
        form.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut s = lock(&state);
    s.codes.push(field("code"));
    let basic = req.headers().get("authorization").is_some();
    s.clients.push(if basic {
        ("<basic>".into(), String::new())
    } else {
        (field("client_id"), field("client_secret"))
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let mut claims = serde_json::json!({
        "iss": s.issuer, "aud": field("client_id"), "sub": s.subject,
        "nonce": s.nonce, "iat": now, "exp": now + 300,
    });
    let mut key = &keys.signing;
    match s.answer {
        Answer::WrongAudience => claims["aud"] = "another-client".into(),
        Answer::Expired => {
            claims["iat"] = (now - 3700).into();
            claims["exp"] = (now - 3600).into();
        }
        Answer::BadSignature => key = &keys.other,
        Answer::WrongIssuer => claims["iss"] = "https://impostor.example".into(),
        Answer::WrongNonce => claims["nonce"] = "a-nonce-of-another-linking".into(),
        Answer::TenMegabytes => {
            let mut body = b"{\"access_token\":\"".to_vec();
            body.resize(10 * 1024 * 1024, b'a');
            return HttpResponse::Ok()
                .content_type("application/json")
                .body(body);
        }
        Answer::Refuse => {
            return HttpResponse::BadRequest().json(serde_json::json!({
                "error": "invalid_grant", "error_description": "the code was already used",
            }))
        }
        Answer::Valid | Answer::NoIdToken => {}
    }
    let mut answer = serde_json::json!({"access_token": "at-1", "token_type": "Bearer"});
    if s.answer != Answer::NoIdToken {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(keys.kid.clone());
        match jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(key),
        ) {
            Ok(jwt) => answer["id_token"] = jwt.into(),
            Err(e) => return HttpResponse::InternalServerError().body(e.to_string()),
        }
    }
    HttpResponse::Ok().json(answer)
}

impl Provider {
    /// Starts a provider on loopback answering valid ID tokens for `subject`.
    pub fn start(subject: &str) -> anyhow::Result<Provider> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let issuer = format!("http://{}", listener.local_addr()?);
        let signing = pkcs8()?;
        let pair = EcdsaKeyPair::from_pkcs8(&ALG, &signing, &ring::rand::SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("key"))?;
        let point = pair.public_key().as_ref().to_vec();
        let kid = "k1".to_owned();
        let keys = web::Data::new(Keys {
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..65]),
            }),
            kid,
            signing,
            other: pkcs8()?,
        });
        let state = Arc::new(Mutex::new(State {
            issuer: issuer.clone(),
            answer: Answer::Valid,
            subject: subject.to_owned(),
            nonce: String::new(),
            codes: Vec::new(),
            clients: Vec::new(),
            metadata_bytes: None,
        }));
        let data = web::Data::from(state.clone());
        let handle = crate::receiver::serve_in_thread(listener, move |cfg| {
            cfg.app_data(data.clone())
                .app_data(keys.clone())
                .route("/.well-known/openid-configuration", web::get().to(metadata))
                .route("/jwks", web::get().to(jwks))
                .route("/token", web::post().to(token));
        })?;
        Ok(Provider {
            issuer,
            state,
            handle,
        })
    }

    /// What the token endpoint answers from now on, for the linking whose authorize URL
    /// carried `nonce`.
    pub fn answer(&self, answer: Answer, nonce: &str) {
        let mut s = lock(&self.state);
        s.answer = answer;
        s.nonce = nonce.to_owned();
    }

    /// Serves `n` bytes as its metadata document (or the real one with `None`).
    pub fn metadata_of_size(&self, n: Option<usize>) {
        lock(&self.state).metadata_bytes = n;
    }

    /// Codes the token endpoint was sent so far.
    pub fn codes(&self) -> Vec<String> {
        lock(&self.state).codes.clone()
    }

    /// Client credentials the token endpoint was sent so far (`client_secret_post`).
    pub fn clients(&self) -> Vec<(String, String)> {
        lock(&self.state).clients.clone()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        std::thread::spawn(move || actix_rt::System::new().block_on(handle.stop(false)));
    }
}
