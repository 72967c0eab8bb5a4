//! Shard files through the swarm: real worker processes on 127.0.0.x, a
//! real shard file of the default model, pieces verified by hash, several
//! providers, bad peers, dead peers, restarts, malformed requests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llama_cluster_proto::v1::{LoadShardRequest, SyncTorrentsRequest};
use llama_cluster_tests::torrent::{
    Split, WAIT, bare_manifest, blake3_of, bootstrap, load, split, start, stored_file, torrent,
    wait_seeding,
};
use llama_cluster_tests::{NodeProc, binary, log_value, test_dir, wait_for, worker_args};
use serde_json::Value;

/// A test's directory, split and bootstrap node (`b`: its QUIC address),
/// and a worker seeding the split's files.
struct Seeded {
    dir: PathBuf,
    s: Split,
    _boot: NodeProc,
    b: String,
    seeder: NodeProc,
}

/// [`Seeded`] for test `test`, its seeder at `host` started with `flags`.
async fn seeded(test: &str, host: &str, flags: &[&str]) -> Seeded {
    let dir = test_dir(test);
    let s = split(&dir);
    let boot = bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let seeder = start(&dir, "seeder", host, &b, &s.manifest, flags);
    wait_seeding(&seeder, &s.hash).await;
    Seeded {
        dir,
        s,
        _boot: boot,
        b,
        seeder,
    }
}

