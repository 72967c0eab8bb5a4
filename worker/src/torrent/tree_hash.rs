//! The whole-file BLAKE3 hash of a download, put together from its pieces.
//!
//! BLAKE3 hashes a file as a binary tree of 1 KiB chunks. Pieces are a
//! power-of-two size of at least one chunk and start at multiples of that
//! size, so every piece is a subtree of the file's tree. Its chaining value
//! (the subtree's non-root hash) is taken while the piece is in memory for
//! verification, and the root is merged from those values once the last
//! piece is in: the file is not read and hashed again at the end (seconds
//! for a file of many GB, and a read from disk when it left the page cache).

use blake3::CHUNK_LEN;
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

/// Whether pieces of `piece_size` bytes are subtrees of the file's tree.
pub fn usable(piece_size: u64) -> bool {
    piece_size >= CHUNK_LEN as u64 && piece_size.is_power_of_two()
}

/// What piece `index` (`data`) contributes to the root of a file of `size`
/// bytes cut in pieces of `piece_size` bytes: its chaining value, or, when
/// the file is this one piece, the file's hash itself. With a piece size
/// that is not [`usable`] (valid metadata never has one) it is the piece's
/// plain hash, and [`root`] refuses the pieces.
pub fn piece_value(data: &[u8], index: u32, piece_size: u64, size: u64) -> ChainingValue {
    if size <= piece_size || !usable(piece_size) {
        return *blake3::hash(data).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index as u64 * piece_size);
    h.update(data);
    h.finalize_non_root()
}

/// The whole file's hash from the values of all its pieces, in order
/// ([`piece_value`]); `None` when their number does not fit `size`.
pub fn root(values: &[ChainingValue], piece_size: u64, size: u64) -> Option<blake3::Hash> {
    if !usable(piece_size) || values.len() as u64 != size.div_ceil(piece_size) {
        return None;
    }
    match values {
        [] => Some(blake3::hash(&[])),
        [only] => Some(blake3::Hash::from_bytes(*only)),
        _ => {
            let split = left_subtree_len(size);
            let (l, r) = values.split_at((split / piece_size) as usize);
            Some(merge_subtrees_root(
                &subtree(l, piece_size, split),
                &subtree(r, piece_size, size - split),
                Mode::Hash,
            ))
        }
    }
}

/// Chaining value of the subtree of `len` bytes made of the pieces `values`
/// (BLAKE3 splits a subtree at the largest power of two of chunks below its
/// length; with power-of-two pieces that split falls between two pieces).
fn subtree(values: &[ChainingValue], piece_size: u64, len: u64) -> ChainingValue {
    if values.len() <= 1 {
        return values.first().copied().unwrap_or([0; 32]);
    }
    let split = left_subtree_len(len);
    let (l, r) = values.split_at((split / piece_size) as usize);
    merge_subtrees_non_root(
        &subtree(l, piece_size, split),
        &subtree(r, piece_size, len - split),
        Mode::Hash,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_pieces(data: &[u8], piece_size: u64) -> Option<blake3::Hash> {
        let values: Vec<_> = data
            .chunks(piece_size as usize)
            .enumerate()
            .map(|(i, p)| piece_value(p, i as u32, piece_size, data.len() as u64))
            .collect();
        root(&values, piece_size, data.len() as u64)
    }

    #[test]
    fn the_root_merged_from_pieces_is_the_files_blake3_hash() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for piece in [1024u64, 2048, 4096, 16384] {
            // Empty, one partial chunk, exact pieces, partial last pieces,
            // piece counts that are and are not powers of two.
            for size in [
                0usize, 1, 1023, 1024, 1025, 2048, 3000, 4096, 5000, 12288, 12289, 20480, 32768,
                32769, 65536, 70_000,
            ] {
                let want = blake3::hash(&data[..size]);
                assert_eq!(
                    from_pieces(&data[..size], piece),
                    Some(want),
                    "{size} bytes in pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn a_wrong_piece_or_count_does_not_give_the_files_hash() {
        let data = vec![7u8; 10_000];
        let want = blake3::hash(&data);
        let mut values: Vec<_> = data
            .chunks(2048)
            .enumerate()
            .map(|(i, p)| piece_value(p, i as u32, 2048, 10_000))
            .collect();
        // Piece 1's bytes hashed as if they were at piece 2's offset.
        let mut swapped = values.clone();
        swapped[1] = piece_value(&data[2048..4096], 2, 2048, 10_000);
        assert_ne!(root(&swapped, 2048, 10_000), Some(want));
        values[3][0] ^= 1;
        assert_ne!(root(&values, 2048, 10_000), Some(want));
        assert_eq!(root(&values[1..], 2048, 10_000), None);
        assert_eq!(root(&values, 3000, 10_000), None);
    }
}
