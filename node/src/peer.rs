//! The peer port: Raft RPCs from other nodes, apart from the client API.

use actix_web::{web, HttpResponse};
use custos_raft::network::encode_reply;
use custos_raft::{codec, Raft};
use serde::de::DeserializeOwned;

/// Largest peer message (snapshot chunks are smaller).
pub const MAX_PEER_BODY: usize = 64 << 20;

fn reply<T: serde::Serialize, E: serde::Serialize>(r: &Result<T, E>) -> HttpResponse {
    match encode_reply(r) {
        Ok(bytes) => HttpResponse::Ok()
            .content_type("application/octet-stream")
            .body(bytes),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, HttpResponse> {
    codec::decode(body).map_err(|e| HttpResponse::BadRequest().body(e.to_string()))
}

fn group_raft(raft: &web::Data<Raft>, group: u32) -> Result<&Raft, HttpResponse> {
    // One data group per node for now; more groups add a lookup here.
    if group == crate::DATA_GROUP {
        Ok(raft.get_ref())
    } else {
        Err(HttpResponse::NotFound().body(format!("no group {group} here")))
    }
}

async fn append(raft: web::Data<Raft>, group: web::Path<u32>, body: web::Bytes) -> HttpResponse {
    let run = async {
        let raft = group_raft(&raft, *group)?;
        let req = decode(&body)?;
        Ok::<_, HttpResponse>(reply(&raft.append_entries(req).await))
    };
    run.await.unwrap_or_else(|e| e)
}

async fn vote(raft: web::Data<Raft>, group: web::Path<u32>, body: web::Bytes) -> HttpResponse {
    let run = async {
        let raft = group_raft(&raft, *group)?;
        let req = decode(&body)?;
        Ok::<_, HttpResponse>(reply(&raft.vote(req).await))
    };
    run.await.unwrap_or_else(|e| e)
}

async fn snapshot(raft: web::Data<Raft>, group: web::Path<u32>, body: web::Bytes) -> HttpResponse {
    let run = async {
        let raft = group_raft(&raft, *group)?;
        let req = decode(&body)?;
        Ok::<_, HttpResponse>(reply(&raft.install_snapshot(req).await))
    };
    run.await.unwrap_or_else(|e| e)
}

/// Registers the peer routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_PEER_BODY))
        .route("/raft/{group}/append", web::post().to(append))
        .route("/raft/{group}/vote", web::post().to(vote))
        .route("/raft/{group}/snapshot", web::post().to(snapshot));
}
