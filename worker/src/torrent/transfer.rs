//! The pieces of one download. Every peer found is asked for its bitfield
//! first (a handshake: it learns this node's, and answers with its own and
//! the peers it knows are downloading the file, who are asked in turn).
//! Pieces are then asked of the peers that have them, rarest first, each
//! peer as many at a time as its measured rate fills ([`super::picker`]),
//! verified on blocking threads while the transfer goes on, and peers that
//! send bad pieces are dropped and named. With partial seeding on, the
//! verified pieces are served to other downloaders at once: the node
//! announces itself as a provider after its first piece and tells the
//! downloaders it knows of every piece it verifies.

use tokio::sync::mpsc;

use super::bitfield::Bitfield;
use super::picker::{Picker, Rate};
use super::spans::PeerSpans;
use super::store::Partial;
use super::*;

/// Pieces received and waiting for (or in) verification; no more are asked
/// for meanwhile, so a slow disk bounds the memory a download holds.
const MAX_CHECKING: usize = 8;
/// How long a seeder that answered busy is left alone.
const BUSY_BACKOFF: Duration = Duration::from_secs(1);
/// Waits with every provider busy and nothing in flight before a download
/// gives up (resumable).
const MAX_BUSY_WAITS: u32 = 120;
/// Seconds waited for news from downloaders, with nothing to ask anyone
/// for, before a download gives up (resumable).
const MAX_IDLE_WAITS: u32 = 30;
/// How long a piece a seeder sent elsewhere is not asked of it again.
const DEFER: Duration = Duration::from_secs(2);
/// Peers one download asks for their bitfield.
pub(super) const MAX_PEERS: usize = 64;

/// What the metadata search found: the metadata, who sent it, the file's
/// providers and the peers asked (the connected ones among them that the
/// DHT did not name are asked for their bitfield too).
pub(super) struct Found {
    pub meta: TorrentMeta,
    pub meta_from: PeerId,
    pub providers: Vec<PeerId>,
    pub tried: HashSet<PeerId>,
}

