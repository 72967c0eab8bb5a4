//! The README's main command: `llama-coordinator demo` on a fresh cache
//! starts a bootstrap node, 3 workers and the coordinator as processes; the
//! coordinator places a 2-shard split (two workers fetch their shard through
//! the swarm), the answer comes through it; the table, placement and timings
//! are printed, and no process is left behind.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llama_cluster_tests::{binary, model_path, test_dir};

/// `llama-coordinator demo` on the default model with its own `cache`,
/// `extra` flags, its stdout piped.
fn demo(cache: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(binary("llama-coordinator"));
    cmd.arg("demo")
        .args(extra)
        .arg("--model")
        .arg(model_path())
        .env("LLAMA_CLUSTER_CACHE", cache)
        .stdout(Stdio::piped());
    cmd
}

#[test]
fn the_demo_answers_through_placed_shards_and_cleans_up() {
    let dir = test_dir("demo");
    let cache = dir.join("cache");
    let mut child = demo(&cache, &["--max-tokens", "8"])
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

/// The processes `pid` started (its children), as `pgrep -P` lists them.
fn children(pid: u32) -> Vec<u32> {
    let ps = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&ps.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether process `pid` still runs (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// Starts the demo (`--keep-running`) on its own cache, waits for a line of
/// its output containing `when`, sends `signal`, and checks that it ends and
/// that none of the processes it started is left (any left are killed
/// before the test fails).
fn stopped_by(name: &str, when: &str, signal: &str) {
    use std::io::{BufRead, BufReader};
    let cache = test_dir(name).join("cache");
    let mut child = demo(&cache, &["--keep-running", "--max-tokens", "4"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut seen: Vec<String> = Vec::new();
    while !seen.iter().any(|l| l.contains(when)) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => seen.push(l),
            Err(_) => {
                // Its own clean-up stops what it started.
                let _ = Command::new("kill")
                    .args(["-INT", &child.id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(5));
                let _ = child.kill();
                let _ = child.wait();
                panic!("no {when:?} from the demo within 240 s: {seen:#?}");
            }
        }
    }
    // The bootstrap node, the workers and the coordinator.
    let started = children(child.id());
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let ended = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    let _ = child.wait();
    let left: Vec<u32> = started.iter().copied().filter(|&p| alive(p)).collect();
    for p in &left {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
    }
    assert!(started.len() >= 5, "the demo's processes: {started:?}");
    assert!(ended, "the demo did not end within 30 s of {signal}");
    assert!(
        left.is_empty(),
        "processes left behind after {signal}: {left:?}"
    );
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        seen.push(l);
    }
    assert!(
        seen.iter().any(|l| l.contains("stopped every process")),
        "{seen:#?}"
    );
}

/// SIGTERM while the demo keeps its cluster running, and Ctrl-C (SIGINT)
/// while it is still placing shards: every process it started is stopped.
#[test]
fn the_demo_stops_every_process_when_terminated_or_interrupted() {
    stopped_by("demo-sigterm", "cluster running", "-TERM");
    stopped_by("demo-sigint", "coordinator: OpenAI API on", "-INT");
}
