//! Swapping news with the other peers of a download: the bitfield
//! handshake (this node's pieces for the other side's, plus the downloaders
//! it knows of), "have" news of each verified piece sent to the downloaders
//! this node knows, and what they told it applied to the download's
//! [`Picker`].

use tokio::sync::mpsc;

use super::bitfield::Bitfield;
use super::picker::Picker;
use super::swarm_state::PeerNews;
use super::transfer::{Answer, Job, MAX_PEERS};
use super::*;

impl Torrents {
    pub(super) fn handshake(
        &self,
        p: PeerId,
        file_hash: &str,
        mine: &Bitfield,
    ) -> futures::future::BoxFuture<'static, Answer> {
        let me = self.clone();
        let req = TorrentRequest::Bitfield {
            file_hash: file_hash.to_string(),
            bits: if self.0.partial_seeding {
                mine.to_bytes()
            } else {
                Bitfield::empty(mine.len()).to_bytes()
            },
        };
        async move { (p, Job::Handshake, me.ask(p, req).await) }.boxed()
    }

    /// Tells the downloaders of `file_hash` this node knows of about the
    /// pieces it verified, as they come (batched while a round is sent).
    pub(super) fn spawn_have_news(&self, file_hash: &str, mut rx: mpsc::UnboundedReceiver<u32>) {
        let me = self.clone();
        let hash = file_hash.to_string();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut pieces = vec![first];
                while let Ok(i) = rx.try_recv() {
                    pieces.push(i);
                }
                let req = TorrentRequest::Have {
                    file_hash: hash.clone(),
                    pieces,
                };
                // A peer that does not take the news (gone, or no longer
                // holding the file) is told no more.
                let sends = me.0.swarm.downloaders(&hash, None).into_iter().map(|p| {
                    let (me, req) = (me.clone(), req.clone());
                    async move { (p, me.ask(p, req).await) }
                });
                for (p, r) in futures::future::join_all(sends).await {
                    if !matches!(r, Ok(TorrentResponse::Ack)) {
                        me.0.swarm.forget(&hash, &p);
                    }
                }
            }
        });
    }

    /// A peer that lied or failed: not asked again in this download, not
    /// named to others.
    pub(super) fn drop_peer(
        &self,
        file_hash: &str,
        peer: &PeerId,
        dropped: &mut HashSet<PeerId>,
        picker: &mut Picker,
    ) {
        dropped.insert(*peer);
        picker.remove_peer(peer);
        self.0.swarm.forget(file_hash, peer);
    }

    /// Applies what downloaders told this node since the last call: their
    /// bitfields (a peer that asked for this node's joins the download) and
    /// their "have" news; returns the peers not known yet that sent news
    /// (to be asked for their bitfield).
    pub(super) fn apply_news(
        &self,
        file_hash: &str,
        picker: &mut Picker,
        active: &mut Vec<PeerId>,
        asked: &mut HashSet<PeerId>,
        dropped: &HashSet<PeerId>,
    ) -> Vec<PeerId> {
        let n = picker.mine().len();
        let mut unknown = Vec::new();
        for (p, item) in self.0.swarm.take_news(file_hash) {
            if dropped.contains(&p) || p == self.0.me {
                continue;
            }
            match item {
                PeerNews::Bitfield(b) => match Bitfield::from_bytes(&b, n) {
                    Ok(bits) => {
                        picker.set_view(p, bits);
                        asked.insert(p);
                        if !active.contains(&p) {
                            debug!("[TORRENT] {p} is downloading this file too; using it");
                            active.push(p);
                        }
                    }
                    Err(e) => debug!("[TORRENT] {p} sent a bad bitfield: {e}"),
                },
                PeerNews::Have(pieces) => {
                    let known = pieces.into_iter().all(|i| picker.add_have(&p, i));
                    // Asked again even if it once said it lacked the file:
                    // it has pieces now.
                    if !known && (asked.contains(&p) || asked.len() < MAX_PEERS) {
                        asked.insert(p);
                        unknown.push(p);
                    }
                }
            }
        }
        unknown
    }
}
