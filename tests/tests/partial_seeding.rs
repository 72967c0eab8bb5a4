//! Shards spread like a torrent (#20): downloaders still fetching a file
//! serve the pieces they verified to each other. Real worker processes on
//! 127.0.0.x; one seeder with its upload capped at 2 MB/s (the 22-piece
//! shard takes it about 11 s to send once), three downloaders starting
//! together. Each test fails with partial seeding off
//! (`LLAMA_CLUSTER_PARTIAL_SEEDING=false` in the environment of the run).

use std::path::PathBuf;

use llama_cluster_proto::v1::LoadShardResponse;
use llama_cluster_tests::torrent::{
    Split, WAIT, bare_manifest, bootstrap, split, start, start_with_env, stored_file, torrent,
    wait_seeding,
};
use llama_cluster_tests::{NodeProc, metric_with, scrape, test_dir, wait_for};

/// The seeder's upload cap, MB/s.
const CAP: &str = "2";

/// A seeder capped at [`CAP`] and three downloaders with only the
/// manifest, on `hosts` (seeder first); downloader `liar` (if any) serves
/// corrupted pieces while it is still downloading.
struct Swarm {
    _dir: PathBuf,
    s: Split,
    _boot: NodeProc,
    _seeder: NodeProc,
    downloaders: Vec<NodeProc>,
}

async fn swarm(test: &str, hosts: [&str; 4], liar: Option<usize>) -> Swarm {
    let dir = test_dir(test);
    let s = split(&dir);
    let boot = bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let seeder = start(
        &dir,
        "seeder",
        hosts[0],
        &b,
        &s.manifest,
        &["--upload-limit-mb-per-sec", CAP],
    );
    wait_seeding(&seeder, &s.hash).await;
    let downloaders = (0..3)
        .map(|i| {
            let name = format!("d{i}");
            let m = bare_manifest(&dir, &name, &s.manifest);
            let env: &[(&str, &str)] = if liar == Some(i) {
                &[("LLAMA_CLUSTER_TEST_CORRUPT_UPLOADS", "true")]
            } else {
                &[]
            };
            start_with_env(
                &dir,
                &name,
                hosts[i + 1],
                &b,
                &m,
                &["--metrics-addr", "127.0.0.1:0"],
                env,
            )
        })
        .collect();
    Swarm {
        _dir: dir,
        s,
        _boot: boot,
        _seeder: seeder,
        downloaders,
    }
}

