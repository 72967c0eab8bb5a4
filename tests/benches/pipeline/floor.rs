//! The floor of a pipeline on this machine: the benchmark's decode with
//! nothing but llama.cpp and, between processes, one of two links:
//!
//! - [`Link::Tcp`]: a blocking TCP socket read and written by the thread that
//!   computes (no async runtime, no hand-off between threads, no libp2p, no
//!   encryption);
//! - [`Link::Libp2p`]: one libp2p stream (TCP, noise, yamux) per session,
//!   driven by a runtime thread of its own while llama.cpp runs on the main
//!   thread, as in a worker (the issue asks for llama.cpp on threads of its
//!   own): the hand-offs and the libp2p hop a worker cannot avoid, and
//!   nothing else of llama-cluster's.
//!
//! Greedy sampling by arg max in both. What the worker pipelines lose beyond
//! this floor is llama-cluster's; what the floor loses against one stage is
//! the split's, the link's and the machine's.
//!
//! Stages after the first run in child processes (this bench binary again,
//! with [`STAGE_ENV`] set); each answers the token of a step upstream, and a
//! stage in the middle relays it, as the worker pipeline does.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use llama_cluster_engine::EngineSettings;
use llama_cluster_engine::batched::SoloContext;
use llama_cluster_engine::ffi::{LoadedModel, ThreadPool, TokenEmbeddings};
use llama_cluster_engine::manifest::Manifest;
use llama_cluster_engine::sampling::argmax;
use llama_cluster_tests::bare_libp2p;
use llama_cluster_tests::self_child::SelfChildren;

/// Set in a child process: `<shard file>\n<1 if last>\n<link>\n<stage
/// index>\n<next stage's address or empty>`.
pub const STAGE_ENV: &str = "LLAMA_CLUSTER_BENCH_FLOOR_STAGE";

/// No read or write on a floor link waits longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

const PROTOCOL: StreamProtocol = StreamProtocol::new("/llama-cluster-bench/stage/1.0");

/// How stages in different processes talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Tcp,
    Libp2p,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Tcp => "tcp",
            Link::Libp2p => "libp2p",
        }
    }
}

/// The identity of the child process running stage `index`: fixed, so
/// that the stage before it knows whom it dials.
fn stage_key(index: usize) -> Keypair {
    Keypair::ed25519_from_bytes([index as u8 + 1; 32]).expect("a 32-byte ed25519 secret")
}

/// A libp2p node (TCP, noise, yamux and streams only) whose swarm runs on
/// a runtime thread of its own.
struct P2pNode {
    rt: tokio::runtime::Runtime,
    control: libp2p_stream::Control,
    port: u16,
}

impl P2pNode {
    /// Starts listening on 127.0.0.1; `next`: the stage it dials.
    fn start(key: Keypair, next: Option<(PeerId, Multiaddr)>) -> anyhow::Result<P2pNode> {
        // One runtime thread, as a worker's networking has.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (control, port) = rt.block_on(async move {
            let mut swarm = bare_libp2p::swarm(key)?;
            swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
            // Connected to the next stage (which listens already) before
            // any stream is opened to it.
            let mut connected = next.is_none();
            if let Some((_, addr)) = next {
                swarm.dial(addr)?;
            }
            let mut port = None;
            let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
            while port.is_none() || !connected {
                let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
                    .await
                    .context("starting a floor stage's libp2p node")?;
                match event {
                    SwarmEvent::NewListenAddr { address, .. } => {
                        port = bare_libp2p::tcp_port(&address);
                    }
                    SwarmEvent::ConnectionEstablished { .. } => connected = true,
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        bail!("dialing the next floor stage: {error}")
                    }
                    _ => {}
                }
            }
            let port = port.ok_or_else(|| anyhow!("no TCP listen address"))?;
            let control = swarm.behaviour().new_control();
            tokio::spawn(async move {
                loop {
                    swarm.select_next_some().await;
                }
            });
            anyhow::Ok((control, port))
        })?;
        Ok(P2pNode { rt, control, port })
    }

    fn open(&self, peer: PeerId) -> anyhow::Result<Conn> {
        let mut control = self.control.clone();
        let s = within(self.rt.handle(), control.open_stream(peer, PROTOCOL))
            .context("opening a stream to the next floor stage")?
            .map_err(|e| anyhow!("{e}"))?;
        Ok(Conn::P2p(s, self.rt.handle().clone()))
    }
}

