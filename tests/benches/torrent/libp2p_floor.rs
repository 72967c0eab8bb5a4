//! The floor of a transfer through libp2p's TCP stack: the shard file sent
//! on one libp2p stream (TCP, noise, yamux: what pieces travel over) from a
//! sender process that does nothing else, read in 1 MiB pieces, each hashed
//! with BLAKE3 and written at its offset by the receiver in this process. No
//! request-response, no DHT, no requests per piece: what is left is the
//! stack's own cost (its encryption, framing and copies).
//!
//! The sender is a child process (this bench binary again, with
//! [`SEND_ENV`]), with a fixed identity so that the receiver knows whom it
//! dials.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use llama_cluster_tests::bare_libp2p::{swarm, tcp_port};
use llama_cluster_tests::self_child::SelfChildren;

/// Set in the sender process: the file's path.
pub const SEND_ENV: &str = "LLAMA_CLUSTER_BENCH_LIBP2P_SEND";

const PROTOCOL: StreamProtocol = StreamProtocol::new("/llama-cluster-bench/file/1.0");
const PIECE: usize = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn sender_key() -> Keypair {
    // A benchmark's identity: fixed, never protecting anything.
    Keypair::ed25519_from_bytes([7u8; 32]).expect("a 32-byte ed25519 secret")
}

/// The sender process: prints its port, then sends the whole file on every
/// stream opened to it, until it is killed.
pub fn serve_from_env() -> anyhow::Result<()> {
    llama_cluster_tests::self_child::exit_when_parent_goes();
    let path = std::env::var(SEND_ENV)?;
    let file = std::sync::Arc::new(std::fs::File::open(path)?);
    // One runtime thread, as a worker's networking has.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut swarm = swarm(sender_key())?;
        let mut incoming = swarm
            .behaviour()
            .new_control()
            .accept(PROTOCOL)
            .map_err(|e| anyhow!("{e}"))?;
        swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                let port = tcp_port(&address).ok_or_else(|| anyhow!("no TCP port in {address}"))?;
                println!("port {port}");
                break;
            }
        }
        tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        while let Some((_, mut stream)) = incoming.next().await {
            let file = file.clone();
            tokio::spawn(async move {
                let size = file.metadata()?.len();
                let mut buf = vec![0u8; PIECE];
                let mut at = 0u64;
                while at < size {
                    let n = (size - at).min(PIECE as u64) as usize;
                    file.read_exact_at(&mut buf[..n], at)?;
                    stream.write_all(&buf[..n]).await?;
                    at += n as u64;
                }
                stream.close().await?;
                anyhow::Ok(())
            });
        }
        anyhow::Ok(())
    })
}

/// A sender process and a connection to it, used every round.
pub struct Libp2pFloor {
    control: libp2p_stream::Control,
    peer: PeerId,
    size: u64,
    _swarm: tokio::task::JoinHandle<()>,
    _child: SelfChildren,
}

impl Libp2pFloor {
    pub async fn start(file: &Path) -> anyhow::Result<Libp2pFloor> {
        let size = std::fs::metadata(file)?.len();
        let mut child = SelfChildren::default();
        let port = child.spawn(&[(SEND_ENV, file.display().to_string())])?;
        let peer = sender_key().public().to_peer_id();
        let mut swarm = swarm(Keypair::generate_ed25519())?;
        let control = swarm.behaviour().new_control();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}").parse()?;
        swarm.dial(addr)?;
        let task = tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        Ok(Libp2pFloor {
            control,
            peer,
            size,
            _swarm: task,
            _child: child,
        })
    }

    /// Seconds to receive the whole file into `out` (hashed and written
    /// piece by piece); the hash is then checked against `data`, the file.
    pub async fn run(&mut self, out: &Path, data: &[u8]) -> anyhow::Result<f64> {
        let file = std::fs::File::create(out)?;
        file.set_len(self.size)?;
        let t0 = Instant::now();
        let mut stream =
            tokio::time::timeout(IO_TIMEOUT, self.control.open_stream(self.peer, PROTOCOL))
                .await
                .context("opening a stream to the libp2p floor sender")?
                .map_err(|e| anyhow!("{e}"))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; PIECE];
        let mut at = 0u64;
        while at < self.size {
            let n = (self.size - at).min(PIECE as u64) as usize;
            tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut buf[..n]))
                .await
                .context("the libp2p floor sender stalled")??;
            hasher.update(&buf[..n]);
            file.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        let secs = t0.elapsed().as_secs_f64();
        if hasher.finalize() != blake3::hash(data) {
            bail!("the file arrived altered");
        }
        drop(file);
        let _ = std::fs::remove_file(out);
        Ok(secs)
    }
}
