//! Lines of one container stream: the RFC 3339 timestamp Docker puts before each record is
//! validated and stripped, 16 KiB partial records are joined, lines are capped (cut on a
//! character boundary, the rest skipped to the next newline) and invalid UTF-8 is replaced —
//! each of these counted.

use chrono::{DateTime, Utc};

/// Default cap on one reassembled line: 1 MiB.
pub const MAX_LINE: usize = 1 << 20;

/// Longest timestamp prefix accepted ("2006-01-02T15:04:05.999999999+07:00" is 35 bytes).
const MAX_TS: usize = 40;

/// One complete line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Docker's timestamp of its first record; None when it was missing or invalid.
    pub ts: Option<DateTime<Utc>>,
    /// The text, valid UTF-8, without the newline.
    pub text: String,
    /// The line was longer than the cap and was cut.
    pub truncated: bool,
}

/// Counters of one assembler.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LineStats {
    /// Lines delivered.
    pub lines: u64,
    /// Lines cut at the cap.
    pub truncated: u64,
    /// Bytes dropped past the cap.
    pub skipped_bytes: u64,
    /// Lines whose invalid UTF-8 was replaced.
    pub invalid_utf8: u64,
    /// Records without a valid timestamp.
    pub bad_timestamps: u64,
}

/// Reassembles lines from the chunks of one stream.
pub struct LineAssembler {
    /// Each chunk is one Docker record (multiplexed streams): a chunk without a newline is a
    /// partial whose continuation starts with its own timestamp. Without records (TTY), a
    /// chunk is whatever a read returned.
    records: bool,
    max_line: usize,
    at_record_start: bool,
    ts_buf: Vec<u8>,
    ts: Option<DateTime<Utc>>,
    have_ts: bool,
    line: Vec<u8>,
    truncated: bool,
    stats: LineStats,
}

/// How many leading bytes of `b` end on a character boundary (an incomplete trailing
/// sequence, as a cut leaves, is dropped; invalid bytes elsewhere are left to the lossy pass).
fn char_boundary(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let i = b.len() - back;
        let c = b[i];
        if c & 0b1100_0000 != 0b1000_0000 {
            let need = match c {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if need > back { i } else { b.len() };
        }
    }
    b.len()
}

impl LineAssembler {
    /// An assembler; `records` for multiplexed (non-TTY) streams.
    pub fn new(records: bool, max_line: usize) -> Self {
        LineAssembler {
            records,
            max_line,
            at_record_start: true,
            ts_buf: Vec::new(),
            ts: None,
            have_ts: false,
            line: Vec::new(),
            truncated: false,
            stats: LineStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> LineStats {
        self.stats
    }

    fn append(&mut self, seg: &[u8]) {
        if self.truncated {
            self.stats.skipped_bytes += seg.len() as u64;
            return;
        }
        let room = self.max_line - self.line.len();
        if seg.len() <= room {
            self.line.extend_from_slice(seg);
        } else {
            self.line.extend_from_slice(&seg[..room]);
            let keep = char_boundary(&self.line);
            self.stats.skipped_bytes += (seg.len() - room + self.line.len() - keep) as u64;
            self.line.truncate(keep);
            self.truncated = true;
        }
    }

    fn finish(&mut self, out: &mut Vec<Line>) {
        let bytes = std::mem::take(&mut self.line);
        let text = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                self.stats.invalid_utf8 += 1;
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            }
        };
        if self.truncated {
            self.stats.truncated += 1;
        }
        self.stats.lines += 1;
        out.push(Line {
            ts: self.ts.take(),
            text,
            truncated: std::mem::take(&mut self.truncated),
        });
        self.have_ts = false;
    }

