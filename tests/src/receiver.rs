//! A real HTTP endpoint playing an entity's command receiver.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

use crate::poll;

/// Serves `configure`'s routes on `listener` from a thread of its own (one worker, no signal
/// handling, so the test's Ctrl-C still stops the test); answers the handle that stops it.
pub fn serve_in_thread<F>(
    listener: std::net::TcpListener,
    configure: F,
) -> anyhow::Result<actix_web::dev::ServerHandle>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let server = HttpServer::new(move || App::new().configure(configure.clone()))
                .workers(1)
                .disable_signals()
                .listen(listener);
            match server {
                Ok(s) => {
                    let s = s.run();
                    let _ = tx.send(Ok(s.handle()));
                    let _ = s.await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
    });
    Ok(rx.recv()??)
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// `webhook-id`.
    pub webhook_id: String,
    /// `webhook-timestamp`.
    pub timestamp: String,
    /// `webhook-signature`.
    pub signature: String,
    /// `content-type`.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
    /// What the receiver answered.
    pub answered: u16,
    /// When it arrived.
    pub at: std::time::Instant,
    /// When the answer was sent (after any hold; None while held).
    pub replied: Option<std::time::Instant>,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<u16>,
    default_status: u16,
    received: Vec<Received>,
    /// How long each request is held before it is answered.
    hold: Duration,
}

/// A running receiver; stops when dropped.
pub struct Receiver {
    /// Its URL (POST anything under it).
    pub url: String,
    state: Arc<Mutex<State>>,
    handle: actix_web::dev::ServerHandle,
}

async fn receive(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<Mutex<State>>,
) -> HttpResponse {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (status, index, hold) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let status = s.script.pop_front().unwrap_or(s.default_status);
        s.received.push(Received {
            webhook_id: h("webhook-id"),
            timestamp: h("webhook-timestamp"),
            signature: h("webhook-signature"),
            content_type: h("content-type"),
            body: body.to_vec(),
            answered: status,
            at: std::time::Instant::now(),
            replied: None,
        });
        (status, s.received.len() - 1, s.hold)
    };
    if !hold.is_zero() {
        actix_rt::time::sleep(hold).await;
    }
    if let Some(r) = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .received
        .get_mut(index)
    {
        r.replied = Some(std::time::Instant::now());
    }
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or_default()).finish()
}

impl Receiver {
    /// Starts a receiver on loopback that answers `script` in order, then `default_status`.
    pub fn start(script: Vec<u16>, default_status: u16) -> anyhow::Result<Receiver> {
        Self::start_on("127.0.0.1:0", script, default_status)
    }

    /// Starts a receiver on `addr` (a network's host address, for nodes in namespaces).
    pub fn start_on(addr: &str, script: Vec<u16>, default_status: u16) -> anyhow::Result<Receiver> {
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            default_status,
            received: Vec::new(),
            hold: Duration::ZERO,
        }));
        let listener = std::net::TcpListener::bind(addr)?;
        let url = format!("http://{}/commands", listener.local_addr()?);
        let data = web::Data::from(state.clone());
        let handle = serve_in_thread(listener, move |cfg| {
            cfg.app_data(data.clone()).default_service(web::to(receive));
        })?;
        Ok(Receiver { url, state, handle })
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .received
            .clone()
    }

    /// Changes what is answered from now on (after any script).
    pub fn set_status(&self, status: u16) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .default_status = status;
    }

    /// True when the first request was answered by `at` (so an attempt that sent it had
    /// finished sending).
    pub fn first_answered_by(&self, at: std::time::Instant) -> bool {
        self.received()
            .first()
            .and_then(|r| r.replied)
            .is_some_and(|r| r <= at)
    }

    /// Holds each request from now on for `hold` before answering it (a slow target).
    pub fn set_hold(&self, hold: Duration) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).hold = hold;
    }

    /// Waits until at least `n` requests were answered with 2xx.
    pub async fn wait_delivered(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        poll::until(&format!("{n} delivered commands"), timeout, || {
            let got: Vec<Received> = self
                .received()
                .into_iter()
                .filter(|r| (200..300).contains(&r.answered))
                .collect();
            async move { (got.len() >= n).then_some(got) }
        })
        .await
    }

    /// Waits until at least `n` requests arrived, whatever was answered.
    pub async fn wait_received(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        poll::until(&format!("{n} requests"), timeout, || {
            let got = self.received();
            async move { (got.len() >= n).then_some(got) }
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Stop without waiting; the thread ends with its system.
        let h = self.handle.clone();
        std::thread::spawn(move || {
            let rt = actix_rt::System::new();
            rt.block_on(h.stop(false));
        });
    }
}
