//! Downloading one file from several providers at once: its metadata from
//! the first peer with a valid answer (connected peers are asked while the
//! DHT is looked up), pieces requested a few at a time per peer and verified
//! on blocking threads while the transfer goes on, peers that send bad
//! pieces dropped, and the whole download started over without a peer
//! whose metadata the file's own data proved wrong.

use super::*;

/// Pieces requested from one peer at a time.
const PER_PEER_IN_FLIGHT: usize = 4;
/// Extra provider lookups (one second apart) before a download gives up.
const PROVIDER_RETRIES: usize = 4;
/// Connected peers asked for a file's metadata besides its DHT providers.
const MAX_CONNECTED_ASKED: usize = 32;
/// Time one piece may take.
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a metadata request (or a probe) may take, dial included.
const META_TIMEOUT: Duration = Duration::from_secs(3);
/// Pieces received and waiting for (or in) verification; no more are asked
/// for meanwhile, so a slow disk bounds the memory a download holds.
const MAX_CHECKING: usize = 8;
/// How long a seeder that answered busy is left alone.
const BUSY_BACKOFF: Duration = Duration::from_secs(1);
/// Waits with every provider busy and nothing in flight before a download
/// gives up (resumable).
const MAX_BUSY_WAITS: u32 = 120;
/// Times a download starts over after metadata was proven wrong.
const MAX_META_RESTARTS: usize = 3;

/// A piece checked and written on a blocking thread: who sent it, its
/// index and length, and what the check found (or the write error).
type Checked = (
    PeerId,
    u32,
    u64,
    Result<std::io::Result<Verdict>, tokio::task::JoinError>,
);

/// What checking a received piece found.
enum Verdict {
    /// It is the piece (written; its part of the whole-file hash).
    Good(blake3::hazmat::ChainingValue),
    /// Its sender sent bad bytes.
    Bad,
    /// It is the file's own last piece, of another length than the
    /// metadata's size gives: the metadata lied, not the sender.
    WrongSize,
}

/// A peer's answer to a metadata request: the metadata when it is valid
/// (and matches the manifest's `pin`, when there is one), else what the peer
/// did and whether it only said that it does not have the file.
fn check_meta(
    p: PeerId,
    answer: Result<TorrentResponse, String>,
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
        Err(e) => e,
    };
    Err((why, false))
}

/// No peer asked gave usable metadata: what each peer did, and whether it
/// only said that it does not have the file.
struct MetaFailure(Vec<(PeerId, String, bool)>);

/// What a request of the download loop was for.
enum Job {
    Probe,
    Piece(u32),
}

impl Torrents {
    async fn ask(&self, peer: PeerId, req: TorrentRequest) -> Result<TorrentResponse, String> {
        // Metadata is small: a peer that cannot answer it quickly (a record
        // of a node that is gone costs a dial timeout) is passed over.
        // Pieces go over TCP, which moves bulk data with less CPU than QUIC
        // (see `network::tcp_only`).
        let (timeout, proto) = match req {
            TorrentRequest::Meta { .. } => (META_TIMEOUT, FrameProto::Torrent),
            TorrentRequest::Piece { .. } => (PIECE_TIMEOUT, FrameProto::TorrentTcp),
        };
        let bytes = self
            .0
            .net
            .frame(proto, peer, req.encode(), timeout)
            .await
            .map_err(|e| e.to_string())?;
        TorrentResponse::decode(bytes)
    }

