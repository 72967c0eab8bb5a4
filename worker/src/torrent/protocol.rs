//! The piece protocol, `/llama-cluster/torrent/1.0`: binary request-response,
//! one length-prefixed frame each way, sizes bounded and checked on both
//! sides. Requests: metadata of a file, one piece, the asker's bitfield (a
//! handshake: the answer is the other side's bitfield and the peers it
//! knows are downloading the file), or "have" news of pieces just verified.
//! Responses: the metadata, a piece's bytes (from a complete file or from a
//! download in progress), a bitfield, an acknowledgement, an error, busy
//! (ask again later), or elsewhere (a capped seeder just sent the piece to
//! another downloader: get it there).

use bytes::Bytes;
use libp2p::PeerId;

use super::bitfield::MAX_BITFIELD_BYTES;
use super::meta::{MAX_PIECE, MAX_PIECES};

pub const TORRENT_PROTOCOL: &str = "/llama-cluster/torrent/1.0";

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = MAX_PIECE as usize + 4096;
/// Largest metadata document.
pub const MAX_META: usize = 4 << 20;
/// Most peers one bitfield answer names.
pub const MAX_PEX: usize = 32;
/// Longest peer id accepted on the wire.
const MAX_PEER_ID: usize = 64;

/// A frame that is not a well-formed message of this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty frame")]
    Empty,
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("request of {0} bytes does not match its header")]
    Length(usize),
    #[error("hash is not UTF-8")]
    HashNotUtf8,
    #[error("unknown request kind {0}")]
    RequestKind(u8),
    #[error("bad response kind {0}")]
    ResponseKind(u8),
    #[error("{what} too large ({got} > {max})")]
    TooLarge {
        what: &'static str,
        got: usize,
        max: usize,
    },
    #[error("bad peer id in a bitfield answer")]
    PeerId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TorrentRequest {
    Meta {
        file_hash: String,
    },
    Piece {
        file_hash: String,
        index: u32,
    },
    /// The asker's bitfield (wire form, see [`super::bitfield`]); the
    /// answer is the other side's.
    Bitfield {
        file_hash: String,
        bits: Vec<u8>,
    },
    /// Pieces the asker verified since it last told this peer.
    Have {
        file_hash: String,
        pieces: Vec<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TorrentResponse {
    Meta(Vec<u8>),
    /// The piece's bytes from a complete file, a view into the received
    /// frame (not copied).
    Piece {
        index: u32,
        data: Bytes,
    },
    /// The piece's bytes from a download in progress (a partial seeder).
    PartialPiece {
        index: u32,
        data: Bytes,
    },
    /// The answerer's bitfield and peers it knows are downloading the file.
    Bitfield {
        bits: Vec<u8>,
        peers: Vec<PeerId>,
    },
    Ack,
    Error(String),
    /// The seeder has the piece but cannot send it soon (its upload limit's
    /// line is long): ask again later, the peer is not at fault.
    Busy(String),
    /// A capped seeder just sent (or is sending) this piece to another
    /// downloader: get it from that one, and ask this seeder for another.
    Elsewhere(String),
}

fn take<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
    if b.len() < n {
        return Err(ProtocolError::Truncated(what));
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

impl TorrentRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let (kind, hash, index, payload): (u8, &String, u32, Vec<u8>) = match self {
            TorrentRequest::Meta { file_hash } => (1, file_hash, 0, vec![]),
            TorrentRequest::Piece { file_hash, index } => (2, file_hash, *index, vec![]),
            TorrentRequest::Bitfield { file_hash, bits } => (3, file_hash, 0, bits.clone()),
            TorrentRequest::Have { file_hash, pieces } => (
                4,
                file_hash,
                pieces.len() as u32,
                pieces.iter().flat_map(|i| i.to_le_bytes()).collect(),
            ),
        };
        v.push(kind);
        v.push(hash.len().min(255) as u8);
        v.extend_from_slice(&hash.as_bytes()[..hash.len().min(255)]);
        v.extend_from_slice(&index.to_le_bytes());
        v.extend_from_slice(&payload);
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let (&kind, rest) = b.split_first().ok_or(ProtocolError::Empty)?;
        let (&n, rest) = rest
            .split_first()
            .ok_or(ProtocolError::Truncated("request"))?;
        let n = n as usize;
        if rest.len() < n + 4 || (matches!(kind, 1 | 2) && rest.len() != n + 4) {
            return Err(ProtocolError::Length(b.len()));
        }
        let file_hash = std::str::from_utf8(&rest[..n])
            .map_err(|_| ProtocolError::HashNotUtf8)?
            .to_string();
        let index = u32::from_le_bytes([rest[n], rest[n + 1], rest[n + 2], rest[n + 3]]);
        let payload = &rest[n + 4..];
        match kind {
            1 => Ok(TorrentRequest::Meta { file_hash }),
            2 => Ok(TorrentRequest::Piece { file_hash, index }),
            3 if payload.len() > MAX_BITFIELD_BYTES => Err(ProtocolError::TooLarge {
                what: "bitfield",
                got: payload.len(),
                max: MAX_BITFIELD_BYTES,
            }),
            3 => Ok(TorrentRequest::Bitfield {
                file_hash,
                bits: payload.to_vec(),
            }),
            4 if index as u64 > MAX_PIECES => Err(ProtocolError::TooLarge {
                what: "have list",
                got: index as usize,
                max: MAX_PIECES as usize,
            }),
            4 if payload.len() != index as usize * 4 => Err(ProtocolError::Length(b.len())),
            4 => Ok(TorrentRequest::Have {
                file_hash,
                pieces: payload
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            }),
            k => Err(ProtocolError::RequestKind(k)),
        }
    }
}

/// Bytes before a piece's data in a piece response frame.
pub const PIECE_HEADER: usize = 5;

impl TorrentResponse {
    /// The start of a piece response frame, with room for `len` bytes of
    /// data to be appended (the seeder reads the piece straight into it);
    /// `partial`: the piece comes from a download in progress.
    pub fn piece_frame(index: u32, len: usize, partial: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(PIECE_HEADER + len);
        v.push(if partial { 5 } else { 2 });
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
                v = Self::piece_frame(*index, data.len(), false);
                v.extend_from_slice(data);
            }
            TorrentResponse::PartialPiece { index, data } => {
                v = Self::piece_frame(*index, data.len(), true);
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
            TorrentResponse::Bitfield { bits, peers } => {
                v.push(6);
                let bits = &bits[..bits.len().min(MAX_BITFIELD_BYTES)];
                v.extend_from_slice(&(bits.len() as u16).to_le_bytes());
                v.extend_from_slice(bits);
                let peers: Vec<Vec<u8>> = peers
                    .iter()
                    .map(|p| p.to_bytes())
                    .filter(|p| p.len() <= MAX_PEER_ID)
                    .take(MAX_PEX)
                    .collect();
                v.push(peers.len() as u8);
                for p in peers {
                    v.push(p.len() as u8);
                    v.extend_from_slice(&p);
                }
            }
            TorrentResponse::Ack => v.push(7),
            TorrentResponse::Elsewhere(e) => {
                v.push(8);
                v.extend_from_slice(e.as_bytes());
            }
        }
        v
    }

    /// Decodes a response frame; a piece's data stays in the frame's buffer.
    pub fn decode(b: Vec<u8>) -> Result<Self, ProtocolError> {
        let (&kind, rest) = b.split_first().ok_or(ProtocolError::Empty)?;
        match kind {
            1 if rest.len() <= MAX_META => Ok(TorrentResponse::Meta(rest.to_vec())),
            1 => Err(ProtocolError::TooLarge {
                what: "metadata",
                got: rest.len(),
                max: MAX_META,
            }),
            2 | 5 if rest.len() >= 4 => {
                let index = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let data = Bytes::from(b).slice(PIECE_HEADER..);
                Ok(if kind == 2 {
                    TorrentResponse::Piece { index, data }
                } else {
                    TorrentResponse::PartialPiece { index, data }
                })
            }
            2 | 5 => Err(ProtocolError::Truncated("piece")),
            3 => Ok(TorrentResponse::Error(
                String::from_utf8_lossy(rest).into_owned(),
            )),
            4 => Ok(TorrentResponse::Busy(
                String::from_utf8_lossy(rest).into_owned(),
            )),
            6 => {
                let mut r = rest;
                let len = take(&mut r, 2, "bitfield")?;
                let len = u16::from_le_bytes([len[0], len[1]]) as usize;
                if len > MAX_BITFIELD_BYTES {
                    return Err(ProtocolError::TooLarge {
                        what: "bitfield",
                        got: len,
                        max: MAX_BITFIELD_BYTES,
                    });
                }
                let bits = take(&mut r, len, "bitfield")?.to_vec();
                let n = take(&mut r, 1, "peer list")?[0] as usize;
                if n > MAX_PEX {
                    return Err(ProtocolError::TooLarge {
                        what: "peer list",
                        got: n,
                        max: MAX_PEX,
                    });
                }
                let mut peers = Vec::with_capacity(n);
                for _ in 0..n {
                    let l = take(&mut r, 1, "peer id")?[0] as usize;
                    let id = take(&mut r, l, "peer id")?;
                    peers.push(PeerId::from_bytes(id).map_err(|_| ProtocolError::PeerId)?);
                }
                Ok(TorrentResponse::Bitfield { bits, peers })
            }
            7 => Ok(TorrentResponse::Ack),
            8 => Ok(TorrentResponse::Elsewhere(
                String::from_utf8_lossy(rest).into_owned(),
            )),
            k => Err(ProtocolError::ResponseKind(k)),
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
            TorrentRequest::Bitfield {
                file_hash: h.clone(),
                bits: vec![0xff, 0x01],
            },
            TorrentRequest::Have {
                file_hash: h.clone(),
                pieces: vec![3, 9, 4000],
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
            TorrentResponse::PartialPiece {
                index: 4,
                data: Bytes::from_static(&[1, 2]),
            },
            TorrentResponse::Bitfield {
                bits: vec![1, 2, 3],
                peers: vec![PeerId::random(), PeerId::random()],
            },
            TorrentResponse::Ack,
            TorrentResponse::Error("nope".into()),
            TorrentResponse::Busy("later".into()),
            TorrentResponse::Elsewhere("from another".into()),
        ] {
            assert_eq!(TorrentResponse::decode(r.encode()).unwrap(), r);
        }
        assert!(TorrentRequest::decode(b"").is_err());
        assert!(TorrentRequest::decode(b"\x02\x40short").is_err());
        assert!(TorrentRequest::decode(b"\x09\x00\x00\x00\x00\x00").is_err());
        assert!(TorrentResponse::decode(b"\x02\x01".to_vec()).is_err());
        // A have list whose count does not match its bytes, or is absurd.
        assert!(TorrentRequest::decode(b"\x04\x00\x02\x00\x00\x00\x01\x00\x00\x00").is_err());
        assert!(TorrentRequest::decode(b"\x04\x00\xff\xff\xff\xff").is_err());
        // A bitfield answer claiming more bytes or peers than it holds.
        assert!(TorrentResponse::decode(vec![6, 0xff, 0xff]).is_err());
        assert!(TorrentResponse::decode(vec![6, 1, 0, 0, 200]).is_err());
        assert!(TorrentResponse::decode(vec![6, 0, 0, 1, 3, 1, 2]).is_err());
    }
}
