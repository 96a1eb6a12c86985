//! Storage acknowledgements: the broker tells an agent which of its readings are durable.
//!
//! rumqttd sends PUBACK as soon as it reads a PUBLISH, long before the reading reaches the
//! database, so a PUBACK proves nothing about storage. After a batch is committed (to the
//! database or to the broker's on-disk spool) the broker publishes a [`StorageAck`] on
//! `ack/<device>` listing the sequence numbers it now holds; only then may the agent delete
//! those readings from its own outbox. The ack lists exact ranges rather than a high-water mark,
//! so a reading lost in between is never acknowledged by accident.

use serde::{Deserialize, Serialize};

/// Sorted, disjoint, inclusive ranges of sequence numbers, e.g. `[[1,5],[7,7]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeqRanges(Vec<(u64, u64)>);

impl SeqRanges {
    /// Builds the smallest set of ranges covering `seqs` (any order, duplicates allowed).
    pub fn from_seqs(seqs: impl IntoIterator<Item = u64>) -> Self {
        let mut seqs: Vec<u64> = seqs.into_iter().collect();
        seqs.sort_unstable();
        seqs.dedup();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for seq in seqs {
            match ranges.last_mut() {
                Some((_, end)) if end.checked_add(1) == Some(seq) => *end = seq,
                _ => ranges.push((seq, seq)),
            }
        }
        Self(ranges)
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.0
            .iter()
            .any(|&(start, end)| (start..=end).contains(&seq))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// How many sequence numbers the ranges cover.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|&(start, end)| end - start + 1).sum()
    }
}

/// Payload of `ack/<device>`: `{"stored":[[first,last],...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageAck {
    pub stored: SeqRanges,
}

impl StorageAck {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("ranges of integers always serialize")
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_neighbours_and_keep_gaps() {
        let r = SeqRanges::from_seqs([5, 1, 2, 3, 3, 7, u64::MAX, u64::MAX - 1]);
        assert_eq!(
            r.ranges(),
            &[(1, 3), (5, 5), (7, 7), (u64::MAX - 1, u64::MAX)]
        );
        assert!(r.contains(2) && r.contains(7) && !r.contains(4) && !r.contains(6));
        assert_eq!(r.len(), 7);
        assert!(SeqRanges::from_seqs([]).is_empty());
    }

    #[test]
    fn ack_json_round_trip() {
        let ack = StorageAck {
            stored: SeqRanges::from_seqs([1, 2, 3, 9]),
        };
        assert_eq!(ack.to_json(), r#"{"stored":[[1,3],[9,9]]}"#);
        assert_eq!(StorageAck::parse(ack.to_json().as_bytes()).unwrap(), ack);
        assert!(StorageAck::parse(b"{}").is_err());
    }
}
