//! Cluster membership (#18): with a cluster key, a peer is served only once
//! it has proven that it holds the key.
//!
//! Right after a first connection is up (QUIC or TCP, both already
//! authenticated by their libp2p peer ids), the two peers run a
//! challenge-response over `/llama-cluster/membership/1.0`; C is the one
//! with the smaller peer id (so that two peers dialing each other at once
//! run one handshake), R the other:
//!
//! 1. C → R: `Challenge { nonce_c }`
//! 2. R → C: `Challenged { mac(R, C, nonce_c), nonce_r }`
//! 3. C → R: `Prove { mac(C, R, nonce_r) }`
//! 4. R → C: `Accepted`
//!
//! `mac(prover, verifier, nonce)` is BLAKE3 keyed with a key derived from
//! the cluster key and the cluster name, over both peer ids and the nonce:
//! an answer is bound to this pair of peers and cannot be replayed to
//! another. Each side admits the other as soon as it has checked its proof
//! (C at 2, R at 3); what R sends from then on may reach C before C has
//! processed 2, so the gates hold such events for the handshake's time.
//!
//! Until a peer is admitted, every behaviour that serves or learns from it
//! ([`Gated`]: Kademlia, rendezvous, JSON messages, shard pieces) gets none
//! of the events its connections raise: requests go unanswered, records
//! are neither read nor stored. Activation streams are refused where they
//! are accepted (`links`). A peer that has not proven the key within
//! [`PROOF_TIMEOUT`], or proves a wrong one, is disconnected.
//!
//! Without a key the cluster runs open: every peer counts as admitted.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, StreamProtocol, request_response};
use serde::{Deserialize, Serialize};

/// The handshake's protocol.
pub const MEMBERSHIP_PROTOCOL: &str = "/llama-cluster/membership/1.0";

/// How long a new peer has to prove the key.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(5);

/// The first line of the key file (the swarm.key format of IPFS private
/// networks, so the same file can serve a libp2p pnet).
const KEY_HEADER: &str = "/key/swarm/psk/1.0.0/";

/// Why a cluster key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the cluster key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the cluster key must be 64 hex digits (32 bytes), alone or after the lines {KEY_HEADER} and /base16/ (`llama-worker keygen` writes one)"
    )]
    Malformed,
    #[error("no random bytes from the operating system: {0}")]
    Random(String),
}

/// A cluster's shared secret.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(…)")
    }
}

impl ClusterKey {
    /// A new random key.
    pub fn generate() -> Result<ClusterKey, KeyError> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(ClusterKey(k))
    }

    /// Reads a key: 64 hex digits, alone or in the swarm.key format.
    pub fn parse(text: &str) -> Result<ClusterKey, KeyError> {
        let hex_line = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != KEY_HEADER && *l != "/base16/")
            .collect::<Vec<_>>();
        let [line] = hex_line.as_slice() else {
            return Err(KeyError::Malformed);
        };
        let mut k = [0u8; 32];
        hex::decode_to_slice(line, &mut k).map_err(|_| KeyError::Malformed)?;
        Ok(ClusterKey(k))
    }

    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        ClusterKey::parse(&text)
    }

    /// The configured key: `cluster_key_file`, `cluster_key`, then the
    /// environment's `LLAMA_CLUSTER_KEY_FILE` and `LLAMA_CLUSTER_KEY`;
    /// `None` when none is set (an open cluster).
    pub fn configured(
        cfg: &llama_cluster_shared::config::NodeConfig,
    ) -> Result<Option<ClusterKey>, KeyError> {
        let env = |k: &str| std::env::var(k).unwrap_or_default();
        let (file, inline) = (env("LLAMA_CLUSTER_KEY_FILE"), env("LLAMA_CLUSTER_KEY"));
        if !cfg.cluster_key_file.is_empty() {
            return ClusterKey::load(Path::new(&cfg.cluster_key_file)).map(Some);
        }
        if !cfg.cluster_key.is_empty() {
            return ClusterKey::parse(&cfg.cluster_key).map(Some);
        }
        if !file.is_empty() {
            return ClusterKey::load(Path::new(&file)).map(Some);
        }
        if !inline.is_empty() {
            return ClusterKey::parse(&inline).map(Some);
        }
        Ok(None)
    }

    /// The key file's text.
    pub fn to_file_text(&self) -> String {
        format!("{KEY_HEADER}\n/base16/\n{}\n", hex::encode(self.0))
    }

    /// What `prover` sends to show `verifier` that it holds the key.
    fn mac(&self, cluster: &str, prover: &PeerId, verifier: &PeerId, nonce: &[u8]) -> [u8; 32] {
        let mut kdf = blake3::Hasher::new_derive_key("llama-cluster membership 1");
        kdf.update(&self.0);
        kdf.update(cluster.as_bytes());
        let key: [u8; 32] = *kdf.finalize().as_bytes();
        let mut h = blake3::Hasher::new_keyed(&key);
        for part in [prover.to_bytes(), verifier.to_bytes()] {
            h.update(&(part.len() as u32).to_le_bytes());
            h.update(&part);
        }
        h.update(nonce);
        *h.finalize().as_bytes()
    }
}

