//! Persistent streams between pipeline stages for activation frames
//! (`/llama-cluster/activation/1.0`).
//!
//! A decode step crosses every stage once per token, so each hop's latency
//! counts in every token. Instead of a new substream per frame (protocol
//! negotiation, and every frame through the swarm task), a worker keeps open
//! streams to the stages it sends to and reuses them: a frame is written to
//! an idle stream and its answer read from the same stream, by the task that
//! needs it. Frames on a stream are one at a time (`u32` little-endian length,
//! then the bytes, each way); concurrent steps use more streams.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use prometheus_client::metrics::counter::Counter;
use tracing::debug;

use super::error::NetError;

/// Idle streams kept per peer; more are closed after use.
const MAX_IDLE_PER_PEER: usize = 16;

/// How long opening a stream may take (a dial to a peer that is gone).
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Times a frame is tried: again when its stream died under it (a pooled
/// stream on a closed connection, a connection closed mid-exchange, or a new
/// stream the receiver dropped: libp2p-stream queues one inbound stream per
/// protocol and drops others that arrive at the same instant).
const MAX_ATTEMPTS: usize = 5;

/// An inbound stream with no frame for this long is closed (its sender
/// opens a new one when it needs it).
const INBOUND_IDLE: Duration = Duration::from_secs(600);

/// Outbound side: a pool of open streams per peer.
#[derive(Clone)]
pub struct Links {
    control: libp2p_stream::Control,
    protocol: StreamProtocol,
    max_frame: usize,
    idle: Arc<Mutex<HashMap<PeerId, Vec<Stream>>>>,
    /// Connections closed per peer. A stream on a closed connection does
    /// not always wake its reader, so a frame waiting for its answer also
    /// watches this count and is sent again on a new stream when it moves
    /// (the receiver answers a repeated frame without running it twice).
    closed: Arc<Mutex<HashMap<PeerId, u64>>>,
    closed_tx: Arc<tokio::sync::watch::Sender<u64>>,
    counters: LinkCounters,
}

/// What a [`Links`] counts: frames sent and streams opened (the second
/// stays small when streams are reused).
#[derive(Clone, Default)]
pub struct LinkCounters {
    pub frames_sent: Counter,
    pub streams_opened: Counter,
}

async fn read_frame(s: &mut Stream, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {max}"),
        ));
    }
    // The buffer grows as bytes arrive, not from the peer's say-so.
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    (&mut *s).take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame ended after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

