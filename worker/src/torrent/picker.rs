//! Which piece to ask which peer for, and how many requests each peer gets.
//!
//! Pieces go rarest first: among the missing pieces a peer has that nobody
//! was asked for yet and no clearly faster peer has, the one the fewest
//! peers hold, ties broken in a random order of this node's own (drawn from
//! its peer id, so downloaders starting together from one seeder seldom ask
//! it for the same pieces; walking the file from different offsets instead
//! makes a downloader that catches up with another skip straight into the
//! pieces the other has in flight).
//! Once every missing piece is asked for (end game), a peer with nothing new
//! duplicates a piece in flight (at most two requests per piece) if it is
//! clearly faster than the peer asked before (a slow seeder's upload is not
//! spent on copies a downloader will have sooner from elsewhere). Each peer gets as many requests at once as its
//! measured rate fills in [`WINDOW`] (between 1 and [`MAX_IN_FLIGHT`]): a
//! seeder whose upload many share gets one or two, an idle peer on a fast
//! link the most.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::bitfield::Bitfield;

/// Requests in flight to a peer whose rate is not known yet.
pub const FIRST_IN_FLIGHT: usize = 2;
/// Most requests in flight to one peer.
pub const MAX_IN_FLIGHT: usize = 8;
/// Time with requests outstanding after which a peer's rate counts even if
/// it delivered nothing.
pub const MEASURED_AFTER: Duration = Duration::from_millis(200);
/// Time of transfer a peer's requests in flight should cover.
pub const WINDOW: Duration = Duration::from_millis(500);

/// A peer's measured rate: bytes it delivered over the time it had
/// requests outstanding.
#[derive(Debug, Default, Clone)]
pub struct Rate {
    bytes: u64,
    busy: Duration,
    since: Option<Instant>,
    in_flight: usize,
}

impl Rate {
    pub fn sent(&mut self, now: Instant) {
        if self.in_flight == 0 {
            self.since = Some(now);
        }
        self.in_flight += 1;
    }

