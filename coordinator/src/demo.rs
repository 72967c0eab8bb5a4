//! `llama-coordinator demo`: a local cluster on 127.0.0.x (a bootstrap node
//! and N workers as separate processes) that discover each other; prints the
//! cluster table and the discovery time, then stops every process.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::status_table::{fetch_status, render};

/// Ready-line prefix printed by `llama-worker` (kept in sync with the worker crate).
const READY_PREFIX: &str = "LLAMA_CLUSTER_READY ";

/// A child process killed on drop.
struct Proc {
    child: Child,
    peer_id: String,
    grpc_addr: String,
    quic_addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name("llama-worker");
    if !path.exists() {
        bail!(
            "{} not found next to the coordinator: build the workspace first (cargo build --bins)",
            path.display()
        );
    }
    Ok(path)
}

fn spawn(bin: &PathBuf, args: &[String], timeout: Duration) -> anyhow::Result<Proc> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting llama-worker")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(READY_PREFIX) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let ready = match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("llama-worker {args:?} did not start within {timeout:?}");
        }
    };
    let v: serde_json::Value = serde_json::from_str(&ready)?;
    let quic_addr = v["listen_addrs"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .find(|a| a.contains("/quic-v1"))
        })
        .unwrap_or_default()
        .to_string();
    Ok(Proc {
        peer_id: v["peer_id"].as_str().unwrap_or_default().to_string(),
        grpc_addr: v["grpc_addr"].as_str().unwrap_or_default().to_string(),
        quic_addr,
        child,
    })
}

/// Runs the demo; `keep_running` waits for Ctrl-C before stopping.
pub async fn run(workers: usize, layers: u32, keep_running: bool) -> anyhow::Result<()> {
    if workers == 0 || workers > 50 {
        bail!("--workers must be between 1 and 50");
    }
    let bin = worker_binary()?;
    let t0 = Instant::now();
    println!("starting bootstrap node on 127.0.0.1 …");
    let boot = spawn(
        &bin,
        &[
            "bootstrap",
            "--p2p-host",
            "127.0.0.1",
            "--grpc-addr",
            "127.0.0.1:0",
        ]
        .map(String::from),
        Duration::from_secs(30),
    )?;
    let per = layers.div_ceil(workers as u32);
    let mut procs = Vec::new();
    for i in 0..workers {
        let start = i as u32 * per;
        let end = ((i as u32 + 1) * per).min(layers) - 1;
        let args: Vec<String> = [
            "--p2p-host",
            &format!("127.0.0.{}", i + 2),
            "--grpc-addr",
            "127.0.0.1:0",
            "--bootstrap",
            &boot.quic_addr,
            "--shard-id",
            &format!("shard-{i}"),
            "--shard-layers",
            &format!("{start}-{end}"),
        ]
        .map(String::from)
        .to_vec();
        let p = spawn(&bin, &args, Duration::from_secs(30))?;
        println!(
            "worker {i}: peer {} gRPC {} layers {start}-{end}",
            p.peer_id, p.grpc_addr
        );
        procs.push(p);
    }
    let spawned = t0.elapsed();
    // Wait (bounded) until every worker is connected to every other one.
    let deadline = Instant::now() + Duration::from_secs(30);
    let table = loop {
        let mut statuses = Vec::new();
        for p in &procs {
            if let Ok(st) = fetch_status(&p.grpc_addr).await {
                statuses.push((p.grpc_addr.clone(), st));
            }
        }
        let complete = statuses.len() == procs.len()
            && statuses.iter().all(|(_, st)| {
                procs.iter().filter(|p| p.peer_id != st.peer_id).all(|p| {
                    st.peers.iter().any(|c| c.peer_id == p.peer_id)
                        && st
                            .shards
                            .iter()
                            .any(|s| s.peer_id == p.peer_id && s.availability == "ONLINE")
                })
            });
        if complete {
            break render(&statuses);
        }
        if Instant::now() > deadline {
            bail!(
                "workers did not all discover each other within 30 s:\n{}",
                render(&statuses)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("\n{table}");
    println!(
        "all {workers} workers discovered each other {:.0} ms after the last one started ({:.0} ms in total)",
        (t0.elapsed() - spawned).as_secs_f64() * 1000.0,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    if keep_running {
        println!("cluster running; Ctrl-C to stop");
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(procs);
    drop(boot);
    println!("stopped every process");
    Ok(())
}