/// The handshake's requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipRequest {
    Challenge { nonce: String },
    Prove { mac: String },
}

/// The handshake's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipResponse {
    Challenged { mac: String, nonce: String },
    Accepted,
    Denied { reason: String },
}

/// The handshake's behaviour (small JSON messages).
pub type MembershipBehaviour =
    request_response::json::Behaviour<MembershipRequest, MembershipResponse>;

pub fn membership_behaviour() -> MembershipBehaviour {
    // Requests and answers are a few hundred bytes.
    let codec = request_response::json::codec::Codec::default()
        .set_request_size_maximum(1024)
        .set_response_size_maximum(1024);
    MembershipBehaviour::with_codec(
        codec,
        [(
            StreamProtocol::new(MEMBERSHIP_PROTOCOL),
            request_response::ProtocolSupport::Full,
        )],
        request_response::Config::default().with_request_timeout(PROOF_TIMEOUT),
    )
}

/// Who is admitted, shared by the gates and the handshake.
#[derive(Clone, Debug)]
pub struct Members(Arc<RwLock<MembersInner>>);

#[derive(Debug)]
struct MembersInner {
    open: bool,
    admitted: HashSet<PeerId>,
}

impl Members {
    /// `keyed`: only admitted peers are served; otherwise everyone is.
    pub fn new(keyed: bool) -> Members {
        Members(Arc::new(RwLock::new(MembersInner {
            open: !keyed,
            admitted: HashSet::new(),
        })))
    }

    pub fn admits(&self, peer: &PeerId) -> bool {
        let m = self.0.read().unwrap_or_else(|e| e.into_inner());
        m.open || m.admitted.contains(peer)
    }

    pub fn is_open(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).open
    }

    fn admit(&self, peer: PeerId) -> bool {
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        m.admitted.insert(peer)
    }

    fn forget(&self, peer: &PeerId) {
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        m.admitted.remove(peer);
    }
}

/// Events held per gate while their peers prove the key (the oldest go
/// first beyond it).
const MAX_HELD: usize = 256;

/// Wraps `B` so that it gets no event from the connections of a peer that
/// is not admitted (see the module docs). Events that come while the
/// handshake runs are held, and handed over at admission: the other side
/// may admit this node a moment before this node admits it, and send at
/// once. Held events are dropped when their connection closes or after
/// [`PROOF_TIMEOUT`].
pub struct Gated<B: NetworkBehaviour> {
    inner: B,
    members: Members,
    held: std::collections::VecDeque<(PeerId, ConnectionId, Instant, THandlerOutEvent<B>)>,
}

impl<B: NetworkBehaviour> Gated<B> {
    pub fn new(inner: B, members: Members) -> Self {
        Gated {
            inner,
            members,
            held: std::collections::VecDeque::new(),
        }
    }

    /// Hands over the held events of admitted peers; drops stale ones.
    fn release(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = Instant::now();
        let held = std::mem::take(&mut self.held);
        for (peer, id, at, ev) in held {
            if self.members.admits(&peer) {
                self.inner.on_connection_handler_event(peer, id, ev);
            } else if now.duration_since(at) < PROOF_TIMEOUT {
                self.held.push_back((peer, id, at, ev));
            }
        }
    }
}

