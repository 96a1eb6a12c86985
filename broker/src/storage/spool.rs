//! The on-disk spool: batches that could not reach the database, kept in order until it is
//! back.
//!
//! Layout: `<data_dir>/spool/spool-<n>.log` segments, appended to and read in `n` order.
//! Each record is `[len: u32 LE][crc32 of body: u32 LE][body: len bytes of JSON Batch]`, and
//! each append is followed by `fsync`, so a batch acked to agents survives a power cut.
//!
//! A power cut can leave a torn record at the tail. Opening the spool checks every record;
//! at the first bad one the segment is cut back to the last good record with a warning. The
//! good records before it are kept.
//!
//! Replay progress inside a segment lives in memory only: after a crash a segment is replayed
//! from its start again, which is harmless because the database ignores rows it already holds.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::ingest::Batch;

/// A segment is closed and a new one started past this size, so fully replayed data can be
/// deleted file by file.
const SEGMENT_BYTES: u64 = 8 << 20;
const HEADER_BYTES: u64 = 8;
/// Larger records are corrupt: a batch of 3,000 readings is well under 2 MiB.
const MAX_RECORD_BYTES: u32 = 64 << 20;

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
    /// Bytes cut off damaged segment tails.
    pub discarded_bytes: u64,
}

#[derive(Debug)]
struct Segment {
    number: u64,
    path: PathBuf,
    len: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Oldest first. The last one is the one appended to.
    segments: VecDeque<Segment>,
    /// Replay position inside the oldest segment.
    read_offset: u64,
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
    /// Opens (creating) the spool in `dir`, checking every record and cutting damaged tails.
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
            let (len, records, discarded) = check_segment(&path)?;
            if discarded > 0 {
                tracing::warn!(
                    segment = %path.display(),
                    kept_records = records,
                    discarded_bytes = discarded,
                    "spool segment ends in a torn or corrupt record (power cut?); cut it back to the last good record"
                );
            }
            recovery.records += records;
            recovery.discarded_bytes += discarded;
            if len == 0 {
                fs::remove_file(&path).map_err(io_err(&path))?;
            } else {
                segments.push_back(Segment { number, path, len });
            }
        }
        let bytes = segments.iter().map(|s| s.len).sum();
        let spool = Self {
            dir: dir.to_owned(),
            max_bytes,
            segments,
            read_offset: 0,
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
        let record_len = HEADER_BYTES + body.len() as u64;
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
            });
            self.active = Some(file);
        }
        let segment = self
            .segments
            .back_mut()
            .expect("a segment was just ensured");
        let file = self.active.as_mut().expect("the last segment is open");
        let mut record = Vec::with_capacity(record_len as usize);
        record.extend_from_slice(&(body.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        record.extend_from_slice(&body);
        file.write_all(&record)
            .and_then(|()| file.sync_data())
            .map_err(io_err(&segment.path))?;
        segment.len += record_len;
        self.bytes += record_len;
        self.pending_records += 1;
        Ok(())
    }

    /// The oldest batch not yet replayed, without removing it.
    pub fn oldest(&mut self) -> Result<Option<Batch>, SpoolError> {
        loop {
            let Some(segment) = self.segments.front() else {
                return Ok(None);
            };
            if self.read_offset < segment.len {
                let (body, _) = read_record(&segment.path, self.read_offset)?;
                let batch = serde_json::from_slice(&body).map_err(|e| SpoolError::Decode {
                    path: segment.path.clone(),
                    offset: self.read_offset,
                    reason: e.to_string(),
                })?;
                return Ok(Some(batch));
            }
            if !self.retire_oldest_segment()? {
                return Ok(None);
            }
        }
    }

    /// Marks the batch [`Spool::oldest`] returned as replayed; deletes segments as they empty.
    pub fn pop_oldest(&mut self) -> Result<(), SpoolError> {
        let Some(segment) = self.segments.front() else {
            return Ok(());
        };
        let (_, record_len) = read_record(&segment.path, self.read_offset)?;
        self.read_offset += record_len;
        self.pending_records = self.pending_records.saturating_sub(1);
        if self.read_offset >= segment.len {
            self.retire_oldest_segment()?;
        }
        Ok(())
    }

    /// Deletes the fully replayed oldest segment. Returns false if nothing was left to delete.
    fn retire_oldest_segment(&mut self) -> Result<bool, SpoolError> {
        let Some(segment) = self.segments.pop_front() else {
            return Ok(false);
        };
        if self.segments.is_empty() {
            self.active = None;
        }
        fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
        self.bytes -= segment.len;
        self.read_offset = 0;
        Ok(true)
    }
}

