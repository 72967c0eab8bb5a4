//! Downloading one file: its metadata from the first peer with a valid
//! answer (connected peers are asked while the DHT is looked up), then its
//! pieces ([`super::transfer`]), and the whole download started over
//! without a peer whose metadata the file's own data proved wrong.

use super::spans::PeerSpans;
use super::transfer::Found;
use super::*;

/// Extra provider lookups (one second apart) before a download gives up.
const PROVIDER_RETRIES: usize = 4;
/// Connected peers asked for a file's metadata besides its DHT providers.
const MAX_CONNECTED_ASKED: usize = 32;
/// Time one piece may take.
pub(super) const PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a metadata request (or a probe) may take, dial included.
pub(super) const META_TIMEOUT: Duration = Duration::from_secs(3);
/// Times a download starts over after metadata was proven wrong.
const MAX_META_RESTARTS: usize = 3;

/// A peer's answer to a metadata request: the metadata when it is valid
/// (and matches the manifest's `pin`, when there is one), else what the peer
/// did and whether it only said that it does not have the file.
fn check_meta(
    p: PeerId,
    answer: Result<TorrentResponse, AskError>,
    file_hash: &str,
    pin: &str,
    distrusted: bool,
) -> Result<TorrentMeta, (String, bool)> {
    let why = match answer {
        Ok(TorrentResponse::Meta(_)) if distrusted => {
            "sent metadata that the file's data proved wrong before".to_string()
        }
        Ok(TorrentResponse::Meta(b)) => match serde_json::from_slice::<TorrentMeta>(&b) {
            Ok(m) if m.file_hash != file_hash => "sent metadata for another file".to_string(),
            Ok(m) => match m.validate() {
                Err(why) => {
                    warn!(
                        "[TORRENT] {p} sent invalid metadata for {} ({why}); not using {p}",
                        m.name
                    );
                    format!("sent invalid metadata: {why}")
                }
                Ok(()) if !pin.is_empty() && m.pieces_hash() != pin => {
                    warn!(
                        "[TORRENT] {p} sent metadata for {} whose piece hashes do not match the manifest; not using {p}",
                        m.name
                    );
                    "sent metadata that does not match the manifest's pieces hash".to_string()
                }
                Ok(()) => return Ok(m),
            },
            Err(e) => format!("sent unreadable metadata: {e}"),
        },
        Ok(TorrentResponse::Error(e)) => return Err((e, true)),
        Ok(_) => "answered out of turn".to_string(),
        Err(e) => e.to_string(),
    };
    Err((why, false))
}

/// No peer asked gave usable metadata: what each peer did, and whether it
/// only said that it does not have the file.
struct MetaFailure(Vec<(PeerId, String, bool)>);

impl Torrents {
    pub(super) async fn ask(
        &self,
        peer: PeerId,
        req: TorrentRequest,
    ) -> Result<TorrentResponse, AskError> {
        // Metadata is small: a peer that cannot answer it quickly (a record
        // of a node that is gone costs a dial timeout) is passed over.
        // Pieces go over TCP, which moves bulk data with less CPU than QUIC
        // (see `network::tcp_only`).
        let (timeout, proto) = match req {
            TorrentRequest::Piece { .. } => (PIECE_TIMEOUT, FrameProto::TorrentTcp),
            _ => (META_TIMEOUT, FrameProto::Torrent),
        };
        let bytes = self.0.net.frame(proto, peer, req.encode(), timeout).await?;
        TorrentResponse::decode(bytes).map_err(|source| AskError::Undecodable { peer, source })
    }

    /// Counts and reports a piece that failed its hash check, naming its
    /// sender (in the log and in the download's status).
    pub(super) fn bad_piece(
        &self,
        prog: &mut DownloadProgress,
        peers: &mut PeerSpans,
        span: &tracing::Span,
        peer: &PeerId,
        i: u32,
        name: &str,
    ) {
        prog.bad_pieces += 1;
        let named = peer.to_string();
        if !prog.bad_peers.contains(&named) {
            prog.bad_peers.push(named);
        }
        peers.bad(span, peer);
        crate::metrics::metrics().torrent_bad_pieces.inc();
        self.set_progress(prog);
        warn!("[TORRENT] {peer} sent a bad piece {i} of {name}; dropping it from this download");
    }

