//! Which pieces of a file a peer holds, verified: a [`FixedBitSet`] of one
//! bit per piece, sent as bytes (piece 0 in the lowest bit of byte 0). A
//! file has at most [`MAX_PIECES`] pieces, so a bitfield is at most
//! [`MAX_BITFIELD_BYTES`] bytes on the wire; a longer one is refused.

use fixedbitset::FixedBitSet;

use super::meta::MAX_PIECES;

/// Largest bitfield on the wire.
pub const MAX_BITFIELD_BYTES: usize = MAX_PIECES.div_ceil(8) as usize;

/// Why a bitfield from a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitfieldError {
    #[error("bitfield of {got} bytes for a file of {pieces} pieces ({want} bytes)")]
    WrongLength {
        got: usize,
        want: usize,
        pieces: u32,
    },
    #[error("bitfield names piece {0}, past the file's end")]
    PastTheEnd(u32),
}

/// The pieces of one file a peer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitfield(FixedBitSet);

impl Bitfield {
    /// No pieces of a file of `n` pieces.
    pub fn empty(n: u32) -> Bitfield {
        Bitfield(FixedBitSet::with_capacity(n as usize))
    }

    /// Every piece of a file of `n` pieces.
    pub fn full(n: u32) -> Bitfield {
        let mut b = FixedBitSet::with_capacity(n as usize);
        b.insert_range(..);
        Bitfield(b)
    }

    pub fn len(&self) -> u32 {
        self.0.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn has(&self, i: u32) -> bool {
        self.0.contains(i as usize)
    }

    /// Marks piece `i` (ignored past the end).
    pub fn set(&mut self, i: u32) {
        if (i as usize) < self.0.len() {
            self.0.insert(i as usize);
        }
    }

    pub fn count(&self) -> u32 {
        self.0.count_ones(..) as u32
    }

    pub fn is_complete(&self) -> bool {
        self.0.is_full()
    }

    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.ones().map(|i| i as u32)
    }

    /// The wire form: `ceil(n / 8)` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.0.len().div_ceil(8)];
        for i in self.0.ones() {
            v[i / 8] |= 1 << (i % 8);
        }
        v
    }

    /// Reads the wire form for a file of `n` pieces: exactly `ceil(n / 8)`
    /// bytes, no bit set past the last piece.
    pub fn from_bytes(b: &[u8], n: u32) -> Result<Bitfield, BitfieldError> {
        let want = (n as usize).div_ceil(8);
        if b.len() != want {
            return Err(BitfieldError::WrongLength {
                got: b.len(),
                want,
                pieces: n,
            });
        }
        let mut out = Bitfield::empty(n);
        for (byte_at, &byte) in b.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    let i = (byte_at * 8 + bit) as u32;
                    if i >= n {
                        return Err(BitfieldError::PastTheEnd(i));
                    }
                    out.0.insert(i as usize);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitfields_round_trip_and_bad_lengths_or_bits_are_refused() {
        let mut b = Bitfield::empty(11);
        for i in [0, 3, 10, 11, 400] {
            b.set(i);
        }
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 3, 10]);
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 2);
        assert_eq!(Bitfield::from_bytes(&bytes, 11).unwrap(), b);
        assert!(matches!(
            Bitfield::from_bytes(&bytes, 20),
            Err(BitfieldError::WrongLength { .. })
        ));
        assert_eq!(
            Bitfield::from_bytes(&[0, 0x80], 11),
            Err(BitfieldError::PastTheEnd(15))
        );
        let full = Bitfield::full(11);
        assert!(full.is_complete() && !b.is_complete());
        assert_eq!(full.count(), 11);
        assert_eq!(Bitfield::from_bytes(&full.to_bytes(), 11).unwrap(), full);
        assert_eq!(MAX_BITFIELD_BYTES, 1024);
    }
}
