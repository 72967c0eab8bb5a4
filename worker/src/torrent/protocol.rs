//! The piece protocol, `/llama-cluster/torrent/1.0`: binary request-response,
//! one length-prefixed frame each way, sizes bounded and checked on both
//! sides. Requests: metadata of a file, or one piece. Responses: the
//! metadata, the piece's bytes, or an error.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;

use super::meta::MAX_PIECE;

pub const TORRENT_PROTOCOL: &str = "/llama-cluster/torrent/1.0";

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = MAX_PIECE as usize + 4096;
/// Largest metadata document.
pub const MAX_META: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TorrentRequest {
    Meta { file_hash: String },
    Piece { file_hash: String, index: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TorrentResponse {
    Meta(Vec<u8>),
    Piece { index: u32, data: Vec<u8> },
    Error(String),
}

fn bad(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

impl TorrentRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let (kind, hash, index) = match self {
            TorrentRequest::Meta { file_hash } => (1u8, file_hash, 0),
            TorrentRequest::Piece { file_hash, index } => (2u8, file_hash, *index),
        };
        v.push(kind);
        v.push(hash.len().min(255) as u8);
        v.extend_from_slice(&hash.as_bytes()[..hash.len().min(255)]);
        v.extend_from_slice(&index.to_le_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let (&kind, rest) = b.split_first().ok_or("empty request")?;
        let (&n, rest) = rest.split_first().ok_or("truncated request")?;
        let n = n as usize;
        if rest.len() != n + 4 {
            return Err(format!(
                "request of {} bytes does not match its header",
                b.len()
            ));
        }
        let file_hash = std::str::from_utf8(&rest[..n])
            .map_err(|_| "hash is not UTF-8")?
            .to_string();
        let index = u32::from_le_bytes([rest[n], rest[n + 1], rest[n + 2], rest[n + 3]]);
        match kind {
            1 => Ok(TorrentRequest::Meta { file_hash }),
            2 => Ok(TorrentRequest::Piece { file_hash, index }),
            k => Err(format!("unknown request kind {k}")),
        }
    }
}

impl TorrentResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            TorrentResponse::Meta(m) => {
                v.push(1);
                v.extend_from_slice(m);
            }
            TorrentResponse::Piece { index, data } => {
                v.push(2);
                v.extend_from_slice(&index.to_le_bytes());
                v.extend_from_slice(data);
            }
            TorrentResponse::Error(e) => {
                v.push(3);
                v.extend_from_slice(e.as_bytes());
            }
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let (&kind, rest) = b.split_first().ok_or("empty response")?;
        match kind {
            1 if rest.len() <= MAX_META => Ok(TorrentResponse::Meta(rest.to_vec())),
            1 => Err("metadata too large".into()),
            2 if rest.len() >= 4 => Ok(TorrentResponse::Piece {
                index: u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]),
                data: rest[4..].to_vec(),
            }),
            3 => Ok(TorrentResponse::Error(
                String::from_utf8_lossy(rest).into_owned(),
            )),
            k => Err(format!("bad response kind {k}")),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TorrentCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(bad(format!("frame of {len} bytes exceeds {MAX_FRAME}")));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(bad("frame too large"));
    }
    io.write_all(&(body.len() as u32).to_le_bytes()).await?;
    io.write_all(body).await?;
    io.close().await
}

/// Raw frames both ways; parsing happens in the handlers so a malformed
/// request is answered with an error.
impl request_response::Codec for TorrentCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
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
        write_frame(io, &req).await
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
        write_frame(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let h = "ab".repeat(32);
        for r in [
            TorrentRequest::Meta {
                file_hash: h.clone(),
            },
            TorrentRequest::Piece {
                file_hash: h.clone(),
                index: 7,
            },
        ] {
            assert_eq!(TorrentRequest::decode(&r.encode()).unwrap(), r);
        }
        for r in [
            TorrentResponse::Meta(b"{}".to_vec()),
            TorrentResponse::Piece {
                index: 3,
                data: vec![1, 2, 3],
            },
            TorrentResponse::Error("nope".into()),
        ] {
            assert_eq!(TorrentResponse::decode(&r.encode()).unwrap(), r);
        }
        assert!(TorrentRequest::decode(b"").is_err());
        assert!(TorrentRequest::decode(b"\x02\x40short").is_err());
        assert!(TorrentRequest::decode(b"\x09\x00\x00\x00\x00\x00").is_err());
        assert!(TorrentResponse::decode(b"\x02\x01").is_err());
    }
}