/// A piece checked and written on a blocking thread: who sent it, its
/// index and length, whether it came from a download in progress, and what
/// the check found (or the write error).
type Checked = (
    PeerId,
    u32,
    u64,
    bool,
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

/// How much faster than another a peer must measure to count as clearly
/// faster (well past the noise between equal seeders on one machine).
const FASTER: f64 = 4.0;

/// Whether peer `a` measurably delivers more than [`FASTER`] times as fast
/// as `b` (a peer not measured yet is neither faster nor slower).
fn clearly_faster(rates: &HashMap<PeerId, Rate>, a: &PeerId, b: &PeerId, now: Instant) -> bool {
    let of = |p: &PeerId| rates.get(p).and_then(|r| r.bytes_per_sec(now));
    matches!((of(a), of(b)), (Some(x), Some(y)) if x > FASTER * y)
}

/// What a request of the download loop was for.
pub(super) enum Job {
    Handshake,
    Piece(u32),
}

pub(super) type Answer = (PeerId, Job, Result<TorrentResponse, super::AskError>);

impl Torrents {
    pub(super) async fn transfer(
        &self,
        file_hash: &str,
        found: Found,
        t0: Instant,
        span: &tracing::Span,
        peers: &mut PeerSpans,
    ) -> Result<PathBuf, TorrentError> {
        let Found {
            meta,
            meta_from,
            providers,
            tried,
        } = found;
        let m2 = meta.clone();
        let me = self.clone();
        let mut partial: Partial = tokio::task::spawn_blocking(move || me.0.store.partial(&m2))
            .await
            .map_err(|e| TorrentError::Failed(e.to_string()))??;
        let mut prog = DownloadProgress {
            file_hash: file_hash.to_string(),
            name: meta.name.clone(),
            total_bytes: meta.size,
            verified_bytes: partial.verified_bytes(),
            pieces_done: meta.n_pieces() - partial.missing().len() as u32,
            pieces_total: meta.n_pieces(),
            peers: providers.len() as u32,
            ..Default::default()
        };
        self.set_progress(&prog);
        span.record("file", meta.name.as_str());
        span.record("size", meta.size);
        span.record("pieces_total", prog.pieces_total);
        span.record("pieces_already_verified", prog.pieces_done);
        span.record("providers", providers.len());
        info!(
            "[TORRENT] downloading {} ({} bytes, {} of {} pieces already verified, {} bytes) from {} peers",
            meta.name,
            meta.size,
            prog.pieces_done,
            prog.pieces_total,
            prog.verified_bytes,
            providers.len()
        );
        let sharing = self.0.partial_seeding;
        let news = self.0.swarm.listen(file_hash);
        let (have_tx, have_rx) = mpsc::unbounded_channel();
        let mut announced = false;
        if sharing {
            self.0.store.share(&partial);
            self.spawn_have_news(file_hash, have_rx);
            if self.0.announce && prog.pieces_done > 0 {
                self.0.net.provide(file_hash.to_string());
                announced = true;
            }
        }
        let mut picker = Picker::new(partial.bitfield(), &self.0.me);
        let mut rates: HashMap<PeerId, Rate> = HashMap::new();
        // Peers whose bitfield is known, in the order they became known.
        let mut active: Vec<PeerId> = Vec::new();
        let mut asked: HashSet<PeerId> = HashSet::new();
        let mut dropped: HashSet<PeerId> = HashSet::new();
        let mut running = FuturesUnordered::new();
        // The providers and the connected peers the DHT did not name (their
        // announcements may be on the way) are asked for their bitfield.
        let is_connected = |p: &PeerId| self.0.state.read(|s| s.connections.contains_key(p));
        for &p in providers.iter().chain(
            tried
                .iter()
                .filter(|p| !providers.contains(p) && is_connected(p)),
        ) {
            if p != self.0.me && asked.insert(p) {
                running.push(self.handshake(p, file_hash, picker.mine()));
            }
        }
        // The first lookup answered as soon as it found someone; a longer
        // one runs alongside the transfer, and providers it adds are asked.
        let mut late_lookup = std::pin::pin!(self.providers(file_hash, 1));
        let mut late_done = false;
        let t_transfer = Instant::now();
        let mut refreshed = false;
        let piece_size = meta.piece_size;
        let shared_meta = Arc::new(meta.clone());
        let writer = partial.writer();
        let mut verifying = FuturesUnordered::new();
        let mut busy_until: HashMap<PeerId, tokio::time::Instant> = HashMap::new();
        let mut busy_waits = 0u32;
        let mut idle_waits = 0u32;
        let metrics = crate::metrics::metrics();
        let by_source = |partial: bool| {
            metrics
                .torrent_download_bytes
                .get_or_create(&crate::metrics::DownloadLabels {
                    file: meta.name.clone(),
                    source: if partial { "partial" } else { "seeder" }.into(),
                })
                .clone()
        };
        let (from_seeders, from_partial) = (by_source(false), by_source(true));
        while picker.remaining() > 0 {
            let now = tokio::time::Instant::now();
            busy_until.retain(|_, t| *t > now);
            // Hand out pieces: to every usable peer, as many as its rate
            // fills, each the rarest piece it has.
            let wall = Instant::now();
            for &p in active
                .iter()
                .filter(|p| !dropped.contains(p) && !busy_until.contains_key(p))
            {
                let rate = rates.entry(p).or_default();
                let window = rate.window(wall, piece_size);
                while rates.get(&p).map_or(0, Rate::in_flight) < window
                    && picker.n_checking() < MAX_CHECKING
                {
                    let faster = |a: &PeerId, b: &PeerId| clearly_faster(&rates, a, b, wall);
                    let Some(i) = picker.pick(&p, faster) else {
                        break;
                    };
                    picker.requested(i, p);
                    rates.entry(p).or_default().sent(wall);
                    let me = self.clone();
                    let hash = file_hash.to_string();
                    running.push(
                        async move {
                            let req = TorrentRequest::Piece {
                                file_hash: hash,
                                index: i,
                            };
                            (p, Job::Piece(i), me.ask(p, req).await)
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
                            "download of {} stalled: every provider stayed busy, {} pieces missing (resumable)",
                            meta.name,
                            picker.remaining()
                        )));
                    }
                    tokio::time::sleep_until(at).await;
                    continue;
                }
                if let Some(at) = picker
                    .next_undeferred()
                    .filter(|_| idle_waits < MAX_IDLE_WAITS)
                {
                    idle_waits += 1;
                    // The pieces left were sent elsewhere a moment ago: they
                    // may be asked again soon (or come from the others).
                    tokio::select! {
                        _ = news.notified() => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                    for p in
                        self.apply_news(file_hash, &mut picker, &mut active, &mut asked, &dropped)
                    {
                        running.push(self.handshake(p, file_hash, picker.mine()));
                    }
                    continue;
                }
                let downloading = active
                    .iter()
                    .any(|p| !dropped.contains(p) && !picker.is_complete(p));
                if downloading && idle_waits < MAX_IDLE_WAITS {
                    // Only downloaders left, with nothing new yet: wait for
                    // their news (bounded).
                    idle_waits += 1;
                    tokio::select! {
                        _ = news.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    for p in
                        self.apply_news(file_hash, &mut picker, &mut active, &mut asked, &dropped)
                    {
                        running.push(self.handshake(p, file_hash, picker.mine()));
                    }
                    continue;
                }
                if !refreshed {
                    // Everybody we knew failed: look for providers again, once.
                    refreshed = true;
                    let fresh: Vec<PeerId> = self
                        .providers(file_hash, 1)
                        .await
                        .into_iter()
                        .filter(|p| !dropped.contains(p) && !picker.knows(p))
                        .collect();
                    for p in fresh {
                        asked.insert(p);
                        running.push(self.handshake(p, file_hash, picker.mine()));
                    }
                    if !running.is_empty() {
                        continue;
                    }
                }
                let named: Vec<String> = prog
                    .bad_peers
                    .iter()
                    .map(|p| format!("{p} sent bad pieces"))
                    .collect();
                return Err(TorrentError::Failed(format!(
                    "download of {} stalled: no provider left, {} pieces missing (resumable){}",
                    meta.name,
                    picker.remaining(),
                    if named.is_empty() {
                        String::new()
                    } else {
                        format!("; dropped: {}", named.join(", "))
                    }
                )));
            }
            let (peer, job, r) = tokio::select! {
                Some(answer) = running.next(), if !running.is_empty() => answer,
                Some(checked) = verifying.next(), if !verifying.is_empty() => {
                    let (peer, i, len, from_part, r): Checked = checked;
                    match r {
                        Ok(Ok(Verdict::Good(value))) => {
                            picker.checked(i, true);
                            partial.mark_written(i, value);
                            prog.fetched_bytes += len;
                            if from_part {
                                prog.from_partial_bytes += len;
                                from_partial.inc_by(len);
                            } else {
                                prog.from_seeders_bytes += len;
                                from_seeders.inc_by(len);
                            }
                            metrics.torrent_bytes_in.inc_by(len);
                            prog.verified_bytes += len;
                            prog.pieces_done += 1;
                            peers.piece(span, &peer, len);
                            prog.peers =
                                active.iter().filter(|p| !dropped.contains(p)).count() as u32;
                            self.set_progress(&prog);
                            busy_waits = 0;
                            idle_waits = 0;
                            if sharing {
                                let _ = have_tx.send(i);
                                if self.0.announce && !announced {
                                    self.0.net.provide(file_hash.to_string());
                                    announced = true;
                                }
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
                            picker.checked(i, false);
                            self.bad_piece(&mut prog, peers, span, &peer, i, &meta.name);
                            self.drop_peer(file_hash, &peer, &mut dropped, &mut picker);
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
                _ = news.notified() => {
                    for p in self.apply_news(file_hash, &mut picker, &mut active, &mut asked, &dropped) {
                        running.push(self.handshake(p, file_hash, picker.mine()));
                    }
                    continue;
                }
                // A busy seeder's pause ended: hand it pieces again.
                _ = tokio::time::sleep_until(next_free.unwrap_or(now)), if next_free.is_some() => continue,
                found = &mut late_lookup, if !late_done => {
                    late_done = true;
                    for p in found {
                        if !dropped.contains(&p) && asked.len() < MAX_PEERS && asked.insert(p) {
                            debug!("[TORRENT] the DHT names {p} as well; asking it");
                            running.push(self.handshake(p, file_hash, picker.mine()));
                        }
                    }
                    continue;
                }
                else => continue,
            };
            let i = match job {
                Job::Handshake => {
                    match r.map(|a| match a {
                        TorrentResponse::Bitfield { bits, peers } => {
                            Bitfield::from_bytes(&bits, meta.n_pieces())
                                .map(|b| (b, peers))
                                .map_err(|e| e.to_string())
                        }
                        TorrentResponse::Error(e) => Err(e),
                        _ => Err("answered out of turn".into()),
                    }) {
                        Ok(Ok((bits, others))) if !dropped.contains(&peer) => {
                            debug!(
                                "[TORRENT] {peer} has {} of {} pieces; using it",
                                bits.count(),
                                bits.len()
                            );
                            if !bits.is_complete() && sharing {
                                self.0.swarm.heard(file_hash, peer, false, None);
                            }
                            picker.set_view(peer, bits);
                            if !active.contains(&peer) {
                                active.push(peer);
                            }
                            // Peer exchange: the downloaders it knows.
                            for q in others {
                                if q != self.0.me
                                    && !dropped.contains(&q)
                                    && asked.len() < MAX_PEERS
                                    && asked.insert(q)
                                {
                                    running.push(self.handshake(q, file_hash, picker.mine()));
                                }
                            }
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            debug!("[TORRENT] {peer} does not serve {}: {e}", meta.name)
                        }
                        Err(e) => debug!("[TORRENT] {peer} does not serve {}: {e}", meta.name),
                    }
                    continue;
                }
                Job::Piece(i) => i,
            };
            picker.answered(i, &peer);
            let got = match &r {
                Ok(TorrentResponse::Piece { index, data })
                | Ok(TorrentResponse::PartialPiece { index, data })
                    if *index == i =>
                {
                    data.len() as u64
                }
                _ => 0,
            };
            rates.entry(peer).or_default().answered(Instant::now(), got);
            let from_part = matches!(r, Ok(TorrentResponse::PartialPiece { .. }));
            let ok = match r {
                Ok(TorrentResponse::Piece { index, data })
                | Ok(TorrentResponse::PartialPiece { index, data })
                    if index == i =>
                {
                    // A second copy (endgame) of a piece already here or
                    // being verified is not needed.
                    if picker.checking(i) {
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
                                (peer, i, len, from_part, r)
                            }
                            .boxed(),
                        );
                    }
                    true
                }
                Ok(TorrentResponse::Piece { .. }) | Ok(TorrentResponse::PartialPiece { .. }) => {
                    self.bad_piece(&mut prog, peers, span, &peer, i, &meta.name);
                    false
                }
                Ok(TorrentResponse::Error(e)) => {
                    debug!("[TORRENT] {peer} could not send piece {i}: {e}");
                    false
                }
                Ok(TorrentResponse::Elsewhere(e)) => {
                    // A capped seeder sent the piece to another downloader:
                    // it comes from that one (or from the seeder later).
                    debug!("[TORRENT] {peer} sends piece {i} elsewhere ({e})");
                    picker.defer(peer, i, Instant::now() + DEFER);
                    true
                }
                Ok(TorrentResponse::Busy(e)) => {
                    // Not the peer's fault: leave it alone for a moment (the
                    // piece is free to be asked of someone else).
                    debug!("[TORRENT] {peer} is busy ({e}); piece {i} goes back in line");
                    busy_until.insert(peer, tokio::time::Instant::now() + BUSY_BACKOFF);
                    true
                }
                Ok(_) => false,
                Err(e) => {
                    warn!(
                        "[TORRENT] {peer} failed while sending piece {i} of {}: {e}; dropping it",
                        meta.name
                    );
                    peers.failed(span, &peer, &e.to_string());
                    false
                }
            };
            if !ok {
                self.drop_peer(file_hash, &peer, &mut dropped, &mut picker);
            }
        }
        drop(running);
        drop(writer);
        drop(have_tx);
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
            "[TORRENT] {} complete and verified: {} bytes fetched in {:.3} s ({:.1} MB/s), pieces transferred in {:.3} s ({:.1} MB/s), {} bytes from complete seeders and {} from partial ones{}",
            meta.name,
            prog.fetched_bytes,
            secs,
            prog.fetched_bytes as f64 / secs.max(1e-9) / 1e6,
            tsecs,
            prog.fetched_bytes as f64 / tsecs.max(1e-9) / 1e6,
            prog.from_seeders_bytes,
            prog.from_partial_bytes,
            if seeding { ", seeding" } else { "" }
        );
        Ok(path)
    }
}