/// One end of a link, read and written by the computing thread (a libp2p
/// stream through its node's runtime).
enum Conn {
    Tcp(TcpStream),
    P2p(libp2p::Stream, tokio::runtime::Handle),
}

impl Conn {
    fn tcp(s: TcpStream) -> anyhow::Result<Conn> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn::Tcp(s))
    }
}

/// Runs `f` on the computing thread through `rt` (whose thread drives the
/// connection), for at most [`IO_TIMEOUT`].
fn within<F: std::future::Future>(rt: &tokio::runtime::Handle, f: F) -> std::io::Result<F::Output> {
    rt.block_on(async { tokio::time::timeout(IO_TIMEOUT, f).await })
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "floor link timed out"))
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::P2p(s, rt) => within(rt, s.read(buf))?,
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::P2p(s, rt) => within(rt, s.write(buf))?,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::P2p(s, rt) => within(rt, s.flush())?,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The other end reads the end of its stream, not a reset.
        if let Conn::P2p(s, rt) = self {
            let _ = within(rt, s.close());
        }
    }
}

fn write_rows(s: &mut Conn, rows: &[f32]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4 + rows.len() * 4);
    out.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    for v in rows {
        out.extend_from_slice(&v.to_le_bytes());
    }
    s.write_all(&out)?;
    s.flush()
}

/// Reads a frame of rows; `None` at the end of the stream.
fn read_rows(s: &mut Conn, max: usize) -> anyhow::Result<Option<Vec<f32>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > max {
        bail!("frame of {n} values exceeds {max}");
    }
    let mut buf = vec![0u8; n * 4];
    s.read_exact(&mut buf)?;
    Ok(Some(
        buf.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    ))
}

fn read_token(s: &mut Conn) -> anyhow::Result<i32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(i32::from_le_bytes(b))
}

fn write_token(s: &mut Conn, token: i32) -> std::io::Result<()> {
    s.write_all(&token.to_le_bytes())?;
    s.flush()
}

/// The next stage as the stage before it reaches it.
enum Next {
    Tcp(String),
    /// Its peer id: the node was told its address.
    Libp2p(PeerId),
}

/// This process's end of its links: sessions come in from upstream, and go
/// on to `next`.
enum Ends {
    Tcp(TcpListener),
    Libp2p(P2pNode, libp2p_stream::IncomingStreams),
}

impl Ends {
    fn start(link: Link, key: Keypair, next: Option<&str>) -> anyhow::Result<(Ends, u16)> {
        Ok(match link {
            Link::Tcp => {
                let l = TcpListener::bind("127.0.0.1:0")?;
                let port = l.local_addr()?.port();
                (Ends::Tcp(l), port)
            }
            Link::Libp2p => {
                let next = next.map(peer_of).transpose()?;
                let node = P2pNode::start(key, next)?;
                let incoming = node
                    .control
                    .clone()
                    .accept(PROTOCOL)
                    .map_err(|e| anyhow!("{e}"))?;
                let port = node.port;
                (Ends::Libp2p(node, incoming), port)
            }
        })
    }

    /// The next session from upstream (waits without a bound: a child
    /// stage waits for its parent, and dies with it).
    fn accept(&mut self) -> anyhow::Result<Conn> {
        match self {
            Ends::Tcp(l) => Conn::tcp(l.accept()?.0),
            Ends::Libp2p(node, incoming) => {
                let (_, s) = node
                    .rt
                    .block_on(incoming.next())
                    .ok_or_else(|| anyhow!("no more streams"))?;
                Ok(Conn::P2p(s, node.rt.handle().clone()))
            }
        }
    }

