//! A shard whose files do not fit on a worker's disk (beside the space it
//! keeps free, `min_free_disk_mb`) is refused before any byte is fetched,
//! with the figures, and the shard the worker serves stays loaded. Before,
//! the fetch filled the disk and failed half-way ("No space left on
//! device"), after the served shard had been unloaded. The coordinator
//! then gives the worker a shard that fits and the refused one to another.
//! And `split` refuses a disk without room, or cleans up after one that
//! fills up.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use llama_cluster_proto::v1::{GetStatusRequest, LoadShardRequest};
use llama_cluster_tests::clients;
use llama_cluster_tests::tmpfs::Tmpfs;
use llama_cluster_tests::{
    NodeProc, binary, coordinator_ready, model_path, shard_ids_of, split_with_cli, start_bootstrap,
    start_coordinator, test_dir, wait_for, worker_args,
};

/// Bytes free on the file system of `dir`, as `df` reads them.
fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df: {text}"))
}

fn start(dir: &Path, name: &str, host: &str, boot: &str, extra: &[String]) -> NodeProc {
    let mut args = worker_args(host, &[boot], None);
    args.extend(["--threads".into(), "1".into()]);
    args.extend(extra.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    NodeProc::start(dir, name, &args).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_does_not_fit_on_the_disk_is_refused_before_any_byte() {
    let dir = test_dir("disk-space");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let ids = shard_ids_of(&manifest).unwrap();
    let json = std::fs::read_to_string(&manifest).unwrap();
    let m: serde_json::Value = serde_json::from_str(&json).unwrap();
    let m_arg = manifest.display().to_string();
    let boot = start_bootstrap(&dir).unwrap();
    let b = boot.addr("quic-v1");
    // A seeder of every file: without the check, the fetch would succeed.
    let _seeder = start(
        &dir,
        "seeder",
        "127.0.0.248",
        &b,
        &[
            "--manifest".into(),
            m_arg.clone(),
            "--shard-id".into(),
            ids[0].clone(),
        ],
    );
    // The worker serves shard 1 from the split beside its manifest (nothing
    // to fetch) and keeps all but 40 MB of its disk free: shard 0 and the
    // head (about 80 MB) do not fit.
    let cache = dir.join("small-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let keep_mb = (free_bytes(&cache) / 1_000_000).saturating_sub(40);
    let w = start(
        &dir,
        "worker",
        "127.0.0.249",
        &b,
        &[
            "--manifest".into(),
            m_arg,
            "--shard-id".into(),
            ids[1].clone(),
            "--no-seed-manifest".into(),
            "--cache-dir".into(),
            cache.display().to_string(),
            "--min-free-disk-mb".into(),
            keep_mb.to_string(),
        ],
    );
    let mut c = w.client().await.unwrap();
    let serves = |st: &llama_cluster_proto::v1::GetStatusResponse, id: &str| {
        st.shards
            .iter()
            .any(|s| s.availability == "LOCAL" && s.shard_id == id && s.state == "ready")
    };
    let ready = wait_for("shard 1 ready", Duration::from_secs(60), || {
        let mut c = c.clone();
        let id = ids[1].clone();
        async move {
            let st = c.get_status(GetStatusRequest {}).await.ok()?.into_inner();
            serves(&st, &id).then_some(())
        }
    })
    .await;
    ready.unwrap_or_else(|e| panic!("{e}\n{}", w.log()));

    let e = c
        .load_shard(LoadShardRequest {
            shard_id: ids[0].clone(),
            manifest_json: json,
            ..Default::default()
        })
        .await
        .expect_err("shard 0 loaded although it does not fit");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let msg = e.message();
    let head = m["head"]["file"].as_str().unwrap();
    let file0 = m["shards"][0]["file"].as_str().unwrap();
    assert!(
        msg.contains("MB more on disk")
            && msg.contains("min_free_disk_mb")
            && msg.contains(&format!("{keep_mb}.0 MB are kept free"))
            && msg.contains(head)
            && msg.contains(file0),
        "{msg}"
    );
    eprintln!("refused: {msg}");
    // Nothing fetched, and shard 1 still served.
    let hashes = [
        m["head"]["hash"].as_str().unwrap(),
        m["shards"][0]["hash"].as_str().unwrap(),
    ];
    for sub in ["partial", "files"] {
        for f in std::fs::read_dir(cache.join("torrents").join(sub)).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !hashes.iter().any(|h| name.starts_with(h)),
                "{sub}/{name} was written"
            );
        }
    }
    let st = c
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(serves(&st, &ids[1]), "shard 1 unloaded: {:?}", st.shards);
}

/// The coordinator places around a refusal: the worker with the most
/// memory gets the largest shard first, refuses it (its disk holds only
/// the other shard), and gets the other one while the worker that has room
/// takes the refused one; the cluster reaches SWARM_READY within seconds
/// (before, the coordinator asked the same worker for the same shard every
/// 30 s for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_places_a_refused_shard_elsewhere() {
    let dir = test_dir("disk-space-placement");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let ids = shard_ids_of(&manifest).unwrap();
    let boot = start_bootstrap(&dir).unwrap();
    let b = boot.addr("quic-v1");
    // Holds the split: can serve either shard.
    let roomy = start(
        &dir,
        "roomy",
        "127.0.0.250",
        &b,
        &[
            "--manifest".into(),
            manifest.display().to_string(),
            "--memory-mb".into(),
            "2000".into(),
        ],
    );
    // More memory, an empty cache, room for shard 1 (48 MB) but not for
    // shard 0 and the head (81 MB).
    let cache = dir.join("small-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let keep_mb = (free_bytes(&cache) / 1_000_000).saturating_sub(60);
    let small = start(
        &dir,
        "small",
        "127.0.0.251",
        &b,
        &[
            "--memory-mb".into(),
            "4000".into(),
            "--cache-dir".into(),
            cache.display().to_string(),
            "--min-free-disk-mb".into(),
            keep_mb.to_string(),
        ],
    );
    let m = manifest.display().to_string();
    let args = ["--manifest", &m, "--replicas", "1", "--poll-ms", "250"];
    let coord = start_coordinator(&dir, &roomy.grpc_addr, &args, &[]).unwrap();
    let st = coordinator_ready(&coord, Duration::from_secs(60)).await;
    let serves = |w: &NodeProc, id: &str| {
        st.workers.iter().any(|x| {
            x.grpc_addr == w.grpc_addr
                && x.status.as_ref().is_some_and(|s| {
                    s.shards.iter().any(|r| {
                        r.availability == "LOCAL" && r.shard_id == id && r.state == "ready"
                    })
                })
        })
    };
    assert!(serves(&small, &ids[1]), "{:?}", st.workers);
    assert!(serves(&roomy, &ids[0]), "{:?}", st.workers);
    let log = coord.log();
    assert!(log.contains("refused shard"), "{log}");
}

/// `llama-worker split` onto a disk without room: refused up front when the
/// disk has less than the model's size free; when it runs out part-way
/// (the shards and the head take more than the model), the error names the
/// file once and no file of the split is left behind.
#[test]
fn a_split_that_does_not_fit_is_refused_or_leaves_nothing() {
    let dir = test_dir("disk-space-split");
    let model = model_path();
    let size_mb = std::fs::metadata(&model).unwrap().len() as f64 / 1e6;
    let split = |disk: &Tmpfs| {
        let out = disk.0.join("split");
        let mut cmd = Command::new(binary("llama-worker"));
        cmd.args(["split", "--shards", "2", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out);
        let r = clients::run(&mut cmd, Duration::from_secs(120)).unwrap();
        let left: Vec<String> = std::fs::read_dir(&disk.0)
            .unwrap()
            .chain(std::fs::read_dir(&out).into_iter().flatten())
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "split")
            .collect();
        (r, left)
    };
    // Less than the model's size: refused before anything is written.
    let small = Tmpfs::mount(dir.join("small"), &format!("{}m", (size_mb * 0.6) as u64));
    let (r, left) = split(&small);
    assert!(!r.ok, "{}", r.all());
    assert!(
        r.stderr.contains("not enough disk space")
            && r.stderr
                .contains(&format!("{size_mb:.1} MB (the model's size)")),
        "{}",
        r.all()
    );
    assert!(left.is_empty(), "{left:?}");
    drop(small);
    // More than the model, less than the split: fails part-way, cleans up.
    let tight = Tmpfs::mount(dir.join("tight"), &format!("{}m", (size_mb * 1.12) as u64));
    let (r, left) = split(&tight);
    assert!(!r.ok, "{}", r.all());
    let err = r
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        err.contains("writing ")
            && err.contains(".gguf")
            && err.matches("No space left").count() == 1,
        "{}",
        r.all()
    );
    assert!(left.is_empty(), "files left behind: {left:?}");
}
