//! `llama-coordinator`: cluster status and the local demo.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llama_coordinator::{demo, status_table};

#[derive(Parser, Debug)]
#[command(
    name = "llama-coordinator",
    version,
    about = "llama-cluster coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the status of workers (by gRPC address) as one table.
    Status {
        /// Worker gRPC addresses, host:port (comma-separated or repeated).
        #[arg(long, required = true, value_delimiter = ',')]
        workers: Vec<String>,
    },
    /// Start a local cluster (bootstrap + workers on 127.0.0.x), wait until
    /// every worker found every other, print the table, stop everything.
    Demo {
        /// Number of workers.
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// Layers of the model to spread over the workers.
        #[arg(long, default_value_t = 30)]
        layers: u32,
        /// Keep the cluster running until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Status { workers } => {
            async {
                let mut rows = Vec::new();
                for w in &workers {
                    rows.push((w.clone(), status_table::fetch_status(w).await?));
                }
                print!("{}", status_table::render(&rows));
                anyhow::Ok(())
            }
            .await
        }
        Cmd::Demo {
            workers,
            layers,
            keep_running,
        } => demo::run(workers, layers, keep_running).await,
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
