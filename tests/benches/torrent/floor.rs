//! The floor of an encrypted, verified transfer on this machine: the shard
//! file sent over plain TCP sockets in 64 KiB records sealed with
//! ChaCha20-Poly1305 (the cipher both libp2p transports negotiate here), each
//! record opened, hashed with BLAKE3 and written at its offset by the
//! receiver; no framing beyond a length, no flow control of its own, no
//! requests. With 1 sender it is the least a transfer that encrypts and
//! verifies can take here; with 3 senders, each sending a third of the file
//! to a receiving thread of its own, it shows what more senders can add when
//! two cores do all the work.
//!
//! Senders are child processes (this bench binary again, with [`SEND_ENV`]).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use llama_cluster_tests::self_child::SelfChildren;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

/// Set in a sender process: `<file>\n<offset>\n<length>`.
pub const SEND_ENV: &str = "LLAMA_CLUSTER_BENCH_FLOOR_SEND";

const RECORD: usize = 64 << 10;
const TAG: usize = 16;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn key() -> LessSafeKey {
    // A benchmark's key: fixed, never protecting anything.
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("key"))
}

fn nonce(i: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// A sender process: prints its port, then sends its range of the file,
/// sealed, to every connection until it is killed.
pub fn serve_from_env() -> anyhow::Result<()> {
    llama_cluster_tests::self_child::exit_when_parent_goes();
    let spec = std::env::var(SEND_ENV)?;
    let parts: Vec<&str> = spec.split('\n').collect();
    let [file, offset, len] = parts[..] else {
        bail!("bad {SEND_ENV}");
    };
    let (offset, len): (u64, u64) = (offset.parse()?, len.parse()?);
    let file = std::fs::File::open(file)?;
    let key = key();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("port {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let mut rec = vec![0u8; RECORD + TAG + 4];
    for conn in listener.incoming() {
        let mut s = conn?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut at = 0u64;
        let mut i = 0u64;
        while at < len {
            let n = (len - at).min(RECORD as u64) as usize;
            let body = &mut rec[4..4 + n];
            file.read_exact_at(body, offset + at)?;
            let tag = key
                .seal_in_place_separate_tag(nonce(i), Aad::empty(), body)
                .map_err(|_| anyhow!("seal"))?;
            rec[4 + n..4 + n + TAG].copy_from_slice(tag.as_ref());
            rec[..4].copy_from_slice(&((n + TAG) as u32).to_le_bytes());
            s.write_all(&rec[..4 + n + TAG])?;
            at += n as u64;
            i += 1;
        }
    }
    Ok(())
}

/// Senders of a file's ranges, started once and used every round.
pub struct FloorTransfer {
    /// (port, offset, length) per sender.
    ranges: Vec<(u16, u64, u64)>,
    size: u64,
    _children: SelfChildren,
}

impl FloorTransfer {
    pub fn start(file: &Path, senders: u64) -> anyhow::Result<FloorTransfer> {
        let size = std::fs::metadata(file)?.len();
        let share = size.div_ceil(senders).div_ceil(RECORD as u64) * RECORD as u64;
        let mut children = SelfChildren::default();
        let mut ranges = Vec::new();
        for k in 0..senders {
            let offset = (k * share).min(size);
            let len = share.min(size - offset);
            let spec = format!("{}\n{offset}\n{len}", file.display());
            let port = children.spawn(&[(SEND_ENV, spec)])?;
            ranges.push((port, offset, len));
        }
        Ok(FloorTransfer {
            ranges,
            size,
            _children: children,
        })
    }

    /// Seconds to receive the whole file into `out` (opened, hashed and
    /// written record by record); each range's hash is then checked
    /// against the same bytes of `data`, the file itself.
    pub fn run(&self, out: &Path, data: &[u8]) -> anyhow::Result<f64> {
        let file = std::fs::File::create(out)?;
        file.set_len(self.size)?;
        let t0 = Instant::now();
        let hashes = std::thread::scope(|scope| {
            let workers: Vec<_> = self
                .ranges
                .iter()
                .map(|&(port, offset, len)| {
                    let file = &file;
                    scope.spawn(move || receive(port, offset, len, file))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .map_err(|_| anyhow!("a receiving thread panicked"))?
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let secs = t0.elapsed().as_secs_f64();
        for (&(_, offset, len), h) in self.ranges.iter().zip(hashes) {
            let want = blake3::hash(&data[offset as usize..(offset + len) as usize]);
            if h != want {
                bail!("range at {offset} arrived altered");
            }
        }
        drop(file);
        let _ = std::fs::remove_file(out);
        Ok(secs)
    }
}

fn receive(port: u16, offset: u64, len: u64, file: &std::fs::File) -> anyhow::Result<blake3::Hash> {
    let key = key();
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connect to a floor sender")?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut hasher = blake3::Hasher::new();
    let mut rec = vec![0u8; RECORD + TAG];
    let mut at = 0u64;
    let mut i = 0u64;
    while at < len {
        let mut n = [0u8; 4];
        s.read_exact(&mut n)?;
        let n = u32::from_le_bytes(n) as usize;
        if !(TAG + 1..=RECORD + TAG).contains(&n) {
            bail!("record of {n} bytes");
        }
        s.read_exact(&mut rec[..n])?;
        let plain = key
            .open_in_place(nonce(i), Aad::empty(), &mut rec[..n])
            .map_err(|_| anyhow!("record {i} does not open"))?;
        hasher.update(plain);
        file.write_all_at(plain, offset + at)?;
        at += plain.len() as u64;
        i += 1;
    }
    Ok(hasher.finalize())
}
