//! Checksummed records in append-only files: `[len: u32 LE][crc32 of body: u32 LE][body]`.
//!
//! The broker's spool and the edge agent's outbox both keep what they promised to deliver in
//! files of such records, and both must tell, after a power cut or a bad sector, which records
//! are intact. One [`Scanner`] decides that for both:
//!
//! - [`Frame::Good`]: the body matches its checksum.
//! - [`Frame::Corrupt`]: a sane length but a wrong checksum (a flipped bit, a bad sector). The
//!   length still says where the next record starts, so the scan goes on: later records are
//!   intact and must not be given up for one damaged record before them.
//! - [`Frame::Torn`]: a short header, a short body, or a length outside what the file's owner
//!   ever writes. Nothing after it can be located, so valid data ends here; at the end of the
//!   last file this is a write cut short, and the owner truncates the file to
//!   [`Scanner::offset`].
//!
//! The format predates this module: files written by earlier versions read the same.

use std::io::{self, Read};
use std::ops::RangeInclusive;

/// Bytes before each body: length and checksum.
pub const HEADER_LEN: usize = 8;

/// The header that goes before `body`.
pub fn header(body: &[u8]) -> [u8; HEADER_LEN] {
    let len = u32::try_from(body.len()).expect("a record body is far below 4 GiB");
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    header
}

/// `body` as one record, header first; written with a single `write` it is torn at worst.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(HEADER_LEN + body.len());
    record.extend_from_slice(&header(body));
    record.extend_from_slice(body);
    record
}

/// Length on disk of a record whose body is `body_len` bytes.
pub fn record_len(body_len: usize) -> u64 {
    (HEADER_LEN + body_len) as u64
}

/// What the scanner found at its offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// An intact record's body.
    Good(&'a [u8]),
    /// A whole record whose body fails its checksum; the scan continues after it.
    Corrupt { body_len: usize },
    /// Where valid data ends, and why; [`Scanner::offset`] stays at the torn record's start.
    Torn(&'static str),
    /// The end of the data, exactly at a record boundary.
    End,
}

/// Reads records one after another from a reader positioned at `offset`.
pub struct Scanner<R> {
    reader: R,
    offset: u64,
    /// Body lengths the file's owner writes; any other is taken for a torn record.
    body_len: RangeInclusive<usize>,
    body: Vec<u8>,
}

impl<R: Read> Scanner<R> {
    /// `offset` is where `reader` stands (the start of a record); it only feeds
    /// [`Scanner::offset`].
    pub fn new(reader: R, offset: u64, body_len: RangeInclusive<usize>) -> Self {
        Self {
            reader,
            offset,
            body_len,
            body: Vec::new(),
        }
    }

    /// Where the next record starts: after the last good or corrupt one, or where a torn one
    /// began.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record. After [`Frame::Torn`] or [`Frame::End`] the reader's position is
    /// past the valid data; scan no further.
    pub fn next_frame(&mut self) -> io::Result<Frame<'_>> {
        let mut header = [0u8; HEADER_LEN];
        match read_full(&mut self.reader, &mut header)? {
            0 => return Ok(Frame::End),
            n if n < HEADER_LEN => return Ok(Frame::Torn("short header")),
            _ => {}
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if !self.body_len.contains(&len) {
            return Ok(Frame::Torn("impossible length"));
        }
        self.body.resize(len, 0);
        if read_full(&mut self.reader, &mut self.body)? < len {
            return Ok(Frame::Torn("short body"));
        }
        self.offset += record_len(len);
        if crc32fast::hash(&self.body) != crc {
            return Ok(Frame::Corrupt { body_len: len });
        }
        Ok(Frame::Good(&self.body))
    }
}

/// Like `read_exact`, but says how much was read when the data ends first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame of `bytes` until the valid data ends, and where it ends.
    fn scan(bytes: &[u8], body_len: RangeInclusive<usize>) -> (Vec<String>, u64) {
        let mut scanner = Scanner::new(bytes, 0, body_len);
        let mut frames = Vec::new();
        loop {
            let frame = match scanner.next_frame().unwrap() {
                Frame::Good(body) => String::from_utf8(body.to_vec()).unwrap(),
                Frame::Corrupt { body_len } => format!("corrupt {body_len}"),
                Frame::Torn(why) => format!("torn: {why}"),
                Frame::End => break,
            };
            let torn = frame.starts_with("torn");
            frames.push(frame);
            if torn {
                break;
            }
        }
        (frames, scanner.offset())
    }

    fn file(bodies: &[&str]) -> Vec<u8> {
        bodies.iter().flat_map(|b| encode(b.as_bytes())).collect()
    }

    #[test]
    fn records_read_back_in_order() {
        let bytes = file(&["one", "two", "three"]);
        assert_eq!(
            &bytes[..8],
            &[3, 0, 0, 0, 0xf1, 0x86, 0x6c, 0x7a][..],
            "LE length, LE crc32"
        );
        let (frames, end) = scan(&bytes, 1..=100);
        assert_eq!(frames, ["one", "two", "three"]);
        assert_eq!(end, bytes.len() as u64);
        assert_eq!(scan(&[], 1..=100), (vec![], 0));
    }

    #[test]
    fn a_corrupt_record_is_skipped_and_the_ones_after_it_kept() {
        let mut bytes = file(&["one", "two", "three"]);
        let second = record_len(3) as usize;
        bytes[second + HEADER_LEN + 1] ^= 0x20; // "two" → "tWo"
        let (frames, end) = scan(&bytes, 1..=100);
        assert_eq!(frames, ["one", "corrupt 3", "three"]);
        assert_eq!(end, bytes.len() as u64);
        // A damaged checksum is the same thing.
        let mut bytes = file(&["one", "two"]);
        bytes[second + 5] ^= 1;
        assert_eq!(scan(&bytes, 1..=100).0, ["one", "corrupt 3"]);
    }

    #[test]
    fn valid_data_ends_at_a_torn_record_whatever_follows() {
        let whole = file(&["one", "two"]);
        let first = record_len(3);
        for cut in first as usize + 1..whole.len() {
            let (frames, end) = scan(&whole[..cut], 1..=100);
            let why = if cut < first as usize + HEADER_LEN {
                "torn: short header"
            } else {
                "torn: short body"
            };
            assert_eq!(frames, ["one", why], "cut at {cut}");
            assert_eq!(end, first, "cut at {cut}");
        }
        // A length the owner never writes: zeros (a file extended but never written) or
        // garbage; nothing after it can be found.
        for junk in [[0u8; 8], [0xFF; 8]] {
            let mut bytes = file(&["one"]);
            bytes.extend_from_slice(&junk);
            bytes.extend(file(&["two"]));
            assert_eq!(
                scan(&bytes, 1..=100),
                (vec!["one".into(), "torn: impossible length".into()], first)
            );
        }
        // A fixed-size format refuses every other length.
        let bytes = file(&["one", "four"]);
        assert_eq!(scan(&bytes, 3..=3).0, ["one", "torn: impossible length"]);
    }

    #[test]
    fn scanning_can_start_at_any_record() {
        let bytes = file(&["one", "two", "three"]);
        let second = record_len(3);
        let mut scanner = Scanner::new(&bytes[second as usize..], second, 1..=100);
        assert_eq!(scanner.next_frame().unwrap(), Frame::Good(b"two"));
        assert_eq!(scanner.offset(), 2 * second);
    }
}