    /// Consumes the timestamp prefix at a record start; returns the rest of `b`, or None
    /// when `b` ended inside the prefix (TTY reads may split it).
    fn strip_ts<'a>(&mut self, b: &'a [u8]) -> Option<&'a [u8]> {
        match b.iter().position(|&c| c == b' ' || c == b'\n') {
            Some(i) if b[i] == b' ' && self.ts_buf.len() + i <= MAX_TS => {
                self.ts_buf.extend_from_slice(&b[..i]);
                let parsed = std::str::from_utf8(&self.ts_buf)
                    .ok()
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
                let rest = match parsed {
                    Some(t) => {
                        if !self.have_ts {
                            self.ts = Some(t.with_timezone(&Utc));
                            self.have_ts = true;
                        }
                        &b[i + 1..]
                    }
                    None => {
                        // Not a timestamp: it is text, keep it.
                        self.stats.bad_timestamps += 1;
                        let prefix = std::mem::take(&mut self.ts_buf);
                        self.append(&prefix);
                        return Some(&b[i..]);
                    }
                };
                self.ts_buf.clear();
                Some(rest)
            }
            None if self.ts_buf.len() + b.len() <= MAX_TS && !self.records => {
                self.ts_buf.extend_from_slice(b);
                None
            }
            _ => {
                self.stats.bad_timestamps += 1;
                let prefix = std::mem::take(&mut self.ts_buf);
                self.append(&prefix);
                Some(b)
            }
        }
    }

    /// Feeds one chunk of the stream, appending complete lines to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Line>) {
        let mut rest = chunk;
        if self.records && !rest.is_empty() {
            self.at_record_start = true;
        }
        while !rest.is_empty() {
            if self.at_record_start {
                match self.strip_ts(rest) {
                    Some(r) => {
                        rest = r;
                        self.at_record_start = false;
                    }
                    None => return,
                }
            }
            match rest.iter().position(|&c| c == b'\n') {
                Some(i) => {
                    self.append(&rest[..i]);
                    self.finish(out);
                    rest = &rest[i + 1..];
                    self.at_record_start = true;
                }
                None => {
                    self.append(rest);
                    rest = &[];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: &str = "2026-11-22T10:00:00.123456789Z";

    fn lines(records: bool, max: usize, chunks: &[&[u8]]) -> (Vec<Line>, LineStats) {
        let mut a = LineAssembler::new(records, max);
        let mut out = Vec::new();
        for c in chunks {
            a.push(c, &mut out);
        }
        (out, a.stats())
    }

    #[test]
    fn timestamps_are_validated_and_stripped() {
        let rec = format!("{TS} hello world\n");
        let (out, st) = lines(true, MAX_LINE, &[rec.as_bytes(), b"not-a-time says hi\n"]);
        assert_eq!(out[0].text, "hello world");
        assert_eq!(
            out[0].ts.unwrap().to_rfc3339(),
            "2026-11-22T10:00:00.123456789+00:00"
        );
        assert_eq!(out[1].text, "not-a-time says hi");
        assert_eq!(out[1].ts, None);
        assert_eq!(st.bad_timestamps, 1);
    }

    #[test]
    fn partial_records_join_into_one_line() {
        let a = format!("{TS} first half ");
        let b = "2026-11-22T10:00:00.2Z second half\n".to_string();
        let (out, st) = lines(true, MAX_LINE, &[a.as_bytes(), b.as_bytes()]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].text, "first half second half");
        assert_eq!(out[0].ts.unwrap().timestamp_subsec_nanos(), 123_456_789);
        assert_eq!(st.lines, 1);
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        // 'é' is two bytes: a cap of 6 falls inside the fourth one.
        let rec = format!("{TS} ééééé tail\n");
        let next = format!("{TS} next\n");
        let (out, st) = lines(true, 7, &[rec.as_bytes(), next.as_bytes()]);
        assert_eq!(out[0].text, "ééé");
        assert!(out[0].truncated);
        assert_eq!(st.truncated, 1);
        assert_eq!(st.skipped_bytes as usize, "ééééé tail".len() - "ééé".len());
        // The rest was skipped to the newline only: the next line is whole.
        assert_eq!(out[1].text, "next");
        assert!(!out[1].truncated);
    }

    #[test]
    fn invalid_utf8_is_replaced_and_counted() {
        let mut rec = format!("{TS} bad ").into_bytes();
        rec.extend_from_slice(&[0xff, 0xfe]);
        rec.push(b'\n');
        let (out, st) = lines(true, MAX_LINE, &[&rec]);
        assert_eq!(out[0].text, "bad \u{fffd}\u{fffd}");
        assert_eq!(st.invalid_utf8, 1);
    }

    #[test]
    fn tty_reads_split_anywhere_give_the_same_lines() {
        let body = format!("{TS} one\n{TS} two three\n");
        let bytes = body.as_bytes();
        for cut in 1..bytes.len() {
            let (out, st) = lines(false, MAX_LINE, &[&bytes[..cut], &bytes[cut..]]);
            let texts: Vec<&str> = out.iter().map(|l| l.text.as_str()).collect();
            assert_eq!(texts, ["one", "two three"], "cut at {cut}");
            assert_eq!(st.bad_timestamps, 0, "cut at {cut}");
        }
    }
}