    fn connect(&self, next: &Next) -> anyhow::Result<Conn> {
        match (self, next) {
            (_, Next::Tcp(addr)) => Conn::tcp(
                TcpStream::connect(addr.as_str()).with_context(|| format!("connect {addr}"))?,
            ),
            (Ends::Libp2p(node, _), Next::Libp2p(peer)) => node.open(*peer),
            (Ends::Tcp(_), Next::Libp2p(_)) => bail!("a TCP stage cannot reach a libp2p one"),
        }
    }
}

/// The peer id at the end of a `/p2p/` address, and the address.
fn peer_of(addr: &str) -> anyhow::Result<(PeerId, Multiaddr)> {
    let addr: Multiaddr = addr.parse()?;
    let peer =
        llama_worker::network::peer_id_of(&addr).ok_or_else(|| anyhow!("no peer id in {addr}"))?;
    Ok((peer, addr))
}

fn next_of(link: Link, addr: Option<&str>) -> anyhow::Result<Option<Next>> {
    addr.map(|a| {
        Ok(match link {
            Link::Tcp => Next::Tcp(a.to_string()),
            Link::Libp2p => Next::Libp2p(peer_of(a)?.0),
        })
    })
    .transpose()
}

/// A child process's stage: prints its port, then serves one session per
/// upstream connection until it is killed.
pub fn serve_from_env(settings: EngineSettings) -> anyhow::Result<()> {
    llama_cluster_tests::self_child::exit_when_parent_goes();
    let spec = std::env::var(STAGE_ENV)?;
    let parts: Vec<&str> = spec.split('\n').collect();
    let [shard, last, link, index, next] = parts[..] else {
        bail!("bad {STAGE_ENV}");
    };
    let last = last == "1";
    let link = match link {
        "tcp" => Link::Tcp,
        "libp2p" => Link::Libp2p,
        l => bail!("unknown link {l}"),
    };
    let next_addr = Some(next.to_string()).filter(|s| !s.is_empty());
    llama_cluster_engine::backend()?;
    let model = LoadedModel::load(Path::new(shard))?;
    let pool = ThreadPool::new(settings.threads)?;
    let (mut ends, port) = Ends::start(link, stage_key(index.parse()?), next_addr.as_deref())?;
    let next = next_of(link, next_addr.as_deref())?;
    println!("port {port}");
    std::io::stdout().flush()?;
    let max = settings.n_batch as usize * model.n_embd;
    loop {
        let mut up = ends.accept()?;
        let mut ctx = SoloContext::new(model.clone(), &settings, !last, Some(pool.clone()))?;
        let mut down = next.as_ref().map(|n| ends.connect(n)).transpose()?;
        while let Some(rows) = read_rows(&mut up, max)? {
            ctx.decode(&rows, !last)?;
            let token = match down.as_mut() {
                None => argmax(ctx.last_logits()?),
                Some(d) => {
                    write_rows(d, &ctx.take_hidden())?;
                    read_token(d)?
                }
            };
            write_token(&mut up, token)?;
        }
    }
}

/// The first stage in this process and the rest either on this thread too
/// (one thread, one thread pool, no I/O) or in child processes.
pub struct FloorChain {
    models: Vec<Rc<LoadedModel>>,
    embeddings: TokenEmbeddings,
    pool: Rc<ThreadPool>,
    settings: EngineSettings,
    /// This process's end of its link to the next stage, and that stage.
    link: Option<(Ends, Next)>,
    /// Dropped after `link`: a stage's child sees its stream end first.
    _children: SelfChildren,
}