    /// An answer came (`bytes` of piece data, 0 for none).
    pub fn answered(&mut self, now: Instant, bytes: u64) {
        self.bytes += bytes;
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0
            && let Some(s) = self.since.take()
        {
            self.busy += now.duration_since(s);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Bytes per second, once something was delivered or requests were
    /// outstanding for [`MEASURED_AFTER`] (a peer that sends nothing then
    /// measures 0).
    pub fn bytes_per_sec(&self, now: Instant) -> Option<f64> {
        let busy = self.busy + self.since.map_or(Duration::ZERO, |s| now.duration_since(s));
        ((self.bytes > 0 && !busy.is_zero()) || busy >= MEASURED_AFTER)
            .then(|| self.bytes as f64 / busy.as_secs_f64())
    }

    /// Requests this peer may have in flight, for pieces of `piece_len`.
    pub fn window(&self, now: Instant, piece_len: u64) -> usize {
        match self.bytes_per_sec(now) {
            None => FIRST_IN_FLIGHT,
            Some(r) => ((r * WINDOW.as_secs_f64() / piece_len.max(1) as f64).round() as usize)
                .clamp(1, MAX_IN_FLIGHT),
        }
    }
}

pub struct Picker {
    /// Pieces this node holds, verified.
    mine: Bitfield,
    /// How many usable peers hold each piece.
    avail: Vec<u32>,
    /// Tie-break order of this node.
    rank: Vec<u64>,
    views: HashMap<PeerId, Bitfield>,
    requested: HashMap<u32, HashSet<PeerId>>,
    checking: HashSet<u32>,
    /// Pieces not to ask of a peer until a moment (it sent them elsewhere).
    deferred: HashMap<(PeerId, u32), Instant>,
}

impl Picker {
    /// Pieces of a file of `mine.len()` pieces, holding `mine`; ties broken
    /// in an order drawn from `me`.
    pub fn new(mine: Bitfield, me: &PeerId) -> Picker {
        let seed = me.to_bytes();
        let rank = (0..mine.len())
            .map(|i| {
                let mut h = blake3::Hasher::new();
                h.update(&seed);
                h.update(&i.to_le_bytes());
                let b = h.finalize();
                u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or_default())
            })
            .collect();
        Picker {
            avail: vec![0; mine.len() as usize],
            mine,
            rank,
            views: HashMap::new(),
            requested: HashMap::new(),
            checking: HashSet::new(),
            deferred: HashMap::new(),
        }
    }

    pub fn mine(&self) -> &Bitfield {
        &self.mine
    }

    pub fn remaining(&self) -> u32 {
        self.mine.len() - self.mine.count()
    }

    pub fn is_done(&self, i: u32) -> bool {
        self.mine.has(i)
    }

    /// `peer`'s whole bitfield (replacing what was known of it).
    pub fn set_view(&mut self, peer: PeerId, bits: Bitfield) {
        self.remove_peer(&peer);
        for i in bits.ones() {
            self.avail[i as usize] += 1;
        }
        self.views.insert(peer, bits);
    }

    /// `peer` verified piece `i`; false when nothing is known of `peer`.
    pub fn add_have(&mut self, peer: &PeerId, i: u32) -> bool {
        let Some(v) = self.views.get_mut(peer) else {
            return false;
        };
        if i < v.len() && !v.has(i) {
            v.set(i);
            self.avail[i as usize] += 1;
        }
        true
    }

    /// A peer no longer asked (it lied or failed).
    pub fn remove_peer(&mut self, peer: &PeerId) {
        if let Some(old) = self.views.remove(peer) {
            for i in old.ones() {
                self.avail[i as usize] -= 1;
            }
        }
    }

    pub fn knows(&self, peer: &PeerId) -> bool {
        self.views.contains_key(peer)
    }

    pub fn is_complete(&self, peer: &PeerId) -> bool {
        self.views.get(peer).is_some_and(Bitfield::is_complete)
    }

    fn has(&self, peer: &PeerId, i: u32) -> bool {
        self.views.get(peer).is_some_and(|v| v.has(i))
    }

    fn wanted(&self, i: u32) -> bool {
        !self.mine.has(i) && !self.checking.contains(&i)
    }

    fn asked(&self, i: u32) -> usize {
        self.requested.get(&i).map_or(0, HashSet::len)
    }

    /// The next piece to ask `peer` for, if it has one this node wants;
    /// `faster(p, q)`: peer `p` is clearly faster than `q` (end game).
    pub fn pick(&self, peer: &PeerId, faster: impl Fn(&PeerId, &PeerId) -> bool) -> Option<u32> {
        let n = self.mine.len();
        // A piece that a clearly faster peer also has is left to that peer
        // (a capped seeder's upload goes to pieces nobody else has).
        let now = Instant::now();
        let fresh = (0..n)
            .filter(|&i| {
                self.wanted(i)
                    && self.asked(i) == 0
                    && self.has(peer, i)
                    && !self.is_deferred(peer, i, now)
                    && !self
                        .views
                        .iter()
                        .any(|(q, v)| q != peer && v.has(i) && faster(q, peer))
            })
            .min_by_key(|&i| (self.avail[i as usize], self.rank[i as usize]));
        if fresh.is_some() {
            return fresh;
        }
        // End game only when every wanted piece is asked for.
        if (0..n).any(|i| self.wanted(i) && self.asked(i) == 0) {
            return None;
        }
        (0..n)
            .filter(|&i| {
                self.wanted(i)
                    && self.has(peer, i)
                    && !self.is_deferred(peer, i, now)
                    && self.asked(i) < 2
                    && self
                        .requested
                        .get(&i)
                        .is_some_and(|w| !w.contains(peer) && w.iter().all(|q| faster(peer, q)))
            })
            .min_by_key(|&i| (self.asked(i), self.rank[i as usize]))
    }

    /// Piece `i` is not asked of `peer` before `until`.
    pub fn defer(&mut self, peer: PeerId, i: u32, until: Instant) {
        let now = Instant::now();
        self.deferred.retain(|_, t| *t > now);
        self.deferred.insert((peer, i), until);
    }

    /// When the first deferral still running ends.
    pub fn next_undeferred(&self) -> Option<Instant> {
        let now = Instant::now();
        self.deferred.values().filter(|t| **t > now).min().copied()
    }

    fn is_deferred(&self, peer: &PeerId, i: u32, now: Instant) -> bool {
        self.deferred.get(&(*peer, i)).is_some_and(|t| *t > now)
    }

    pub fn requested(&mut self, i: u32, peer: PeerId) {
        self.requested.entry(i).or_default().insert(peer);
    }

    /// `peer` answered its request for piece `i` (whatever the answer).
    pub fn answered(&mut self, i: u32, peer: &PeerId) {
        if let Some(w) = self.requested.get_mut(&i) {
            w.remove(peer);
            if w.is_empty() {
                self.requested.remove(&i);
            }
        }
    }

    /// Piece `i` arrived and is being verified; true unless it already is
    /// (or is done).
    pub fn checking(&mut self, i: u32) -> bool {
        !self.mine.has(i) && self.checking.insert(i)
    }

    /// The verification of piece `i` ended: `good`, it is this node's now.
    pub fn checked(&mut self, i: u32, good: bool) {
        self.checking.remove(&i);
        if good {
            self.mine.set(i);
            self.requested.remove(&i);
        }
    }

    pub fn n_checking(&self) -> usize {
        self.checking.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(n: u32, ones: &[u32]) -> Bitfield {
        let mut b = Bitfield::empty(n);
        for &i in ones {
            b.set(i);
        }
        b
    }

    #[test]
    fn the_rarest_piece_a_peer_has_comes_first_and_end_game_duplicates_once() {
        let me = PeerId::random();
        let (seeder, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let (yes, no) = (
            |_: &PeerId, _: &PeerId| true,
            |_: &PeerId, _: &PeerId| false,
        );
        let mut p = Picker::new(bits(4, &[0]), &me);
        p.set_view(seeder, Bitfield::full(4));
        p.set_view(a, bits(4, &[1, 2]));
        p.set_view(b, bits(4, &[2]));
        // Piece 3 is held by the seeder alone; 1 by two peers; 2 by three.
        assert_eq!(p.pick(&seeder, no), Some(3));
        assert_eq!(p.pick(&a, no), Some(1));
        assert_eq!(p.pick(&b, no), Some(2));
        // A piece a clearly faster peer has is left to it.
        let b_is_faster = |x: &PeerId, _: &PeerId| *x == b;
        assert_eq!(p.pick(&a, b_is_faster), Some(1));
        assert_eq!(p.pick(&seeder, b_is_faster), Some(3));
        p.requested(3, seeder);
        p.requested(1, a);
        assert_eq!(p.pick(&seeder, no), Some(2));
        assert_eq!(p.pick(&seeder, b_is_faster), None);
        p.requested(2, b);
        // Everything is asked for: end game, one duplicate per piece, and
        // only from a peer faster than the one asked.
        assert_eq!(p.pick(&seeder, no), None);
        let dup = p.pick(&seeder, yes).unwrap();
        assert!(dup == 1 || dup == 2, "{dup}");
        p.requested(dup, seeder);
        assert_eq!(p.pick(&a, yes), Some(2).filter(|_| dup == 1));
        // A piece a seeder sent elsewhere is not asked of it for a moment.
        let mut q = Picker::new(Bitfield::empty(2), &me);
        q.set_view(seeder, Bitfield::full(2));
        q.defer(seeder, 0, Instant::now() + Duration::from_secs(60));
        q.defer(seeder, 1, Instant::now());
        assert_eq!(q.pick(&seeder, no), Some(1));
        assert!(q.next_undeferred().is_some());
        // A peer that lied no longer counts.
        p.remove_peer(&a);
        assert!(!p.knows(&a));
        assert!(p.add_have(&b, 1));
        assert!(!p.add_have(&a, 1));
        assert!(p.checking(2) && !p.checking(2));
        p.checked(2, true);
        assert!(p.is_done(2) && p.remaining() == 2);
        assert!(p.is_complete(&seeder) && !p.is_complete(&b));
    }

    #[test]
    fn downloaders_break_ties_in_different_orders() {
        let seeder = PeerId::random();
        let firsts: HashSet<u32> = (0..8)
            .map(|_| {
                let mut p = Picker::new(Bitfield::empty(64), &PeerId::random());
                p.set_view(seeder, Bitfield::full(64));
                p.pick(&seeder, |_, _| false).unwrap()
            })
            .collect();
        assert!(firsts.len() > 1, "{firsts:?}");
    }

    #[test]
    fn a_peer_gets_as_many_requests_as_its_rate_fills() {
        let t = Instant::now();
        let mut r = Rate::default();
        assert_eq!(r.window(t, 1 << 20), FIRST_IN_FLIGHT);
        // 1 MiB in 1 s: half a piece per window, rounded up to one.
        r.sent(t);
        r.answered(t + Duration::from_secs(1), 1 << 20);
        assert_eq!(r.window(t + Duration::from_secs(1), 1 << 20), 1);
        // 100 MiB/s: the most.
        let mut fast = Rate::default();
        fast.sent(t);
        fast.answered(t + Duration::from_millis(10), 1 << 20);
        assert_eq!(fast.window(t, 1 << 20), MAX_IN_FLIGHT);
        assert_eq!(fast.in_flight(), 0);
    }
}
