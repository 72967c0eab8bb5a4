//! Shard transfer benchmark (printed, not asserted): the largest shard file
//! of the default model (2-shard split) downloaded by a fresh worker from 1
//! seeder and from 3 seeders over loopback, against `curl` fetching the same
//! file from `python3 -m http.server`, in one run, as throughput ratios;
//! then the same with every seeder's upload capped at 100 MB/s (about a
//! gigabit link each), where 3 seeders against 1 shows what the swarm adds
//! when the links, not this machine's two cores, are the limit. The four
//! configurations run side by side as separate clusters and the rounds take
//! turns, so ratios are also printed paired within each round.
//!
//! The floor (`floor`): the same file sealed, sent, opened, hashed and
//! written with nothing else in the way, from 1 and from 3 sender processes.
//!
//! Then replicas filling at once (`fill`): one seeder capped at
//! `BENCH_FILL_CAP_MB_S` (default 10) and N = 1, 2, 4, 8 workers loading the
//! shard together, with partial seeding on and off (`BENCH_FILL_ONLY=1`
//! runs this part alone).
//!
//! cargo build --release --workspace --bins && cargo bench -p llama-cluster-tests --bench torrent

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llama_cluster_tests::{NodeProc, binary, cpu, split_with_cli, test_dir, wait_for, worker_args};
use serde_json::Value;

#[path = "torrent/fill.rs"]
mod fill;
#[path = "torrent/floor.rs"]
mod floor;
#[path = "torrent/libp2p_floor.rs"]
mod libp2p_floor;

/// Rounds per configuration (`BENCH_ROUNDS`), the best one counts.
const ROUNDS: usize = 5;
/// Upload cap of each seeder in the capped runs: about a gigabit link.
const CAP_MB_S: u32 = 100;
/// Upload cap of the seeder while replicas fill (`BENCH_FILL_CAP_MB_S`):
/// low enough for this VM's two cores to carry eight downloaders' traffic.
const FILL_CAP_MB_S: u32 = 10;

fn use_release_binaries() {
    if std::env::var_os("LLAMA_CLUSTER_BIN_DIR").is_none() {
        let rel = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
        if rel.join("llama-worker").exists() {
            // SAFETY: set before any other thread reads the environment.
            unsafe { std::env::set_var("LLAMA_CLUSTER_BIN_DIR", &rel) };
        }
    }
}

fn http_round(dir: &Path, file: &str, port: u16) -> f64 {
    let out = dir.join("curl.out");
    let t0 = Instant::now();
    let st = Command::new("curl")
        .args(["-sf", "-o"])
        .arg(&out)
        .arg(format!("http://127.0.0.1:{port}/{file}"))
        .status()
        .expect("curl");
    assert!(st.success(), "curl failed");
    let s = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(out);
    s
}

