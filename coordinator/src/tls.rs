//! TLS of the coordinator: the CA it checks workers' gRPC certificates
//! against (one per process, set at start), and an HTTPS listener for the
//! OpenAI API and the dashboard.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use llama_cluster_shared::tls::{ClientTls, ServerTls, TlsError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;

static CLIENT: OnceLock<Option<ClientTls>> = OnceLock::new();

/// Sets the CA of the workers' (and coordinators') gRPC servers for every
/// channel this process opens; `None`: plaintext. The first call counts.
pub fn set_client(tls: Option<ClientTls>) {
    let _ = CLIENT.set(tls);
}

/// A gRPC endpoint of `addr` (`host:port`), TLS when a CA was set.
pub fn endpoint(addr: &str) -> Result<tonic::transport::Endpoint, TlsError> {
    llama_cluster_shared::tls::endpoint(addr, CLIENT.get().and_then(Option::as_ref))
}

/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done, waiting for the HTTP server.
const ACCEPTED_BACKLOG: usize = 64;

/// An HTTPS listener for `axum::serve`: TCP connections with their TLS
/// handshake done (each in its own task, so a slow client holds up no
/// other); failed handshakes are dropped.
pub struct TlsListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: &ServerTls) -> anyhow::Result<TlsListener> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(tls.rustls(&[b"http/1.1"])?);
        let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!("[API] accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let done = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = done.send((s, peer)).await;
                        }
                        Ok(Err(e)) => debug!("[API] TLS handshake with {peer}: {e}"),
                        Err(_) => debug!("[API] TLS handshake with {peer} timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { local, rx })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ends only with the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