/// LoadShard of the split's shard on `node`, on a task of its own.
fn load_in_background(
    node: &NodeProc,
    shard: &str,
) -> tokio::task::JoinHandle<Result<LoadShardResponse, tonic::Status>> {
    let addr = node.grpc_addr.clone();
    let shard = shard.to_string();
    tokio::spawn(async move {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        llama_cluster_proto::v1::worker_client::WorkerClient::new(ch)
            .load_shard(llama_cluster_proto::v1::LoadShardRequest {
                shard_id: shard,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    })
}

/// The shard is ready on `node` and its stored file is the split's, byte
/// for byte.
fn assert_holds(node: &NodeProc, s: &Split, r: Result<LoadShardResponse, tonic::Status>) {
    let r = r.unwrap_or_else(|e| panic!("{}: {e}\n{}", node.name, node.log()));
    assert_eq!(r.state, "ready", "{}", node.name);
    let want = std::fs::read(s.manifest.with_file_name(&s.file)).unwrap();
    let got = std::fs::read(stored_file(node, &s.hash)).unwrap();
    assert!(got == want, "{} holds different bytes", node.name);
}

/// (from complete seeders, from partial ones) bytes of `node`'s download,
/// from its /metrics (and the same from GetStatus).
async fn bytes_by_source(node: &NodeProc, s: &Split) -> (u64, u64) {
    let st = node.status().await.unwrap();
    let t = torrent(&st, &s.hash).expect("listed");
    let text = scrape(node).unwrap();
    let of = |source: &str| {
        metric_with(
            &text,
            "llama_cluster_torrent_download_bytes_total",
            &[("file", t.name.as_str()), ("source", source)],
        )
        .unwrap_or(0.0) as u64
    };
    let (seeders, partial) = (of("seeder"), of("partial"));
    assert_eq!(
        (t.bytes_from_seeders, t.bytes_from_partial),
        (seeders, partial),
        "GetStatus and /metrics of {} agree\n{text}",
        node.name
    );
    (seeders, partial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_downloaders_fill_from_each_other_while_the_seeder_is_capped() {
    let sw = swarm(
        "partial-3",
        ["127.0.0.200", "127.0.0.201", "127.0.0.202", "127.0.0.203"],
        None,
    )
    .await;
    let loads: Vec<_> = sw
        .downloaders
        .iter()
        .map(|d| load_in_background(d, &sw.s.shard_id))
        .collect();
    for (d, l) in sw.downloaders.iter().zip(loads) {
        assert_holds(d, &sw.s, l.await.unwrap());
    }
    for d in &sw.downloaders {
        let (seeders, partial) = bytes_by_source(d, &sw.s).await;
        assert_eq!(seeders + partial, sw.s.size, "{}", d.name);
        // A substantial share came from the other downloaders.
        assert!(
            partial * 4 >= sw.s.size,
            "{}: {partial} of {} bytes from partial seeders\n{}",
            d.name,
            sw.s.size,
            d.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_seeder_serving_corrupted_pieces_is_dropped_and_named() {
    let sw = swarm(
        "partial-liar",
        ["127.0.0.205", "127.0.0.206", "127.0.0.207", "127.0.0.208"],
        Some(0),
    )
    .await;
    let liar = &sw.downloaders[0];
    let loads: Vec<_> = sw
        .downloaders
        .iter()
        .map(|d| load_in_background(d, &sw.s.shard_id))
        .collect();
    for (d, l) in sw.downloaders.iter().zip(loads) {
        // The liar's own download is honest, and it finishes too.
        assert_holds(d, &sw.s, l.await.unwrap());
    }
    for d in &sw.downloaders[1..] {
        let log = d.log();
        assert!(
            log.contains(&format!("{} sent a bad piece", liar.peer_id)),
            "{} names the liar in its log:\n{log}",
            d.name
        );
        let st = d.status().await.unwrap();
        let t = torrent(&st, &sw.s.hash).unwrap();
        assert!(t.bad_pieces >= 1, "{t:?}");
        assert_eq!(t.bad_peers, vec![liar.peer_id.clone()], "{t:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloader_killed_midway_does_not_stall_the_others() {
    let mut sw = swarm(
        "partial-kill",
        ["127.0.0.210", "127.0.0.211", "127.0.0.212", "127.0.0.213"],
        None,
    )
    .await;
    let loads: Vec<_> = sw
        .downloaders
        .iter()
        .map(|d| load_in_background(d, &sw.s.shard_id))
        .collect();
    // The victim is killed while it is still downloading and once it has
    // served pieces to the others (they ask it for more).
    let victim = &sw.downloaders[0];
    let served = wait_for("the victim serving pieces", WAIT, || async {
        let st = victim.status().await.ok()?;
        let t = torrent(&st, &sw.s.hash)?;
        assert!(
            t.state == "downloading",
            "{} finished before it served two pieces\n{}",
            victim.name,
            victim.log()
        );
        let out = llama_cluster_tests::metric(
            &scrape(victim).ok()?,
            "llama_cluster_torrent_bytes_out_total",
        )?;
        (out >= 2.0 * (1 << 20) as f64).then_some(t.pieces_done)
    })
    .await
    .unwrap();
    assert!(served < 22);
    sw.downloaders[0].kill();
    let mut loads = loads.into_iter();
    let _victim_load = loads.next();
    for (d, l) in sw.downloaders[1..].iter().zip(loads) {
        assert_holds(d, &sw.s, l.await.unwrap());
        let (_, partial) = bytes_by_source(d, &sw.s).await;
        assert!(partial > 0, "{}", d.name);
    }
}
