//! A request-response codec for binary protocols: one `u32` length-prefixed
//! frame each way, bounded on both sides. Frames stay raw bytes so that the
//! handlers parse them and answer malformed ones with an error.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;

#[derive(Debug, Clone)]
pub struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    /// A codec accepting frames of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameCodec { max }
    }

    async fn read<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > self.max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes exceeds {}", self.max),
            ));
        }
        let mut buf = vec![0u8; len];
        io.read_exact(&mut buf).await?;
        Ok(buf)
    }

    async fn write<T: AsyncWrite + Unpin + Send>(&self, io: &mut T, body: &[u8]) -> io::Result<()> {
        if body.len() > self.max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {} bytes exceeds {}", body.len(), self.max),
            ));
        }
        io.write_all(&(body.len() as u32).to_le_bytes()).await?;
        io.write_all(body).await?;
        io.close().await
    }
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn frames_round_trip_and_are_bounded() {
        let c = FrameCodec::new(8);
        let mut out = Cursor::new(Vec::new());
        c.write(&mut out, b"hello").await.unwrap();
        let mut inp = Cursor::new(out.into_inner());
        assert_eq!(c.read(&mut inp).await.unwrap(), b"hello");
        let mut big = Cursor::new(Vec::new());
        assert!(c.write(&mut big, &[0; 9]).await.is_err());
        let mut lie = Cursor::new(vec![0xff, 0xff, 0xff, 0x7f, 1, 2]);
        assert!(c.read(&mut lie).await.is_err());
    }
}
