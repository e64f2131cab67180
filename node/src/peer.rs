//! The peer port: Raft RPCs from other nodes, apart from the client API.

use actix_web::{web, HttpResponse, ResponseError};
use custos_raft::network::encode_reply;
use custos_raft::{codec, Raft};

/// Largest peer message (snapshot chunks are smaller).
pub const MAX_PEER_BODY: usize = 64 << 20;

/// Why a peer request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The body is not a request of this format version.
    #[error("undecodable peer request: {0}")]
    Decode(#[from] custos_raft::codec::CodecError),
    /// This node has no such group.
    #[error("no group {0} here")]
    NoGroup(u32),
}

impl ResponseError for PeerError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        match self {
            PeerError::Decode(_) => actix_web::http::StatusCode::BAD_REQUEST,
            PeerError::NoGroup(_) => actix_web::http::StatusCode::NOT_FOUND,
        }
    }
}

fn reply<T: serde::Serialize, E: serde::Serialize>(r: &Result<T, E>) -> HttpResponse {
    match encode_reply(r) {
        Ok(bytes) => HttpResponse::Ok()
            .content_type("application/octet-stream")
            .body(bytes),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

fn group_raft(raft: &web::Data<Raft>, group: u32) -> Result<&Raft, PeerError> {
    // One data group per node for now; more groups add a lookup here.
    if group == crate::DATA_GROUP {
        Ok(raft.get_ref())
    } else {
        Err(PeerError::NoGroup(group))
    }
}

async fn append(
    raft: web::Data<Raft>,
    group: web::Path<u32>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    let raft = group_raft(&raft, *group)?;
    Ok(reply(&raft.append_entries(codec::decode(&body)?).await))
}

async fn vote(
    raft: web::Data<Raft>,
    group: web::Path<u32>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    let raft = group_raft(&raft, *group)?;
    Ok(reply(&raft.vote(codec::decode(&body)?).await))
}

async fn snapshot(
    raft: web::Data<Raft>,
    group: web::Path<u32>,
    body: web::Bytes,
) -> Result<HttpResponse, PeerError> {
    let raft = group_raft(&raft, *group)?;
    Ok(reply(&raft.install_snapshot(codec::decode(&body)?).await))
}

/// Registers the peer routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_PEER_BODY))
        .route("/raft/{group}/append", web::post().to(append))
        .route("/raft/{group}/vote", web::post().to(vote))
        .route("/raft/{group}/snapshot", web::post().to(snapshot));
}
