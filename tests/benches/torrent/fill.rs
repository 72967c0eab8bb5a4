//! New replicas filling at once (#20): one seeder with its upload capped,
//! and N = 1, 2, 4 and 8 fresh workers (only the manifest) told to load the
//! same shard at the same moment; the figure is the time until all of them
//! hold it (GetStatus shows the file seeding), and its ratio to N = 1. Each
//! N runs with partial seeding on (downloaders serve each other the pieces
//! they verified) and off (`--no-partial-seeding` on every worker: only
//! complete seeders serve, today's design before #20), each its own
//! cluster, in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use llama_cluster_proto::v1::{LoadShardRequest, TorrentInfo};
use llama_cluster_tests::{NodeProc, wait_for, worker_args};

/// Downloader counts.
pub const COUNTS: [usize; 4] = [1, 2, 4, 8];

/// One run: N downloaders, partial seeding on or off.
pub struct Fill {
    pub n: usize,
    pub partial: bool,
    /// Seconds from the LoadShard calls until the last one holds the file.
    pub secs: f64,
    /// Share of the downloaders' bytes that came from partial seeders.
    pub from_partial: f64,
}

/// `w`'s entry for file `hash` once it holds all of it.
async fn holds(w: &NodeProc, hash: &str) -> Option<TorrentInfo> {
    w.status().await.ok().and_then(|st| {
        st.torrents
            .into_iter()
            .find(|t| t.file_hash == hash && t.state == "seeding")
    })
}

/// A cluster of its own: bootstrap, capped seeder, `n` downloaders.
#[allow(clippy::too_many_arguments)]
async fn one(
    dir: &Path,
    manifest: &Path,
    bare: &Path,
    shard_id: &str,
    hash: &str,
    cap: u32,
    n: usize,
    partial: bool,
) -> Fill {
    let cluster = format!("bench-fill-{}-{n}", if partial { "on" } else { "off" });
    let off: &[&str] = if partial {
        &[]
    } else {
        &["--no-partial-seeding"]
    };
    let boot = NodeProc::start(
        dir,
        &format!("{cluster}-bootstrap"),
        &[
            "bootstrap",
            "--cluster",
            &cluster,
            "--p2p-host",
            "127.0.0.1",
            "--grpc-addr",
            "127.0.0.1:0",
        ],
    )
    .expect("bootstrap");
    let b = boot.addr("quic-v1");
    let node = |name: String, host: &str, m: &Path, extra: &[&str]| {
        let mut args = worker_args(host, &[&b], None);
        args.extend([
            "--cluster".into(),
            cluster.clone(),
            "--manifest".into(),
            m.display().to_string(),
        ]);
        args.extend(extra.iter().chain(off).map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProc::start(dir, &name, &args).expect("worker")
    };
    let cap_s = cap.to_string();
    let seeder = node(
        format!("{cluster}-seeder"),
        "127.0.0.30",
        manifest,
        &["--upload-limit-mb-per-sec", &cap_s],
    );
    wait_for("seeding", Duration::from_secs(120), || holds(&seeder, hash))
        .await
        .expect("the seeder seeds");
    let workers: Vec<NodeProc> = (0..n)
        .map(|i| {
            node(
                format!("{cluster}-w{i}"),
                &format!("127.0.0.{}", 31 + i),
                bare,
                &[],
            )
        })
        .collect();
    // Everybody sees everybody (discovery) before the clock starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t0 = Instant::now();
    let _loads: Vec<_> = workers
        .iter()
        .map(|w| {
            let addr = w.grpc_addr.clone();
            let shard = shard_id.to_string();
            tokio::spawn(async move {
                let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                llama_cluster_proto::v1::worker_client::WorkerClient::new(ch)
                    .load_shard(LoadShardRequest {
                        shard_id: shard,
                        ..Default::default()
                    })
                    .await
                    .ok()
            })
        })
        .collect();
    let mut secs = 0.0;
    let (mut bytes, mut partial_bytes) = (0u64, 0u64);
    for w in &workers {
        let t = wait_for("a replica filled", Duration::from_secs(600), || {
            holds(w, hash)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: see {}", w.log_path.display()));
        secs = f64::max(secs, t0.elapsed().as_secs_f64());
        bytes += t.bytes_from_seeders + t.bytes_from_partial;
        partial_bytes += t.bytes_from_partial;
    }
    drop((workers, seeder, boot));
    Fill {
        n,
        partial,
        secs,
        from_partial: partial_bytes as f64 / bytes.max(1) as f64,
    }
}

/// Every count, partial seeding on and off. The downloaders' disk holds the
/// manifest and the model's head file (which every shard needs, so only the
/// shard file itself is fetched).
pub async fn run(dir: &Path, manifest: &Path, shard_id: &str, hash: &str, cap: u32) -> Vec<Fill> {
    let bare_dir = dir.join("fill-manifest");
    std::fs::create_dir_all(&bare_dir).expect("dir");
    let bare = bare_dir.join("manifest.json");
    std::fs::copy(manifest, &bare).expect("manifest");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest).expect("manifest")).expect("manifest");
    if let Some(head) = m["head"]["file"].as_str() {
        std::fs::copy(manifest.with_file_name(head), bare_dir.join(head)).expect("head file");
    }
    let mut out = Vec::new();
    for partial in [true, false] {
        for n in COUNTS {
            eprintln!(
                "fill: {n} replica(s), partial seeding {}",
                if partial { "on" } else { "off" }
            );
            out.push(one(dir, manifest, &bare, shard_id, hash, cap, n, partial).await);
        }
    }
    out
}

/// Prints the figures: seconds and ratio to N = 1, per mode.
pub fn print(fills: &[Fill], file: &str, mb: f64, cap: u32) {
    println!(
        "replicas filling at once: {file} ({mb:.1} MB), 1 seeder capped at {cap} MB/s, N fresh workers loading it together (floor: {:.2} s, the file once at the cap)",
        mb / cap as f64
    );
    println!(
        "{:<10} {:>22} {:>9} {:>14} {:>22} {:>9}",
        "replicas",
        "partial seeding: s",
        "vs N=1",
        "from partial",
        "complete seeders only: s",
        "vs N=1"
    );
    let of = |n: usize, partial: bool| fills.iter().find(|f| f.n == n && f.partial == partial);
    let base = |partial: bool| of(1, partial).map_or(f64::NAN, |f| f.secs);
    for n in COUNTS {
        let (Some(on), Some(off)) = (of(n, true), of(n, false)) else {
            continue;
        };
        println!(
            "{:<10} {:>22.2} {:>8.2}x {:>13.0}% {:>22.2} {:>8.2}x",
            n,
            on.secs,
            on.secs / base(true),
            on.from_partial * 100.0,
            off.secs,
            off.secs / base(false)
        );
    }
    println!(
        "target: 8 replicas within 1.5x of 1 with partial seeding (complete seeders only: about 8x)"
    );
}