/// Extra flags for the fetching node (`BENCH_FETCH_ARGS`, e.g. `--no-quic`).
fn fetch_args() -> Vec<String> {
    std::env::var("BENCH_FETCH_ARGS")
        .ok()
        .map(|a| a.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// (seconds end to end, seconds of piece transfer) from the fetching worker's log.
fn fetch_round(dir: &Path, round: &str, cluster: &str, boot: &str, hash: &str) -> (f64, f64) {
    let cache = dir.join(format!("fetch-{round}.cache"));
    let log = dir.join(format!("fetch-{round}.log"));
    let out = dir.join(format!("fetched-{round}"));
    let st = Command::new(binary("llama-worker"))
        .args(["fetch", "--hash", hash, "--out"])
        .arg(&out)
        .args([
            "--cluster",
            cluster,
            "--bootstrap",
            boot,
            "--p2p-host",
            "127.0.0.9",
            "--grpc-addr",
            "127.0.0.1:0",
            "--cache-dir",
        ])
        .arg(&cache)
        .args(fetch_args())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .expect("fetch");
    assert!(st.success(), "fetch failed, see {}", log.display());
    let text = std::fs::read_to_string(&log).unwrap();
    let grab = |marker: &str| {
        llama_cluster_tests::log_value::<f64>(&text, marker, " s ").expect("times in the log")
    };
    let secs = (grab(" fetched in "), grab(" transferred in "));
    let _ = std::fs::remove_dir_all(cache);
    let _ = std::fs::remove_file(out);
    secs
}

/// Seconds to seal and then open `data` with ChaCha20-Poly1305 (the cipher
/// the QUIC and TCP transports negotiate) in 16 KiB records on one thread:
/// what encryption alone costs an encrypted transfer of this file.
fn cipher_round(data: &[u8]) -> f64 {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("key"));
    let nonce = |i: usize| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(i as u64).to_le_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let mut buf = data.to_vec();
    let t0 = Instant::now();
    let tags: Vec<_> = buf
        .chunks_mut(16 << 10)
        .enumerate()
        .map(|(i, rec)| {
            key.seal_in_place_separate_tag(nonce(i), Aad::empty(), rec)
                .expect("seal")
        })
        .collect();
    for (i, (rec, tag)) in buf.chunks_mut(16 << 10).zip(tags).enumerate() {
        key.open_in_place_separate_tag(nonce(i), Aad::empty(), tag, rec, 0..)
            .expect("open");
    }
    let secs = t0.elapsed().as_secs_f64();
    assert!(buf == data, "the round trip restores the file");
    secs
}

/// One configuration: its own cluster of seeders and what each round took.
struct Scenario {
    cap: Option<u32>,
    n: usize,
    cluster: String,
    boot_addr: String,
    /// Kept alive for the whole run.
    procs: (NodeProc, Vec<NodeProc>),
    /// (end to end, pieces) seconds per round.
    rounds: Vec<(f64, f64)>,
    /// CPU seconds of the fetching process and of the seeders, per round.
    cpu: Vec<(f64, f64)>,
}

/// CPU seconds the seeders of `sc` have used so far.
fn seeders_cpu(sc: &Scenario) -> f64 {
    sc.procs
        .1
        .iter()
        .filter_map(|p| cpu::of_pid(p.child.id()))
        .sum()
}

/// `python3 -m http.server` serving `dir` on 127.0.0.1, once it accepts
/// connections: a port taken by someone else makes it exit, and the next
/// port is tried (bounded).
fn start_http(dir: &Path) -> (std::process::Child, u16) {
    let first = 18000 + (std::process::id() % 1000) as u16;
    for port in first..first + 20 {
        let mut child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .arg("--directory")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 http.server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("python3 http.server did not start on any of 20 ports from {first}");
}

fn best(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::MAX, f64::min)
}

fn best2(v: &[(f64, f64)]) -> (f64, f64) {
    (
        best(&v.iter().map(|x| x.0).collect::<Vec<_>>()),
        best(&v.iter().map(|x| x.1).collect::<Vec<_>>()),
    )
}

fn main() {
    // Or the sender of the libp2p floor, which builds its own runtime.
    if std::env::var_os(libp2p_floor::SEND_ENV).is_some() {
        if let Err(e) = libp2p_floor::serve_from_env() {
            eprintln!("libp2p floor sender: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    // Or a sender of the floor transfer (see `floor`): no async runtime.
    llama_cluster_tests::self_child::main_or_helper(floor::SEND_ENV, floor::serve_from_env, run);
}

async fn run() {
    use_release_binaries();
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&r| r > 0)
        .unwrap_or(ROUNDS);
    let dir = test_dir("bench-torrent");
    let manifest = split_with_cli(&dir.join("split"), 2).expect("split");
    let m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let big = m["shards"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|s| s["size"].as_u64())
        .unwrap()
        .clone();
    let (file, hash, size) = (
        big["file"].as_str().unwrap().to_string(),
        big["hash"].as_str().unwrap().to_string(),
        big["size"].as_u64().unwrap(),
    );
    let mb = size as f64 / 1e6;
    let fill_cap = std::env::var("BENCH_FILL_CAP_MB_S")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&c| c > 0)
        .unwrap_or(FILL_CAP_MB_S);
    let shard_id = big["id"].as_str().unwrap().to_string();
    let fill_run = || fill::run(&dir, &manifest, &shard_id, &hash, fill_cap);
    if std::env::var_os("BENCH_FILL_ONLY").is_some_and(|v| v == "1") {
        fill::print(&fill_run().await, &file, mb, fill_cap);
        return;
    }

    // Every configuration runs side by side, each its own cluster (own
    // bootstrap, DHT and rendezvous namespace, so a leecher sees only its
    // seeders), and the rounds take turns: a slow spell of this VM (its
    // figures drift by about ±20 %) hits all of them, and each round gives
    // ratios paired within it.
    let (mut http, port) = start_http(manifest.parent().unwrap());
    let mut scenarios = Vec::new();
    // (uncapped or capped, seeders, their 127.0.0.x hosts)
    for (cap, hosts) in [
        (None, vec![2u8]),
        (None, vec![3, 4, 5]),
        (Some(CAP_MB_S), vec![6]),
        (Some(CAP_MB_S), vec![7, 8, 10]),
    ] {
        let cluster = format!(
            "bench-{}{}",
            if cap.is_some() { "capped" } else { "uncapped" },
            hosts.len()
        );
        let boot = NodeProc::start(
            &dir,
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
        .unwrap();
        let b = boot.addr("quic-v1");
        let mut seeders = Vec::new();
        for h in &hosts {
            let mut args = worker_args(&format!("127.0.0.{h}"), &[&b], None);
            args.extend([
                "--cluster".into(),
                cluster.clone(),
                "--manifest".into(),
                manifest.display().to_string(),
            ]);
            if let Some(c) = cap {
                args.extend(["--upload-limit-mb-per-sec".into(), c.to_string()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            seeders.push(NodeProc::start(&dir, &format!("{cluster}-seeder{h}"), &args).unwrap());
        }
        for s in &seeders {
            wait_for("seeding", Duration::from_secs(60), || async {
                s.status()
                    .await
                    .ok()?
                    .torrents
                    .iter()
                    .any(|t| t.file_hash == hash)
                    .then_some(())
            })
            .await
            .unwrap();
        }
        scenarios.push(Scenario {
            cap,
            n: hosts.len(),
            cluster,
            // A fetching node without QUIC (BENCH_FETCH_ARGS=--no-quic)
            // needs the bootstrap node's TCP address.
            boot_addr: if fetch_args().iter().any(|a| a == "--no-quic") {
                boot.addr("tcp")
            } else {
                b
            },
            procs: (boot, seeders),
            rounds: Vec::new(),
            cpu: Vec::new(),
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let data = std::fs::read(manifest.with_file_name(&file)).expect("shard file");
    let floors = [1u64, 3].map(|n| {
        floor::FloorTransfer::start(&manifest.with_file_name(&file), n).expect("floor senders")
    });
    let mut p2p_floor = libp2p_floor::Libp2pFloor::start(&manifest.with_file_name(&file))
        .await
        .expect("libp2p floor sender");
    let mut p2p_floor_rounds = Vec::new();
    let floor_out = dir.join("floor.out");
    let mut floor_rounds: [Vec<f64>; 2] = Default::default();
    let mut http_rounds = Vec::new();
    // CPU seconds of curl and of the HTTP server, per round.
    let mut http_cpu = Vec::new();
    let mut cipher_rounds = Vec::new();
    for r in 0..rounds {
        eprintln!("round {}/{rounds}", r + 1);
        let (server0, curl0) = (cpu::of_pid(http.id()), cpu::of_waited_children());
        http_rounds.push(http_round(&dir, &file, port));
        http_cpu.push((
            cpu::of_waited_children() - curl0,
            cpu::of_pid(http.id())
                .zip(server0)
                .map_or(0.0, |(b, a)| b - a),
        ));
        for sc in scenarios.iter_mut() {
            let tag = format!("{}-{r}", sc.cluster);
            let (seeders0, fetch0) = (seeders_cpu(sc), cpu::of_waited_children());
            let secs = fetch_round(&dir, &tag, &sc.cluster, &sc.boot_addr, &hash);
            sc.cpu.push((
                cpu::of_waited_children() - fetch0,
                seeders_cpu(sc) - seeders0,
            ));
            sc.rounds.push(secs);
        }
        cipher_rounds.push(cipher_round(&data));
        for (f, secs) in floors.iter().zip(floor_rounds.iter_mut()) {
            secs.push(f.run(&floor_out, &data).expect("floor transfer"));
        }
        p2p_floor_rounds.push(
            p2p_floor
                .run(&floor_out, &data)
                .await
                .expect("libp2p floor transfer"),
        );
    }
    drop(floors);
    drop(p2p_floor);
    drop(data);
    let _ = http.kill();
    let _ = http.wait();
    let http_s = best(&http_rounds);
    let cipher_s = best(&cipher_rounds);
    let results: Vec<(Option<u32>, usize, (f64, f64))> = scenarios
        .iter()
        .map(|sc| (sc.cap, sc.n, best2(&sc.rounds)))
        .collect();
    println!("shard transfer benchmark: {file} ({mb:.1} MB), loopback, best of {rounds}");
    println!("{:<52} {:>9} {:>9} {:>8}", "", "seconds", "MB/s", "ratio");
    println!(
        "{:<52} {:>9.3} {:>9.1} {:>8.2}",
        "curl from python3 http.server",
        http_s,
        mb / http_s,
        1.0
    );
    for (cap, n, (total, transfer)) in &results {
        let who = match cap {
            None => format!("{n} seeder(s)"),
            Some(c) => format!("{n} seeder(s) at {c} MB/s"),
        };
        println!(
            "{:<52} {:>9.3} {:>9.1} {:>8.2}",
            format!("llama-cluster, {who}, pieces only"),
            transfer,
            mb / transfer,
            http_s / transfer
        );
        println!(
            "{:<52} {:>9.3} {:>9.1} {:>8.2}",
            format!("llama-cluster, {who}, end to end"),
            total,
            mb / total,
            http_s / total
        );
    }
    let pieces = |cap: Option<u32>, n: usize| {
        results
            .iter()
            .find(|r| r.0 == cap && r.1 == n)
            .map_or(f64::NAN, |r| r.2.1)
    };
    for (n, secs) in [1, 3].iter().zip(&floor_rounds) {
        let s = best(secs);
        println!(
            "{:<52} {:>9.3} {:>9.1} {:>8.2}",
            format!("floor: sealed records over TCP, {n} sender(s)"),
            s,
            mb / s,
            http_s / s
        );
    }
    let s = best(&p2p_floor_rounds);
    println!(
        "{:<52} {:>9.3} {:>9.1} {:>8.2}",
        "floor: one libp2p stream (TCP, noise, yamux)",
        s,
        mb / s,
        http_s / s
    );
    println!(
        "ChaCha20-Poly1305 alone, seal + open of the file on one thread: {cipher_s:.3} s ({:.2}x the HTTP transfer's time)",
        cipher_s / http_s
    );
    println!(
        "3 seeders vs 1, pieces: {:.2}x uncapped, {:.2}x capped at {CAP_MB_S} MB/s each",
        pieces(None, 1) / pieces(None, 3),
        pieces(Some(CAP_MB_S), 1) / pieces(Some(CAP_MB_S), 3)
    );
    // Ratios within each round, then their median and range.
    let paired = |f: &dyn Fn(usize) -> f64| {
        let (mid, lo, hi) = llama_cluster_tests::median_range((0..rounds).map(f).collect());
        format!("{mid:.2} [{lo:.2}, {hi:.2}]")
    };
    let pieces_of = |i: usize, r: usize| scenarios[i].rounds[r].1;
    println!("paired within each round (median of {rounds} [lowest, highest]):");
    println!(
        "  1 seeder against HTTP, pieces:      {}",
        paired(&|r| http_rounds[r] / pieces_of(0, r))
    );
    println!(
        "  1 seeder against HTTP, end to end:  {}",
        paired(&|r| http_rounds[r] / scenarios[0].rounds[r].0)
    );
    println!(
        "  3 seeders vs 1, uncapped:           {}",
        paired(&|r| pieces_of(0, r) / pieces_of(1, r))
    );
    println!(
        "  3 seeders vs 1, capped:             {}",
        paired(&|r| pieces_of(2, r) / pieces_of(3, r))
    );
    println!(
        "  floor, 1 sender against HTTP:       {}",
        paired(&|r| http_rounds[r] / floor_rounds[0][r])
    );
    println!(
        "  floor, one libp2p stream vs HTTP:   {}",
        paired(&|r| http_rounds[r] / p2p_floor_rounds[r])
    );
    println!(
        "  floor, 3 senders vs 1:              {}",
        paired(&|r| floor_rounds[0][r] / floor_rounds[1][r])
    );
    // What each way costs the machine: on 2 shared cores, a transfer that
    // needs more CPU than the cores give cannot keep up with HTTP.
    let median = |v: Vec<f64>| llama_cluster_tests::median_range(v).0;
    let medians = |v: &[(f64, f64)]| {
        (
            median(v.iter().map(|c| c.0).collect()),
            median(v.iter().map(|c| c.1).collect()),
            median(v.iter().map(|c| c.0 + c.1).collect()),
        )
    };
    let (curl_s, server_s, http_total) = medians(&http_cpu);
    println!(
        "CPU per transfer (user + system, median of {rounds} rounds; a server's in 10 ms ticks):"
    );
    println!("  curl {curl_s:.3} s + python3 http.server {server_s:.3} s = {http_total:.3} s");
    for sc in scenarios.iter().filter(|sc| sc.cap.is_none()) {
        let (fetch_s, seeders_s, total) = medians(&sc.cpu);
        println!(
            "  llama-cluster, {} seeder(s): fetching process {fetch_s:.3} s (with its start and lookup) + seeders {seeders_s:.3} s = {total:.3} s ({:.2}x HTTP's)",
            sc.n,
            total / http_total
        );
    }
    println!("(end to end: provider lookup, metadata, pieces, whole-file hash, fsync and rename)");
    println!(
        "(floor: the file in 64 KiB records sealed with ChaCha20-Poly1305 over plain TCP, each opened, hashed with BLAKE3 and written; the least an encrypted, verified transfer takes here)"
    );
    println!("targets: 1 seeder >= 0.80x HTTP; 3 seeders faster than 1");
    drop(scenarios);
    fill::print(&fill_run().await, &file, mb, fill_cap);
}
