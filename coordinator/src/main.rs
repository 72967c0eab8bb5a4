//! `llama-coordinator`: cluster status and the local demo.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llama_coordinator::{demo, drivers, openai, placer, status_table};

#[derive(Parser, Debug)]
#[command(
    name = "llama-coordinator",
    version,
    about = "llama-cluster coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// PEM CA certificate the workers' (and coordinators') gRPC
    /// certificates are checked against: TLS to them (empty: plaintext).
    #[arg(
        long,
        global = true,
        env = "LLAMA_CLUSTER_TLS_CA_FILE",
        default_value = ""
    )]
    tls_ca_file: String,
    /// The name checked in every gRPC server's certificate, whatever
    /// address is dialled (workers are found by IP); empty: the host dialled.
    #[arg(
        long,
        global = true,
        env = "LLAMA_CLUSTER_TLS_SERVER_NAME",
        default_value = ""
    )]
    tls_server_name: String,
}

// Parsed once at start: the size of `Serve`'s options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the status of workers (by gRPC address) as one table.
    Status {
        /// Worker gRPC addresses, host:port (comma-separated or repeated).
        #[arg(long, value_delimiter = ',', required_unless_present = "coordinator")]
        workers: Vec<String>,
        /// Ask a coordinator (its gRPC host:port) instead: the whole cluster,
        /// SWARM_READY and the placement.
        #[arg(long, conflicts_with = "workers")]
        coordinator: Option<String>,
    },
    /// Serve the OpenAI-compatible HTTP API in front of workers.
    Serve {
        /// Worker gRPC addresses, host:port (comma-separated or repeated);
        /// one is enough, the others are found through it.
        #[arg(
            long,
            env = "LLAMA_COORDINATOR_WORKERS",
            required = true,
            value_delimiter = ','
        )]
        workers: Vec<String>,
        /// HTTP address of the OpenAI API and /metrics (port 0: any).
        #[arg(long, env = "LLAMA_COORDINATOR_HTTP", default_value = "127.0.0.1:8080")]
        http: String,
        /// gRPC address of the coordinator service (port 0: any).
        #[arg(
            long,
            env = "LLAMA_COORDINATOR_GRPC",
            default_value = "127.0.0.1:50060"
        )]
        grpc: String,
        /// OTLP/gRPC endpoint for traces, e.g. http://127.0.0.1:4317 (empty:
        /// off unless OTEL_EXPORTER_OTLP_ENDPOINT is set).
        #[arg(long, env = "LLAMA_CLUSTER_OTLP_ENDPOINT", default_value = "")]
        otlp_endpoint: String,
        /// Split manifest of the model to place on the workers (none: the
        /// workers' own shards are used as they are).
        #[arg(long, env = "LLAMA_COORDINATOR_MANIFEST")]
        manifest: Option<std::path::PathBuf>,
        /// Replicas of every shard to place (spare workers get more).
        #[arg(long, env = "LLAMA_COORDINATOR_REPLICAS", default_value_t = 1)]
        replicas: usize,
        /// Milliseconds between status polls of the workers (placement
        /// rounds, readiness, worker discovery).
        #[arg(long, env = "LLAMA_COORDINATOR_POLL_MS", default_value_t = 2000,
              value_parser = clap::value_parser!(u64).range(100..=600_000))]
        poll_ms: u64,
        /// Requests that may wait for a free session at once; more get
        /// RESOURCE_EXHAUSTED / HTTP 429.
        #[arg(long, env = "LLAMA_COORDINATOR_MAX_QUEUED", default_value_t = 256)]
        max_queued: usize,
        /// Seconds a request may wait for a free session.
        #[arg(long, env = "LLAMA_COORDINATOR_QUEUE_TIMEOUT_SECS", default_value_t = 120,
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        queue_timeout_secs: u64,
        /// Drivers one request may try when a driver's stream breaks (it
        /// resumes on the next from the tokens delivered); 1: no failover.
        #[arg(long, env = "LLAMA_COORDINATOR_DRIVER_ATTEMPTS", default_value_t = 4,
              value_parser = clap::value_parser!(u64).range(1..=64))]
        driver_attempts: u64,
        /// Seconds a driver may leave the coordinator's HTTP/2 pings
        /// unanswered (a hung process, a machine gone without closing its
        /// connections) before its streams resume on another driver.
        #[arg(long, env = "LLAMA_COORDINATOR_DRIVER_TIMEOUT_SECS", default_value_t = 10,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        driver_timeout_secs: u64,
        /// Seconds a gRPC client may leave the coordinator's HTTP/2 pings
        /// unanswered (a hung process, a machine gone without closing its
        /// connections) before its connection is closed and its requests
        /// cancelled.
        #[arg(long, env = "LLAMA_COORDINATOR_CLIENT_TIMEOUT_SECS", default_value_t = 20,
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        client_timeout_secs: u64,
        /// File holding the admin token sent with LoadShard (placement);
        /// or the token itself in LLAMA_CLUSTER_ADMIN_TOKEN.
        #[arg(long, env = "LLAMA_CLUSTER_ADMIN_TOKEN_FILE", default_value = "")]
        admin_token_file: String,
        /// File holding the API token clients must send (`Authorization:
        /// Bearer`) and that goes to the drivers; or the token itself in
        /// LLAMA_CLUSTER_API_TOKEN. None: inference is open.
        #[arg(long, env = "LLAMA_CLUSTER_API_TOKEN_FILE", default_value = "")]
        api_token_file: String,
        /// PEM certificate chain of the HTTP API and the gRPC service: TLS
        /// on both (with --tls-key-file); empty: plaintext.
        #[arg(long, env = "LLAMA_CLUSTER_TLS_CERT_FILE", default_value = "")]
        tls_cert_file: String,
        /// PEM private key of --tls-cert-file.
        #[arg(long, env = "LLAMA_CLUSTER_TLS_KEY_FILE", default_value = "")]
        tls_key_file: String,
        /// Origins whose web pages may call the HTTP API from the browser
        /// (CORS), comma-separated (`https://chat.example.org`); `*`: any,
        /// as llama-server allows; empty: none.
        #[arg(long, env = "LLAMA_COORDINATOR_ALLOWED_ORIGINS", default_value = "*")]
        allowed_origins: String,
    },
    /// Start a local cluster (bootstrap + workers on 127.0.0.x), place a
    /// split model with the coordinator's placement (shards travel through
    /// the swarm), answer a prompt, print table and timings, stop everything.
    Demo {
        /// Number of workers.
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// Shards the model is split into.
        #[arg(long, default_value_t = 2)]
        shards: usize,
        /// Replicas of every shard (spare workers get more).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// GGUF model (default: the cached SmolLM2-135M-Instruct).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// The prompt (sent as a chat message).
        #[arg(
            long,
            default_value = "What is the capital of France? Answer in one sentence."
        )]
        prompt: String,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// Keep the cluster running until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match llama_cluster_shared::tls::ClientTls::load(&cli.tls_ca_file, &cli.tls_server_name) {
        Ok(t) => llama_coordinator::tls::set_client(t),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let r = match cli.command {
        Cmd::Status {
            workers,
            coordinator: Some(addr),
        } if workers.is_empty() => status_table::print_cluster(&addr).await,
        Cmd::Status { workers, .. } => {
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
        Cmd::Serve {
            workers,
            http,
            grpc,
            otlp_endpoint,
            manifest,
            replicas,
            poll_ms,
            max_queued,
            queue_timeout_secs,
            driver_attempts,
            driver_timeout_secs,
            client_timeout_secs,
            admin_token_file,
            api_token_file,
            tls_cert_file,
            tls_key_file,
            allowed_origins,
        } => {
            let telemetry = llama_cluster_shared::telemetry::init(
                llama_cluster_shared::config::LogFormat::Text,
                &llama_cluster_shared::telemetry::TraceSettings {
                    otlp_endpoint,
                    service: "llama-coordinator".into(),
                    instance: String::new(),
                },
            );
            match telemetry {
                Ok(t) => {
                    let r = async {
                        if replicas == 0 {
                            anyhow::bail!("--replicas must be at least 1");
                        }
                        let tls = llama_cluster_shared::tls::ServerTls::load(
                            &tls_cert_file,
                            &tls_key_file,
                        )?;
                        let cors = openai::cors::layer(&allowed_origins)?;
                        let env = |k: &str| std::env::var(k).unwrap_or_default();
                        let tokens = llama_cluster_shared::auth::Tokens::load(
                            &env("LLAMA_CLUSTER_ADMIN_TOKEN"),
                            &admin_token_file,
                            &env("LLAMA_CLUSTER_API_TOKEN"),
                            &api_token_file,
                        )?;
                        if !tokens.has_api() {
                            eprintln!(
                                "warning: no API token (--api-token-file or LLAMA_CLUSTER_API_TOKEN): the OpenAI API and Inference are open to anyone who reaches them"
                            );
                        }
                        let placer = match &manifest {
                            Some(m) => Some(placer::Placer::new(
                                placer::ManifestInfo::load(m)?,
                                replicas,
                                tokens.clone(),
                            )),
                            None => None,
                        };
                        let serving = openai::serve(
                            openai::Listen {
                                http: &http,
                                grpc: &grpc,
                                tls,
                                cors,
                                client_timeout: std::time::Duration::from_secs(
                                    client_timeout_secs,
                                ),
                            },
                            llama_coordinator::workers::WorkerSet::new(workers),
                            placer,
                            std::time::Duration::from_millis(poll_ms),
                            drivers::Drivers::new(
                                max_queued,
                                std::time::Duration::from_secs(queue_timeout_secs),
                                driver_attempts as usize,
                                std::time::Duration::from_secs(driver_timeout_secs),
                                tokens,
                            ),
                        );
                        // Ctrl-C or SIGTERM (Kubernetes) ends it cleanly, so
                        // the spans still buffered are sent.
                        tokio::select! {
                            r = serving => r,
                            _ = shutdown_signal() => Ok(()),
                        }
                    }
                    .await;
                    t.flush();
                    r
                }
                Err(e) => Err(e),
            }
        }
        Cmd::Demo {
            workers,
            shards,
            replicas,
            model,
            prompt,
            max_tokens,
            keep_running,
        } => {
            let mut run = Box::pin(demo::run(demo::DemoOptions {
                model,
                workers,
                shards,
                replicas,
                prompt,
                max_tokens,
                keep_running,
            }));
            // Ctrl-C, SIGTERM or SIGHUP at any time: dropping the demo
            // stops every process it started (each is killed on drop).
            let done = tokio::select! {
                r = &mut run => Some(r),
                _ = shutdown_signal() => None,
            };
            match done {
                Some(r) => r,
                None => {
                    drop(run);
                    println!("interrupted: stopped every process");
                    Ok(())
                }
            }
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C, SIGTERM or SIGHUP (the terminal closed).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