    /// Peers this node is connected to (at most [`MAX_CONNECTED_ASKED`]).
    fn connected_peers(&self) -> Vec<PeerId> {
        self.0.state.read(|s| {
            s.connections
                .keys()
                .filter(|p| **p != self.0.me)
                .take(MAX_CONNECTED_ASKED)
                .copied()
                .collect()
        })
    }

    /// Providers of a file in the DHT; lookup `attempt` (from 0) may take
    /// longer than the one before (2 s, 4 s, ... at most 10 s).
    pub(super) async fn providers(&self, file_hash: &str, attempt: u32) -> Vec<PeerId> {
        let bound = Duration::from_secs((2 * (attempt as u64 + 1)).min(10));
        let mut found: Vec<PeerId> = self.0.net.get_providers(file_hash.to_string(), bound).await;
        found.retain(|p| *p != self.0.me);
        found.sort();
        found.dedup();
        found
    }

    /// Asks every candidate for the file's metadata at once and takes the
    /// first valid answer and who sent it (while any peer answers, a dead
    /// one costs nothing; when all are dead, the metadata timeout); the
    /// error lists what each peer did.
    async fn fetch_meta(
        &self,
        providers: &[PeerId],
        file_hash: &str,
        pin: &str,
    ) -> Result<(TorrentMeta, PeerId), MetaFailure> {
        let mut asks: FuturesUnordered<_> = providers
            .iter()
            .map(|&p| self.ask_meta(p, file_hash))
            .collect();
        let mut failures: Vec<(PeerId, String, bool)> = Vec::new();
        while let Some((p, answer)) = asks.next().await {
            match check_meta(p, answer, file_hash, pin, self.distrusts(&p)) {
                Ok(m) => return Ok((m, p)),
                Err((why, refused)) => failures.push((p, why, refused)),
            }
        }
        Err(MetaFailure(failures))
    }

    /// Whether a file's own data proved `p`'s metadata wrong.
    fn distrusts(&self, p: &PeerId) -> bool {
        self.0
            .distrusted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(p)
    }