/// Reads the record at `offset`: its body and its length on disk.
fn read_record(path: &Path, offset: u64) -> Result<(Vec<u8>, u64), SpoolError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    file.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    match next_record(&mut file).map_err(io_err(path))? {
        RecordRead::Good(body) => {
            let len = HEADER_BYTES + body.len() as u64;
            Ok((body, len))
        }
        RecordRead::End | RecordRead::Damaged(_) => Err(SpoolError::Decode {
            path: path.to_owned(),
            offset,
            reason: "record changed on disk since the spool was opened".into(),
        }),
    }
}

enum RecordRead {
    Good(Vec<u8>),
    End,
    Damaged(&'static str),
}

fn next_record(file: &mut File) -> io::Result<RecordRead> {
    let mut header = [0u8; HEADER_BYTES as usize];
    match read_full(file, &mut header)? {
        0 => return Ok(RecordRead::End),
        n if n < header.len() => return Ok(RecordRead::Damaged("truncated header")),
        _ => {}
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > MAX_RECORD_BYTES {
        return Ok(RecordRead::Damaged("impossible length"));
    }
    let mut body = vec![0u8; len as usize];
    if read_full(file, &mut body)? < body.len() {
        return Ok(RecordRead::Damaged("truncated body"));
    }
    if crc32fast::hash(&body) != crc {
        return Ok(RecordRead::Damaged("checksum mismatch"));
    }
    Ok(RecordRead::Good(body))
}

/// Like `read_exact`, but reports how much was read at end of file instead of failing.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Validates a segment; cuts it after its last good record. Returns (good length, good
/// records, bytes discarded).
fn check_segment(path: &Path) -> Result<(u64, u64, u64), SpoolError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let total = file.metadata().map_err(io_err(path))?.len();
    let (mut good_len, mut records) = (0u64, 0u64);
    loop {
        match next_record(&mut file).map_err(io_err(path))? {
            RecordRead::Good(body) => {
                good_len += HEADER_BYTES + body.len() as u64;
                records += 1;
            }
            RecordRead::End => break,
            RecordRead::Damaged(why) => {
                tracing::warn!(segment = %path.display(), offset = good_len, why, "damaged spool record");
                break;
            }
        }
    }
    if good_len < total {
        file.set_len(good_len)
            .and_then(|()| file.sync_all())
            .map_err(io_err(path))?;
    }
    Ok((good_len, records, total - good_len))
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
                discarded_bytes: 6
            }
        );
        assert_eq!(fs::metadata(&segment).unwrap().len(), len);
        spool.append(&batch(3)).unwrap();
        let lens: Vec<usize> = std::iter::from_fn(|| {
            let b = spool.oldest().unwrap()?;
            spool.pop_oldest().unwrap();
            Some(b.len())
        })
        .collect();
        assert_eq!(lens, [1, 2, 3]);
    }

    #[test]
    fn corrupt_last_record_is_dropped() {
        let dir = temp_dir("corrupt");
        let (mut spool, _) = Spool::open(&dir, 1 << 20).unwrap();
        spool.append(&batch(1)).unwrap();
        spool.append(&batch(2)).unwrap();
        drop(spool);
        let segment = dir.join("spool-0000000000.log");
        let mut bytes = fs::read(&segment).unwrap();
        let last = bytes.len() - 10;
        bytes[last] ^= 0xff;
        fs::write(&segment, bytes).unwrap();
        let (mut spool, recovery) = Spool::open(&dir, 1 << 20).unwrap();
        assert_eq!(recovery.records, 1);
        assert!(recovery.discarded_bytes > 0);
        assert_eq!(spool.oldest().unwrap().unwrap().len(), 1);
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
