//! The outbox: every reading is appended here before anything else happens to it, and leaves
//! only when it is acknowledged (or dropped at the size bound). Broker down, network cut, agent
//! crash or Pi reboot lose nothing that reached the disk.
//!
//! # Layout (`<data_dir>/outbox/`)
//! - `<first_seq, 20 digits>.seg`: append-only segment files of records
//!   `[len u32 LE][crc32 u32 LE][body]` ([`co2_proto::framing`], shared with the broker's
//!   spool), body = [`BODY_LEN`] bytes (version, seq, time evidence, values). Sequence numbers
//!   are consecutive across segments.
//! - `cursor`: `v1 <cursor> <dropped_total> <clean_next_seq>`; every seq below the cursor is
//!   acknowledged or dropped. `clean_next_seq` is non-zero only after a graceful [`Outbox::close`].
//!   Replaced atomically (write tmp, fsync, rename, fsync dir).
//!
//! # SD-card friendliness
//! Writes are sequential appends, one `write` per record; fsync is batched (`fsync_every`
//! records or `fsync_interval`, whichever first); the cursor is rewritten at sync time or
//! before a segment is deleted, never per ack. Whole segments are deleted once acknowledged.
//!
//! # Crash safety
//! On open, each segment is scanned: a record whose CRC fails but whose length is sane is
//! skipped (counted as lost, the rest kept); a torn tail (short header, short body, impossible
//! length) is truncated off the last segment. Acks held only in memory (above the cursor) are
//! lost by a crash, which means those readings are sent again; the broker deduplicates on
//! `(device, seq)`. A crash can never move the cursor past an unacknowledged reading.
//!
//! After an unclean stop, the up to `fsync_every` readings that were written but not yet
//! fsynced may have been published and stored before the power went. Their seqs must never be
//! reused for new readings (the broker would discard those as duplicates), so opening after an
//! unclean stop skips `fsync_every` seqs. Sequence numbers are unique, not dense.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use co2_proto::framing::{self, Frame, Scanner};
use co2_proto::SeqRanges;

use crate::clock::RecordTime;
use crate::reading::{Reading, Record};

const BODY_VERSION: u8 = 1;
/// version u8, seq u64, wall_ms i64, boottime_ms u64, boot_id [16], flags u8, 3 × f64.
pub const BODY_LEN: usize = 1 + 8 + 8 + 8 + 16 + 1 + 3 * 8;
const HEADER_LEN: usize = framing::HEADER_LEN;
const CURSOR_FILE: &str = "cursor";
const SEGMENT_EXT: &str = "seg";
const FLAG_TRUSTED: u8 = 1;
const FLAG_TEMPERATURE: u8 = 2;
const FLAG_HUMIDITY: u8 = 4;

#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Unacknowledged records kept at most; the oldest are dropped beyond it.
    pub max_records: u64,
    pub segment_records: u64,
    pub fsync_every: u64,
    pub fsync_interval: Duration,
}

