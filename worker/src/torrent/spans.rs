//! One `torrent.peer` tracing span per provider a download used, child of
//! its `torrent.download` span, with the peer's tally.

use std::collections::HashMap;

use libp2p::PeerId;

/// One `torrent.peer` span per provider a download used, with its tally.
#[derive(Default)]
pub(super) struct PeerSpans(HashMap<PeerId, PeerTally>);

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

    pub(super) fn piece(&mut self, parent: &tracing::Span, peer: &PeerId, bytes: u64) {
        let t = self.get(parent, peer);
        t.pieces += 1;
        t.bytes += bytes;
    }

    pub(super) fn bad(&mut self, parent: &tracing::Span, peer: &PeerId) {
        let t = self.get(parent, peer);
        t.bad += 1;
    }

    pub(super) fn failed(&mut self, parent: &tracing::Span, peer: &PeerId, e: &str) {
        let t = self.get(parent, peer);
        t.span.record("error", e);
    }

    /// Records the tallies and ends the spans.
    pub(super) fn finish(self) {
        for t in self.0.into_values() {
            t.span.record("pieces", t.pieces);
            t.span.record("bytes", t.bytes);
            t.span.record("bad_pieces", t.bad);
        }
    }
}