impl<B: NetworkBehaviour> std::ops::Deref for Gated<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B: NetworkBehaviour> std::ops::DerefMut for Gated<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Gated<B> {
    type ConnectionHandler = THandler<B>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_inbound_connection(id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, maybe_peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role_override, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = &event {
            self.held.retain(|(_, id, _, _)| *id != c.connection_id);
        }
        self.inner.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        if self.members.admits(&peer) {
            self.release();
            self.inner.on_connection_handler_event(peer, id, event);
        } else {
            if self.held.len() >= MAX_HELD {
                self.held.pop_front();
            }
            self.held.push_back((peer, id, Instant::now(), event));
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.release();
        self.inner.poll(cx)
    }
}

/// What the handshake asks the node to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing yet.
    Pending,
    /// The peer proved the key: start serving and learning from it.
    Admitted(PeerId),
    /// Disconnect the peer.
    Reject(PeerId, String),
}

/// One node's side of the handshakes.
pub struct Handshake {
    key: ClusterKey,
    cluster: String,
    local: PeerId,
    members: Members,
    /// Nonces this node sent, per peer.
    nonces: HashMap<PeerId, [u8; 32]>,
    /// Peers connected and not admitted yet, with their deadline.
    deadlines: HashMap<PeerId, Instant>,
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    if getrandom::fill(&mut n).is_err() {
        // No OS randomness: a time- and address-derived nonce still never
        // repeats for a pair of peers within a process.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        n = *blake3::hash(&t.to_le_bytes()).as_bytes();
    }
    n
}

impl Handshake {
    pub fn new(key: ClusterKey, cluster: &str, local: PeerId, members: Members) -> Handshake {
        Handshake {
            key,
            cluster: cluster.to_string(),
            local,
            members,
            nonces: HashMap::new(),
            deadlines: HashMap::new(),
        }
    }

    /// A first connection to `peer` is up: the peer with the smaller id
    /// challenges (whoever dialed: both may dial at once); both wait for
    /// the proof.
    pub fn on_connected(&mut self, b: &mut MembershipBehaviour, peer: PeerId, now: Instant) {
        if self.members.admits(&peer) {
            return;
        }
        self.deadlines.entry(peer).or_insert(now + PROOF_TIMEOUT);
        if self.local.to_bytes() < peer.to_bytes() {
            let n = nonce();
            self.nonces.insert(peer, n);
            b.send_request(
                &peer,
                MembershipRequest::Challenge {
                    nonce: hex::encode(n),
                },
            );
        }
    }

    /// The last connection to `peer` closed; whether it had not proven
    /// the key yet.
    pub fn on_disconnected(&mut self, peer: &PeerId) -> bool {
        self.members.forget(peer);
        self.nonces.remove(peer);
        self.deadlines.remove(peer).is_some()
    }

    /// Peers past their deadline.
    pub fn expired(&mut self, now: Instant) -> Vec<PeerId> {
        let late: Vec<PeerId> = self
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &late {
            self.deadlines.remove(p);
            self.nonces.remove(p);
        }
        late
    }

    fn check(&self, prover: &PeerId, mac: &str) -> bool {
        let Some(n) = self.nonces.get(prover) else {
            return false;
        };
        let want = self.key.mac(&self.cluster, prover, &self.local, n);
        let mut got = [0u8; 32];
        // Constant time: blake3's Hash compares in constant time.
        hex::decode_to_slice(mac, &mut got).is_ok()
            && blake3::Hash::from(got) == blake3::Hash::from(want)
    }

    fn my_mac(&self, verifier: &PeerId, nonce_hex: &str) -> Option<String> {
        let mut n = [0u8; 32];
        hex::decode_to_slice(nonce_hex, &mut n).ok()?;
        Some(hex::encode(self.key.mac(
            &self.cluster,
            &self.local,
            verifier,
            &n,
        )))
    }

