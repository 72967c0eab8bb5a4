//! Optional TLS (rustls, ring) of the control plane: a server certificate
//! chain and key from PEM files for the gRPC servers and the coordinator's
//! HTTP API, and a CA certificate from a PEM file for clients of workers.
//! Nothing configured: plaintext. Files are read and checked at start, so a
//! missing or malformed file is an error there, naming the option.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("`{field}`: cannot read {path}: {source}")]
    Read {
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("`{field}`: {path} {reason}")]
    Pem {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("`tls_cert_file` and `tls_key_file` go together: {0} is not set")]
    Half(&'static str),
    #[error("the certificate and key do not make a TLS server: {0}")]
    Server(rustls::Error),
    #[error("bad address {addr:?}: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("client TLS: {0}")]
    Client(tonic::transport::Error),
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_string(),
        source,
    })
}

fn certs(
    field: &'static str,
    path: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem {
        field,
        path: path.to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's rustls provider (tonic's TLS asks for the
/// process default, and the dependency tree enables two providers).
fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A server's certificate chain and private key.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The certificate chain and key from PEM files; `None` when both are
    /// empty (plaintext). Checks that they make a server configuration.
    pub fn load(cert_file: &str, key_file: &str) -> Result<Option<ServerTls>, TlsError> {
        match (cert_file.is_empty(), key_file.is_empty()) {
            (true, true) => return Ok(None),
            (false, true) => return Err(TlsError::Half("tls_key_file")),
            (true, false) => return Err(TlsError::Half("tls_cert_file")),
            (false, false) => {}
        }
        install_provider();
        let cert_pem = read("tls_cert_file", cert_file)?;
        let key_pem = read("tls_key_file", key_file)?;
        let certs = certs("tls_cert_file", cert_file, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            field: "tls_key_file",
            path: key_file.to_string(),
            reason: format!("holds no PEM private key: {e}"),
        })?;
        let tls = ServerTls {
            cert_pem,
            key_pem,
            certs,
            key: Arc::new(key),
        };
        tls.rustls(&[])?;
        Ok(Some(tls))
    }

    /// For a tonic server (`Server::builder().tls_config(…)`).
    pub fn tonic(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            &self.cert_pem,
            &self.key_pem,
        ))
    }

    /// A rustls server configuration offering the ALPN protocols `alpn`.
    pub fn rustls(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Server)?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(TlsError::Server)?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// What a client trusts: the CA certificate(s) of the servers it calls.
#[derive(Clone, Debug)]
pub struct ClientTls {
    ca_pem: Vec<u8>,
    /// The name every server's certificate must carry, whatever address
    /// is dialled (workers found by IP); `None`: the dialled host.
    server_name: Option<String>,
}

impl ClientTls {
    /// The CA from a PEM file; `None` when `ca_file` is empty (plaintext).
    /// `server_name` (empty: the dialled host) is the name checked in every
    /// server's certificate.
    pub fn load(ca_file: &str, server_name: &str) -> Result<Option<ClientTls>, TlsError> {
        if ca_file.is_empty() {
            return Ok(None);
        }
        install_provider();
        let ca_pem = read("tls_ca_file", ca_file)?;
        certs("tls_ca_file", ca_file, &ca_pem)?;
        Ok(Some(ClientTls {
            ca_pem,
            server_name: (!server_name.is_empty()).then(|| server_name.to_string()),
        }))
    }

    /// For a tonic channel.
    pub fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        let c = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        match &self.server_name {
            Some(n) => c.domain_name(n.clone()),
            None => c,
        }
    }
}

/// A gRPC endpoint for `addr` (`host:port`): `https://` checked against
/// `tls`'s CA when given, else plaintext `http://`.
pub fn endpoint(
    addr: &str,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Endpoint, TlsError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let e = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(
        |source| TlsError::Address {
            addr: addr.to_string(),
            source,
        },
    )?;
    match tls {
        Some(t) => e.tls_config(t.tonic()).map_err(TlsError::Client),
        None => Ok(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_name_the_option() {
        assert!(ServerTls::load("", "").unwrap().is_none());
        assert!(matches!(
            ServerTls::load("/x.pem", ""),
            Err(TlsError::Half("tls_key_file"))
        ));
        let e = ServerTls::load("/nonexistent/cert.pem", "/nonexistent/key.pem")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls_cert_file") && e.contains("/nonexistent/cert.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("llama-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let j = junk.to_str().unwrap();
        let e = ServerTls::load(j, j).unwrap_err().to_string();
        assert!(
            e.contains("tls_cert_file") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = ClientTls::load(j, "").unwrap_err().to_string();
        assert!(e.contains("tls_ca_file"), "{e}");
        assert!(ClientTls::load("", "").unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
