//! Sending a frame to the next stage: in-process when that is this worker,
//! else over a persistent activation stream, with a `hop` span and the
//! stage at fault named in the error.

use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use libp2p::PeerId;
use tracing::{Instrument, debug, info_span};

use super::{HOP_MARGIN, Pipeline};
use crate::net::frame::{ActivationRequest, ActivationResponse, Hop, codes};

impl Pipeline {
    /// Sends a frame to its first hop: in-process when that is this worker,
    /// else over `/llama-cluster/activation/1.0` (a persistent stream).
    pub(crate) fn send(&self, req: ActivationRequest) -> BoxFuture<'static, ActivationResponse> {
        let me = self.clone();
        async move { me.send_step(req).await }.boxed()
    }

    async fn send_step(&self, mut req: ActivationRequest) -> ActivationResponse {
        let Some(hop) = req.route.first().cloned() else {
            return ActivationResponse::error(codes::ROUTE, "empty route");
        };
        if hop.peer == self.0.me {
            return self.handle(req, 0, None).await;
        }
        let span = info_span!(
            "hop",
            otel.kind = "client",
            peer = %hop.peer,
            shard = %hop.shard_id,
            kind = ?req.kind,
            pos = req.pos0,
            bytes_out = tracing::field::Empty,
            bytes_back = tracing::field::Empty,
            latency_us = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        req.trace = llama_cluster_shared::telemetry::traceparent(&span);
        let t0 = Instant::now();
        let resp = self.send_remote(req, hop).instrument(span.clone()).await;
        span.record("latency_us", t0.elapsed().as_micros() as u64);
        if let Some(e) = &resp.error {
            span.record("error", e.message.as_str());
        }
        resp
    }

    async fn send_remote(&self, req: ActivationRequest, hop: Hop) -> ActivationResponse {
        let peer: PeerId = match hop.peer.parse() {
            Ok(p) => p,
            Err(_) => {
                return ActivationResponse::error(
                    codes::ROUTE,
                    format!("bad peer id {}", hop.peer),
                );
            }
        };
        // A little longer than the budget the next hop gets: a stage further
        // down that times out reports first, and names the stage at fault.
        let budget = Duration::from_millis(req.budget_ms as u64) + HOP_MARGIN;
        let bytes = req.encode();
        tracing::Span::current().record("bytes_out", bytes.len() as u64);
        debug!(
            "[PIPELINE] {} bytes to {} ({})",
            bytes.len(),
            hop.shard_id,
            peer
        );
        match self.0.net.activation(peer, &bytes, budget).await {
            Ok(b) => {
                self.0.state.clear_suspect(&peer);
                tracing::Span::current().record("bytes_back", b.len() as u64);
                ActivationResponse::decode(&b).unwrap_or_else(|e| {
                    ActivationResponse::error(
                        codes::INTERNAL,
                        format!("bad response from {peer}: {e}"),
                    )
                })
            }
            Err(e) => {
                let timeout = e.is_timeout();
                if !timeout {
                    // Connection lost: out of routes until it answers or
                    // reconnects. (A slow stage is suspected by the driver
                    // that fails it over.)
                    self.0.state.suspect(peer);
                }
                ActivationResponse::error_at(
                    if timeout {
                        codes::TIMEOUT
                    } else {
                        codes::UNAVAILABLE
                    },
                    format!("stage {} on {peer} did not answer: {e}", hop.shard_id),
                    e.peer().unwrap_or(peer).to_string(),
                )
            }
        }
    }
}
