//! What this worker's stage reports (sessions, limits, counters) and which
//! driver each of its sessions belongs to.

use std::sync::atomic::Ordering;
use std::time::Instant;

use libp2p::PeerId;

use super::Pipeline;

impl Pipeline {
    /// Forward steps waiting for or running on this worker's stage.
    pub fn queue_depth(&self) -> u32 {
        self.loaded()
            .map(|l| l.engine.queue_depth() as u32)
            .unwrap_or(0)
    }

    /// Requests this worker drives that wait for free capacity.
    pub fn queued_requests(&self) -> usize {
        self.0.admission.queued()
    }

    /// Session limit of this worker's stage (0: none loaded).
    pub fn max_sessions(&self) -> u32 {
        self.loaded()
            .map(|l| l.engine.info().max_sessions as u32)
            .unwrap_or(0)
    }

    /// `llama_decode` calls of this worker's stage so far.
    pub fn decode_calls(&self) -> u64 {
        self.loaded()
            .map(|l| l.engine.counters().decode_calls.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// The most steps one `llama_decode` call of this worker's stage has run.
    pub fn max_batch(&self) -> u64 {
        self.loaded()
            .map(|l| l.engine.counters().max_steps.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Micro-batches llama.cpp ran for this worker's stage so far (one per
    /// run of consecutive sequence ids in a call).
    pub fn micro_batches(&self) -> u64 {
        self.loaded()
            .map(|l| l.engine.counters().micro_batches.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Seconds this worker's stage spent in llama.cpp so far.
    pub fn busy_seconds(&self) -> f64 {
        self.loaded()
            .map(|l| l.engine.counters().busy_ns.load(Ordering::Relaxed) as f64 / 1e9)
            .unwrap_or(0.0)
    }

    /// Open sessions on this worker's stage.
    pub fn active_sessions(&self) -> u32 {
        self.loaded()
            .map(|l| l.engine.active_sessions() as u32)
            .unwrap_or(0)
    }

    /// The last connection to `peer` closed: sessions it drove here are
    /// freed (it cannot step them any more).
    pub fn peer_gone(&self, peer: &PeerId) {
        let Some(l) = self.loaded() else {
            return;
        };
        let gone: Vec<u64> = {
            let mut d = self
                .0
                .session_drivers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let gone = d
                .iter()
                .filter(|(_, (p, _))| p == peer)
                .map(|(s, _)| *s)
                .collect::<Vec<_>>();
            d.retain(|_, (p, _)| p != peer);
            gone
        };
        if !gone.is_empty() {
            tracing::info!(
                "[PIPELINE] driver {peer} gone: freeing its {} session(s)",
                gone.len()
            );
        }
        for s in gone {
            l.engine.close(s);
        }
    }

    pub(super) fn note_driver(&self, session: u64, driver: &str) {
        let Ok(peer) = driver.parse::<PeerId>() else {
            return;
        };
        let idle = self.0.cfg.session_idle;
        let mut d = self
            .0
            .session_drivers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        d.retain(|_, (_, at)| at.elapsed() < idle);
        d.insert(session, (peer, Instant::now()));
    }
}
