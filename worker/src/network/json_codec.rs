//! Codec of `/json-message/1.0`: one request and one response per stream,
//! each the raw JSON bytes up to the end of the stream. Parsing happens in
//! the dispatcher so that malformed JSON gets an error response instead of a
//! dropped stream.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;

/// How much of an oversized request is read and thrown away before the
/// stream is reset: enough to answer senders that overshoot by a little with
/// a proper `too_large` error, bounded so that nobody can make us read forever.
const DRAIN_FACTOR: usize = 16;

/// An inbound request body, or the size of one that exceeded the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonRequest {
    Body(Vec<u8>),
    TooLarge(usize),
}

#[derive(Debug, Clone)]
pub struct JsonCodec {
    max_bytes: usize,
}

impl JsonCodec {
    pub fn new(max_bytes: usize) -> Self {
        JsonCodec { max_bytes }
    }
}

async fn read_limited<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<JsonRequest> {
    let mut buf = Vec::new();
    (&mut *io)
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .await?;
    if buf.len() <= limit {
        return Ok(JsonRequest::Body(buf));
    }
    // Drain (bounded) so the sender can read our error response.
    let mut sink = [0u8; 16 * 1024];
    let mut total = buf.len();
    let cap = limit.saturating_mul(DRAIN_FACTOR);
    loop {
        let n = io.read(&mut sink).await?;
        if n == 0 {
            return Ok(JsonRequest::TooLarge(total));
        }
        total += n;
        if total > cap {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request larger than {cap} bytes, stream reset"),
            ));
        }
    }
}

impl request_response::Codec for JsonCodec {
    type Protocol = StreamProtocol;
    type Request = JsonRequest;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<JsonRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited(io, self.max_bytes).await
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        match read_limited(io, self.max_bytes).await? {
            JsonRequest::Body(b) => Ok(b),
            JsonRequest::TooLarge(n) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "response of {n} bytes exceeds the limit of {}",
                    self.max_bytes
                ),
            )),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        req: JsonRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let JsonRequest::Body(body) = req else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot send a TooLarge marker",
            ));
        };
        io.write_all(&body).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&res).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn reads_within_limit_and_flags_oversize() {
        let mut small = Cursor::new(b"{\"a\":1}".to_vec());
        assert_eq!(
            read_limited(&mut small, 64).await.unwrap(),
            JsonRequest::Body(b"{\"a\":1}".to_vec())
        );
        let mut big = Cursor::new(vec![b' '; 100]);
        assert_eq!(
            read_limited(&mut big, 64).await.unwrap(),
            JsonRequest::TooLarge(100)
        );
        let mut huge = Cursor::new(vec![b' '; 64 * DRAIN_FACTOR + 10]);
        assert!(read_limited(&mut huge, 64).await.is_err());
    }
}
