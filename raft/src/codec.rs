//! The one place bytes are encoded and decoded: bincode 2 (serde) behind a format byte, so
//! the stored and peer format can change later without guessing.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The current format version, the first byte of every encoded value (and of snapshot files
/// and peer messages). 3: the cluster (meta and data groups, intents, batches) changed the
/// records and the changes; data written by an earlier version is refused with
/// `UnknownVersion`, never misread. 4: subject claims carry their claim ids. 5: rule failures
/// in the activity. 6: OpenID Connect providers (issuer, sealed client secret, refresh tokens,
/// nonces). 7: the recommender's model stores a ranker instead of calibration steps. 8: a data
/// group indexes unfinished linkings by customer and entity (`keys::CLAIM_OF`). 9: a retention
/// entry lists every key one change aged at one time ([`encode_keys`]), not one key each. 10: a
/// customer's record, links and rules share one key prefix (`keys::PROFILE`).
///
/// A bump must keep [`merge_counts`] reading the counts and operands of the version before:
/// RocksDB folds them in flushes and compactions, and a merge that fails stops those (and so
/// the whole database) rather than one read.
pub const FORMAT_VERSION: u8 = 10;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Empty input.
    #[error("empty value")]
    Empty,
    /// Written by a format this build does not know.
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// A key list ends inside a key.
    #[error("truncated key list")]
    Truncated,
    /// bincode refused to encode.
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// bincode refused to decode.
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
}

/// The most bytes one value may claim when decoded: a length prefix from a peer or a damaged
/// file is checked against it before anything is allocated (an unbounded claim would abort the
/// process), and it is well above the largest Raft message (payload entries of at most 4 MiB).
pub const DECODE_LIMIT: usize = 1 << 30;

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_LIMIT>,
> {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encodes a value with the format byte in front.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, &mut out, config())?;
    Ok(out)
}

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_since(bytes, FORMAT_VERSION)
}

/// Decodes a value written by [`encode`] of this format or one since `oldest`, for the few
/// values encoded the same in each of them.
fn decode_since<T: DeserializeOwned>(bytes: &[u8], oldest: u8) -> Result<T, CodecError> {
    let (&version, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    if !(oldest..=FORMAT_VERSION).contains(&version) {
        return Err(CodecError::UnknownVersion(version));
    }
    let (value, _) = bincode::serde::decode_from_slice(rest, config())?;
    Ok(value)
}

/// A count and when it was last added to: what an engagement key holds, and each addition
/// to it ([`merge_counts`]).
pub type Count = (u64, i64);

/// RocksDB's merge of counts (registered by `open_db`): the stored value, if any, and each
/// operand are a [`Count`]; the counts add up and the last operand's time is kept. An apply
/// adds to a count without reading it first. Associative, so RocksDB may fold operands in
/// any grouping (compactions do) and every replica reads the same value. None (RocksDB then
/// reports corruption) if a value does not decode.
pub fn merge_counts(
    _key: &[u8],
    stored: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut total: Option<Count> = match stored {
        Some(v) => Some(decode_count(v)?),
        None => None,
    };
    for operand in operands {
        total = Some(add_count(total, decode_count(operand)?));
    }
    encode(&total?).ok()
}

/// A stored count or an operand, of this format or the one before (a count is encoded the
/// same in both): see [`FORMAT_VERSION`] on why merges must read the version before.
fn decode_count(bytes: &[u8]) -> Option<Count> {
    decode_since(bytes, FORMAT_VERSION - 1).ok()
}

/// Adds `operand` to `stored` as [`merge_counts`] does: for a batch's own reads of a count it
/// has added to.
pub fn add_count(stored: Option<Count>, operand: Count) -> Count {
    match stored {
        Some((count, _)) => (count.saturating_add(operand.0), operand.1),
        None => operand,
    }
}

/// Encodes a list of keys (a retention entry's targets): each as a big-endian `u16` length
/// and its bytes, after the format byte. Keys are far shorter than 64 KiB (ids and subjects
/// are bounded); a longer one could not be listed whole, and is left out rather than cut.
pub fn encode_keys<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(FORMAT_VERSION);
    for k in keys {
        let Ok(len) = u16::try_from(k.len()) else {
            continue;
        };
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(k);
    }
    out
}

/// Decodes a list written by [`encode_keys`].
pub fn decode_keys(bytes: &[u8]) -> Result<Vec<&[u8]>, CodecError> {
    let (&version, mut rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion(version));
    }
    let mut keys = Vec::with_capacity(4);
    while !rest.is_empty() {
        let (len, tail) = rest.split_at_checked(2).ok_or(CodecError::Truncated)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let (key, tail) = tail.split_at_checked(len).ok_or(CodecError::Truncated)?;
        keys.push(key);
        rest = tail;
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Fuzzing the peer and storage codec (PROPTEST_CASES=100000 for a longer run):
        /// arbitrary bytes decode or are refused, never panic nor allocate without bound.
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut bytes = vec![FORMAT_VERSION];
            bytes.extend_from_slice(&tail);
            let _ = decode::<crate::StateChange>(&bytes);
            let _ = decode::<Vec<crate::StateChange>>(&bytes);
            let _ = decode::<crate::records::OutboxRecord>(&bytes);
            let _ = decode::<crate::records::EntityRecord>(&bytes);
            let _ = decode::<crate::ChangeOutcome>(&bytes);
            let _ = decode_keys(&bytes);
        }
    }

    #[test]
    fn round_trip_and_version_check() {
        let v = (1u64, "x".to_string(), Some(vec![1u8, 2]));
        let bytes = encode(&v).expect("encode");
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: (u64, String, Option<Vec<u8>>) = decode(&bytes).expect("decode");
        assert_eq!(back, v);
        let mut wrong = bytes.clone();
        wrong[0] = 0xee;
        assert!(matches!(
            decode::<(u64, String, Option<Vec<u8>>)>(&wrong),
            Err(CodecError::UnknownVersion(0xee))
        ));
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Empty)));
    }

    #[test]
    fn counts_merge_from_this_format_and_the_one_before() {
        let now = encode(&(3u64, 7i64)).expect("encode");
        assert_eq!(decode_count(&now), Some((3, 7)));
        let mut before = now.clone();
        before[0] = FORMAT_VERSION - 1;
        assert_eq!(decode_count(&before), Some((3, 7)));
        before[0] = FORMAT_VERSION - 2;
        assert_eq!(decode_count(&before), None);
    }

    #[test]
    fn key_lists_round_trip_and_refuse_a_truncated_list() {
        let keys: [&[u8]; 3] = [b"a\0b", b"", &[0, 0, 0, 1, 0x17, 0xff]];
        let bytes = encode_keys(keys);
        assert_eq!(decode_keys(&bytes).expect("decode"), keys.to_vec());
        assert!(matches!(
            decode_keys(&bytes[..bytes.len() - 1]),
            Err(CodecError::Truncated)
        ));
        assert!(matches!(
            decode_keys(&[0xee]),
            Err(CodecError::UnknownVersion(0xee))
        ));
        assert!(decode_keys(&[FORMAT_VERSION])
            .expect("empty list")
            .is_empty());
    }
}
