//! Helper processes of the benchmarks' floors: this benchmark binary run
//! again with a role in its environment. Each prints `port N` once it
//! listens; it exits when its parent goes (its stdin, held by the parent,
//! closes), and [`SelfChildren`] kills the rest when dropped.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

use anyhow::anyhow;

/// Child processes killed and reaped when dropped.
#[derive(Default)]
pub struct SelfChildren(Vec<Child>);

impl Drop for SelfChildren {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl SelfChildren {
    /// Starts this binary again with `env`; returns the port it printed.
    pub fn spawn(&mut self, env: &[(&str, String)]) -> anyhow::Result<u16> {
        let mut cmd = Command::new(std::env::current_exe()?);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        self.0.push(child);
        // Printed once it listens; an empty line if it exited first.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        line.strip_prefix("port ")
            .and_then(|p| p.trim().parse::<u16>().ok())
            .ok_or_else(|| anyhow!("a helper process did not start: {line:?}"))
    }
}

/// A bench's `main`: the helper role when `role_env` is set (no async
/// runtime; exits 1 on an error), else `bench` on a multi-thread runtime.
pub fn main_or_helper<F: std::future::Future<Output = ()>>(
    role_env: &str,
    helper: impl FnOnce() -> anyhow::Result<()>,
    bench: impl FnOnce() -> F,
) {
    if std::env::var_os(role_env).is_some() {
        if let Err(e) = helper() {
            eprintln!("{role_env}: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench());
}

/// In the child: exits the process once the parent has gone.
pub fn exit_when_parent_goes() {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
}