    /// Counts and reports a piece that failed its hash check.
    fn bad_piece(
        &self,
        prog: &mut DownloadProgress,
        peers: &mut PeerSpans,
        span: &tracing::Span,
        peer: &PeerId,
        i: u32,
        name: &str,
    ) {
        prog.bad_pieces += 1;
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
    async fn providers(&self, file_hash: &str, attempt: u32) -> Vec<PeerId> {
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

    fn ask_meta(
        &self,
        p: PeerId,
        file_hash: &str,
    ) -> futures::future::BoxFuture<'static, (PeerId, Result<TorrentResponse, String>)> {
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
        let m2 = meta.clone();
        let me = self.clone();
        let mut partial = tokio::task::spawn_blocking(move || me.0.store.partial(&m2))
            .await
            .map_err(|e| TorrentError::Failed(e.to_string()))??;
        let mut prog = DownloadProgress {
            file_hash: file_hash.to_string(),
            name: meta.name.clone(),
            total_bytes: meta.size,
            verified_bytes: partial.verified_bytes(),
            fetched_bytes: 0,
            pieces_done: meta.n_pieces() - partial.missing().len() as u32,
            pieces_total: meta.n_pieces(),
            peers: providers.len() as u32,
            bad_pieces: 0,
            done: false,
        };
        self.set_progress(&prog);
        span.record("file", meta.name.as_str());
        span.record("size", meta.size);
        span.record("pieces_total", prog.pieces_total);
        span.record("pieces_already_verified", prog.pieces_done);
        span.record("providers", providers.len());
        info!(
            "[TORRENT] downloading {} ({} bytes, {} of {} pieces already verified) from {} peers",
            meta.name,
            meta.size,
            prog.pieces_done,
            prog.pieces_total,
            providers.len()
        );
        // Peers we are connected to get pieces at once; the others are
        // probed first (a stale provider record must not stall the download).
        let is_connected = |p: &PeerId| self.0.state.read(|s| s.connections.contains_key(p));
        let mut active: Vec<PeerId> = providers
            .iter()
            .copied()
            .filter(|p| is_connected(p))
            .collect();
        let mut running = FuturesUnordered::new();
        // Connected peers the DHT did not name (their announcements may be
        // on the way) are probed as well: any that has the file joins in.
        let unnamed: Vec<PeerId> = tried
            .iter()
            .filter(|p| !providers.contains(p) && is_connected(p))
            .copied()
            .collect();
        let probe = |p: PeerId| {
            self.ask_meta(p, file_hash)
                .map(|(p, r)| (p, Job::Probe, r))
                .boxed()
        };
        let mut probed: HashSet<PeerId> = HashSet::new();
        for &p in providers
            .iter()
            .filter(|p| !is_connected(p))
            .chain(unnamed.iter())
        {
            probed.insert(p);
            running.push(probe(p));
        }
        // The first lookup answered as soon as it found someone; a longer
        // one runs alongside the transfer, and providers it adds are probed.
        let mut late_lookup = std::pin::pin!(self.providers(file_hash, 1));
        let mut late_done = false;
        let t_transfer = Instant::now();
        let n = meta.n_pieces() as usize;
        let mut done = vec![true; n];
        for i in partial.missing() {
            done[i as usize] = false;
        }
        let mut queue: VecDeque<u32> = partial.missing().into();
        let mut in_flight: HashMap<PeerId, usize> = HashMap::new();
        let mut requested: HashMap<u32, HashSet<PeerId>> = HashMap::new();
        let mut dropped: HashSet<PeerId> = HashSet::new();
        let mut refreshed = false;
        let mut remaining = queue.len();
        // Pieces are verified and written on blocking threads while the
        // transfer goes on; `checking` holds the ones being verified.
        let shared_meta = Arc::new(meta.clone());
        let writer = partial.writer();
        let mut verifying = FuturesUnordered::new();
        let mut checking: HashSet<u32> = HashSet::new();
        // Seeders that answered busy, and until when they are left alone.
        let mut busy_until: HashMap<PeerId, tokio::time::Instant> = HashMap::new();
        let mut busy_waits = 0u32;
        while remaining > 0 {
            let now = tokio::time::Instant::now();
            busy_until.retain(|_, t| *t > now);
            // Hand out pieces round robin, a few per peer; once nothing is
            // queued, idle peers duplicate pieces still in flight (endgame).
            for &p in active
                .iter()
                .filter(|p| !dropped.contains(p) && !busy_until.contains_key(p))
            {
                loop {
                    let n_in = in_flight.get(&p).copied().unwrap_or(0);
                    if n_in >= PER_PEER_IN_FLIGHT || checking.len() >= MAX_CHECKING {
                        break;
                    }
                    let mut next = None;
                    while let Some(i) = queue.pop_front() {
                        if !done[i as usize] && !checking.contains(&i) {
                            next = Some(i);
                            break;
                        }
                    }
                    let next = next.or_else(|| {
                        requested
                            .iter()
                            .filter(|(i, who)| {
                                !done[**i as usize]
                                    && !checking.contains(*i)
                                    && !who.contains(&p)
                                    && who.len() < 2
                            })
                            .map(|(i, _)| *i)
                            .min()
                    });
                    let Some(i) = next else { break };
                    *in_flight.entry(p).or_insert(0) += 1;
                    requested.entry(i).or_default().insert(p);
                    let me = self.clone();
                    let hash = file_hash.to_string();
                    running.push(
                        async move {
                            (
                                p,
                                Job::Piece(i),
                                me.ask(
                                    p,
                                    TorrentRequest::Piece {
                                        file_hash: hash,
                                        index: i,
                                    },
                                )
                                .await,
                            )
                        }
                        .boxed(),
                    );
                }
            }
            let next_free = busy_until.values().min().copied();
            if running.is_empty() && verifying.is_empty() {
                if let Some(at) = next_free {
                    // Every provider left is busy: wait for the first (bounded).
                    busy_waits += 1;
                    if busy_waits > MAX_BUSY_WAITS {
                        return Err(TorrentError::Failed(format!(
                            "download of {} stalled: every provider stayed busy, {remaining} pieces missing (resumable)",
                            meta.name
                        )));
                    }
                    tokio::time::sleep_until(at).await;
                    continue;
                }
                if !refreshed {
                    // Everybody we knew failed: look for providers again, once.
                    refreshed = true;
                    let fresh: Vec<PeerId> = self
                        .providers(file_hash, 1)
                        .await
                        .into_iter()
                        .filter(|p| !dropped.contains(p) && !active.contains(p))
                        .collect();
                    active.extend(fresh);
                    if active.iter().any(|p| !dropped.contains(p)) {
                        continue;
                    }
                }
                return Err(TorrentError::Failed(format!(
                    "download of {} stalled: no provider left, {remaining} pieces missing (resumable)",
                    meta.name
                )));
            }
            let (peer, job, r) = tokio::select! {
                Some(answer) = running.next(), if !running.is_empty() => answer,
                Some(checked) = verifying.next(), if !verifying.is_empty() => {
                    let (peer, i, len, r): Checked = checked;
                    checking.remove(&i);
                    match r {
                        Ok(Ok(Verdict::Good(value))) => {
                            if !done[i as usize] {
                                partial.mark_written(i, value);
                                done[i as usize] = true;
                                remaining -= 1;
                                requested.remove(&i);
                                prog.fetched_bytes += len;
                                crate::metrics::metrics().torrent_bytes_in.inc_by(len);
                                prog.verified_bytes += len;
                                prog.pieces_done += 1;
                                peers.piece(span, &peer, len);
                                prog.peers =
                                    active.iter().filter(|p| !dropped.contains(p)).count() as u32;
                                self.set_progress(&prog);
                                busy_waits = 0;
                            }
                        }
                        Ok(Ok(Verdict::WrongSize)) => {
                            return Err(TorrentError::WrongMeta {
                                from: meta_from,
                                why: format!(
                                    "the metadata of {} from {meta_from} gives its size as {} bytes, but its last piece (from {peer}) shows another size",
                                    meta.name, meta.size
                                ),
                            });
                        }
                        Ok(Ok(Verdict::Bad)) => {
                            self.bad_piece(&mut prog, peers, span, &peer, i, &meta.name);
                            dropped.insert(peer);
                            if !done[i as usize] && requested.get(&i).is_none_or(|w| w.is_empty()) {
                                queue.push_back(i);
                            }
                        }
                        Ok(Err(e)) => {
                            // Writes already started on other blocking threads
                            // may still land in the .part file: they hold
                            // verified bytes, and a resume checks every piece.
                            return Err(TorrentError::Failed(format!(
                                "writing {} failed: {e} (download stopped, resumable)",
                                meta.name
                            )));
                        }
                        Err(e) => return Err(TorrentError::Failed(e.to_string())),
                    }
                    continue;
                }
                // A busy seeder's pause ended: hand it pieces again.
                _ = tokio::time::sleep_until(next_free.unwrap_or(now)), if next_free.is_some() => continue,
                found = &mut late_lookup, if !late_done => {
                    late_done = true;
                    for p in found {
                        if !active.contains(&p) && !dropped.contains(&p) && probed.insert(p) {
                            debug!("[TORRENT] the DHT names {p} as well; probing it");
                            running.push(probe(p));
                        }
                    }
                    continue;
                }
                else => continue,
            };
            let i = match job {
                Job::Probe => {
                    if matches!(r, Ok(TorrentResponse::Meta(_))) && !dropped.contains(&peer) {
                        debug!("[TORRENT] {peer} answers; using it");
                        active.push(peer);
                    } else {
                        debug!("[TORRENT] provider {peer} is unreachable; skipping it");
                    }
                    continue;
                }
                Job::Piece(i) => i,
            };
            if let Some(c) = in_flight.get_mut(&peer) {
                *c = c.saturating_sub(1);
            }
            if let Some(who) = requested.get_mut(&i) {
                who.remove(&peer);
            }
            let ok = match r {
                Ok(TorrentResponse::Piece { index, data }) if index == i => {
                    // A second copy (endgame) of a piece already here or
                    // being verified is not needed.
                    if !done[i as usize] && checking.insert(i) {
                        let (m, w) = (shared_meta.clone(), writer.clone());
                        verifying.push(
                            async move {
                                let len = data.len() as u64;
                                let r = tokio::task::spawn_blocking(move || {
                                    let Some(value) = m.check_piece(i, &data) else {
                                        return Ok(if m.proves_wrong_size(i, &data) {
                                            Verdict::WrongSize
                                        } else {
                                            Verdict::Bad
                                        });
                                    };
                                    w.write(i, &data).map(|_| Verdict::Good(value))
                                })
                                .await;
                                (peer, i, len, r)
                            }
                            .boxed(),
                        );
                    }
                    true
                }
                Ok(TorrentResponse::Piece { .. }) => {
                    self.bad_piece(&mut prog, peers, span, &peer, i, &meta.name);
                    false
                }
                Ok(TorrentResponse::Error(e)) => {
                    debug!("[TORRENT] {peer} could not send piece {i}: {e}");
                    false
                }
                Ok(TorrentResponse::Busy(e)) => {
                    // Not the peer's fault: leave it alone for a moment and
                    // put the piece first in line (someone may be free).
                    debug!("[TORRENT] {peer} is busy ({e}); piece {i} goes back in line");
                    busy_until.insert(peer, tokio::time::Instant::now() + BUSY_BACKOFF);
                    if !done[i as usize]
                        && !checking.contains(&i)
                        && requested.get(&i).is_none_or(|w| w.is_empty())
                    {
                        queue.push_front(i);
                    }
                    true
                }
                Ok(_) => false,
                Err(e) => {
                    warn!(
                        "[TORRENT] {peer} failed while sending piece {i} of {}: {e}; dropping it",
                        meta.name
                    );
                    peers.failed(span, &peer, &e);
                    false
                }
            };
            if !ok {
                dropped.insert(peer);
                if !done[i as usize]
                    && !checking.contains(&i)
                    && requested.get(&i).is_none_or(|w| w.is_empty())
                {
                    queue.push_back(i);
                }
            }
        }
        drop(running);
        drop(writer);
        span.record("bytes_fetched", prog.fetched_bytes);
        span.record("bad_pieces", prog.bad_pieces);
        let transfer = t_transfer.elapsed();
        let name = meta.name.clone();
        let me = self.clone();
        let path = tokio::task::spawn_blocking(move || me.0.store.complete(partial))
            .await
            .map_err(|e| TorrentError::Failed(e.to_string()))?
            .map_err(|e| TorrentError::Failed(format!("finishing {name}: {e}")))?;
        prog.done = true;
        self.set_progress(&prog);
        let seeding = self.0.announce;
        if seeding {
            self.0.net.provide(file_hash.to_string());
        }
        let secs = t0.elapsed().as_secs_f64();
        let tsecs = transfer.as_secs_f64();
        info!(
            "[TORRENT] {} complete and verified: {} bytes fetched in {:.3} s ({:.1} MB/s), pieces transferred in {:.3} s ({:.1} MB/s){}",
            meta.name,
            prog.fetched_bytes,
            secs,
            prog.fetched_bytes as f64 / secs.max(1e-9) / 1e6,
            tsecs,
            prog.fetched_bytes as f64 / tsecs.max(1e-9) / 1e6,
            if seeding { ", seeding" } else { "" }
        );
        Ok(path)
    }
}

/// One `torrent.peer` span per provider a download used, with its tally.
#[derive(Default)]
struct PeerSpans(HashMap<PeerId, PeerTally>);

struct PeerTally {
    span: tracing::Span,
    pieces: u32,
    bytes: u64,
    bad: u32,
}

impl PeerSpans {
    fn get(&mut self, parent: &tracing::Span, peer: &PeerId) -> &mut PeerTally {
        self.0.entry(*peer).or_insert_with(|| PeerTally {
            span: tracing::info_span!(
                parent: parent,
                "torrent.peer",
                peer = %peer,
                pieces = tracing::field::Empty,
                bytes = tracing::field::Empty,
                bad_pieces = tracing::field::Empty,
                error = tracing::field::Empty,
            ),
            pieces: 0,
            bytes: 0,
            bad: 0,
        })
    }

    fn piece(&mut self, parent: &tracing::Span, peer: &PeerId, bytes: u64) {
        let t = self.get(parent, peer);
        t.pieces += 1;
        t.bytes += bytes;
    }

    fn bad(&mut self, parent: &tracing::Span, peer: &PeerId) {
        let t = self.get(parent, peer);
        t.bad += 1;
    }

    fn failed(&mut self, parent: &tracing::Span, peer: &PeerId, e: &str) {
        let t = self.get(parent, peer);
        t.span.record("error", e);
    }

    /// Records the tallies and ends the spans.
    fn finish(self) {
        for t in self.0.into_values() {
            t.span.record("pieces", t.pieces);
            t.span.record("bytes", t.bytes);
            t.span.record("bad_pieces", t.bad);
        }
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
