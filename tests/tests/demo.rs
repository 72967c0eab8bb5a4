//! The README's main command: `llama-coordinator demo` on a fresh cache
//! starts a bootstrap node, 3 workers and the coordinator as processes; the
//! coordinator places a 2-shard split (two workers fetch their shard through
//! the swarm), the answer comes through it; the table, placement and timings
//! are printed, and no process is left behind.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llama_cluster_tests::{binary, model_path, test_dir};

#[test]
fn the_demo_answers_through_placed_shards_and_cleans_up() {
    let dir = test_dir("demo");
    let cache = dir.join("cache");
    let mut child = Command::new(binary("llama-coordinator"))
        .args(["demo", "--max-tokens", "8", "--model"])
        .arg(model_path())
        .env("LLAMA_CLUSTER_CACHE", &cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let answer = stdout
        .lines()
        .find_map(|l| l.strip_prefix("answer: "))
        .unwrap_or_default();
    assert!(!answer.trim().is_empty(), "{stdout}");
    for needle in [
        "placing 2 shards x 1 replica(s) on 3 workers",
        "coordinator: OpenAI API on http://",
        "shards placed and fetched",
        "placement:",
        "shards fetched through the swarm: ",
        "SWARM_READY",
        "time to first token",
        "stopped every process",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    // 3 workers, each in the table with its shard ready.
    assert_eq!(stdout.matches(" ready (+").count(), 3, "{stdout}");
    // No process of this demo is left.
    let ps = Command::new("pgrep")
        .args(["-f", &cache.display().to_string()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ps.stdout).trim().is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}
