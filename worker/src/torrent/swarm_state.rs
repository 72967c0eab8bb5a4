//! Who else is fetching a file, as this node heard it: the peers that sent
//! their bitfield or "have" news for a file this node holds (all of it or
//! verified pieces), kept a while for peer exchange (a handshake's answer
//! names them) and as the audience of this node's own "have" news; and,
//! while this node downloads the file, that news queued for its download
//! loop, which a [`Notify`] wakes. Bounded: [`MAX_DOWNLOADERS`] peers and
//! [`MAX_NEWS`] queued items per file, entries forgotten after
//! [`DOWNLOADER_TTL`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::Notify;

use super::protocol::MAX_PEX;

/// Peers remembered per file as downloading it.
pub const MAX_DOWNLOADERS: usize = 256;
/// News items queued per file for the download loop.
pub const MAX_NEWS: usize = 4096;
/// How long a peer that said nothing more stays listed.
pub const DOWNLOADER_TTL: Duration = Duration::from_secs(600);
/// How long after a capped seeder sent a piece to one downloader it sends
/// the others elsewhere for it (that one shares it meanwhile).
pub const SENT_HOLD: Duration = Duration::from_secs(2);

/// What a peer told this node about its pieces of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerNews {
    /// Its whole bitfield (wire form).
    Bitfield(Vec<u8>),
    /// Pieces it verified since.
    Have(Vec<u32>),
}

#[derive(Default)]
struct FileSwarm {
    /// Peers downloading the file, and when they were last heard from.
    downloaders: HashMap<PeerId, Instant>,
    /// News for this node's download of the file, while it runs.
    news: Option<VecDeque<(PeerId, PeerNews)>>,
    notify: Arc<Notify>,
    /// Pieces this node (a capped seeder) is sending or sent a moment ago,
    /// to whom, and since when (`None`: still in line).
    sent: HashMap<u32, (PeerId, Option<Instant>)>,
}

#[derive(Default)]
pub struct SwarmState(Mutex<HashMap<String, FileSwarm>>);

impl SwarmState {
    fn with<T>(&self, file: &str, f: impl FnOnce(&mut FileSwarm) -> T) -> T {
        let mut files = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(files.entry(file.to_string()).or_default())
    }

    /// Like [`SwarmState::with`], for a file already listed (nothing is
    /// added for a file this node never held).
    fn with_listed(&self, file: &str, f: impl FnOnce(&mut FileSwarm)) {
        let mut files = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = files.get_mut(file) {
            f(e)
        }
    }

    /// `peer` spoke about `file` (the caller checked that this node holds
    /// it): listed as downloading unless it holds all of it, and its news
    /// queued for this node's download, if one runs.
    pub fn heard(&self, file: &str, peer: PeerId, complete: bool, news: Option<PeerNews>) {
        self.with(file, |f| {
            let now = Instant::now();
            f.downloaders
                .retain(|_, t| now.duration_since(*t) < DOWNLOADER_TTL);
            if complete {
                f.downloaders.remove(&peer);
            } else {
                if f.downloaders.len() >= MAX_DOWNLOADERS
                    && !f.downloaders.contains_key(&peer)
                    && let Some(oldest) = f.downloaders.iter().min_by_key(|(_, t)| **t)
                {
                    let oldest = *oldest.0;
                    f.downloaders.remove(&oldest);
                }
                f.downloaders.insert(peer, now);
            }
            if let (Some(q), Some(n)) = (f.news.as_mut(), news) {
                if q.len() >= MAX_NEWS {
                    q.pop_front();
                }
                q.push_back((peer, n));
                f.notify.notify_one();
            }
        })
    }

