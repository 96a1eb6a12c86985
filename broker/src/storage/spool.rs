//! The on-disk spool: batches that could not reach the database, kept in order until it is
//! back.
//!
//! Layout: `<data_dir>/spool/spool-<n>.log` segments, appended to and read in `n` order.
//! Each record is a JSON [`Batch`] framed by [`co2_proto::framing`] (`[len][crc32][body]`),
//! and each append is followed by `fsync`, so a batch acked to agents survives a power cut.
//!
//! Opening the spool checks every record. A corrupt record (bad checksum, sane length: a bad
//! sector) is skipped and counted, and the records after it are kept: they were acked to
//! their agents, who no longer hold them. A torn record (a write cut short by a power cut)
//! ends the valid data: the segment is cut back to the last record before it.
//!
//! Replay progress inside a segment lives in memory only: after a crash a segment is replayed
//! from its start again, which is harmless because the database ignores rows it already holds.
//! Segments are only appended to by the process that created them; after a restart new
//! batches go to a new segment.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Seek, SeekFrom, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use co2_proto::framing::{self, Frame, Scanner};

use crate::ingest::Batch;

/// A segment is closed and a new one started past this size, so fully replayed data can be
/// deleted file by file.
const SEGMENT_BYTES: u64 = 8 << 20;
/// Body lengths the spool writes: a JSON batch is never empty, and a batch of 3,000 readings is
/// well under 2 MiB. A length outside this is a torn record.
const BODY_LEN: RangeInclusive<usize> = 1..=64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
    #[error("spool I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("spool record in {path} at offset {offset} cannot be decoded: {reason}")]
    Decode {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

/// What opening the spool found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Good records waiting to be replayed.
    pub records: u64,
    /// Records with a bad checksum, skipped (their readings are lost; the ones after them
    /// are kept).
    pub corrupt_records: u64,
    /// Bytes cut off segments after a torn record.
    pub discarded_bytes: u64,
}

