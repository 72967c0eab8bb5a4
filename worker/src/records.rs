//! Signed shard records (#18): a record in the DHT carries the public key
//! and signature of the peer that published it, and counts only when that
//! key is the one of the peer the record names. A member can thus not
//! forge another member's record (say, mark its shard failed or point its
//! addresses elsewhere): it does not hold that member's identity key.

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use llama_cluster_shared::dht_keys::ShardRecord;
use serde::{Deserialize, Serialize};

/// Largest signed record accepted (a record is well under 4 KiB).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// The DHT value: the record's JSON, and who signed it.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The record, as the exact JSON text that was signed.
    record: String,
    /// The signer's public key (libp2p protobuf encoding, hex).
    public_key: String,
    /// Signature over `record` (hex).
    signature: String,
}

/// Why a record was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("the record is larger than {MAX_RECORD_BYTES} bytes")]
    TooLarge,
    #[error("not a signed shard record")]
    Malformed,
    #[error("its signature does not verify")]
    BadSignature,
    #[error("it names peer {named} but is signed by {signer}")]
    WrongSigner { named: String, signer: PeerId },
}

/// The signed DHT value of `rec`.
pub fn seal(rec: &ShardRecord, key: &Keypair) -> Vec<u8> {
    let record = String::from_utf8(rec.to_bytes()).unwrap_or_default();
    let signature = key.sign(record.as_bytes()).unwrap_or_default();
    serde_json::to_vec(&Envelope {
        record,
        public_key: hex::encode(key.public().encode_protobuf()),
        signature: hex::encode(signature),
    })
    .unwrap_or_default()
}

/// The record in a signed DHT value, once its signature is checked against
/// the peer it names.
pub fn open(value: &[u8]) -> Result<ShardRecord, RecordError> {
    if value.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge);
    }
    let env: Envelope = serde_json::from_slice(value).map_err(|_| RecordError::Malformed)?;
    let pk = hex::decode(&env.public_key)
        .ok()
        .and_then(|b| PublicKey::try_decode_protobuf(&b).ok())
        .ok_or(RecordError::Malformed)?;
    let sig = hex::decode(&env.signature).map_err(|_| RecordError::Malformed)?;
    if !pk.verify(env.record.as_bytes(), &sig) {
        return Err(RecordError::BadSignature);
    }
    let rec = ShardRecord::from_bytes(env.record.as_bytes()).ok_or(RecordError::Malformed)?;
    let signer = pk.to_peer_id();
    if rec.peer_id != signer.to_string() {
        return Err(RecordError::WrongSigner {
            named: rec.peer_id,
            signer,
        });
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_cluster_shared::dht_keys::ShardState;

    fn record(peer: &PeerId) -> ShardRecord {
        ShardRecord {
            shard_id: "m-L0-9".into(),
            peer_id: peer.to_string(),
            addrs: vec![],
            model: "m".into(),
            layer_start: 0,
            layer_end: 9,
            state: ShardState::Ready,
            updated_at: 1,
            load: 0,
            max_sessions: 4,
        }
    }

    #[test]
    fn a_record_opens_only_when_signed_by_the_peer_it_names() {
        let (me, other) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let mine = record(&me.public().to_peer_id());
        assert_eq!(open(&seal(&mine, &me)).unwrap(), mine);
        // A record for another peer, signed with this one's key.
        let forged = record(&other.public().to_peer_id());
        assert!(matches!(
            open(&seal(&forged, &me)),
            Err(RecordError::WrongSigner { .. })
        ));
        // A signed record changed afterwards.
        let mut env: Envelope = serde_json::from_slice(&seal(&mine, &me)).unwrap();
        env.record = env.record.replace("\"ready\"", "\"failed\"");
        assert_eq!(
            open(&serde_json::to_vec(&env).unwrap()),
            Err(RecordError::BadSignature)
        );
        // Unsigned (the old format), garbage, and oversized values.
        assert_eq!(open(&mine.to_bytes()), Err(RecordError::Malformed));
        assert_eq!(open(b"\xff\x00"), Err(RecordError::Malformed));
        assert_eq!(
            open(&vec![b' '; MAX_RECORD_BYTES + 1]),
            Err(RecordError::TooLarge)
        );
    }
}
