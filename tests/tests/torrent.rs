//! Shard files through the swarm: real worker processes on 127.0.0.x, a
//! real shard file of the default model, pieces verified by hash, several
//! providers, bad peers, dead peers, restarts, malformed requests.

use std::time::Duration;

use llama_cluster_proto::v1::SyncTorrentsRequest;
use llama_cluster_tests::torrent::{
    Seeded, WAIT, bare_manifest, blake3_of, bootstrap, fetch_cli, load, loaded_leecher, seeded,
    split, start, stored_file, torrent, wait_seeding,
};
use llama_cluster_tests::{NodeProc, test_dir, wait_for, worker_args};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_seeder_three_leechers_end_byte_identical() {
    let Seeded {
        dir,
        s,
        boot: _boot,
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
        boot: _boot,
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
        boot: _boot,
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
    // The leecher cannot dial the seeder over TCP, so it asks over QUIC;
    // unless the seeder has dialed the leecher over TCP itself first (a
    // seeder sends its bitfield news to downloaders, #20), and then pieces
    // may come over that connection. Either way the file arrives (checked
    // by `loaded_leecher`).
    let over_quic = log.contains(&format!(
        "{} cannot be reached over TCP (no TCP address known); asking it for pieces over its other connections",
        seeder.peer_id
    ));
    let over_seeders_tcp = seeder.log().contains(&format!("{} via TCP", leech.peer_id));
    assert!(over_quic || over_seeders_tcp, "{log}");
    if !over_seeders_tcp {
        assert!(
            !log.contains("pieces from"),
            "no piece came over TCP:\n{log}"
        );
    }
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
        boot: _boot,
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
