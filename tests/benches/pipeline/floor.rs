//! The floor of a pipeline on this machine: the benchmark's decode with
//! nothing but llama.cpp and, between processes, a blocking TCP socket read
//! and written by the thread that computes (no async runtime, no hand-off
//! between threads, no libp2p, no encryption, greedy sampling by arg max).
//! What the worker pipelines lose beyond this floor is llama-cluster's; what
//! the floor loses against one stage is the split's and the machine's.
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
use llama_cluster_engine::EngineSettings;
use llama_cluster_engine::ffi::{
    BatchInput, LoadedModel, StageContext, ThreadPool, TokenEmbeddings,
};
use llama_cluster_engine::manifest::Manifest;
use llama_cluster_engine::sampling::argmax;
use llama_cluster_tests::self_child::SelfChildren;

/// Set in a child process: `<shard file>\n<1 if last>\n<next stage's address or empty>`.
pub const STAGE_ENV: &str = "LLAMA_CLUSTER_BENCH_FLOOR_STAGE";

/// No read or write on a floor socket waits longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn write_rows(s: &mut TcpStream, rows: &[f32]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4 + rows.len() * 4);
    out.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    for v in rows {
        out.extend_from_slice(&v.to_le_bytes());
    }
    s.write_all(&out)
}

/// Reads a frame of rows; `None` at the end of the stream.
fn read_rows(s: &mut TcpStream, max: usize) -> anyhow::Result<Option<Vec<f32>>> {
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

fn read_token(s: &mut TcpStream) -> anyhow::Result<i32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(i32::from_le_bytes(b))
}

fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// A child process's stage: prints its port, then serves one session per
/// upstream connection until it is killed.
pub fn serve_from_env(settings: EngineSettings) -> anyhow::Result<()> {
    llama_cluster_tests::self_child::exit_when_parent_goes();
    let spec = std::env::var(STAGE_ENV)?;
    let mut parts = spec.split('\n');
    let (Some(shard), Some(last), next) = (parts.next(), parts.next(), parts.next()) else {
        bail!("bad {STAGE_ENV}");
    };
    let last = last == "1";
    let next = next.filter(|s| !s.is_empty());
    llama_cluster_engine::backend()?;
    let model = LoadedModel::load(Path::new(shard))?;
    let pool = ThreadPool::new(settings.threads)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("port {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let max = settings.n_batch as usize * model.n_embd;
    for conn in listener.incoming() {
        let mut up = conn?;
        up.set_nodelay(true)?;
        up.set_read_timeout(Some(IO_TIMEOUT))?;
        up.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut ctx = StageContext::new(model.clone(), &settings, !last, Some(pool.clone()))?;
        let mut down = next.map(connect).transpose()?;
        while let Some(rows) = read_rows(&mut up, max)? {
            ctx.decode(BatchInput::Embeddings(&rows), !last)?;
            let token = match down.as_mut() {
                None => argmax(ctx.last_logits()?),
                Some(d) => {
                    write_rows(d, &ctx.take_hidden())?;
                    read_token(d)?
                }
            };
            up.write_all(&token.to_le_bytes())?;
        }
    }
    Ok(())
}

/// The first stage in this process and the rest either on this thread too
/// (one thread, one thread pool, no I/O) or in child processes.
pub struct FloorChain {
    models: Vec<Rc<LoadedModel>>,
    embeddings: TokenEmbeddings,
    pool: Rc<ThreadPool>,
    settings: EngineSettings,
    next_addr: Option<String>,
    _children: SelfChildren,
}

impl FloorChain {
    pub fn load(
        manifest_path: &Path,
        settings: EngineSettings,
        processes: bool,
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
        let in_here = if processes { 1 } else { files.len() };
        let models = files[..in_here]
            .iter()
            .map(|f| LoadedModel::load(f))
            .collect::<Result<Vec<_>, _>>()?;
        // Children from the last stage back, each told where the next is.
        let mut children = SelfChildren::default();
        let mut next_addr: Option<String> = None;
        for (i, file) in files.iter().enumerate().skip(in_here).rev() {
            let spec = format!(
                "{}\n{}\n{}",
                file.display(),
                u8::from(i + 1 == files.len()),
                next_addr.as_deref().unwrap_or("")
            );
            let port = children.spawn(&[
                (STAGE_ENV, spec),
                ("LLAMA_CLUSTER_BENCH_THREADS", settings.threads.to_string()),
            ])?;
            next_addr = Some(format!("127.0.0.1:{port}"));
        }
        Ok(FloorChain {
            models,
            embeddings,
            pool,
            settings,
            next_addr,
            _children: children,
        })
    }

    /// Prefill of `prompt`, then greedy decode to `n_gen` tokens: (prompt
    /// tok/s, decode tok/s, the tokens).
    pub fn run(&self, prompt: &[i32], n_gen: usize) -> anyhow::Result<(f64, f64, Vec<i32>)> {
        let remote = self.next_addr.is_some();
        let n = self.models.len();
        let mut ctxs = self
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let capture = remote || i + 1 < n;
                StageContext::new(m.clone(), &self.settings, capture, Some(self.pool.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut down = self.next_addr.as_deref().map(connect).transpose()?;
        let mut step = |tokens: &[i32]| -> anyhow::Result<i32> {
            let mut rows = self.embeddings.embed(tokens)?;
            let count = ctxs.len();
            for (i, ctx) in ctxs.iter_mut().enumerate() {
                let capture = remote || i + 1 < count;
                ctx.decode(BatchInput::Embeddings(&rows), capture)?;
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
