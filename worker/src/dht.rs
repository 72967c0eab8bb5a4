//! The Kademlia side of a node: publishing this worker's shard record under
//! `/llama-cluster/<cluster>/shard/<id>` and its membership under
//! `/llama-cluster/<cluster>/members`, re-publishing before expiry, and
//! learning shard records and members from the DHT.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, GetProvidersOk, GetRecordOk, QueryResult, Quorum, Record, RecordKey};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use llama_cluster_shared::dht_keys::{
    ShardRecord, members_key, parse_shard_key, shard_key, swarm_ready_key,
};
use tracing::{debug, info, warn};

use crate::network::behaviour::Role;
use crate::node::Node;

impl Node {
    /// Writes (or refreshes) this worker's records in the DHT.
    pub(crate) fn publish_local_records(&mut self) {
        if self.role != Role::Worker {
            return;
        }
        let cluster = self.cfg.cluster.clone();
        let listen: Vec<String> = self
            .state
            .read(|s| s.listen_addrs.iter().map(|a| a.to_string()).collect());
        let load = self.pipeline.active_sessions();
        let max_sessions = self.pipeline.max_sessions();
        let record = self.state.write(|s| {
            let rec = s.local_shard.as_mut()?;
            rec.updated_at = llama_cluster_shared::unix_now_ms();
            rec.addrs = listen;
            rec.load = load;
            rec.max_sessions = max_sessions;
            Some(rec.clone())
        });
        let announce = self.announce;
        let kad = &mut self.swarm.behaviour_mut().kad;
        if announce && let Err(e) = kad.start_providing(RecordKey::new(&members_key(&cluster))) {
            debug!("[DHT] cannot announce membership: {e}");
        }
        if self.cfg.test_forge_records {
            self.publish_forged_records();
        }
        let kad = &mut self.swarm.behaviour_mut().kad;
        if let Some(rec) = record {
            let key = shard_key(&cluster, &rec.shard_id);
            let mut r = Record::new(
                RecordKey::new(&key),
                crate::records::seal(&rec, &self.keypair),
            );
            r.expires = Some(Instant::now() + Duration::from_secs(self.cfg.record_ttl_secs));
            match kad.put_record(r, Quorum::One) {
                Ok(_) => debug!("[DHT] publishing {key} ({})", rec.state.as_str()),
                Err(e) => debug!("[DHT] cannot store {key}: {e}"),
            }
        }
    }

    /// Asks the DHT for the latest record of every shard id we know of.
    /// Test only (`test_forge_records`): publishes, for every shard record
    /// of another peer this node knows, a copy that marks it failed, signed
    /// with this node's own key (it has no other). Members must ignore it.
    pub(crate) fn publish_forged_records(&mut self) {
        let me = self.local_peer_id().to_string();
        let victims: Vec<ShardRecord> = self.state.read(|s| {
            s.shards
                .values()
                .filter(|r| r.peer_id != me)
                .cloned()
                .collect()
        });
        for mut rec in victims {
            rec.state = llama_cluster_shared::dht_keys::ShardState::Failed;
            rec.updated_at = llama_cluster_shared::unix_now_ms();
            let key = shard_key(&self.cfg.cluster, &rec.shard_id);
            let r = Record::new(
                RecordKey::new(&key),
                crate::records::seal(&rec, &self.keypair),
            );
            info!(
                "[DHT] test: publishing a forged record for {key} of {}",
                rec.peer_id
            );
            let _ = self.swarm.behaviour_mut().kad.put_record(r, Quorum::One);
        }
    }

    pub(crate) fn query_known_shards(&mut self) {
        let ids: std::collections::BTreeSet<String> = self
            .state
            .read(|s| s.shards.keys().map(|(id, _)| id.clone()).collect());
        self.query_shards(ids);
    }