async fn write_frame(s: &mut Stream, body: &[u8], max: usize) -> io::Result<()> {
    if body.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds {max}", body.len()),
        ));
    }
    // One write: the length and the body leave in the same packet.
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    s.write_all(&out).await?;
    s.flush().await
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl Links {
    pub fn new(
        control: libp2p_stream::Control,
        protocol: &'static str,
        max_frame: usize,
        counters: LinkCounters,
    ) -> Self {
        Links {
            counters,
            control,
            protocol: StreamProtocol::new(protocol),
            max_frame,
            idle: Arc::new(Mutex::new(HashMap::new())),
            closed: Arc::new(Mutex::new(HashMap::new())),
            closed_tx: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// A connection to `peer` closed: its idle streams are dropped (they
    /// may have been on it) and frames waiting on it are sent again.
    pub fn connection_closed(&self, peer: &PeerId) {
        self.forget(peer);
        *self
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*peer)
            .or_default() += 1;
        self.closed_tx.send_modify(|n| *n += 1);
    }

    fn closed_count(&self, peer: &PeerId) -> u64 {
        self.closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .copied()
            .unwrap_or(0)
    }

    /// Resolves once a connection to `peer` closes after `seen` closures.
    async fn closed_since(&self, peer: &PeerId, seen: u64) {
        let mut rx = self.closed_tx.subscribe();
        loop {
            if self.closed_count(peer) != seen {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    fn take(&self, peer: &PeerId) -> Option<Stream> {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(peer)
            .and_then(Vec::pop)
    }

    fn put(&self, peer: PeerId, s: Stream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let v = idle.entry(peer).or_default();
        if v.len() < MAX_IDLE_PER_PEER {
            v.push(s);
        }
    }

    /// Drops the idle streams to `peer` (its connection is gone).
    pub fn forget(&self, peer: &PeerId) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(peer);
    }

    /// Idle streams to `peer` (tests, status).
    pub fn idle_streams(&self, peer: &PeerId) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .map_or(0, Vec::len)
    }

    /// Sends one frame to `peer` and returns its answer, within `timeout`.
    /// Errors name the peer ([`NetError`]). A frame
    /// whose stream dies under it (a pooled stream on a replaced connection,
    /// a connection closed while it waits, a new stream the receiver
    /// dropped) is sent again on a new stream after a short random pause, a
    /// bounded number of times: the receiver answers a repeated frame
    /// without running it twice.
    pub async fn call(
        &self,
        peer: PeerId,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, NetError> {
        if body.len() > self.max_frame {
            return Err(NetError::TooLarge {
                peer,
                size: body.len(),
                max: self.max_frame,
            });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_err = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                self.pause_before_retry(deadline).await;
            }
            let seen = self.closed_count(&peer);
            let (mut stream, pooled) = match self.take(&peer) {
                Some(s) => (s, true),
                None => {
                    let mut control = self.control.clone();
                    let open = control.open_stream(peer, self.protocol.clone());
                    let open_by = (tokio::time::Instant::now() + OPEN_TIMEOUT).min(deadline);
                    match tokio::time::timeout_at(open_by, open).await {
                        Err(_) if open_by == deadline => {
                            return Err(NetError::Timeout { peer, timeout });
                        }
                        // A dial that does not complete: the peer is gone.
                        Err(_) => {
                            return Err(NetError::Failed {
                                peer,
                                reason: format!("could not open a stream in {OPEN_TIMEOUT:?}"),
                            });
                        }
                        Ok(Err(e @ libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
                            return Err(NetError::Unsupported {
                                peer,
                                reason: e.to_string(),
                            });
                        }
                        // Typically the connection chosen for the stream
                        // closed meanwhile (TCP replaced by QUIC): try again.
                        Ok(Err(e)) => {
                            debug!("[LINK] cannot open a stream to {peer} ({e}); trying again");
                            last_err = e.to_string();
                            continue;
                        }
                        Ok(Ok(s)) => {
                            self.counters.streams_opened.inc();
                            (s, false)
                        }
                    }
                }
            };
            let max = self.max_frame;
            self.counters.frames_sent.inc();
            let exchange = async {
                write_frame(&mut stream, body, max).await?;
                read_frame(&mut stream, max).await
            };
            let outcome = tokio::select! {
                r = tokio::time::timeout_at(deadline, exchange) => r,
                _ = self.closed_since(&peer, seen) => {
                    debug!("[LINK] a connection to {peer} closed under a frame; sending it again");
                    last_err = "connection closed".into();
                    continue;
                }
            };
            match outcome {
                // The stream is dropped: an answer arriving later must not
                // be read as the answer to another frame.
                Err(_) => return Err(NetError::Timeout { peer, timeout }),
                Ok(Ok(answer)) => {
                    // Not pooled when a connection to the peer closed
                    // meanwhile: it may have been this stream's.
                    if self.closed_count(&peer) == seen {
                        self.put(peer, stream);
                    }
                    return Ok(answer);
                }
                Ok(Err(e)) if pooled || self.closed_count(&peer) != seen || stream_died(&e) => {
                    debug!("[LINK] stream to {peer} died ({e}); sending the frame again");
                    last_err = e.to_string();
                    if pooled {
                        self.forget(&peer);
                    }
                }
                Ok(Err(e)) => {
                    return Err(NetError::Failed {
                        peer,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Err(NetError::Failed {
            peer,
            reason: last_err,
        })
    }

    /// A random pause of 1–10 ms (never past `deadline`), so that frames
    /// retried together (libp2p-stream queues one new inbound stream at a
    /// time and drops the others) open their streams apart.
    async fn pause_before_retry(&self, deadline: tokio::time::Instant) {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(self.counters.frames_sent.get());
        let jitter = Duration::from_micros(1000 + h.finish() % 9000);
        tokio::time::sleep_until((tokio::time::Instant::now() + jitter).min(deadline)).await;
    }
}

/// Whether an I/O error ended the stream rather than the exchange: resets,
/// closed or lost connections, a stream the receiver dropped. Malformed or
/// oversized frames, and a peer that does not speak the protocol, are not.
fn stream_died(e: &io::Error) -> bool {
    !matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::Other
    )
}

/// Inbound side: answers every frame on every stream of `protocol` with
/// `handler`, one frame at a time per stream, until the stream closes.
pub fn serve<H, F>(
    mut control: libp2p_stream::Control,
    protocol: &'static str,
    max_frame: usize,
    members: super::membership::Members,
    handler: H,
) -> anyhow::Result<()>
where
    H: Fn(PeerId, Vec<u8>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Vec<u8>> + Send + 'static,
{
    let mut incoming = control
        .accept(StreamProtocol::new(protocol))
        .map_err(|e| anyhow::anyhow!("cannot accept {protocol} streams: {e}"))?;
    tokio::spawn(async move {
        while let Some((peer, mut stream)) = incoming.next().await {
            if !members.admits(&peer) {
                debug!("[LINK] refused a stream from {peer}: not a cluster member");
                drop(stream);
                continue;
            }
            let handler = handler.clone();
            tokio::spawn(async move {
                loop {
                    let req = match tokio::time::timeout(
                        INBOUND_IDLE,
                        read_frame(&mut stream, max_frame),
                    )
                    .await
                    {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            if e.kind() != io::ErrorKind::UnexpectedEof {
                                debug!("[LINK] stream from {peer} ended: {e}");
                            }
                            break;
                        }
                        Err(_) => break,
                    };
                    let answer = handler(peer, req).await;
                    if let Err(e) = write_frame(&mut stream, &answer, max_frame).await {
                        debug!("[LINK] cannot answer {peer}: {e}");
                        break;
                    }
                }
                let _ = stream.close().await;
            });
        }
    });
    Ok(())
}
