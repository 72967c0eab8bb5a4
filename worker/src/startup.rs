//! Start-up of a node: identity, swarm, listeners, the pipeline and
//! torrents, bootstrap dials; then the swarm task ([`Node::run`]) is spawned.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use llama_cluster_shared::config::NodeConfig;
use llama_cluster_shared::dht_keys::{ShardRecord, ShardState};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::dispatcher::Dispatcher;
use crate::net::NetHandle;
use crate::net::frame::{ACTIVATION_PROTOCOL, MAX_FRAME as MAX_ACTIVATION_FRAME};
use crate::network::behaviour::{Role, build_swarm};
use crate::network::links::{LinkCounters, Links};
use crate::network::membership::{ClusterKey, Handshake, Members};
use crate::node::Node;
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::state::SharedState;
use crate::torrent::Torrents;

/// A started node: its identity and addresses, and the task that runs it.
pub struct RunningNode {
    pub peer_id: PeerId,
    pub listen_addrs: Vec<Multiaddr>,
    pub state: SharedState,
    pub dispatcher: Dispatcher,
    pub net: NetHandle,
    pub pipeline: Pipeline,
    pub torrents: Torrents,
    pub task: tokio::task::JoinHandle<()>,
}

fn listen_addrs_for(cfg: &NodeConfig) -> anyhow::Result<Vec<Multiaddr>> {
    let ip: std::net::IpAddr = cfg.p2p_host.parse().context("p2p_host")?;
    let ip_proto = match ip {
        std::net::IpAddr::V4(v4) => Protocol::Ip4(v4),
        std::net::IpAddr::V6(v6) => Protocol::Ip6(v6),
    };
    let base = Multiaddr::empty().with(ip_proto);
    let mut addrs = vec![];
    if cfg.quic {
        addrs.push(
            base.clone()
                .with(Protocol::Udp(cfg.p2p_port))
                .with(Protocol::QuicV1),
        );
    }
    if !(cfg.test_no_tcp_listen && cfg.quic) {
        addrs.push(base.with(Protocol::Tcp(cfg.p2p_port)));
    }
    Ok(addrs)
}

/// Parses and checks the multiaddr lists of the configuration.
pub fn parse_addr_list(field: &'static str, list: &[String]) -> anyhow::Result<Vec<Multiaddr>> {
    list.iter()
        .map(|s| {
            s.parse::<Multiaddr>().map_err(|e| {
                anyhow::Error::new(llama_cluster_shared::config::ConfigError::invalid(
                    field,
                    format!("{s:?} is not a multiaddr ({e}); example: /ip4/127.0.0.1/tcp/9000"),
                ))
            })
        })
        .collect()
}

/// Starts a node: identity, swarm, listeners, bootstrap dials, and the swarm
/// task. Returns once the node listens.
pub async fn start(
    cfg: NodeConfig,
    role: Role,
    keypair: libp2p::identity::Keypair,
) -> anyhow::Result<RunningNode> {
    start_with(cfg, role, keypair, true).await
}

