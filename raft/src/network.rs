//! The peer RPC client openraft drives: HTTP POSTs of codec-encoded requests to the peer
//! port (`/raft/{group}/{append|vote|snapshot}`), apart from the client API.
//!
//! Every group shares one [`Peers`] client (pooled connections per peer), and every request
//! carries the token derived from the cluster secret ([`PEER_AUTH_HEADER`]); with peer TLS
//! configured, requests go over HTTPS to certificates signed by the cluster's CA.
//!
//! The serving side lives in the node (it owns the HTTP server); both use [`encode_reply`] /
//! [`decode_reply`] so the bytes are defined in one place.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, CodecError};
use crate::types::{GroupId, NodeId, TypeConfig};

/// Largest peer message a node accepts (snapshot chunks are smaller). An append that would
/// encode larger is not sent: openraft is told to send fewer entries at a time instead (it
/// sends up to 300, and entries hold up to 4 MiB), else a replica that fell that far behind
/// would be refused the same batch for ever.
pub const MAX_PEER_MESSAGE: usize = 64 << 20;

/// Peer RPC path for a group and verb.
pub fn rpc_path(group: GroupId, verb: &str) -> String {
    format!("/raft/{group}/{verb}")
}

/// Encodes a handler's reply (`Ok` response or openraft error).
pub fn encode_reply<T: Serialize, E: Serialize>(
    reply: &Result<T, E>,
) -> Result<Vec<u8>, CodecError> {
    codec::encode(reply)
}

/// Decodes a reply written by [`encode_reply`].
pub fn decode_reply<T: DeserializeOwned, E: DeserializeOwned>(
    bytes: &[u8],
) -> Result<Result<T, E>, CodecError> {
    codec::decode(bytes)
}

/// The header carrying the peer token on every peer request.
pub const PEER_AUTH_HEADER: &str = "x-custos-peer-auth";

/// The node's one client for talking to peers: pooled connections, the peer token, and the
/// scheme (HTTPS when peer TLS is configured). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Peers {
    http: reqwest::Client,
    token: std::sync::Arc<str>,
    scheme: &'static str,
}

impl Peers {
    /// A client sending `token`; over HTTPS trusting `ca_pem` when given.
    pub fn new(token: String, ca_pem: Option<&[u8]>) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            // Peers are reached directly: an HTTP_PROXY in the node's environment must not
            // carry (or refuse) the cluster's Raft traffic.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        let scheme = match ca_pem {
            Some(pem) => {
                let ca = reqwest::Certificate::from_pem(pem).map_err(|e| e.to_string())?;
                b = b.add_root_certificate(ca).tls_built_in_root_certs(false);
                "https"
            }
            None => "http",
        };
        Ok(Peers {
            http: b.build().map_err(|e| e.to_string())?,
            token: token.into(),
            scheme,
        })
    }

    /// A POST to `path` at the peer `addr`, authenticated.
    pub fn post(&self, addr: &str, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, addr, path)
    }

    /// A request to `path` at the peer `addr`, authenticated.
    pub fn request(
        &self,
        method: reqwest::Method,
        addr: &str,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}://{addr}{path}", self.scheme))
            .header(PEER_AUTH_HEADER, &*self.token)
    }
}

/// Makes a [`PeerClient`] per target node.
#[derive(Debug, Clone)]
pub struct PeerNetwork {
    group: GroupId,
    peers: Peers,
}

impl PeerNetwork {
    /// A network for `group` over the node's peer client.
    pub fn new(group: GroupId, peers: Peers) -> Self {
        PeerNetwork { group, peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            group: self.group,
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
        }
    }
}

/// Sends one group's RPCs to one peer.
#[derive(Debug)]
pub struct PeerClient {
    group: GroupId,
    target: NodeId,
    addr: String,
    peers: Peers,
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        verb: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let body = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.send(verb, body, option).await
    }

    async fn send<Resp, E>(
        &self,
        verb: &str,
        body: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let resp = self
            .peers
            .post(&self.addr, &rpc_path(self.group, verb))
            .timeout(option.hard_ttl())
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        if !resp.status().is_success() {
            let err = std::io::Error::other(format!("peer answered {}", resp.status()));
            return Err(RPCError::Network(NetworkError::new(&err)));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply: Result<Resp, E> =
            decode_reply(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// How many of `entries` entries that encoded to `bytes` openraft should send at a time so a
/// message fits [`MAX_PEER_MESSAGE`] (with room for entries larger than their average).
fn fewer_entries(entries: usize, bytes: usize) -> PayloadTooLarge {
    let fit = entries.saturating_mul(MAX_PEER_MESSAGE / 2) / bytes.max(1);
    PayloadTooLarge::new_entries_hint(fit.clamp(1, entries.saturating_sub(1).max(1)) as u64)
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let body = codec::encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if body.len() > MAX_PEER_MESSAGE {
            return Err(RPCError::PayloadTooLarge(fewer_entries(
                rpc.entries.len(),
                body.len(),
            )));
        }
        self.send("append", body, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_too_large_for_a_peer_asks_for_fewer_entries_that_fit() {
        const MIB: usize = 1 << 20;
        // openraft's 300 entries of 4 MiB each: 8 at a time (32 MiB).
        assert_eq!(fewer_entries(300, 300 * 4 * MIB).entries_hint(), 8);
        // Just over the limit: about half.
        assert_eq!(fewer_entries(300, 65 * MIB).entries_hint(), 147);
        // Never zero, and always fewer than were tried.
        assert_eq!(fewer_entries(1, 100 * MIB).entries_hint(), 1);
        assert_eq!(fewer_entries(2, 65 * MIB).entries_hint(), 1);
    }
}
