//! The piece protocol, `/llama-cluster/torrent/1.0`: binary request-response,
//! one length-prefixed frame each way, sizes bounded and checked on both
//! sides. Requests: metadata of a file, or one piece. Responses: the
//! metadata, the piece's bytes, an error, or busy (ask again later).

use bytes::Bytes;

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
    /// The piece's bytes, a view into the received frame (not copied).
    Piece {
        index: u32,
        data: Bytes,
    },
    Error(String),
    /// The seeder has the piece but cannot send it soon (its upload limit's
    /// line is long): ask again later, the peer is not at fault.
    Busy(String),
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

/// Bytes before a piece's data in a piece response frame.
pub const PIECE_HEADER: usize = 5;

impl TorrentResponse {
    /// The start of a piece response frame, with room for `len` bytes of
    /// data to be appended (the seeder reads the piece straight into it).
    pub fn piece_frame(index: u32, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(PIECE_HEADER + len);
        v.push(2);
        v.extend_from_slice(&index.to_le_bytes());
        v
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            TorrentResponse::Meta(m) => {
                v.push(1);
                v.extend_from_slice(m);
            }
            TorrentResponse::Piece { index, data } => {
                v = Self::piece_frame(*index, data.len());
                v.extend_from_slice(data);
            }
            TorrentResponse::Error(e) => {
                v.push(3);
                v.extend_from_slice(e.as_bytes());
            }
            TorrentResponse::Busy(e) => {
                v.push(4);
                v.extend_from_slice(e.as_bytes());
            }
        }
        v
    }

    /// Decodes a response frame; a piece's data stays in the frame's buffer.
    pub fn decode(b: Vec<u8>) -> Result<Self, String> {
        let (&kind, rest) = b.split_first().ok_or("empty response")?;
        match kind {
            1 if rest.len() <= MAX_META => Ok(TorrentResponse::Meta(rest.to_vec())),
            1 => Err("metadata too large".into()),
            2 if rest.len() >= 4 => Ok(TorrentResponse::Piece {
                index: u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]),
                data: Bytes::from(b).slice(PIECE_HEADER..),
            }),
            3 => Ok(TorrentResponse::Error(
                String::from_utf8_lossy(rest).into_owned(),
            )),
            4 => Ok(TorrentResponse::Busy(
                String::from_utf8_lossy(rest).into_owned(),
            )),
            k => Err(format!("bad response kind {k}")),
        }
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
                data: Bytes::from_static(&[1, 2, 3]),
            },
            TorrentResponse::Error("nope".into()),
            TorrentResponse::Busy("later".into()),
        ] {
            assert_eq!(TorrentResponse::decode(r.encode()).unwrap(), r);
        }
        assert!(TorrentRequest::decode(b"").is_err());
        assert!(TorrentRequest::decode(b"\x02\x40short").is_err());
        assert!(TorrentRequest::decode(b"\x09\x00\x00\x00\x00\x00").is_err());
        assert!(TorrentResponse::decode(b"\x02\x01".to_vec()).is_err());
    }
}