#[derive(Debug)]
struct Segment {
    number: u64,
    path: PathBuf,
    len: u64,
    /// Good records not replayed yet.
    pending: u64,
    /// Offsets of the corrupt records found at open: replay steps over them, and they were
    /// never counted as pending.
    corrupt: Vec<u64>,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Oldest first. The last one is the one appended to.
    segments: VecDeque<Segment>,
    /// Replay position inside the oldest segment.
    read_offset: u64,
    /// Length on disk of the record at `read_offset`, once [`Spool::oldest`] has read it
    /// (also when its body did not decode): how far [`Spool::pop_oldest`] moves.
    current_len: Option<u64>,
    /// Open append handle on the last segment.
    active: Option<File>,
    bytes: u64,
    pending_records: u64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Spool {
    /// Opens (creating) the spool in `dir`, checking every record, skipping corrupt ones and
    /// cutting torn tails.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Self, Recovery), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut numbers = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let name = entry.map_err(io_err(dir))?.file_name();
            let number = name.to_str().and_then(|n| {
                n.strip_prefix("spool-")?
                    .strip_suffix(".log")?
                    .parse::<u64>()
                    .ok()
            });
            numbers.extend(number);
        }
        numbers.sort_unstable();
        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        for number in numbers {
            let path = dir.join(format!("spool-{number:010}.log"));
            let checked = check_segment(&path)?;
            if checked.discarded > 0 {
                tracing::warn!(
                    segment = %path.display(),
                    kept_records = checked.records,
                    discarded_bytes = checked.discarded,
                    "spool segment ends in a torn record (power cut?); cut it back to the last good record"
                );
            }
            if !checked.corrupt.is_empty() {
                tracing::warn!(
                    segment = %path.display(),
                    corrupt_records = checked.corrupt.len(),
                    kept_records = checked.records,
                    "spool segment holds corrupt records (bad sector?); their readings are lost, \
                     the records around them are kept"
                );
            }
            recovery.records += checked.records;
            recovery.corrupt_records += checked.corrupt.len() as u64;
            recovery.discarded_bytes += checked.discarded;
            if checked.records == 0 {
                fs::remove_file(&path).map_err(io_err(&path))?;
            } else {
                segments.push_back(Segment {
                    number,
                    path,
                    len: checked.len,
                    pending: checked.records,
                    corrupt: checked.corrupt,
                });
            }
        }
        let bytes = segments.iter().map(|s| s.len).sum();
        let spool = Self {
            dir: dir.to_owned(),
            max_bytes,
            segments,
            read_offset: 0,
            current_len: None,
            active: None,
            bytes,
            pending_records: recovery.records,
        };
        Ok((spool, recovery))
    }

    pub fn is_empty(&self) -> bool {
        self.pending_records == 0
    }

    /// Bytes on disk, replayed or not, until their segment is deleted.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn pending_records(&self) -> u64 {
        self.pending_records
    }

    /// Appends `batch` and makes it durable before returning.
    pub fn append(&mut self, batch: &Batch) -> Result<(), SpoolError> {
        let body = serde_json::to_vec(batch).expect("a batch of plain values always serializes");
        let record_len = framing::record_len(body.len());
        if self.bytes + record_len > self.max_bytes {
            return Err(SpoolError::Full {
                used: self.bytes,
                max: self.max_bytes,
            });
        }
        let needs_new_segment = match self.segments.back() {
            None => true,
            Some(s) => self.active.is_none() || s.len >= SEGMENT_BYTES,
        };
        if needs_new_segment {
            let number = self.segments.back().map_or(0, |s| s.number + 1);
            let path = self.dir.join(format!("spool-{number:010}.log"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            // The new file's directory entry must survive a power cut too.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&self.dir))?;
            self.segments.push_back(Segment {
                number,
                path,
                len: 0,
                pending: 0,
                corrupt: Vec::new(),
            });
            self.active = Some(file);
        }
        let segment = self
            .segments
            .back_mut()
            .expect("a segment was just ensured");
        let file = self.active.as_mut().expect("the last segment is open");
        file.write_all(&framing::encode(&body))
            .and_then(|()| file.sync_data())
            .map_err(io_err(&segment.path))?;
        segment.len += record_len;
        segment.pending += 1;
        self.bytes += record_len;
        self.pending_records += 1;
        Ok(())
    }

    /// The oldest batch not yet replayed, without removing it. Corrupt records are stepped
    /// over. A record that cannot be decoded is an error; [`Spool::pop_oldest`] skips it.
    pub fn oldest(&mut self) -> Result<Option<Batch>, SpoolError> {
        loop {
            self.current_len = None;
            let Some(segment) = self.segments.front_mut() else {
                self.pending_records = 0;
                return Ok(None);
            };
            if self.read_offset >= segment.len {
                self.retire_oldest_segment()?;
                continue;
            }
            let offset = self.read_offset;
            let path = &segment.path;
            let mut file = File::open(path).map_err(io_err(path))?;
            file.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
            let mut scanner = Scanner::new(file, offset, BODY_LEN);
            let frame = scanner.next_frame().map_err(io_err(path))?;
            let decode_err = |reason: String| SpoolError::Decode {
                path: path.clone(),
                offset,
                reason,
            };
            match frame {
                Frame::Good(body) => {
                    self.current_len = Some(framing::record_len(body.len()));
                    let batch = serde_json::from_slice(body).map_err(|e| decode_err(e.to_string()));
                    return batch.map(Some);
                }
                Frame::Corrupt { body_len } => {
                    if !segment.corrupt.contains(&offset) {
                        // Checked at open, so damaged since: it was counted as pending.
                        tracing::warn!(segment = %path.display(), offset, "spool record damaged since the spool was opened; skipped, its readings are lost");
                        segment.pending = segment.pending.saturating_sub(1);
                        self.pending_records = self.pending_records.saturating_sub(1);
                    }
                    self.read_offset += framing::record_len(body_len);
                }
                Frame::Torn(why) => {
                    return Err(decode_err(format!(
                        "record changed on disk since the spool was opened ({why})"
                    )));
                }
                Frame::End => {
                    return Err(decode_err(
                        "segment shorter on disk than when the spool was opened".into(),
                    ));
                }
            }
        }
    }

    /// Moves past the record [`Spool::oldest`] returned (replayed) or could not decode
    /// (skipped), and deletes segments as they empty. A record whose length cannot be read
    /// hides where the next one starts: the rest of its segment is given up, with an error.
    pub fn pop_oldest(&mut self) -> Result<(), SpoolError> {
        let Some(segment) = self.segments.front() else {
            return Ok(());
        };
        if self.read_offset < segment.len {
            let len = match self.current_len.take() {
                Some(len) => Some(len),
                None => record_len_at(&segment.path, self.read_offset)?,
            };
            let segment = self.segments.front_mut().expect("the front segment exists");
            match len {
                Some(len) => {
                    self.read_offset += len;
                    segment.pending = segment.pending.saturating_sub(1);
                    self.pending_records = self.pending_records.saturating_sub(1);
                }
                None => {
                    tracing::error!(
                        segment = %segment.path.display(),
                        offset = self.read_offset,
                        lost_records = segment.pending,
                        "the rest of a spool segment cannot be located after an unreadable record; its readings are lost"
                    );
                    self.read_offset = segment.len;
                    self.pending_records = self.pending_records.saturating_sub(segment.pending);
                    segment.pending = 0;
                }
            }
        }
        if self
            .segments
            .front()
            .is_some_and(|s| self.read_offset >= s.len)
        {
            self.retire_oldest_segment()?;
        }
        Ok(())
    }

    /// Deletes the fully replayed oldest segment.
    fn retire_oldest_segment(&mut self) -> Result<(), SpoolError> {
        let Some(segment) = self.segments.front() else {
            return Ok(());
        };
        match fs::remove_file(&segment.path) {
            // Gone already (deleted by hand): what matters is that it is gone.
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(&segment.path)(e));
            }
            _ => {}
        }
        let segment = self.segments.pop_front().expect("the front segment exists");
        if self.segments.is_empty() {
            self.active = None;
        }
        self.bytes -= segment.len;
        self.read_offset = 0;
        self.current_len = None;
        Ok(())
    }
}