    pub(super) fn ask_meta(
        &self,
        p: PeerId,
        file_hash: &str,
    ) -> futures::future::BoxFuture<'static, (PeerId, Result<TorrentResponse, AskError>)> {
        let me = self.clone();
        let req = TorrentRequest::Meta {
            file_hash: file_hash.to_string(),
        };
        async move { (p, me.ask(p, req).await) }.boxed()
    }

    /// Returns the local path of file `file_hash`, downloading it from the
    /// swarm first when it is not here.
    pub async fn fetch(&self, file_hash: &str) -> Result<PathBuf, TorrentError> {
        self.fetch_pinned(file_hash, "").await
    }

    /// Like [`Torrents::fetch`], accepting only metadata whose pieces hash
    /// is `pieces_hash` (from the manifest; empty: any self-consistent one).
    pub async fn fetch_pinned(
        &self,
        file_hash: &str,
        pieces_hash: &str,
    ) -> Result<PathBuf, TorrentError> {
        if let Some(s) = self.0.store.seed(file_hash) {
            return Ok(s.path);
        }
        // One download per file at a time; later callers wait for it.
        let lock = self
            .0
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(file_hash.to_string())
            .or_default()
            .clone();
        let result = {
            let _guard = lock.lock().await;
            match self.0.store.seed(file_hash) {
                Some(s) => Ok(s.path),
                None => self.download(file_hash, pieces_hash).await,
            }
        };
        let mut locks = self.0.locks.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&lock) <= 2 {
            locks.remove(file_hash);
        }
        result
    }

    /// Downloads one file, in a `torrent.download` span with one
    /// `torrent.peer` child per provider used (pieces, bytes, bad pieces).
    async fn download(&self, file_hash: &str, pin: &str) -> Result<PathBuf, TorrentError> {
        let span = tracing::info_span!(
            "torrent.download",
            file_hash,
            file = tracing::field::Empty,
            size = tracing::field::Empty,
            pieces_total = tracing::field::Empty,
            pieces_already_verified = tracing::field::Empty,
            providers = tracing::field::Empty,
            bytes_fetched = tracing::field::Empty,
            bad_pieces = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let mut peers = PeerSpans::default();
        let mut r = self
            .download_in_span(file_hash, pin, &span, &mut peers)
            .instrument(span.clone())
            .await;
        // Metadata proven wrong: again, without its sender's (a few times:
        // there may be more than one such peer).
        for _ in 0..MAX_META_RESTARTS {
            let Err(TorrentError::WrongMeta { from, why }) = &r else {
                break;
            };
            warn!("[TORRENT] {why}; not using {from}'s metadata again, starting over");
            self.0
                .distrusted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(*from);
            r = self
                .download_in_span(file_hash, pin, &span, &mut peers)
                .instrument(span.clone())
                .await;
        }
        peers.finish();
        // Its pieces are served no more (a complete file is, as a seed).
        self.0.store.unshare(file_hash);
        self.0.swarm.unlisten(file_hash);
        if let Err(e) = &r {
            span.record("error", tracing::field::display(e));
        }
        r
    }

    async fn download_in_span(
        &self,
        file_hash: &str,
        pin: &str,
        span: &tracing::Span,
        peers: &mut PeerSpans,
    ) -> Result<PathBuf, TorrentError> {
        let t0 = Instant::now();
        // A node that just joined may not see the announcements yet, a new
        // seeder's announcement may still be on its way, and the providers
        // found may all be gone (records outlive their nodes): the peers this
        // node is connected to are asked too, and the DHT is asked again a
        // few times (bounded), each peer once per round.
        let mut tried: HashSet<PeerId> = HashSet::new();
        // What each peer asked last did (refusals: "I do not have it").
        let mut failures: HashMap<PeerId, (String, bool)> = HashMap::new();
        let mut first_refused: Vec<PeerId> = Vec::new();
        // Connected peers are asked while the DHT is looked up: in a small
        // cluster a seeder is usually among them, and the download starts
        // without waiting for the lookup (providers it finds join later).
        let mut early = None;
        let mut providers = {
            let mut asks = FuturesUnordered::new();
            for p in self.connected_peers() {
                if tried.insert(p) {
                    asks.push(self.ask_meta(p, file_hash));
                }
            }
            let mut lookup = std::pin::pin!(self.providers(file_hash, 0));
            let mut found: Option<Vec<PeerId>> = None;
            // Peers that connect meanwhile (discovery is still running for a
            // node that just started) are asked as they come.
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let started = Instant::now();
            loop {
                tokio::select! {
                    Some((p, answer)) = asks.next(), if !asks.is_empty() => {
                        match check_meta(p, answer, file_hash, pin, self.distrusts(&p)) {
                            Ok(m) => {
                                early = Some((m, p));
                                break;
                            }
                            Err((why, refused)) => {
                                if refused {
                                    first_refused.push(p);
                                }
                                failures.insert(p, (why, refused));
                            }
                        }
                    }
                    ps = &mut lookup, if found.is_none() => {
                        for &p in &ps {
                            if tried.insert(p) {
                                asks.push(self.ask_meta(p, file_hash));
                            }
                        }
                        found = Some(ps);
                    }
                    _ = tick.tick() => {
                        for p in self.connected_peers() {
                            if tried.insert(p) {
                                asks.push(self.ask_meta(p, file_hash));
                            }
                        }
                    }
                }
                // Done when the lookup answered and every peer asked did;
                // with nobody found, discovery gets a moment to connect the
                // peers it is dialing (a node that just started).
                let nobody = found.as_ref().is_some_and(|f| f.is_empty());
                if found.is_some()
                    && asks.is_empty()
                    && (!nobody || started.elapsed() >= Duration::from_millis(500))
                {
                    break;
                }
            }
            found.unwrap_or_default()
        };
        let mut lookups = 0;
        let mut dht_found_any = !providers.is_empty();
        let (meta, meta_from) = loop {
            if let Some((m, from)) = early.take() {
                if !providers.contains(&from) {
                    providers.push(from);
                }
                break (m, from);
            }
            let connected = self.connected_peers();
            let mut fresh: Vec<PeerId> = Vec::new();
            for p in providers.iter().chain(connected.iter()) {
                if tried.insert(*p) {
                    fresh.push(*p);
                }
            }
            if !fresh.is_empty() {
                match self.fetch_meta(&fresh, file_hash, pin).await {
                    Ok((m, from)) => {
                        if !providers.contains(&from) {
                            providers.push(from);
                        }
                        break (m, from);
                    }
                    Err(MetaFailure(f)) => {
                        for (p, why, refused) in f {
                            // A peer that said it lacks the file may have it
                            // by the next round (a seeder still hashing).
                            if refused {
                                tried.remove(&p);
                            }
                            failures.insert(p, (why, refused));
                        }
                    }
                }
            }
            if lookups >= PROVIDER_RETRIES {
                // NotFound only when nobody announced the file and every
                // peer asked said it does not have it; gone or misbehaving
                // providers are a failure of the download.
                if !dht_found_any && failures.values().all(|(_, refused)| *refused) {
                    return Err(TorrentError::NoProvider(file_hash.to_string()));
                }
                let mut list: Vec<(&PeerId, &(String, bool))> = failures.iter().collect();
                list.sort_by_key(|(p, (_, refused))| (*refused, **p));
                let list: Vec<String> = list
                    .into_iter()
                    .map(|(p, (why, _))| format!("{p}: {why}"))
                    .collect();
                return Err(TorrentError::Failed(format!(
                    "no usable metadata for {file_hash}: {}",
                    list.join("; ")
                )));
            }
            // Peers that refused in the first round are asked again from the
            // next one on.
            for p in first_refused.drain(..) {
                tried.remove(&p);
            }
            lookups += 1;
            // A second before the next round, cut short when a peer not
            // asked yet connects.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if self.connected_peers().iter().any(|p| !tried.contains(p)) {
                    break;
                }
            }
            providers = self.providers(file_hash, lookups as u32).await;
            dht_found_any |= !providers.is_empty();
        };
        self.transfer(
            file_hash,
            Found {
                meta,
                meta_from,
                providers,
                tried,
            },
            t0,
            span,
            peers,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_of_a_file() -> TorrentMeta {
        let dir = std::env::temp_dir().join(format!("llama-check-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let data: Vec<u8> = (0..(2 * meta::MIN_PIECE + 5))
            .map(|i| (i % 241) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let m = TorrentMeta::from_file(&path, "f.bin").unwrap();
        let _ = std::fs::remove_dir_all(dir);
        m
    }

    #[test]
    fn metadata_is_taken_only_when_it_is_valid_and_matches_the_pin() {
        let m = meta_of_a_file();
        let p = PeerId::random();
        let answer = |m: &TorrentMeta| Ok(TorrentResponse::Meta(m.encode()));
        let hash = m.file_hash.clone();
        assert_eq!(check_meta(p, answer(&m), &hash, "", false), Ok(m.clone()));
        assert_eq!(
            check_meta(p, answer(&m), &hash, &m.pieces_hash(), false),
            Ok(m.clone())
        );
        let refused =
            |m: &TorrentMeta, pin: &str| check_meta(p, answer(m), &hash, pin, false).unwrap_err();
        let (why, only_absent) = refused(&m, &"0".repeat(64));
        assert!(why.contains("manifest"), "{why}");
        assert!(!only_absent);
        let mut lying = m.clone();
        lying.pieces.swap(0, 2);
        let (why, _) = refused(&lying, "");
        assert!(why.contains(meta::PIECES_DO_NOT_ADD_UP), "{why}");
        let mut other = m.clone();
        other.file_hash = blake3::hash(b"other").to_hex().to_string();
        assert!(refused(&other, "").0.contains("another file"));
        let (why, only_absent) = check_meta(
            p,
            Ok(TorrentResponse::Error("no such file".into())),
            &hash,
            "",
            false,
        )
        .unwrap_err();
        assert_eq!((why.as_str(), only_absent), ("no such file", true));
        // Metadata from a peer whose metadata was proven wrong before.
        let (why, _) = check_meta(p, answer(&m), &hash, "", true).unwrap_err();
        assert!(why.contains("proved wrong"), "{why}");
        let (why, _) = check_meta(
            p,
            Ok(TorrentResponse::Meta(b"{".to_vec())),
            &hash,
            "",
            false,
        )
        .unwrap_err();
        assert!(why.contains("unreadable"), "{why}");
    }
}