    fn admitted(&mut self, peer: PeerId) -> Verdict {
        self.deadlines.remove(&peer);
        self.nonces.remove(&peer);
        if self.members.admit(peer) {
            Verdict::Admitted(peer)
        } else {
            Verdict::Pending
        }
    }

    /// One event of the handshake's behaviour.
    pub fn on_event(
        &mut self,
        b: &mut MembershipBehaviour,
        ev: request_response::Event<MembershipRequest, MembershipResponse>,
    ) -> Verdict {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => match request {
                MembershipRequest::Challenge { nonce: theirs } => {
                    let Some(mac) = self.my_mac(&peer, &theirs) else {
                        return Verdict::Reject(peer, "sent a malformed challenge".into());
                    };
                    let mine = nonce();
                    self.nonces.insert(peer, mine);
                    let _ = b.send_response(
                        channel,
                        MembershipResponse::Challenged {
                            mac,
                            nonce: hex::encode(mine),
                        },
                    );
                    Verdict::Pending
                }
                MembershipRequest::Prove { mac } => {
                    if self.check(&peer, &mac) {
                        let _ = b.send_response(channel, MembershipResponse::Accepted);
                        self.admitted(peer)
                    } else {
                        let _ = b.send_response(
                            channel,
                            MembershipResponse::Denied {
                                reason: "wrong cluster key".into(),
                            },
                        );
                        Verdict::Reject(peer, "proved a wrong cluster key".into())
                    }
                }
            },
            Event::Message {
                peer,
                message: Message::Response { response, .. },
                ..
            } => match response {
                MembershipResponse::Challenged { mac, nonce: theirs } => {
                    if !self.check(&peer, &mac) {
                        return Verdict::Reject(peer, "answered with a wrong cluster key".into());
                    }
                    let Some(mine) = self.my_mac(&peer, &theirs) else {
                        return Verdict::Reject(peer, "sent a malformed challenge".into());
                    };
                    b.send_request(&peer, MembershipRequest::Prove { mac: mine });
                    // Its proof checked: admitted now, before it admits
                    // this node (it sends once it has).
                    self.admitted(peer)
                }
                MembershipResponse::Accepted => Verdict::Pending,
                MembershipResponse::Denied { reason } => {
                    Verdict::Reject(peer, format!("refused this node's key: {reason}"))
                }
            },
            Event::OutboundFailure { peer, error, .. } => {
                if self.members.admits(&peer) {
                    return Verdict::Pending;
                }
                let why = match error {
                    request_response::OutboundFailure::UnsupportedProtocols => {
                        "does not speak the membership protocol (no cluster key?)".to_string()
                    }
                    e => format!("handshake failed: {e}"),
                };
                Verdict::Reject(peer, why)
            }
            Event::InboundFailure { .. } | Event::ResponseSent { .. } => Verdict::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_in_both_formats_and_bad_ones_are_refused() {
        let k = ClusterKey::generate().unwrap();
        let text = k.to_file_text();
        assert!(text.starts_with(KEY_HEADER));
        let back = ClusterKey::parse(&text).unwrap();
        assert_eq!(back.0, k.0);
        let bare = ClusterKey::parse(&hex::encode(k.0)).unwrap();
        assert_eq!(bare.0, k.0);
        for bad in ["", "abc", &"z".repeat(64), &"a".repeat(62), "aa\nbb"] {
            assert!(ClusterKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_proof_is_bound_to_the_key_the_cluster_and_both_peers() {
        let k = ClusterKey::generate().unwrap();
        let other = ClusterKey::generate().unwrap();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let n = [7u8; 32];
        let m = k.mac("c", &a, &b, &n);
        assert_eq!(m, k.mac("c", &a, &b, &n));
        assert_ne!(m, other.mac("c", &a, &b, &n), "another key");
        assert_ne!(m, k.mac("d", &a, &b, &n), "another cluster");
        assert_ne!(m, k.mac("c", &b, &a, &n), "roles swapped");
        assert_ne!(m, k.mac("c", &a, &c, &n), "another verifier");
        assert_ne!(m, k.mac("c", &a, &b, &[8u8; 32]), "another nonce");
    }
}