impl From<&crate::config::OutboxConfig> for OutboxLimits {
    fn from(c: &crate::config::OutboxConfig) -> Self {
        Self {
            max_records: c.max_records,
            segment_records: c.segment_records,
            fsync_every: c.fsync_every,
            fsync_interval: Duration::from_millis(c.fsync_interval_ms),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What opening found on disk; logged at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Unacknowledged readings waiting to be sent.
    pub pending: u64,
    /// Records with a bad CRC that were skipped.
    pub corrupt_records: u64,
    /// Bytes of a torn tail cut off the last segment.
    pub truncated_bytes: u64,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    /// One past the last seq in the segment.
    end_seq: u64,
    path: PathBuf,
}

pub struct Outbox {
    dir: PathBuf,
    limits: OutboxLimits,
    segments: VecDeque<Segment>,
    /// Append handle of the last segment, opened lazily.
    active: Option<File>,
    next_seq: u64,
    /// Every seq below this is acknowledged or dropped; persisted in `cursor`.
    cursor: u64,
    /// Acknowledged seqs at or above the cursor (acks may arrive out of order).
    acked_above: BTreeSet<u64>,
    dropped_total: u64,
    unsynced: u64,
    unsynced_since: Option<Instant>,
    cursor_dirty: bool,
    /// Where the last `read_from` stopped, to avoid rescanning a segment per batch.
    read_hint: Option<ReadHint>,
}

#[derive(Debug, Clone, Copy)]
struct ReadHint {
    /// First seq of the segment the offset belongs to.
    segment: u64,
    next_seq: u64,
    offset: u64,
}

enum ScanItem {
    Record(u64, Record),
    Corrupt,
}

/// Reads records from `reader` (positioned at `offset`) until EOF or a torn record, with the
/// framing shared with the broker's spool ([`co2_proto::framing`]): every record is exactly
/// [`BODY_LEN`] long, so any other length is torn. A body that fails its checksum, or whose
/// version this agent does not know, is corrupt and skipped. Returns the offset where valid
/// data ends.
fn scan(
    reader: &mut impl Read,
    offset: u64,
    mut each: impl FnMut(ScanItem) -> bool,
) -> io::Result<u64> {
    let mut scanner = Scanner::new(reader, offset, BODY_LEN..=BODY_LEN);
    loop {
        let item = match scanner.next_frame()? {
            // Always BODY_LEN long: the scanner refuses any other length.
            Frame::Good(body) => <&[u8; BODY_LEN]>::try_from(body).ok().and_then(decode),
            Frame::Corrupt { .. } => None,
            Frame::Torn(_) | Frame::End => return Ok(scanner.offset()),
        };
        let item = match item {
            Some(record) => ScanItem::Record(scanner.offset(), record),
            None => ScanItem::Corrupt,
        };
        if !each(item) {
            return Ok(scanner.offset());
        }
    }
}

fn encode(record: &Record) -> [u8; HEADER_LEN + BODY_LEN] {
    let r = &record.reading;
    let mut flags = 0;
    if r.time.trusted {
        flags |= FLAG_TRUSTED;
    }
    if r.temperature_c.is_some() {
        flags |= FLAG_TEMPERATURE;
    }
    if r.humidity_pct.is_some() {
        flags |= FLAG_HUMIDITY;
    }
    let mut body = Vec::with_capacity(BODY_LEN);
    body.push(BODY_VERSION);
    body.extend_from_slice(&record.seq.to_le_bytes());
    body.extend_from_slice(&r.time.wall_ms.to_le_bytes());
    body.extend_from_slice(&r.time.boottime_ms.to_le_bytes());
    body.extend_from_slice(&r.time.boot_id);
    body.push(flags);
    body.extend_from_slice(&r.co2_ppm.to_le_bytes());
    body.extend_from_slice(&r.temperature_c.unwrap_or_default().to_le_bytes());
    body.extend_from_slice(&r.humidity_pct.unwrap_or_default().to_le_bytes());
    let mut out = [0u8; HEADER_LEN + BODY_LEN];
    out[..HEADER_LEN].copy_from_slice(&framing::header(&body));
    out[HEADER_LEN..].copy_from_slice(&body);
    out
}

fn decode(body: &[u8; BODY_LEN]) -> Option<Record> {
    if body[0] != BODY_VERSION {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap_or_default());
    let f64_at = |i: usize| f64::from_bits(u64_at(i));
    let mut boot_id = [0u8; 16];
    boot_id.copy_from_slice(&body[25..41]);
    let flags = body[41];
    Some(Record {
        seq: u64_at(1),
        reading: Reading {
            time: RecordTime {
                wall_ms: u64_at(9) as i64,
                boottime_ms: u64_at(17),
                boot_id,
                trusted: flags & FLAG_TRUSTED != 0,
            },
            co2_ppm: f64_at(42),
            temperature_c: (flags & FLAG_TEMPERATURE != 0).then(|| f64_at(50)),
            humidity_pct: (flags & FLAG_HUMIDITY != 0).then(|| f64_at(58)),
        },
    })
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.{SEGMENT_EXT}")
}

/// The first sequence number of a brand-new outbox: the current Unix time in ms when the clock
/// looks sane, so that a wiped data directory never reuses sequence numbers the broker has
/// already stored (it deduplicates on them). Readings are far rarer than one per ms.
fn initial_seq() -> u64 {
    let ms = chrono::Utc::now().timestamp_millis();
    // 2025-01-01T00:00:00Z
    if ms > 1_735_689_600_000 {
        ms as u64
    } else {
        1
    }
}

impl Outbox {
    /// Opens (creating if needed) the outbox in `dir`, recovering from a crash.
    pub fn open(dir: &Path, limits: OutboxLimits) -> Result<(Self, Recovery), OutboxError> {
        fs::create_dir_all(dir).map_err(at(dir))?;
        let mut recovery = Recovery::default();
        let saved = read_cursor(&dir.join(CURSOR_FILE));
        let clean_next_seq = saved.map(|s| s.2).filter(|&n| n > 0);
        let saved = saved.map(|(cursor, dropped, _)| (cursor, dropped));
        let mut files: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(at(dir))? {
            let path = entry.map_err(at(dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXT) {
                continue;
            }
            let first = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok());
            if let Some(first) = first {
                files.push((first, path));
            }
        }
        files.sort_unstable();

        let mut segments = VecDeque::new();
        // Seqs the files do not hold (corrupt records, missing files): lost, so they count as
        // acknowledged; otherwise the cursor could never pass them.
        let mut missing: Vec<std::ops::Range<u64>> = Vec::new();
        let last_index = files.len().saturating_sub(1);
        for (i, (first, path)) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(at(&path))?;
            let file_len = file.metadata().map_err(at(&path))?.len();
            let mut expected = first;
            let mut corrupt = 0;
            let mut slots = 0u64;
            let valid_end = scan(&mut BufReader::new(file), 0, |item| {
                slots += 1;
                match item {
                    ScanItem::Record(_, r) => {
                        if r.seq > expected {
                            missing.push(expected..r.seq);
                        }
                        expected = expected.max(r.seq + 1);
                    }
                    ScanItem::Corrupt => corrupt += 1,
                }
                true
            })
            .map_err(at(&path))?;
            recovery.corrupt_records += corrupt;
            if valid_end < file_len {
                recovery.truncated_bytes += file_len - valid_end;
                tracing::warn!(path = %path.display(), bytes = file_len - valid_end, "outbox: torn tail");
                if i == last_index {
                    // Cut the torn tail so new records follow valid data.
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(at(&path))?;
                    f.set_len(valid_end).map_err(at(&path))?;
                    f.sync_all().map_err(at(&path))?;
                }
            }
            if corrupt > 0 {
                tracing::warn!(path = %path.display(), corrupt, "outbox: skipped corrupt records");
            }
            // A corrupt record still used up its seq (records are consecutive), even after the
            // last good one: never hand that seq out again, the broker may have stored it.
            let end_seq = expected.max(first + slots);
            if end_seq > expected {
                missing.push(expected..end_seq);
            }
            segments.push_back(Segment {
                first_seq: first,
                end_seq,
                path,
            });
        }

        let (cursor, dropped_total) = match (saved, segments.front()) {
            (Some((cursor, dropped)), _) => (cursor, dropped),
            (None, Some(first)) => (first.first_seq, 0),
            (None, None) => (initial_seq(), 0),
        };
        let mut previous_end = cursor;
        for s in &segments {
            if s.first_seq > previous_end {
                missing.push(previous_end..s.first_seq);
            }
            previous_end = previous_end.max(s.end_seq);
        }
        let next_seq = match clean_next_seq {
            Some(clean) if clean == previous_end => previous_end,
            // Unclean stop (or first start): never reuse seqs that may be on the broker already.
            _ if saved.is_some() => previous_end + limits.fsync_every,
            _ => previous_end,
        };
        missing.push(previous_end..next_seq);
        let acked_above = missing
            .into_iter()
            .flatten()
            .filter(|&s| s >= cursor && s < next_seq)
            .collect();
        let mut outbox = Self {
            dir: dir.to_path_buf(),
            limits,
            segments,
            active: None,
            next_seq,
            cursor,
            acked_above,
            dropped_total,
            unsynced: 0,
            unsynced_since: None,
            cursor_dirty: saved.is_none(),
            read_hint: None,
        };
        outbox.advance_cursor();
        outbox.delete_acked_segments()?;
        // Always rewrite: this also clears the clean-shutdown marker until the next close.
        outbox.cursor_dirty = true;
        outbox.write_cursor()?;
        recovery.pending = outbox.pending_len();
        Ok((outbox, recovery))
    }

    /// Unacknowledged readings in the outbox.
    pub fn pending_len(&self) -> u64 {
        (self.next_seq - self.cursor).saturating_sub(self.acked_above.len() as u64)
    }

    /// The oldest unacknowledged seq, if any.
    pub fn first_pending(&self) -> Option<u64> {
        (self.cursor < self.next_seq).then_some(self.cursor)
    }

    /// Readings dropped at the size bound, over the outbox's lifetime.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// The seq the next appended reading gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends a reading and returns its seq. At the bound, the oldest unacknowledged reading
    /// is dropped first (counted and logged).
    pub fn append(&mut self, reading: &Reading) -> Result<u64, OutboxError> {
        let needs_new_segment = match self.segments.back() {
            None => true,
            Some(s) => s.end_seq - s.first_seq >= self.limits.segment_records,
        };
        if needs_new_segment {
            self.start_segment()?;
        }
        let seq = self.next_seq;
        let bytes = encode(&Record {
            seq,
            reading: *reading,
        });
        let path = self
            .segments
            .back()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        let file = match &mut self.active {
            Some(f) => f,
            None => self.active.insert(
                OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(at(&path))?,
            ),
        };
        file.write_all(&bytes).map_err(at(&path))?;
        self.next_seq += 1;
        if let Some(s) = self.segments.back_mut() {
            s.end_seq = self.next_seq;
        }
        self.unsynced += 1;
        self.unsynced_since.get_or_insert_with(Instant::now);
        if self.unsynced >= self.limits.fsync_every {
            self.sync()?;
        }
        while self.pending_len() > self.limits.max_records {
            self.drop_oldest();
        }
        self.delete_acked_segments()?;
        Ok(seq)
    }

    fn start_segment(&mut self) -> Result<(), OutboxError> {
        if self.unsynced > 0 {
            self.sync()?;
        }
        let path = self.dir.join(segment_name(self.next_seq));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(at(&path))?;
        sync_dir(&self.dir)?;
        self.active = Some(file);
        self.segments.push_back(Segment {
            first_seq: self.next_seq,
            end_seq: self.next_seq,
            path,
        });
        Ok(())
    }

    fn drop_oldest(&mut self) {
        let seq = self.cursor;
        self.cursor += 1;
        self.advance_cursor();
        self.dropped_total += 1;
        if self.dropped_total <= 10 || self.dropped_total % 1000 == 0 {
            tracing::warn!(
                seq,
                dropped_total = self.dropped_total,
                max_records = self.limits.max_records,
                "outbox full: dropped the oldest unacknowledged reading"
            );
        }
    }

    /// Marks `ranges` as acknowledged; returns how many pending readings that removed.
    /// Seqs outside the outbox (already removed, never issued) are ignored.
    pub fn ack(&mut self, ranges: &SeqRanges) -> Result<u64, OutboxError> {
        let mut removed = 0;
        for &(first, last) in ranges.ranges() {
            let start = first.max(self.cursor);
            let end = last.saturating_add(1).min(self.next_seq);
            for seq in start..end {
                if self.acked_above.insert(seq) {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            self.advance_cursor();
            self.delete_acked_segments()?;
        }
        Ok(removed)
    }

    fn advance_cursor(&mut self) {
        let before = self.cursor;
        while self.acked_above.remove(&self.cursor) {
            self.cursor += 1;
        }
        // Drops can move the cursor past acked seqs that are no longer needed.
        self.acked_above = self.acked_above.split_off(&self.cursor);
        if self.cursor != before {
            self.cursor_dirty = true;
        }
    }

    /// Deletes every segment but the last whose records are all below the cursor. The cursor
    /// is persisted first, so a crash in between cannot resurrect the sequence numbers.
    fn delete_acked_segments(&mut self) -> Result<(), OutboxError> {
        while self.segments.len() > 1 && self.segments[0].end_seq <= self.cursor {
            self.write_cursor()?;
            if let Some(segment) = self.segments.pop_front() {
                fs::remove_file(&segment.path).map_err(at(&segment.path))?;
                self.read_hint = None;
            }
        }
        Ok(())
    }

    /// fsyncs appended records and persists the cursor.
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        if let Some(file) = &self.active {
            file.sync_data().map_err(at(&self.dir))?;
        }
        self.unsynced = 0;
        self.unsynced_since = None;
        self.write_cursor()
    }

    /// Syncs when the oldest unsynced record has waited `fsync_interval`; call periodically.
    pub fn sync_if_due(&mut self) -> Result<(), OutboxError> {
        let due = self
            .unsynced_since
            .is_some_and(|t| t.elapsed() >= self.limits.fsync_interval);
        if due || (self.unsynced == 0 && self.cursor_dirty) {
            self.sync()?;
        }
        Ok(())
    }

    /// Graceful shutdown: fsync everything and mark the outbox as cleanly closed, so the next
    /// open continues the sequence without a gap.
    pub fn close(mut self) -> Result<(), OutboxError> {
        self.sync()?;
        self.write_cursor_file(self.next_seq)
    }

    fn write_cursor(&mut self) -> Result<(), OutboxError> {
        if !self.cursor_dirty {
            return Ok(());
        }
        self.write_cursor_file(0)
    }

    fn write_cursor_file(&mut self, clean_next_seq: u64) -> Result<(), OutboxError> {
        let path = self.dir.join(CURSOR_FILE);
        let tmp = self.dir.join("cursor.tmp");
        let text = format!(
            "v1 {} {} {clean_next_seq}\n",
            self.cursor, self.dropped_total
        );
        let mut f = File::create(&tmp).map_err(at(&tmp))?;
        f.write_all(text.as_bytes()).map_err(at(&tmp))?;
        f.sync_all().map_err(at(&tmp))?;
        fs::rename(&tmp, &path).map_err(at(&path))?;
        sync_dir(&self.dir)?;
        self.cursor_dirty = false;
        Ok(())
    }

    /// Up to `max` pending records with seq ≥ `from`, oldest first, read from disk.
    pub fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<Record>, OutboxError> {
        let start = from.max(self.cursor);
        let mut out = Vec::new();
        for segment in self.segments.iter().filter(|s| s.end_seq > start) {
            if out.len() >= max {
                break;
            }
            // Sequential reads (the normal case while draining) continue where the last one
            // stopped; anything else scans the segment from its start.
            let offset = match self.read_hint {
                Some(hint) if hint.segment == segment.first_seq && hint.next_seq == start => {
                    hint.offset
                }
                _ => 0,
            };
            let path = &segment.path;
            let mut file = File::open(path).map_err(at(path))?;
            file.seek(SeekFrom::Start(offset)).map_err(at(path))?;
            let acked = &self.acked_above;
            let hint = &mut self.read_hint;
            scan(&mut BufReader::new(file), offset, |item| {
                if let ScanItem::Record(end, r) = item {
                    if r.seq >= start && !acked.contains(&r.seq) {
                        out.push(r);
                    }
                    *hint = Some(ReadHint {
                        segment: segment.first_seq,
                        next_seq: r.seq + 1,
                        offset: end,
                    });
                }
                out.len() < max
            })
            .map_err(at(path))?;
        }
        Ok(out)
    }
}

/// `(cursor, dropped_total, clean_next_seq)`; None when missing or unreadable (then every
/// record on disk is sent again, which the broker deduplicates).
fn read_cursor(path: &Path) -> Option<(u64, u64, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let mut parts = text.split_whitespace();
    if parts.next()? != "v1" {
        return None;
    }
    let mut number = || parts.next()?.parse().ok();
    Some((number()?, number()?, number()?))
}

fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD_LEN: u64 = (HEADER_LEN + BODY_LEN) as u64;

    fn limits(max_records: u64, segment_records: u64) -> OutboxLimits {
        OutboxLimits {
            max_records,
            segment_records,
            fsync_every: 4,
            fsync_interval: Duration::from_secs(30),
        }
    }

    fn reading(ppm: f64) -> Reading {
        Reading {
            time: RecordTime {
                wall_ms: 1_790_000_000_000,
                boottime_ms: 1234,
                boot_id: [7; 16],
                trusted: true,
            },
            co2_ppm: ppm,
            temperature_c: (ppm > 500.0).then_some(21.5),
            humidity_pct: None,
        }
    }

    fn ppms(records: &[Record]) -> Vec<f64> {
        records.iter().map(|r| r.reading.co2_ppm).collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == SEGMENT_EXT))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn record_encoding_round_trips() {
        let record = Record {
            seq: 42,
            reading: reading(612.0),
        };
        let bytes = encode(&record);
        let body: [u8; BODY_LEN] = bytes[HEADER_LEN..].try_into().unwrap();
        assert_eq!(decode(&body), Some(record));
    }