/// A worker at `host` with only the manifest, after LoadShard of the
/// split's shard fetched its file through the swarm (checked: ready, and the
/// file's hash).
async fn loaded_leecher(dir: &Path, s: &Split, b: &str, host: &str) -> NodeProc {
    let m = bare_manifest(dir, "leech", &s.manifest);
    let leech = start(dir, "leech", host, b, &m, &[]);
    let r = load(&leech, &s.shard_id)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", leech.log()));
    assert_eq!(r.state, "ready");
    assert_eq!(blake3_of(&stored_file(&leech, &s.hash)), s.hash);
    leech
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_seeder_three_leechers_end_byte_identical() {
    let Seeded {
        dir,
        s,
        _boot,
        b,
        seeder,
    } = seeded("torrent-3leech", "127.0.0.60", &[]).await;
    let leechers: Vec<NodeProc> = (0..3)
        .map(|i| {
            let m = bare_manifest(&dir, &format!("l{i}"), &s.manifest);
            start(
                &dir,
                &format!("leecher{i}"),
                &format!("127.0.0.{}", 61 + i),
                &b,
                &m,
                &[],
            )
        })
        .collect();
    // All three load the shard at once: each fetches it through the swarm.
    let loads = futures::future::join_all(leechers.iter().map(|l| load(l, &s.shard_id))).await;
    let want = std::fs::read(s.manifest.with_file_name(&s.file)).unwrap();
    for (l, r) in leechers.iter().zip(loads) {
        let r = r.unwrap_or_else(|e| panic!("{}: {e}\n{}", l.name, l.log()));
        assert_eq!(r.state, "ready");
        let got = std::fs::read(stored_file(l, &s.hash)).unwrap();
        assert_eq!(got.len() as u64, s.size);
        assert!(got == want, "{} holds different bytes", l.name);
        let st = l.status().await.unwrap();
        let t = torrent(&st, &s.hash).expect("listed");
        assert_eq!(t.state, "seeding", "a complete file is seeded at once");
        assert_eq!((t.pieces_done, t.pieces_total), (22, 22));
        assert!(l.log().contains("complete and verified"));
        // Workers talk over QUIC, and pieces travel over TCP (from the
        // seeder or from another leecher).
        let log = l.log();
        assert!(log.contains("via QUIC"), "{log}");
        assert!(
            log.lines()
                .any(|l| l.contains("shard file pieces from ") && l.ends_with(" over TCP")),
            "{log}"
        );
    }
    // SyncTorrents lists who has what; fetch_missing pulls the rest.
    let mut c = leechers[0].client().await.unwrap();
    let r = c
        .sync_torrents(SyncTorrentsRequest {
            fetch_missing: false,
        })
        .await
        .unwrap()
        .into_inner();
    let e = r
        .entries
        .iter()
        .find(|e| e.file_hash == s.hash)
        .expect("shard listed");
    assert!(e.local);
    assert!(e.providers.contains(&seeder.peer_id), "{:?}", e.providers);
    assert!(
        r.entries.iter().any(|e| !e.local),
        "the seeder has files leecher0 lacks"
    );
    let r = c
        .sync_torrents(SyncTorrentsRequest {
            fetch_missing: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.entries.iter().all(|e| e.local), "{:?}", r.entries);
    assert_eq!(r.entries.len(), 4, "head + 3 shards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_sending_bad_pieces_is_dropped_and_the_download_completes() {
    let dir = test_dir("torrent-corrupt");
    let s = split(&dir);
    let boot = bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let good = start(
        &dir,
        "good",
        "127.0.0.70",
        &b,
        &s.manifest,
        &["--test-piece-delay-ms", "20"],
    );
    let bad = start(
        &dir,
        "bad",
        "127.0.0.71",
        &b,
        &s.manifest,
        &["--test-corrupt-pieces"],
    );
    for n in [&good, &bad] {
        wait_seeding(n, &s.hash).await;
    }
    let m = bare_manifest(&dir, "leech", &s.manifest);
    let leech = start(
        &dir,
        "leech",
        "127.0.0.72",
        &b,
        &m,
        &["--metrics-addr", "127.0.0.1:0"],
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // both announcements seen
    let r = load(&leech, &s.shard_id)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", leech.log()));
    assert_eq!(r.state, "ready");
    assert_eq!(blake3_of(&stored_file(&leech, &s.hash)), s.hash);
    let log = leech.log();
    assert!(
        log.contains(&format!("{} sent a bad piece", bad.peer_id)),
        "the bad peer is named in the log:\n{log}"
    );
    let st = leech.status().await.unwrap();
    assert!(torrent(&st, &s.hash).unwrap().bad_pieces >= 1);
    let text = llama_cluster_tests::scrape(&leech).unwrap();
    let bad_count =
        llama_cluster_tests::metric(&text, "llama_cluster_torrent_bad_pieces_total").unwrap();
    assert_eq!(
        bad_count as u32,
        torrent(&st, &s.hash).unwrap().bad_pieces,
        "{text}"
    );
    assert!(
        llama_cluster_tests::metric(&text, "llama_cluster_torrent_bytes_in_total").unwrap()
            >= s.size as f64
    );
}

/// A cache the worker may not write to ends the download with a clear
/// "permission denied" error and no file under the final name. Root ignores
/// file modes, so as root the leecher runs without CAP_DAC_OVERRIDE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_without_write_permission_ends_the_download_with_a_clear_error() {
    let Seeded {
        dir,
        s,
        _boot,
        b,
        seeder: _seeder,
    } = seeded("torrent-permission", "127.0.0.135", &[]).await;
    let mf = bare_manifest(&dir, "leech", &s.manifest);
    let mut args = worker_args("127.0.0.136", &[&b], None);
    args.extend(["--manifest".into(), mf.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let as_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let wrapper: &[&str] = if as_root {
        &[
            "setpriv",
            "--bounding-set",
            "-dac_override,-dac_read_search",
            "--inh-caps",
            "-all",
            "--",
        ]
    } else {
        &[]
    };
    let leech = NodeProc::start_wrapped(&dir, "leech", wrapper, "llama-worker", &args, &[])
        .unwrap_or_else(|e| panic!("{e:#}"));
    // The store exists; its download directory is made read-only.
    let partial = leech
        .log_path
        .with_file_name("leech.cache")
        .join("torrents/partial");
    assert!(partial.is_dir(), "{}", partial.display());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o500)).unwrap();
    let e = load(&leech, &s.shard_id).await.unwrap_err();
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).unwrap();
    let msg = e.message().to_lowercase();
    assert!(msg.contains("permission denied"), "{e:?}\n{}", leech.log());
    assert!(!stored_file(&leech, &s.hash).exists());
    assert!(
        std::fs::read_dir(&partial).unwrap().next().is_none(),
        "nothing half-written"
    );
    // With the permission back, the same request works.
    let r = load(&leech, &s.shard_id)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", leech.log()));
    assert_eq!(r.state, "ready");
    assert_eq!(blake3_of(&stored_file(&leech, &s.hash)), s.hash);
}

/// A seeder that lies about piece hashes (its metadata matches the corrupt
/// pieces it serves) is refused up front: piece hashes are nodes of the
/// file's BLAKE3 tree, and a liar's do not add up to the file's hash (the
/// split manifest also pins every file's metadata, `pieces_hash`). With only
/// the liar, loading fails with a clear error and nothing is written; with
/// an honest seeder too, it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_metadata_is_refused() {
    let dir = test_dir("torrent-lying-meta");
    let s = split(&dir);
    let m: Value = serde_json::from_slice(&std::fs::read(&s.manifest).unwrap()).unwrap();
    let pin = m["shards"][1]["pieces_hash"].as_str().unwrap_or_default();
    assert_eq!(pin.len(), 64, "split pins the metadata: {}", m["shards"][1]);
    let boot = bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let liar = start(
        &dir,
        "liar",
        "127.0.0.130",
        &b,
        &s.manifest,
        &["--test-lying-meta"],
    );
    wait_seeding(&liar, &s.hash).await;
    let mf = bare_manifest(&dir, "leech", &s.manifest);
    let leech = start(&dir, "leech", "127.0.0.131", &b, &mf, &[]);
    let e = load(&leech, &s.shard_id).await.unwrap_err();
    assert!(
        e.message()
            .contains("piece hashes do not add up to the file's hash"),
        "{e:?}\n{}",
        leech.log()
    );
    assert!(
        leech.log().contains(&format!("not using {}", liar.peer_id)),
        "the liar is named:\n{}",
        leech.log()
    );
    assert!(!stored_file(&leech, &s.hash).exists());
    let st = leech.status().await.unwrap();
    assert_eq!(
        torrent(&st, &s.hash).map(|t| t.verified_bytes).unwrap_or(0),
        0,
        "no piece was taken from the liar"
    );
    // An honest seeder joins: the same request now succeeds.
    let honest = start(&dir, "honest", "127.0.0.132", &b, &s.manifest, &[]);
    wait_seeding(&honest, &s.hash).await;
    let r = wait_for("a load with an honest seeder", WAIT, || async {
        load(&leech, &s.shard_id).await.ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", leech.log()));
    assert_eq!(r.state, "ready");
    assert_eq!(blake3_of(&stored_file(&leech, &s.hash)), s.hash);
}

/// Pieces travel over TCP; a seeder that cannot be reached over TCP (it
/// listens on QUIC alone) still serves them, over QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_go_over_quic_when_the_seeder_cannot_be_reached_over_tcp() {
    let Seeded {
        dir,
        s,
        _boot,
        b,
        seeder,
    } = seeded("torrent-no-tcp", "127.0.0.190", &["--test-no-tcp-listen"]).await;
    assert!(
        !seeder.log().contains("/tcp/"),
        "the seeder listens on QUIC alone:\n{}",
        seeder.log()
    );
    let leech = loaded_leecher(&dir, &s, &b, "127.0.0.191").await;
    let log = leech.log();
    assert!(
        log.contains(&format!(
            "{} cannot be reached over TCP (no TCP address known); asking it for pieces over its other connections",
            seeder.peer_id
        )),
        "{log}"
    );
    assert!(
        !log.contains("pieces from"),
        "no piece came over TCP:\n{log}"
    );
}

/// A seeder whose metadata gives a wrong size (its pieces are right; piece
/// hashes cannot carry that lie) is found out by the file's own last piece:
/// an unpinned `llama-worker fetch` names it, does not take its metadata
/// again, and with no other provider ends with a clear error and no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_with_a_wrong_size_is_found_out_by_the_last_piece() {
    let Seeded {
        dir,
        s,
        _boot,
        b,
        seeder,
    } = seeded(
        "torrent-wrong-size",
        "127.0.0.192",
        &["--test-wrong-size-meta"],
    )
    .await;
    let (ok, text) = fetch_cli(&dir, "first", &s.hash, &b, "127.0.0.193").await;
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("from {} gives its size as", seeder.peer_id))
            && text.contains("shows another size"),
        "{text}"
    );
    assert!(
        text.contains(&format!("not using {}'s metadata again", seeder.peer_id)),
        "{text}"
    );
    assert!(
        text.contains("sent metadata that the file's data proved wrong before"),
        "the second attempt refuses it: {text}"
    );
    assert!(
        !text.contains("sent a bad piece"),
        "the seeder is not blamed for its right pieces: {text}"
    );
    assert!(!dir.join("first.out").exists());
    // With an honest seeder too, the fetch completes, whichever metadata
    // comes first.
    let honest = start(&dir, "honest", "127.0.0.194", &b, &s.manifest, &[]);
    wait_seeding(&honest, &s.hash).await;
    let (ok, text) = fetch_cli(&dir, "second", &s.hash, &b, "127.0.0.195").await;
    assert!(ok, "{text}");
    assert_eq!(blake3_of(&dir.join("second.out")), s.hash);
}

