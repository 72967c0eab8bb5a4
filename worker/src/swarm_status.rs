//! What a node says of the swarm: SWARM_READY (every layer of the model
//! served by a ready worker), announced to the workers and in the DHT, and
//! the periodic `[STATUS]` report.

use libp2p::PeerId;
use llama_cluster_shared::status::Availability;
use llama_cluster_shared::unix_now;
use tracing::{debug, info};

use crate::network::json_codec::JsonRequest;
use crate::node::{Node, Pending};

impl Node {
    /// SWARM_READY: when every layer of the model is served by a ready,
    /// reachable shard. On a change, the serving worker with the smallest peer
    /// id announces it to every connected worker and in the DHT under
    /// `/llama-cluster/<cluster>/swarm-ready` (and withdraws it the same way).
    pub(crate) fn check_swarm_ready(&mut self) {
        // The model of the loaded shard (placement may have changed it),
        // else the configured manifest's.
        let target = self
            .pipeline
            .loaded()
            .map(|l| (l.model.clone(), l.model_layers))
            .or_else(|| self.coverage_target.clone());
        let Some((model, n_layer)) = target else {
            // No model any more (a shard being replaced): not ready.
            if self
                .state
                .write(|s| std::mem::replace(&mut s.swarm_ready, false))
            {
                info!("[STATUS] SWARM_READY withdrawn: no model loaded");
            }
            return;
        };
        let snapshot = self.state.snapshot();
        let ready = crate::pipeline::route::plan(&snapshot.shards, &model, n_layer).is_ok();
        let changed = self
            .state
            .write(|s| std::mem::replace(&mut s.swarm_ready, ready) != ready);
        if !changed {
            return;
        }
        if ready {
            info!("[STATUS] SWARM_READY: every layer of {model} is served by a ready worker");
        } else {
            info!("[STATUS] SWARM_READY withdrawn: some layers of {model} have no ready worker");
        }
        let me = self.local_peer_id().to_string();
        let servers: Vec<&str> = snapshot
            .shards
            .iter()
            .filter(|s| {
                s.model == model && s.state == llama_cluster_shared::dht_keys::ShardState::Ready
            })
            .filter(|s| s.availability != Availability::Offline)
            .map(|s| s.peer_id.as_str())
            .collect();
        let announcer =
            servers.iter().min().is_none_or(|m| *m == me) && servers.contains(&me.as_str());
        if !announcer {
            return;
        }
        let body = serde_json::json!({
            "command": "SWARM_READY", "from": me, "request_id": format!("swarm-ready-{}", unix_now()),
            "params": {"model": model, "ready": ready},
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let peers: Vec<PeerId> = self.state.read(|s| {
            s.connections
                .keys()
                .filter(|p| s.agents.get(p).is_some_and(|a| a.ends_with("/worker")))
                .copied()
                .collect()
        });
        for p in peers {
            let id = self
                .swarm
                .behaviour_mut()
                .messaging
                .send_request(&p, JsonRequest::Body(bytes.clone()));
            self.pending.insert(id, Pending::Notice);
        }
        self.state
            .write(|s| s.swarm_announcement = Some((me.clone(), model.clone(), ready)));
        let value = serde_json::json!({"model": model, "ready": ready, "by": me, "at": unix_now()});
        let key = llama_cluster_shared::dht_keys::swarm_ready_key(&self.cfg.cluster);
        let record = libp2p::kad::Record::new(
            libp2p::kad::RecordKey::new(&key),
            value.to_string().into_bytes(),
        );
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .kad
            .put_record(record, libp2p::kad::Quorum::One)
        {
            debug!("[DHT] cannot store {key}: {e}");
        }
    }

    /// Prints the periodic `[STATUS]` report.
    pub(crate) fn report_status(&mut self) {
        let st = self.state.snapshot();
        let quic = st
            .peers
            .iter()
            .filter(|p| p.transport.as_str() == "QUIC")
            .count();
        info!(
            "[STATUS] {} {} | cluster {} | {} peers (QUIC {quic}, TCP {}) | {} shards known",
            self.role.as_str(),
            st.peer_id,
            st.cluster,
            st.peers.len(),
            st.peers.len() - quic,
            st.shards.len()
        );
        for s in &st.shards {
            let who = if s.availability == Availability::Local {
                "self".to_string()
            } else {
                s.peer_id.clone()
            };
            info!(
                "[STATUS]   {:<12} layers {:>3}-{:<3} {:<24} {:<7} {:<9} {who}",
                s.shard_id,
                s.layer_start,
                s.layer_end,
                s.model,
                s.availability.as_str(),
                s.state.as_str(),
            );
        }
    }
}