    #[test]
    fn append_read_and_ack() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, recovery) = Outbox::open(dir.path(), limits(100, 3)).unwrap();
        assert_eq!(recovery, Recovery::default());
        let first = outbox.next_seq();
        assert!(
            first > 1_700_000_000_000,
            "a fresh outbox starts at Unix ms"
        );
        for i in 0..7 {
            assert_eq!(
                outbox.append(&reading(400.0 + f64::from(i))).unwrap(),
                first + i as u64
            );
        }
        assert_eq!(outbox.pending_len(), 7);
        assert_eq!(segment_files(dir.path()).len(), 3);

        let batch = outbox.read_from(0, 4).unwrap();
        assert_eq!(ppms(&batch), [400.0, 401.0, 402.0, 403.0]);
        let next = outbox.read_from(batch[3].seq + 1, 10).unwrap();
        assert_eq!(ppms(&next), [404.0, 405.0, 406.0]);

        // Out-of-order ack: nothing can be deleted yet, but seq+1 is no longer pending.
        let removed = outbox
            .ack(&SeqRanges::from_seqs([first + 1, first + 4]))
            .unwrap();
        assert_eq!(removed, 2);
        assert_eq!(outbox.first_pending(), Some(first));
        assert_eq!(
            ppms(&outbox.read_from(0, 10).unwrap()),
            [400.0, 402.0, 403.0, 405.0, 406.0]
        );

        // Acking the head deletes the first segment; acking garbage changes nothing.
        assert_eq!(
            outbox
                .ack(&SeqRanges::from_seqs([first, first + 2]))
                .unwrap(),
            2
        );
        assert_eq!(
            outbox.ack(&SeqRanges::from_seqs([0, 1, u64::MAX])).unwrap(),
            0
        );
        assert_eq!(outbox.first_pending(), Some(first + 3));
        assert_eq!(segment_files(dir.path()).len(), 2);
        assert_eq!(outbox.pending_len(), 3);

        // Everything acked: only the last (active) segment stays.
        outbox.ack(&SeqRanges::from_seqs(first..first + 7)).unwrap();
        assert_eq!(outbox.pending_len(), 0);
        assert_eq!(outbox.first_pending(), None);
        assert_eq!(segment_files(dir.path()).len(), 1);
    }

    #[test]
    fn reopen_after_crash_keeps_unacked_and_never_reuses_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open(dir.path(), limits(100, 3)).unwrap();
        let first = outbox.next_seq();
        for i in 0..5 {
            outbox.append(&reading(500.0 + f64::from(i))).unwrap();
        }
        outbox
            .ack(&SeqRanges::from_seqs([first, first + 1]))
            .unwrap();
        outbox.sync().unwrap();
        drop(outbox); // crash: no close()

        let (mut outbox, recovery) = Outbox::open(dir.path(), limits(100, 3)).unwrap();
        assert_eq!(recovery.pending, 3);
        assert_eq!(
            ppms(&outbox.read_from(0, 10).unwrap()),
            [502.0, 503.0, 504.0]
        );
        // Unclean stop: fsync_every (4) seqs are skipped.
        let seq = outbox.append(&reading(600.0)).unwrap();
        assert_eq!(seq, first + 5 + 4);
        assert_eq!(outbox.pending_len(), 4);
        outbox.close().unwrap();

        // Clean close: the sequence continues without a gap, the gap itself is not pending.
        let (mut outbox, recovery) = Outbox::open(dir.path(), limits(100, 3)).unwrap();
        assert_eq!(recovery.pending, 4);
        assert_eq!(outbox.append(&reading(601.0)).unwrap(), seq + 1);
        let all = outbox.read_from(0, 10).unwrap();
        assert_eq!(ppms(&all), [502.0, 503.0, 504.0, 600.0, 601.0]);
        outbox
            .ack(&SeqRanges::from_seqs(all.iter().map(|r| r.seq)))
            .unwrap();
        assert_eq!(outbox.pending_len(), 0);
    }

    #[test]
    fn torn_tail_is_cut_at_every_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open(dir.path(), limits(100, 100)).unwrap();
        for i in 0..3 {
            outbox.append(&reading(700.0 + f64::from(i))).unwrap();
        }
        outbox.close().unwrap();
        let path = segment_files(dir.path()).remove(0);
        let full = fs::read(&path).unwrap();
        let two = 2 * RECORD_LEN as usize;
        for cut in two..full.len() {
            let copy = tempfile::tempdir().unwrap();
            fs::write(copy.path().join(path.file_name().unwrap()), &full[..cut]).unwrap();
            fs::copy(dir.path().join(CURSOR_FILE), copy.path().join(CURSOR_FILE)).unwrap();
            let (mut outbox, recovery) = Outbox::open(copy.path(), limits(100, 100)).unwrap();
            assert_eq!(recovery.pending, 2, "cut at {cut}");
            assert_eq!(recovery.truncated_bytes, (cut - two) as u64);
            assert_eq!(ppms(&outbox.read_from(0, 10).unwrap()), [700.0, 701.0]);
            // New records follow the good ones and read back intact.
            outbox.append(&reading(800.0)).unwrap();
            assert_eq!(
                ppms(&outbox.read_from(0, 10).unwrap()),
                [700.0, 701.0, 800.0]
            );
        }
    }

    #[test]
    fn corrupt_record_is_skipped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open(dir.path(), limits(100, 100)).unwrap();
        let first = outbox.next_seq();
        for i in 0..4 {
            outbox.append(&reading(900.0 + f64::from(i))).unwrap();
        }
        outbox.close().unwrap();
        let path = segment_files(dir.path()).remove(0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[RECORD_LEN as usize + HEADER_LEN + 45] ^= 0xFF; // inside record 2's value
        bytes[3 * RECORD_LEN as usize + HEADER_LEN + 45] ^= 0xFF; // and the last record's
        fs::write(&path, bytes).unwrap();

        let (mut outbox, recovery) = Outbox::open(dir.path(), limits(100, 100)).unwrap();
        assert_eq!(recovery.corrupt_records, 2);
        assert_eq!(recovery.pending, 2);
        let good = outbox.read_from(0, 10).unwrap();
        assert_eq!(ppms(&good), [900.0, 902.0]);
        // The corrupt last record's seq is not handed out again.
        assert!(outbox.append(&reading(1.0)).unwrap() > first + 3);
        outbox
            .ack(&SeqRanges::from_seqs(good.iter().map(|r| r.seq)))
            .unwrap();
        assert_eq!(outbox.pending_len(), 1);
    }

    #[test]
    fn bound_drops_the_oldest_with_a_counter() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open(dir.path(), limits(5, 2)).unwrap();
        for i in 0..12 {
            outbox.append(&reading(f64::from(i))).unwrap();
        }
        assert_eq!(outbox.pending_len(), 5);
        assert_eq!(outbox.dropped_total(), 7);
        assert_eq!(
            ppms(&outbox.read_from(0, 10).unwrap()),
            [7.0, 8.0, 9.0, 10.0, 11.0]
        );
        assert!(
            segment_files(dir.path()).len() <= 4,
            "dropped segments are deleted"
        );
        outbox.close().unwrap();
        let (outbox, recovery) = Outbox::open(dir.path(), limits(5, 2)).unwrap();
        assert_eq!((recovery.pending, outbox.dropped_total()), (5, 7));
    }

    #[test]
    fn missing_cursor_file_resends_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, _) = Outbox::open(dir.path(), limits(100, 2)).unwrap();
        for i in 0..3 {
            outbox.append(&reading(f64::from(i))).unwrap();
        }
        let first = outbox.first_pending().unwrap();
        outbox.ack(&SeqRanges::from_seqs([first + 2])).unwrap();
        outbox.close().unwrap();
        fs::remove_file(dir.path().join(CURSOR_FILE)).unwrap();
        let (mut outbox, recovery) = Outbox::open(dir.path(), limits(100, 2)).unwrap();
        assert_eq!(recovery.pending, 3);
        assert_eq!(outbox.read_from(0, 10).unwrap().len(), 3);
    }
}