    /// Asks the DHT for the latest record of each of `ids`.
    pub(crate) fn query_shards(&mut self, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            let key = shard_key(&self.cfg.cluster, &id);
            self.swarm
                .behaviour_mut()
                .kad
                .get_record(RecordKey::new(&key));
        }
    }

    /// A record a peer put here. With `StoreInserts::FilterBoth` Kademlia
    /// stores nothing itself: a shard record is kept (and learnt at once)
    /// only when signed by the peer it names, and never over a newer one.
    fn store_inbound_record(&mut self, source: PeerId, record: Record) {
        if record.key.as_ref() == swarm_ready_key(&self.cfg.cluster).as_bytes() {
            // The cluster's readiness notice, kept when put by the worker it
            // names (the connection authenticates the sender).
            let by = serde_json::from_slice::<serde_json::Value>(&record.value)
                .ok()
                .and_then(|v| v.get("by")?.as_str().map(str::to_owned));
            if by.as_deref() == Some(source.to_string().as_str()) {
                if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().put(record) {
                    debug!("[DHT] record not stored: {e}");
                }
            } else {
                debug!("[DHT] refused a readiness record put by {source} for {by:?}");
            }
            return;
        }
        let rec = match decode_record(&self.cfg.cluster, &record) {
            Ok(rec) => rec,
            Err(e) => {
                crate::metrics::metrics().dht_records_rejected.inc();
                warn!(
                    "[DHT] refused the record {} put by {source}: {e}",
                    String::from_utf8_lossy(record.key.as_ref())
                );
                return;
            }
        };
        let store = self.swarm.behaviour_mut().kad.store_mut();
        let newer_held = store
            .get(&record.key)
            .and_then(|held| decode_record(&self.cfg.cluster, &held).ok())
            .is_some_and(|held| held.peer_id == rec.peer_id && held.updated_at > rec.updated_at);
        if !newer_held && let Err(e) = store.put(record) {
            debug!("[DHT] record not stored: {e}");
        }
        self.learn_shard(rec, "DHT store");
    }

    pub(crate) fn learn_shard(&mut self, rec: ShardRecord, source: &str) {
        if rec.peer_id == self.local_peer_id().to_string() {
            return;
        }
        let (id, peer, state) = (rec.shard_id.clone(), rec.peer_id.clone(), rec.state);
        let known = self
            .state
            .read(|s| s.shards.contains_key(&(id.clone(), peer.clone())));
        if self.state.upsert_shard(rec) {
            if known {
                debug!(
                    "[DHT] shard {id} of {peer} now {} (from {source})",
                    state.as_str()
                );
            } else {
                info!(
                    "[DHT] discovered shard {id} served by {peer} ({}, from {source})",
                    state.as_str()
                );
            }
        }
    }

    pub(crate) fn on_kad(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                addresses,
                ..
            } => {
                debug!("[DHT] routing table gained {peer}");
                // Debounced: announce our files to the grown network.
                if self.reprovide_at.is_none() {
                    self.reprovide_at =
                        Some(tokio::time::Instant::now() + Duration::from_millis(500));
                }
                if !self.swarm.is_connected(&peer) {
                    self.dial_peer(peer, addresses.into_vec(), "DHT");
                }
            }
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => {
                // Event-driven: a peer stores (or updates) a record here.
                self.store_inbound_record(source, record);
            }
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(provider),
                    },
            } => {
                // Kademlia passes on only provider records sent by the
                // provider itself; with `StoreInserts::FilterBoth` it
                // stores none of them.
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .add_provider(provider)
                {
                    debug!("[DHT] provider record not stored: {e}");
                }
            }
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(r))) => {
                    match decode_record(&self.cfg.cluster, &r.record) {
                        Ok(rec) => self.learn_shard(rec, "DHT query"),
                        Err(e) => {
                            crate::metrics::metrics().dht_records_rejected.inc();
                            warn!(
                                "[DHT] ignored the record {} from {:?}: {e}",
                                String::from_utf8_lossy(r.record.key.as_ref()),
                                r.peer
                            );
                        }
                    }
                }
                QueryResult::GetRecord(Err(e)) => debug!("[DHT] get_record: {e}"),
                QueryResult::PutRecord(Ok(ok)) => {
                    if !self.published {
                        info!(
                            "[DHT] published {}",
                            String::from_utf8_lossy(ok.key.as_ref())
                        );
                    }
                    self.published = true;
                }
                QueryResult::PutRecord(Err(e)) => {
                    // With no other DHT node yet the record stays local; it is
                    // published again when a peer appears.
                    debug!("[DHT] put_record: {e} (kept locally)");
                }
                QueryResult::GetProviders(r) if self.provider_queries.contains_key(&id) => {
                    let finished = step.last
                        || matches!(
                            r,
                            Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) | Err(_)
                        );
                    if let Some(q) = self.provider_queries.get_mut(&id)
                        && let Ok(GetProvidersOk::FoundProviders { providers, .. }) = r
                    {
                        q.found.extend(providers);
                        if !q.found.is_empty() {
                            // A moment more for other answers, never later
                            // than the lookup's bound.
                            let soon = tokio::time::Instant::now() + Duration::from_millis(25);
                            q.answer_at = Some(q.answer_at.map_or(soon, |at| at.min(soon)));
                        }
                    }
                    if finished
                        && let Some(q) = self.provider_queries.remove(&id)
                        && let Some(reply) = q.reply
                    {
                        let _ = reply.send(q.found.into_iter().collect());
                    }
                }
                QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                    providers, ..
                })) => {
                    for p in providers {
                        if p != self.local_peer_id() && !self.swarm.is_connected(&p) {
                            info!("[DISCOVERY] found cluster member {p} in the DHT; dialing");
                            let _ = self.swarm.dial(
                                DialOpts::peer_id(p)
                                    .condition(PeerCondition::DisconnectedAndNotDialing)
                                    .build(),
                            );
                        }
                    }
                }
                QueryResult::Bootstrap(Ok(_)) => debug!("[DHT] bootstrap step done"),
                QueryResult::Bootstrap(Err(e)) => debug!("[DHT] bootstrap: {e}"),
                QueryResult::StartProviding(Err(e)) => debug!("[DHT] start_providing: {e}"),
                _ => {}
            },
            _ => {}
        }
    }
}

/// Why a DHT record was not taken as a shard record.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("not a shard record key of this cluster")]
    Key,
    #[error("the record is for shard {0}, not the one its key names")]
    Mismatch(String),
    #[error(transparent)]
    Record(#[from] crate::records::RecordError),
}

/// A shard record of `cluster`, stored under its own key and signed by the
/// peer it names.
fn decode_record(cluster: &str, r: &Record) -> Result<ShardRecord, DecodeError> {
    let key = std::str::from_utf8(r.key.as_ref()).map_err(|_| DecodeError::Key)?;
    let (c, id) = parse_shard_key(key).ok_or(DecodeError::Key)?;
    if c != cluster {
        return Err(DecodeError::Key);
    }
    let rec = crate::records::open(&r.value)?;
    if rec.shard_id != id {
        return Err(DecodeError::Mismatch(rec.shard_id));
    }
    Ok(rec)
}