/// [`start`], choosing whether the node announces itself and its files
/// (rendezvous registration, DHT membership, provider records); a one-shot
/// `fetch` that exits after its download does not.
pub async fn start_with(
    cfg: NodeConfig,
    role: Role,
    keypair: libp2p::identity::Keypair,
    announce_files: bool,
) -> anyhow::Result<RunningNode> {
    let bootstrap_addrs = parse_addr_list("bootstrap", &cfg.bootstrap)?;
    let external_addrs = parse_addr_list("external_addrs", &cfg.external_addrs)?;
    let peer_id = keypair.public().to_peer_id();
    let key = ClusterKey::configured(&cfg)?;
    let members = Members::new(key.is_some());
    match &key {
        Some(_) => info!("[MEMBERSHIP] cluster key set: only peers that prove it are served"),
        None => warn!(
            "[MEMBERSHIP] no cluster key (cluster_key_file or LLAMA_CLUSTER_KEY_FILE): any process that reaches this node's ports can join the swarm, read and write its records and fetch its files"
        ),
    }
    let handshake = key.map(|k| Handshake::new(k, &cfg.cluster, peer_id, members.clone()));
    let mut swarm = build_swarm(keypair.clone(), &cfg, role, members.clone())?;
    let mut listeners = HashSet::new();
    for addr in listen_addrs_for(&cfg)? {
        let id = swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.insert(id);
    }
    for addr in &external_addrs {
        swarm.add_external_address(addr.clone());
    }
    let state = SharedState::new(peer_id, &cfg.cluster, role, cfg.quic);
    state.write(|s| {
        s.grpc_addr = cfg.grpc_addr.clone();
        s.resources = crate::resources::detect(cfg.memory_mb, cfg.threads);
    });
    if let Some((start, end)) = cfg.layer_range()? {
        state.write(|s| {
            s.local_shard = Some(ShardRecord {
                shard_id: cfg.shard_id.clone(),
                peer_id: peer_id.to_string(),
                addrs: vec![],
                model: cfg.shard_model.clone(),
                layer_start: start,
                layer_end: end,
                state: ShardState::Announced,
                updated_at: llama_cluster_shared::unix_now_ms(),
                load: 0,
                max_sessions: 0,
            })
        });
    }
    let (tx, rx) = mpsc::channel(1024);
    let control = swarm.behaviour().streams.new_control();
    let net = NetHandle::new(
        tx,
        Links::new(
            control.clone(),
            ACTIVATION_PROTOCOL,
            MAX_ACTIVATION_FRAME,
            LinkCounters {
                frames_sent: crate::metrics::metrics().activation_frames_sent.clone(),
                streams_opened: crate::metrics::metrics().activation_streams_opened.clone(),
            },
        ),
    );
    let store_dir = crate::torrent::cache_dir(&cfg).join("torrents");
    let store = crate::torrent::store::Store::open(&store_dir)
        .with_context(|| format!("cannot open the file store {}", store_dir.display()))?;
    let hooks = crate::torrent::TestHooks {
        corrupt_pieces: cfg.test_corrupt_pieces || cfg.test_lying_meta,
        lying_meta: cfg.test_lying_meta,
        wrong_size_meta: cfg.test_wrong_size_meta,
        piece_delay: Duration::from_millis(cfg.test_piece_delay_ms),
        busy_pieces: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(cfg.test_busy_pieces)),
    };
    let torrents = Torrents::new(
        store,
        net.clone(),
        state.clone(),
        hooks,
        crate::torrent::upload_limit::UploadLimit::new(cfg.upload_limit_mb_per_sec),
        announce_files,
    );
    let pipeline = Pipeline::new(
        state.clone(),
        net.clone(),
        PipelineConfig::from_node(&cfg),
        torrents.clone(),
    );
    {
        let pipeline = pipeline.clone();
        crate::network::links::serve(
            control,
            ACTIVATION_PROTOCOL,
            MAX_ACTIVATION_FRAME,
            members.clone(),
            move |peer, req| {
                let pipeline = pipeline.clone();
                async move { pipeline.handle_inbound(peer, req).await }
            },
        )?;
    }
    let dispatcher = Dispatcher::new(state.clone(), pipeline.clone(), cfg.max_message_bytes);
    let (resp_tx, resp_rx) = mpsc::channel(256);
    let (frame_tx, frame_rx) = mpsc::channel(1024);
    let mut node = Node {
        keypair,
        members,
        handshake,
        identify_stash: HashMap::new(),
        announce: announce_files,
        swarm,
        cfg,
        role,
        state: state.clone(),
        dispatcher: dispatcher.clone(),
        dialing: HashMap::new(),
        rendezvous_points: HashMap::new(),
        bootstrap_addrs,
        pending: HashMap::new(),
        responses: resp_tx,
        frame_responses: frame_tx,
        pending_frames: HashMap::new(),
        pipeline: pipeline.clone(),
        torrents: torrents.clone(),
        provider_queries: HashMap::new(),
        published: false,
        discovered: HashSet::new(),
        quic_upgrade_tried: HashSet::new(),
        closing: Vec::new(),
        piece_conns: HashMap::new(),
        no_tcp: HashMap::new(),
        reprovide_at: None,
        coverage_target: None,
        p2p_metrics: libp2p::metrics::Metrics::new(
            &mut crate::metrics::libp2p_registry()
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        ),
    };
    if let Some(m) = node
        .pipeline
        .config()
        .manifest
        .as_ref()
        .and_then(|p| llama_cluster_engine::manifest::Manifest::load(p).ok())
    {
        node.coverage_target = Some((m.model, m.n_layer));
    }

    // Wait (bounded) until every listener has an address.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !listeners.is_empty() {
        let ev = tokio::time::timeout_at(deadline, node.swarm.select_next_some())
            .await
            .context("listeners did not come up within 10 s")?;
        match ev {
            SwarmEvent::NewListenAddr { listener_id, .. } => {
                listeners.remove(&listener_id);
                node.on_swarm_event(ev);
            }
            SwarmEvent::ListenerClosed {
                reason: Err(e),
                listener_id,
                ..
            } if listeners.contains(&listener_id) => bail!("listener failed: {e}"),
            other => node.on_swarm_event(other),
        }
    }
    let listen_addrs = node.state.read(|s| s.listen_addrs.clone());
    info!(
        "[CONNECT] {} {peer_id} listening on {}",
        role.as_str(),
        listen_addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    node.publish_local_records();
    node.dial_bootstrap();

    let task = tokio::spawn(node.run(rx, resp_rx, frame_rx));
    Ok(RunningNode {
        peer_id,
        listen_addrs,
        state,
        dispatcher,
        net,
        pipeline,
        torrents,
        task,
    })
}