impl FloorChain {
    pub fn load(
        manifest_path: &Path,
        settings: EngineSettings,
        processes: Option<Link>,
    ) -> anyhow::Result<FloorChain> {
        let m = Manifest::load(manifest_path)?;
        let files: Vec<PathBuf> = m
            .shards
            .iter()
            .map(|s| Manifest::path_of(manifest_path, &s.file.file))
            .collect();
        let head = Manifest::path_of(manifest_path, &m.head.file);
        llama_cluster_engine::backend()?;
        let embeddings = TokenEmbeddings::load(&head)?;
        let pool = ThreadPool::new(settings.threads)?;
        let in_here = if processes.is_some() { 1 } else { files.len() };
        let models = files[..in_here]
            .iter()
            .map(|f| LoadedModel::load(f))
            .collect::<Result<Vec<_>, _>>()?;
        // Children from the last stage back, each told where the next is.
        let mut children = SelfChildren::default();
        let mut next_addr: Option<String> = None;
        for (i, file) in files.iter().enumerate().skip(in_here).rev() {
            let link = processes.unwrap_or(Link::Tcp);
            let spec = format!(
                "{}\n{}\n{}\n{i}\n{}",
                file.display(),
                u8::from(i + 1 == files.len()),
                link.name(),
                next_addr.as_deref().unwrap_or("")
            );
            let port = children.spawn(&[
                (STAGE_ENV, spec),
                ("LLAMA_CLUSTER_BENCH_THREADS", settings.threads.to_string()),
            ])?;
            next_addr = Some(match link {
                Link::Tcp => format!("127.0.0.1:{port}"),
                Link::Libp2p => format!(
                    "/ip4/127.0.0.1/tcp/{port}/p2p/{}",
                    stage_key(i).public().to_peer_id()
                ),
            });
        }
        let link = match processes {
            Some(link) => {
                let next = next_of(link, next_addr.as_deref())?
                    .ok_or_else(|| anyhow!("no stage after the first"))?;
                Some((
                    Ends::start(link, Keypair::generate_ed25519(), next_addr.as_deref())?.0,
                    next,
                ))
            }
            None => None,
        };
        Ok(FloorChain {
            models,
            embeddings,
            pool,
            settings,
            link,
            _children: children,
        })
    }

    /// Prefill of `prompt`, then greedy decode to `n_gen` tokens: (prompt
    /// tok/s, decode tok/s, the tokens).
    pub fn run(&self, prompt: &[i32], n_gen: usize) -> anyhow::Result<(f64, f64, Vec<i32>)> {
        let remote = self.link.is_some();
        let n = self.models.len();
        let mut ctxs = self
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let capture = remote || i + 1 < n;
                SoloContext::new(m.clone(), &self.settings, capture, Some(self.pool.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut down = self
            .link
            .as_ref()
            .map(|(ends, next)| ends.connect(next))
            .transpose()?;
        let mut step = |tokens: &[i32]| -> anyhow::Result<i32> {
            let mut rows = self.embeddings.embed(tokens)?;
            let count = ctxs.len();
            for (i, ctx) in ctxs.iter_mut().enumerate() {
                let capture = remote || i + 1 < count;
                ctx.decode(&rows, capture)?;
                if !capture {
                    return Ok(argmax(ctx.last_logits()?));
                }
                rows = ctx.take_hidden();
            }
            let d = down.as_mut().ok_or_else(|| anyhow!("no next stage"))?;
            write_rows(d, &rows)?;
            read_token(d)
        };
        let t0 = Instant::now();
        let mut token = step(prompt)?;
        let prompt_time = t0.elapsed();
        let mut out = vec![token];
        let t1 = Instant::now();
        while out.len() < n_gen {
            token = step(&[token])?;
            out.push(token);
        }
        let decode_time = t1.elapsed();
        Ok((
            prompt.len() as f64 / prompt_time.as_secs_f64(),
            (n_gen - 1) as f64 / decode_time.as_secs_f64(),
            out,
        ))
    }
}