/// Runs `llama-worker fetch` of `hash` (no manifest, so no pin) as `name`
/// at `host`, bounded: whether it succeeded, and its log.
async fn fetch_cli(dir: &Path, name: &str, hash: &str, boot: &str, host: &str) -> (bool, String) {
    let log = dir.join(format!("{name}.log"));
    let fetch = tokio::process::Command::new(binary("llama-worker"))
        .args(["fetch", "--hash", hash, "--out"])
        .arg(dir.join(format!("{name}.out")))
        .args(["--bootstrap", boot, "--p2p-host", host])
        .args(["--grpc-addr", "127.0.0.1:0", "--cache-dir"])
        .arg(dir.join(format!("{name}.cache")))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .status();
    let st = tokio::time::timeout(Duration::from_secs(120), fetch)
        .await
        .expect("the fetch ends within 120 s")
        .unwrap();
    (
        st.success(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_fast_seeder_mid_download_still_completes() {
    let dir = test_dir("torrent-kill-seeder");
    let s = split(&dir);
    let boot = bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let mut fast = start(
        &dir,
        "fast",
        "127.0.0.80",
        &b,
        &s.manifest,
        &["--test-piece-delay-ms", "150"],
    );
    let slow = start(
        &dir,
        "slow",
        "127.0.0.81",
        &b,
        &s.manifest,
        &["--test-piece-delay-ms", "400"],
    );
    for n in [&fast, &slow] {
        wait_seeding(n, &s.hash).await;
    }
    let m = bare_manifest(&dir, "leech", &s.manifest);
    let leech = start(&dir, "leech", "127.0.0.82", &b, &m, &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let shard = s.shard_id.clone();
    let loading = {
        let addr = leech.grpc_addr.clone();
        tokio::spawn(async move {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            llama_cluster_proto::v1::worker_client::WorkerClient::new(ch)
                .load_shard(LoadShardRequest {
                    shard_id: shard,
                    ..Default::default()
                })
                .await
        })
    };
    wait_for("a few pieces", WAIT, || async {
        let st = leech.status().await.ok()?;
        torrent(&st, &s.hash)
            .filter(|t| t.pieces_done >= 3)
            .map(|_| ())
    })
    .await
    .unwrap();
    let before = torrent(&leech.status().await.unwrap(), &s.hash)
        .unwrap()
        .pieces_done;
    assert!(before < 22, "still downloading when the seeder dies");
    fast.kill();
    let r = loading
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", leech.log()))
        .into_inner();
    assert_eq!(r.state, "ready");
    assert_eq!(blake3_of(&stored_file(&leech, &s.hash)), s.hash);
}

/// Seeders that are gone leave provider records and routing entries
/// behind; a download still finds the live seeder at once (bounded lookups,
/// connected peers asked too), waits out its busy answers without dropping
/// it (it is the only one), and that seeder keeps to its upload limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_departed_seeders_do_not_stop_a_download_and_uploads_keep_to_their_limit() {
    const LIMIT_MB_S: f64 = 10.0;
    let dir = test_dir("torrent-departed");
    let s = split(&dir);
    let boot = bootstrap(&dir);
    let b = boot.addr("quic-v1");
    for (i, host) in ["127.0.0.185", "127.0.0.186"].iter().enumerate() {
        let mut gone = start(&dir, &format!("gone{i}"), host, &b, &s.manifest, &[]);
        wait_seeding(&gone, &s.hash).await;
        // Its provider record reaches the bootstrap node before it dies.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        gone.kill();
    }
    let live = start(
        &dir,
        "live",
        "127.0.0.187",
        &b,
        &s.manifest,
        &[
            "--upload-limit-mb-per-sec",
            &LIMIT_MB_S.to_string(),
            "--test-busy-pieces",
            "6",
        ],
    );
    wait_seeding(&live, &s.hash).await;
    assert!(live.log().contains("uploads limited to 10 MB/s"));
    let leech = loaded_leecher(&dir, &s, &b, "127.0.0.188").await;
    let log = leech.log();
    assert!(log.contains("is busy"), "{log}");
    assert!(
        !log.contains("dropping it"),
        "a busy seeder is not dropped\n{log}"
    );
    // The transfer cannot beat the limit: a lower bound (less the 10 ms
    // burst), not a speed goal.
    let secs: f64 = log_value(&log, " transferred in ", " s ")
        .unwrap_or_else(|| panic!("no transfer time in the log\n{log}"));
    let floor = s.size as f64 / (LIMIT_MB_S * 1e6) - 0.05;
    assert!(
        secs >= floor,
        "{secs} s for {} bytes at {LIMIT_MB_S} MB/s",
        s.size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leecher_resumes_from_verified_pieces() {
    let Seeded {
        dir,
        s,
        _boot,
        b,
        seeder: _seeder,
    } = seeded(
        "torrent-resume",
        "127.0.0.90",
        &["--test-piece-delay-ms", "300"],
    )
    .await;
    let m = bare_manifest(&dir, "leech", &s.manifest);
    let mut leech = start(&dir, "leech", "127.0.0.91", &b, &m, &[]);
    let shard = s.shard_id.clone();
    let addr = leech.grpc_addr.clone();
    let _first = tokio::spawn(async move {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let _ = llama_cluster_proto::v1::worker_client::WorkerClient::new(ch)
            .load_shard(LoadShardRequest {
                shard_id: shard,
                ..Default::default()
            })
            .await;
    });
    let verified = wait_for("half the pieces", WAIT, || async {
        let st = leech.status().await.ok()?;
        torrent(&st, &s.hash)
            .filter(|t| t.pieces_done >= 8)
            .map(|t| t.verified_bytes)
    })
    .await
    .unwrap();
    assert!(verified < s.size);
    leech.kill();
    // Same address, same cache directory.
    let t0 = Instant::now();
    std::fs::rename(
        &leech.log_path,
        leech.log_path.with_extension("before-restart.log"),
    )
    .unwrap();
    let leech = start(&dir, "leech", "127.0.0.91", &b, &m, &[]);
    let r = load(&leech, &s.shard_id)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", leech.log()));
    assert_eq!(r.state, "ready");
    assert_eq!(blake3_of(&stored_file(&leech, &s.hash)), s.hash);
    let st = leech.status().await.unwrap();
    let fetched = torrent(&st, &s.hash).unwrap().fetched_bytes;
    // What the restarted worker found verified on disk when it resumed.
    let log = leech.log();
    let resumed_pieces: u64 = log_value(&log, " bytes, ", " of ").expect("resume line in the log");
    // Pieces come rarest first, in no fixed order: the short last piece may
    // be among those kept, so the bytes kept are read, not computed.
    let resumed: u64 =
        log_value(&log, " pieces already verified, ", " bytes)").expect("resumed bytes in the log");
    let missing = s.size - resumed;
    println!(
        "verified before the kill {verified}, found on disk after the restart {resumed}, fetched after {fetched}, took {:?}",
        t0.elapsed()
    );
    assert!(
        resumed >= verified,
        "pieces verified before the kill were kept"
    );
    assert!(resumed_pieces < 22, "something was left to fetch");
    assert_eq!(fetched, missing, "exactly the pieces missing were fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_piece_requests_get_errors_and_the_seeder_keeps_serving() {
    use libp2p::futures::StreamExt;
    use libp2p::request_response::{self, Event, Message};
    use libp2p::swarm::SwarmEvent;
    use llama_worker::network::frame_codec::FrameCodec;
    use llama_worker::torrent::protocol::{
        MAX_FRAME, TORRENT_PROTOCOL, TorrentRequest, TorrentResponse,
    };

    let Seeded {
        dir,
        s,
        _boot,
        b,
        seeder,
    } = seeded("torrent-malformed", "127.0.0.100", &[]).await;

    // A raw piece-protocol client.
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                FrameCodec::new(MAX_FRAME),
                [(
                    libp2p::StreamProtocol::new(TORRENT_PROTOCOL),
                    request_response::ProtocolSupport::Outbound,
                )],
                request_response::Config::default(),
            )
        })
        .unwrap()
        .build();
    let addr: libp2p::Multiaddr = seeder.addr("tcp").parse().unwrap();
    swarm.dial(addr).unwrap();
    let peer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                swarm.select_next_some().await
            {
                return peer_id;
            }
        }
    })
    .await
    .unwrap();
    let mut ask = async |body: Vec<u8>| -> TorrentResponse {
        let id = swarm.behaviour_mut().send_request(&peer, body);
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let SwarmEvent::Behaviour(Event::Message {
                    message:
                        Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) = swarm.select_next_some().await
                    && request_id == id
                {
                    return TorrentResponse::decode(response).unwrap();
                }
            }
        })
        .await
        .expect("an answer, not a dropped stream")
    };
    let is_err = |r: &TorrentResponse| matches!(r, TorrentResponse::Error(_));
    assert!(is_err(&ask(b"\x07garbage".to_vec()).await));
    assert!(is_err(&ask(vec![]).await));
    assert!(is_err(
        &ask(TorrentRequest::Piece {
            file_hash: s.hash.clone(),
            index: 22
        }
        .encode())
        .await
    ));
    assert!(is_err(
        &ask(TorrentRequest::Piece {
            file_hash: s.hash.clone(),
            index: u32::MAX
        }
        .encode())
        .await
    ));
    assert!(is_err(
        &ask(TorrentRequest::Piece {
            file_hash: "0".repeat(64),
            index: 0
        }
        .encode())
        .await
    ));
    assert!(is_err(
        &ask(TorrentRequest::Meta {
            file_hash: "x".repeat(300)
        }
        .encode())
        .await
    ));
    // Absurd header: a hash length that does not match the frame.
    assert!(is_err(&ask(vec![2, 250, b'a', b'b']).await));
    // Good requests still work on the same connection.
    match ask(TorrentRequest::Piece {
        file_hash: s.hash.clone(),
        index: 21,
    }
    .encode())
    .await
    {
        TorrentResponse::Piece { index, data } => {
            assert_eq!(index, 21);
            assert_eq!(data.len() as u64, s.size - 21 * (1 << 20));
        }
        other => panic!("{other:?}"),
    }
    match ask(TorrentRequest::Meta {
        file_hash: s.hash.clone(),
    }
    .encode())
    .await
    {
        TorrentResponse::Meta(m) => {
            let v: Value = serde_json::from_slice(&m).unwrap();
            assert_eq!(v["file_hash"], s.hash);
        }
        other => panic!("{other:?}"),
    }
    // And other peers can still download from it.
    let m = bare_manifest(&dir, "leech", &s.manifest);
    let leech = start(&dir, "leech", "127.0.0.101", &b, &m, &[]);
    let r = load(&leech, &s.shard_id)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", leech.log()));
    assert_eq!(r.state, "ready");
    assert!(
        seeder.log().contains("malformed request"),
        "{}",
        seeder.log()
    );
}

/// Unmounts a tmpfs on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "this test needs root to mount a small tmpfs (a full disk)"
        );
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_ends_the_download_with_a_clear_error_and_no_final_file() {
    let Seeded {
        dir,
        s,
        _boot,
        b,
        seeder: _seeder,
    } = seeded("torrent-disk-full", "127.0.0.110", &[]).await;
    // The leecher's cache is a 4 MiB file system: the 22 MB shard cannot fit.
    let small = Tmpfs::mount(dir.join("small-disk"), "4m");
    let m = bare_manifest(&dir, "leech", &s.manifest);
    let leech = start(
        &dir,
        "leech",
        "127.0.0.111",
        &b,
        &m,
        &["--cache-dir", small.0.to_str().unwrap()],
    );
    let e = load(&leech, &s.shard_id).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("No space left"), "{}", e.message());
    assert!(
        !small.0.join("torrents/files").join(&s.hash).exists(),
        "no file under the final name"
    );
    // The worker is still up, its shard marked failed.
    let st = leech.status().await.unwrap();
    assert!(
        st.shards
            .iter()
            .any(|x| x.availability == "LOCAL" && x.state == "failed"),
        "{:?}",
        st.shards
    );
    drop(leech);
}