/// Length on disk of the record at `offset`, good or corrupt; `None` if it is torn (its end
/// cannot be known).
fn record_len_at(path: &Path, offset: u64) -> Result<Option<u64>, SpoolError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    file.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    let mut scanner = Scanner::new(file, offset, BODY_LEN);
    Ok(match scanner.next_frame().map_err(io_err(path))? {
        Frame::Good(body) => Some(framing::record_len(body.len())),
        Frame::Corrupt { body_len } => Some(framing::record_len(body_len)),
        Frame::Torn(_) | Frame::End => None,
    })
}

/// What checking a segment found.
struct CheckedSegment {
    /// Bytes up to the end of the valid data (the file is cut there).
    len: u64,
    /// Good records.
    records: u64,
    /// Offsets of corrupt records.
    corrupt: Vec<u64>,
    /// Bytes cut off after a torn record.
    discarded: u64,
}

/// Validates a segment: counts good records, notes corrupt ones and cuts the file at a torn
/// record.
fn check_segment(path: &Path) -> Result<CheckedSegment, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let total = file.metadata().map_err(io_err(path))?.len();
    let mut scanner = Scanner::new(BufReader::with_capacity(1 << 16, &file), 0, BODY_LEN);
    let (mut records, mut corrupt) = (0u64, Vec::new());
    loop {
        let start = scanner.offset();
        match scanner.next_frame().map_err(io_err(path))? {
            Frame::Good(_) => records += 1,
            Frame::Corrupt { .. } => {
                tracing::warn!(segment = %path.display(), offset = start, "corrupt spool record (checksum mismatch)");
                corrupt.push(start);
            }
            Frame::End => break,
            Frame::Torn(why) => {
                tracing::warn!(segment = %path.display(), offset = start, why, "torn spool record");
                break;
            }
        }
    }
    let len = scanner.offset();
    if len < total {
        file.set_len(len)
            .and_then(|()| file.sync_all())
            .map_err(io_err(path))?;
    }
    Ok(CheckedSegment {
        len,
        records,
        corrupt,
        discarded: total - len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Rejection;

    fn batch(n: usize) -> Batch {
        Batch {
            readings: vec![],
            rejections: (0..n)
                .map(|i| Rejection {
                    received_at: chrono::DateTime::from_timestamp(1_700_000_000 + i as i64, 0)
                        .unwrap()
                        .naive_utc(),
                    topic: format!("co2/{i}"),
                    payload: "x".repeat(100),
                    payload_bytes: 100,
                    reason: "test".into(),
                })
                .collect(),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("co2-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir); // a leftover from an earlier run, if any
        dir
    }

    #[test]
    fn batches_come_back_in_order_and_survive_reopen() {
        let dir = temp_dir("order");
        let (mut spool, recovery) = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(recovery, Recovery::default());
        for n in 1..=3 {
            spool.append(&batch(n)).unwrap();
        }
        drop(spool);
        let (mut spool, recovery) = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(recovery.records, 3);
        for n in 1..=3 {
            assert_eq!(spool.oldest().unwrap().unwrap().len(), n);
            spool.pop_oldest().unwrap();
        }
        assert!(spool.is_empty());
        assert_eq!(spool.oldest().unwrap(), None);
        assert_eq!(spool.bytes(), 0);
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            0,
            "replayed segments are deleted"
        );
        spool.append(&batch(4)).unwrap();
        assert_eq!(spool.oldest().unwrap().unwrap().len(), 4);
    }

    #[test]
    fn torn_tail_is_cut_and_good_records_kept() {
        let dir = temp_dir("torn");
        let (mut spool, _) = Spool::open(&dir, 1 << 20).unwrap();
        spool.append(&batch(1)).unwrap();
        spool.append(&batch(2)).unwrap();
        drop(spool);
        let segment = dir.join("spool-0000000000.log");
        let len = fs::metadata(&segment).unwrap().len();
        // Half a record, as a power cut mid-write leaves it.
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(file);
        let (mut spool, recovery) = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                records: 2,
                corrupt_records: 0,
                discarded_bytes: 6
            }
        );
        assert_eq!(fs::metadata(&segment).unwrap().len(), len);
        spool.append(&batch(3)).unwrap();
        assert_eq!(drain(&mut spool), [1, 2, 3]);
    }

    /// Replays everything left, oldest first, returning each batch's length.
    fn drain(spool: &mut Spool) -> Vec<usize> {
        std::iter::from_fn(|| {
            let b = spool.oldest().unwrap()?;
            spool.pop_oldest().unwrap();
            Some(b.len())
        })
        .collect()
    }

    /// Where each record of a segment starts.
    fn record_offsets(segment: &Path) -> Vec<usize> {
        let bytes = fs::read(segment).unwrap();
        let mut offsets = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            offsets.push(offset);
            let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap());
            offset += framing::HEADER_LEN + len as usize;
        }
        offsets
    }

    #[test]
    fn a_corrupt_record_is_skipped_and_the_ones_after_it_kept() {
        let dir = temp_dir("corrupt");
        let (mut spool, _) = Spool::open(&dir, 1 << 20).unwrap();
        for n in 1..=5 {
            spool.append(&batch(n)).unwrap();
        }
        drop(spool);
        let segment = dir.join("spool-0000000000.log");
        let offsets = record_offsets(&segment);
        assert_eq!(offsets.len(), 5);
        // A bad sector in the middle of record 2 and in the last record.
        let mut bytes = fs::read(&segment).unwrap();
        bytes[offsets[1] + 40] ^= 0xff;
        let last = bytes.len() - 10;
        bytes[last] ^= 0xff;
        fs::write(&segment, &bytes).unwrap();

        let (mut spool, recovery) = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                records: 3,
                corrupt_records: 2,
                discarded_bytes: 0
            }
        );
        assert_eq!(spool.pending_records(), 3);
        assert_eq!(fs::read(&segment).unwrap(), bytes, "nothing cut");
        // New batches go to a new segment, behind the old one.
        spool.append(&batch(6)).unwrap();
        assert_eq!(drain(&mut spool), [1, 3, 4, 6]);
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn a_record_damaged_after_open_is_skipped_on_replay() {
        let dir = temp_dir("damaged-later");
        let (mut spool, _) = Spool::open(&dir, 1 << 20).unwrap();
        for n in 1..=3 {
            spool.append(&batch(n)).unwrap();
        }
        let segment = dir.join("spool-0000000000.log");
        let offsets = record_offsets(&segment);
        let mut bytes = fs::read(&segment).unwrap();
        bytes[offsets[1] + 40] ^= 0xff;
        fs::write(&segment, &bytes).unwrap();
        assert_eq!(drain(&mut spool), [1, 3]);
        assert!(spool.is_empty(), "{} pending", spool.pending_records());
    }

    #[test]
    fn a_record_that_does_not_decode_is_skipped_by_pop() {
        let dir = temp_dir("undecodable");
        fs::create_dir_all(&dir).unwrap();
        // Intact frames: a batch, a body that is no batch, and one with a device id no
        // topic can carry (written by a bug, or an older version with laxer rules).
        let good = serde_json::to_vec(&batch(2)).unwrap();
        let bad_device = String::from_utf8(good.clone()).unwrap().replace(
            r#""readings":[]"#,
            &format!(r#""readings":[{}]"#, BAD_READING),
        );
        let mut bytes = framing::encode(&serde_json::to_vec(&batch(1)).unwrap());
        bytes.extend(framing::encode(b"not json"));
        bytes.extend(framing::encode(bad_device.as_bytes()));
        bytes.extend(framing::encode(&good));
        fs::write(dir.join("spool-0000000007.log"), bytes).unwrap();
        let (mut spool, recovery) = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(recovery.records, 4);
        assert_eq!(spool.oldest().unwrap().unwrap().len(), 1);
        spool.pop_oldest().unwrap();
        for _ in 0..2 {
            let err = spool.oldest().unwrap_err();
            assert!(matches!(err, SpoolError::Decode { .. }), "{err}");
            spool.pop_oldest().unwrap();
        }
        assert_eq!(drain(&mut spool), [2]);
        assert!(spool.is_empty());
    }

    const BAD_READING: &str = r#"{"device_id":"co2/#","topic":"co2/x","measured_at":"2025-01-01T00:00:00","received_at":"2025-01-01T00:00:00","co2_ppm":400.0,"seq":1,"temperature_c":null,"humidity_pct":null,"dedup_key":"t1"}"#;

    #[test]
    fn a_record_torn_after_open_gives_up_the_rest_of_its_segment_only() {
        let dir = temp_dir("torn-later");
        let (mut spool, _) = Spool::open(&dir, 1 << 20).unwrap();
        for n in 1..=3 {
            spool.append(&batch(n)).unwrap();
        }
        drop(spool);
        let (mut spool, _) = Spool::open(&dir, 1 << 20).unwrap();
        spool.append(&batch(4)).unwrap(); // a second segment
        let segment = dir.join("spool-0000000000.log");
        let offsets = record_offsets(&segment);
        let bytes = fs::read(&segment).unwrap();
        fs::write(&segment, &bytes[..offsets[1] + 3]).unwrap();
        assert_eq!(spool.oldest().unwrap().unwrap().len(), 1);
        spool.pop_oldest().unwrap();
        assert!(matches!(spool.oldest(), Err(SpoolError::Decode { .. })));
        spool.pop_oldest().unwrap();
        assert_eq!(spool.pending_records(), 1, "records 2 and 3 are lost");
        assert_eq!(drain(&mut spool), [4]);
        assert!(spool.is_empty());
    }

    #[test]
    fn an_io_error_is_not_taken_for_a_bad_record() {
        let dir = temp_dir("io");
        let (mut spool, _) = Spool::open(&dir, 1 << 20).unwrap();
        spool.append(&batch(1)).unwrap();
        let segment = dir.join("spool-0000000000.log");
        let bytes = fs::read(&segment).unwrap();
        fs::remove_file(&segment).unwrap();
        fs::create_dir(&segment).unwrap(); // reading it fails, and so does deleting it
        assert!(matches!(spool.oldest(), Err(SpoolError::Io { .. })));
        assert_eq!(spool.pending_records(), 1, "nothing given up");
        fs::remove_dir(&segment).unwrap();
        fs::write(&segment, bytes).unwrap();
        assert_eq!(drain(&mut spool), [1]);
    }

    #[test]
    fn the_bound_refuses_and_says_so() {
        let dir = temp_dir("bound");
        let (mut spool, _) = Spool::open(&dir, 2_000).unwrap();
        spool.append(&batch(5)).unwrap();
        let err = spool.append(&batch(20)).unwrap_err();
        assert!(matches!(err, SpoolError::Full { max: 2_000, .. }), "{err}");
        assert_eq!(spool.pending_records(), 1);
    }
}
