//! SYNC_TORRENTS: a node exchanges its catalog of shard files with every
//! connected worker and, with `fetch_missing`, downloads what it lacks.

use llama_cluster_shared::protocol::CommandResponse;
use llama_cluster_shared::unix_now;
use serde_json::json;

use crate::dispatcher::Dispatcher;
use crate::torrent::CatalogEntry;

impl Dispatcher {
    /// Exchanges catalogs with every connected worker; with `fetch_missing`,
    /// downloads the files this node lacks.
    pub async fn sync_torrents(&self, fetch_missing: bool) -> Result<Vec<CatalogEntry>, SyncError> {
        let me = self.me();
        let torrents = self.pipeline.torrents();
        let mut entries: std::collections::BTreeMap<String, CatalogEntry> = torrents
            .store()
            .catalog()
            .into_iter()
            .map(|m| {
                let e = CatalogEntry {
                    file_hash: m.file_hash.clone(),
                    name: m.name,
                    size: m.size,
                    providers: vec![me.clone()],
                    local: true,
                };
                (m.file_hash, e)
            })
            .collect();
        let peers: Vec<libp2p::PeerId> = self.state.read(|s| {
            s.connections
                .keys()
                .filter(|p| s.agents.get(p).is_some_and(|a| a.ends_with("/worker")))
                .copied()
                .collect()
        });
        let body = serde_json::to_vec(&json!({
            "command": "SYNC_TORRENTS", "from": me, "request_id": format!("sync-{}", unix_now()),
            "params": {"catalog_only": true}
        }))
        .unwrap_or_default();
        let net = self.pipeline.net().clone();
        let answers = futures::future::join_all(peers.iter().map(|p| {
            let net = net.clone();
            let body = body.clone();
            async move {
                (
                    *p,
                    net.request(*p, body, std::time::Duration::from_secs(10))
                        .await,
                )
            }
        }))
        .await;
        for (peer, r) in answers {
            let Ok(bytes) = r else { continue };
            let Ok(resp) = serde_json::from_slice::<CommandResponse>(&bytes) else {
                continue;
            };
            let list = resp
                .result
                .and_then(|r| r.get("catalog").cloned())
                .unwrap_or_default();
            for item in list.as_array().cloned().unwrap_or_default() {
                let (Some(hash), Some(name), Some(size)) = (
                    item["file_hash"].as_str(),
                    item["name"].as_str(),
                    item["size"].as_u64(),
                ) else {
                    continue;
                };
                let e = entries
                    .entry(hash.to_string())
                    .or_insert_with(|| CatalogEntry {
                        file_hash: hash.to_string(),
                        name: name.to_string(),
                        size,
                        providers: vec![],
                        local: false,
                    });
                e.providers.push(peer.to_string());
            }
        }
        if fetch_missing {
            let mut failed = vec![];
            for e in entries.values_mut().filter(|e| !e.local) {
                match torrents.fetch(&e.file_hash).await {
                    Ok(_) => {
                        e.local = true;
                        e.providers.push(me.clone());
                    }
                    Err(err) => failed.push((e.name.clone(), err)),
                }
            }
            if !failed.is_empty() {
                return Err(SyncError { failed });
            }
        }
        Ok(entries.into_values().collect())
    }
}

/// Downloads that failed during a SYNC_TORRENTS with `fetch_missing`.
#[derive(Debug, thiserror::Error)]
#[error("some downloads failed: {}", failed.iter().map(|(name, e)| format!("{name}: {e}")).collect::<Vec<_>>().join("; "))]
pub struct SyncError {
    /// Each file's name and why it failed.
    pub failed: Vec<(String, crate::torrent::TorrentError)>,
}
