//! Shard files through the swarm when peers and disks fail: real worker
//! processes on 127.0.0.x, a seeder killed mid-download, records of
//! departed seeders, a restarted leecher resuming, malformed piece
//! requests, a full disk.

use std::time::{Duration, Instant};

use llama_cluster_proto::v1::LoadShardRequest;
use llama_cluster_tests::tmpfs::Tmpfs;
use llama_cluster_tests::torrent::{
    Seeded, WAIT, bare_manifest, blake3_of, bootstrap, load, loaded_leecher, seeded, split, start,
    stored_file, torrent, wait_seeding,
};
use llama_cluster_tests::{log_value, test_dir, wait_for};
use serde_json::Value;

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
        boot: _boot,
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
        boot: _boot,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_ends_the_download_with_a_clear_error_and_no_final_file() {
    let Seeded {
        dir,
        s,
        boot: _boot,
        b,
        seeder: _seeder,
    } = seeded("torrent-disk-full", "127.0.0.110", &[]).await;
    // The leecher's cache is a file system with 64 MB free, so the space
    // checked before a fetch is there (disk_space.rs covers a disk too
    // small for it), but with no inode left once the worker's cache
    // directories exist (the root and 4 directories): the download's file
    // cannot be created, as on a disk that filled up meanwhile.
    let small = Tmpfs::mount(dir.join("small-disk"), "64m,nr_inodes=5");
    let m = bare_manifest(&dir, "leech", &s.manifest);
    let leech = start(
        &dir,
        "leech",
        "127.0.0.111",
        &b,
        &m,
        &[
            "--cache-dir",
            small.0.to_str().unwrap(),
            "--min-free-disk-mb",
            "0",
        ],
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
