//! Answering other peers: metadata, pieces (of complete files, and with
//! partial seeding the verified pieces of downloads in progress, all under
//! the one upload limit), bitfields (a downloader's handshake, answered
//! with this node's bitfield and the other downloaders it knows) and
//! "have" news.

use super::bitfield::Bitfield;
use super::protocol::PIECE_HEADER;
use super::store::PieceSource;
use super::swarm_state::PeerNews;
use super::*;

impl Torrents {
    /// The pieces of `file_hash` this node serves, if any.
    fn served_bitfield(&self, file_hash: &str) -> Option<Bitfield> {
        match self.0.store.seed(file_hash) {
            Some(s) => Some(Bitfield::full(s.meta.n_pieces())),
            None if self.0.partial_seeding => self.0.store.bitfield(file_hash),
            None => None,
        }
    }

    /// Answers one inbound piece-protocol request.
    pub async fn serve(&self, from: PeerId, bytes: Vec<u8>) -> Vec<u8> {
        let resp = match TorrentRequest::decode(&bytes) {
            Err(e) => {
                warn!("[TORRENT] malformed request from {from}: {e}");
                TorrentResponse::Error(format!("malformed request: {e}"))
            }
            Ok(TorrentRequest::Meta { file_hash }) => self.serve_meta(&file_hash).await,
            Ok(TorrentRequest::Piece { file_hash, index }) => {
                return self.serve_piece(from, file_hash, index).await;
            }
            Ok(TorrentRequest::Bitfield { file_hash, bits }) => {
                match self.served_bitfield(&file_hash) {
                    None => TorrentResponse::Error(format!("no file {file_hash} here")),
                    Some(mine) => match Bitfield::from_bytes(&bits, mine.len()) {
                        Err(e) => TorrentResponse::Error(format!("bad bitfield: {e}")),
                        Ok(theirs) => {
                            if self.0.partial_seeding {
                                self.0.swarm.heard(
                                    &file_hash,
                                    from,
                                    theirs.is_complete(),
                                    Some(PeerNews::Bitfield(bits)),
                                );
                            }
                            TorrentResponse::Bitfield {
                                bits: mine.to_bytes(),
                                peers: if self.0.partial_seeding {
                                    self.0.swarm.downloaders(&file_hash, Some(&from))
                                } else {
                                    vec![]
                                },
                            }
                        }
                    },
                }
            }
            Ok(TorrentRequest::Have { file_hash, pieces }) => {
                match self.served_bitfield(&file_hash) {
                    None => TorrentResponse::Error(format!("no file {file_hash} here")),
                    Some(mine) if pieces.iter().any(|&i| i >= mine.len()) => {
                        TorrentResponse::Error("have news past the file's end".into())
                    }
                    Some(_) => {
                        self.0
                            .swarm
                            .heard(&file_hash, from, false, Some(PeerNews::Have(pieces)));
                        TorrentResponse::Ack
                    }
                }
            }
        };
        resp.encode()
    }

    async fn serve_meta(&self, file_hash: &str) -> TorrentResponse {
        match self.0.store.seed(file_hash) {
            Some(s) if self.0.hooks.lying_meta => {
                let me = self.clone();
                let meta = tokio::task::spawn_blocking(move || {
                    let mut m = s.meta.clone();
                    for i in 0..m.n_pieces() {
                        if let Ok(mut d) = me.0.store.read_piece(&m.file_hash, i) {
                            if let Some(b) = d.first_mut() {
                                *b ^= 0xff;
                            }
                            m.pieces[i as usize] =
                                meta::hex(&tree_hash::piece_value(&d, i, m.piece_size, m.size));
                        }
                    }
                    m
                })
                .await;
                match meta {
                    Ok(m) => TorrentResponse::Meta(m.encode()),
                    Err(e) => TorrentResponse::Error(e.to_string()),
                }
            }
            Some(s) if self.0.hooks.wrong_size_meta => {
                let mut m = s.meta.clone();
                m.size = m.size.saturating_sub(1);
                TorrentResponse::Meta(m.encode())
            }
            Some(s) => TorrentResponse::Meta(s.meta.encode()),
            // A download in progress serves the metadata it verified its
            // pieces by.
            None => match self.0.store.shared_meta(file_hash) {
                Some(m) if self.0.partial_seeding => TorrentResponse::Meta(m.encode()),
                _ => TorrentResponse::Error(format!("no complete file {file_hash} here")),
            },
        }
    }

    async fn serve_piece(&self, from: PeerId, file_hash: String, index: u32) -> Vec<u8> {
        if !self.0.hooks.piece_delay.is_zero() {
            tokio::time::sleep(self.0.hooks.piece_delay).await;
        }
        let from_partial = !self.0.store.has_seed(&file_hash);
        if from_partial && !self.0.partial_seeding {
            return TorrentResponse::Error(format!("no complete file {file_hash} here")).encode();
        }
        let len = self.0.store.piece_len(&file_hash, index).unwrap_or(0) as usize;
        if self
            .0
            .hooks
            .busy_pieces
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            return TorrentResponse::Busy("test: busy".into()).encode();
        }
        // A capped seeder's upload is the swarm's scarcest resource: a piece
        // it is sending to one downloader, or sent a moment ago, the others
        // get from that one.
        let claimed = self.0.upload_limit.is_some() && self.0.partial_seeding && len > 0;
        let connected = |p: &PeerId| self.0.state.read(|s| s.connections.contains_key(p));
        if claimed && let Some(other) = self.0.swarm.claim(&file_hash, index, from, connected) {
            return TorrentResponse::Elsewhere(format!("piece {index} went to {other}")).encode();
        }
        // Under an upload limit the piece waits its turn before it is read
        // (no piece sits in memory while it waits), whether it comes from a
        // complete file or a download in progress.
        if let Some(l) = &self.0.upload_limit
            && let Err(wait) = l.take_in_line(len).await
        {
            debug!("[TORRENT] busy: piece {index} for {from} would wait {wait:.1?}");
            if claimed {
                self.0.swarm.sent(&file_hash, index, &from, false);
            }
            return TorrentResponse::Busy(format!(
                "upload limit of {} MB/s: {:.0} s of pieces in line",
                l.mb_per_sec(),
                wait.as_secs_f64()
            ))
            .encode();
        }
        // The piece is read straight into the response frame.
        let me = self.clone();
        let hash = file_hash.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut frame = TorrentResponse::piece_frame(index, len, false);
            me.0.store
                .read_piece_into(&hash, index, &mut frame)
                .map(|source| (frame, source))
        })
        .await;
        if claimed {
            self.0
                .swarm
                .sent(&file_hash, index, &from, matches!(r, Ok(Ok(_))));
        }
        let resp = match r {
            Ok(Ok((mut frame, source))) => {
                let n = frame.len() - PIECE_HEADER;
                crate::metrics::metrics().torrent_bytes_out.inc_by(n as u64);
                let partial = source == PieceSource::Partial;
                if partial {
                    frame[0] = TorrentResponse::piece_frame(index, 0, true)[0];
                }
                if (self.0.hooks.corrupt_pieces
                    || (partial && self.0.hooks.corrupt_partial_uploads))
                    && n > 0
                {
                    frame[PIECE_HEADER] ^= 0xff;
                }
                return frame;
            }
            Ok(Err(e)) => TorrentResponse::Error(e.to_string()),
            Err(e) => TorrentResponse::Error(e.to_string()),
        };
        resp.encode()
    }
}