    /// Peers downloading `file`, most recently heard first, at most
    /// [`MAX_PEX`], without `except`.
    pub fn downloaders(&self, file: &str, except: Option<&PeerId>) -> Vec<PeerId> {
        self.with(file, |f| {
            let now = Instant::now();
            let mut v: Vec<(PeerId, Instant)> = f
                .downloaders
                .iter()
                .filter(|(p, t)| Some(*p) != except && now.duration_since(**t) < DOWNLOADER_TTL)
                .map(|(p, t)| (*p, *t))
                .collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.1));
            v.into_iter().take(MAX_PEX).map(|(p, _)| p).collect()
        })
    }

    /// A peer that lied or failed: no longer named to others.
    pub fn forget(&self, file: &str, peer: &PeerId) {
        self.with_listed(file, |f| {
            f.downloaders.remove(peer);
        })
    }

    /// A capped seeder is asked for piece `i` by `peer`: `Some(other)` when
    /// it is sending the piece to another downloader, or sent it within
    /// [`SENT_HOLD`], that one is still there (`alive`) and other
    /// downloaders than `peer` have pieces waiting in this seeder's line
    /// (its upload is contended); `peer` gets the piece from `other`. Else
    /// the piece is `peer`'s to send, until [`SwarmState::sent`].
    pub fn claim(
        &self,
        file: &str,
        i: u32,
        peer: PeerId,
        alive: impl Fn(&PeerId) -> bool,
    ) -> Option<PeerId> {
        self.with(file, |f| {
            let now = Instant::now();
            f.sent
                .retain(|_, (_, at)| at.is_none_or(|t| now.duration_since(t) < SENT_HOLD));
            let contended = f.sent.values().any(|(p, at)| at.is_none() && *p != peer);
            match f.sent.get(&i) {
                Some((other, _))
                    if contended
                        && *other != peer
                        && f.downloaders.contains_key(other)
                        && alive(other) =>
                {
                    Some(*other)
                }
                _ => {
                    f.sent.insert(i, (peer, None));
                    None
                }
            }
        })
    }

    /// The piece claimed by `peer` went out (`ok`) or did not.
    pub fn sent(&self, file: &str, i: u32, peer: &PeerId, ok: bool) {
        self.with(file, |f| {
            if f.sent.get(&i).is_some_and(|(p, _)| p == peer) {
                if ok {
                    f.sent.insert(i, (*peer, Some(Instant::now())));
                } else {
                    f.sent.remove(&i);
                }
            }
        })
    }

    /// A download of `file` starts: news is queued for it from now on; the
    /// returned [`Notify`] wakes when some arrives.
    pub fn listen(&self, file: &str) -> Arc<Notify> {
        self.with(file, |f| {
            f.news = Some(VecDeque::new());
            f.notify.clone()
        })
    }

    /// The download of `file` ended.
    pub fn unlisten(&self, file: &str) {
        self.with_listed(file, |f| f.news = None)
    }

    /// News queued since the last call.
    pub fn take_news(&self, file: &str) -> Vec<(PeerId, PeerNews)> {
        self.with(file, |f| {
            f.news
                .as_mut()
                .map(|q| q.drain(..).collect())
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloaders_are_listed_newest_first_and_news_reaches_a_running_download_only() {
        let s = SwarmState::default();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        // No download running: the peer is listed, its news dropped.
        s.heard("f", a, false, Some(PeerNews::Have(vec![1])));
        assert!(s.take_news("f").is_empty());
        let notify = s.listen("f");
        std::thread::sleep(Duration::from_millis(2));
        s.heard("f", b, false, Some(PeerNews::Bitfield(vec![3])));
        s.heard("f", c, true, None);
        assert_eq!(s.downloaders("f", None), vec![b, a]);
        assert_eq!(s.downloaders("f", Some(&b)), vec![a]);
        assert_eq!(s.take_news("f"), vec![(b, PeerNews::Bitfield(vec![3]))]);
        // The wake-up was stored for the loop's next wait.
        assert!(futures::FutureExt::now_or_never(notify.notified()).is_some());
        // A peer that completes or lies leaves the list.
        s.heard("f", a, true, None);
        s.forget("f", &b);
        assert!(s.downloaders("f", None).is_empty());
        s.unlisten("f");
        s.heard("f", a, false, Some(PeerNews::Have(vec![2])));
        assert!(s.take_news("f").is_empty());
    }

    #[test]
    fn a_piece_sent_to_one_downloader_sends_the_others_there_for_a_moment() {
        let s = SwarmState::default();
        let (a, b, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
        for p in [a, b] {
            s.heard("f", p, false, None);
        }
        let yes = |_: &PeerId| true;
        assert_eq!(s.claim("f", 3, a, yes), None);
        // In line for a (so a is waiting: contended): b is sent to a, a
        // itself may ask again.
        assert_eq!(s.claim("f", 3, b, yes), Some(a));
        assert_eq!(s.claim("f", 3, a, yes), None);
        s.sent("f", 3, &a, true);
        // Sent a moment ago, but nobody else waits in line: b gets it here.
        assert_eq!(s.claim("f", 3, b, yes), None);
        s.sent("f", 3, &b, true);
        // While a has another piece in line, b is sent to a for one a just got.
        assert_eq!(s.claim("f", 7, a, yes), None);
        s.sent("f", 7, &a, true);
        assert_eq!(s.claim("f", 9, a, yes), None);
        assert_eq!(s.claim("f", 7, b, yes), Some(a));
        // Nor to one that is gone.
        assert_eq!(s.claim("f", 7, b, |p: &PeerId| *p != a), None);
        // A failed send frees the piece.
        assert_eq!(s.claim("f", 4, a, yes), None);
        s.sent("f", 4, &a, false);
        assert_eq!(s.claim("f", 4, b, yes), None);
        // Nobody is sent to a peer that is not known to be downloading.
        assert_eq!(s.claim("f", 5, stranger, yes), None);
        assert_eq!(s.claim("f", 5, a, yes), None);
        s.forget("f", &b);
        assert_eq!(s.claim("f", 4, a, yes), None);
    }

    #[test]
    fn the_lists_are_bounded() {
        let s = SwarmState::default();
        s.listen("f");
        for _ in 0..MAX_DOWNLOADERS + 10 {
            s.heard("f", PeerId::random(), false, Some(PeerNews::Have(vec![0])));
        }
        let n = s.with("f", |f| f.downloaders.len());
        assert_eq!(n, MAX_DOWNLOADERS);
        assert_eq!(s.downloaders("f", None).len(), MAX_PEX);
        for _ in 0..MAX_NEWS {
            s.heard("f", PeerId::random(), false, Some(PeerNews::Have(vec![0])));
        }
        assert_eq!(s.take_news("f").len(), MAX_NEWS);
    }
}
