//! The tonic server every node runs its gRPC services on: TLS when given,
//! and HTTP/2 pings that find clients gone silent.

use std::time::Duration;

use tonic::transport::Server;

use crate::tls::ServerTls;

/// A server that pings a client connection once it has been quiet for
/// half of `client_timeout`, and closes it when no answer comes within the
/// rest: a hung client process, or a machine gone without closing its
/// connections (its kernel, or nobody, answers TCP), would otherwise keep
/// its streams open, and a worker generating for it, until they end. Their
/// requests are cancelled as on a disconnect. Any HTTP/2 client answers
/// pings, however long its requests run.
pub fn builder(
    tls: Option<&ServerTls>,
    client_timeout: Duration,
) -> Result<Server, tonic::transport::Error> {
    let (interval, timeout) = ping_timing(client_timeout);
    let server = Server::builder()
        .http2_keepalive_interval(Some(interval))
        .http2_keepalive_timeout(Some(timeout));
    match tls {
        Some(t) => server.tls_config(t.tonic()),
        None => Ok(server),
    }
}

/// (quiet time before a ping, time its answer may take): together at most
/// `client_timeout`, neither under 250 ms.
fn ping_timing(client_timeout: Duration) -> (Duration, Duration) {
    let floor = Duration::from_millis(250);
    let interval = (client_timeout / 2).max(floor);
    (interval, client_timeout.saturating_sub(interval).max(floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_and_its_answer_fit_in_the_timeout() {
        let s = Duration::from_secs;
        assert_eq!(ping_timing(s(20)), (s(10), s(10)));
        assert_eq!(
            ping_timing(s(3)),
            (Duration::from_millis(1500), Duration::from_millis(1500))
        );
        let ms = Duration::from_millis;
        assert_eq!(ping_timing(ms(100)), (ms(250), ms(250)));
    }
}
