//! Lines of one container stream: the RFC 3339 timestamp Docker puts before each record is
//! validated and stripped, 16 KiB partial records are joined, lines are capped (cut on a
//! character boundary, the rest skipped to the next newline) and invalid UTF-8 is replaced —
//! each of these counted.

use chrono::{DateTime, Utc};

use crate::pipeline::messages::{Line, Pos};

/// Default cap on one reassembled line: 1 MiB.
pub const MAX_LINE: usize = crate::config::DEFAULT_MAX_LINE_BYTES;

/// Longest timestamp prefix accepted ("2006-01-02T15:04:05.999999999+07:00" is 35 bytes).
const MAX_TS: usize = 40;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

// A digest that must stay the same across builds and versions (it is persisted): FNV-1a,
// not std's or foldhash's seeded hashers.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
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

/// Where a container's log stands: the position of each record, shared by the assemblers of
/// its streams (Docker interleaves stdout and stderr records in one sequence), and the
/// records a resume skips because they were consumed before.
#[derive(Debug, Default)]
pub struct RecordCursor {
    rec: Option<Pos>,
    resume: Option<Pos>,
    skipping: bool,
    /// Records skipped on resume.
    pub resumed_skipped: u64,
    /// Resumes whose saved record came back with another digest or not at all (the log was
    /// rotated or rewritten).
    pub resume_mismatches: u64,
}

impl RecordCursor {
    /// A cursor that skips every record up to and including `pos` (saved from
    /// [`Line::end`]), for a stream reopened with `since` = [`Pos::since_param`].
    pub fn resuming(pos: Option<Pos>) -> Self {
        RecordCursor {
            resume: pos,
            ..Self::default()
        }
    }

    /// Gives the next record its position, and decides whether it is skipped.
    fn start(&mut self, t: DateTime<Utc>) {
        let ts_ns = t.timestamp_nanos_opt().unwrap_or(i64::MAX);
        let rank = match self.rec {
            Some(p) if p.ts_ns == ts_ns => p.rank + 1,
            _ => 1,
        };
        self.rec = Some(Pos {
            ts_ns,
            rank,
            digest: FNV_OFFSET,
        });
        if let Some(r) = self.resume {
            if (ts_ns, rank) <= (r.ts_ns, r.rank) {
                self.skipping = true;
                self.resumed_skipped += 1;
            } else {
                // Rank 0 is "from this instant on", with no record to find; otherwise the
                // saved record never came back: the log was rotated or rewritten.
                if r.rank > 0 {
                    self.resume_mismatches += 1;
                }
                self.resume = None;
            }
        }
    }

    fn digest(&mut self, seg: &[u8]) {
        if let Some(r) = self.rec.as_mut() {
            r.digest = fnv(r.digest, seg);
        }
    }

    /// A record is complete: when it was the saved one, check its digest and stop skipping.
    /// Returns whether it was skipped.
    fn end(&mut self) -> bool {
        if !std::mem::take(&mut self.skipping) {
            return false;
        }
        if let (Some(rec), Some(r)) = (self.rec, self.resume)
            && (rec.ts_ns, rec.rank) == (r.ts_ns, r.rank)
        {
            if rec.digest != r.digest {
                self.resume_mismatches += 1;
            }
            self.resume = None;
        }
        true
    }
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

    /// The stream ended: a line still waiting for its newline is complete as it is (a
    /// container that exits without a final newline).
    pub fn flush(&mut self, cur: &RecordCursor, out: &mut Vec<Line>) {
        if !self.ts_buf.is_empty() {
            // The stream ended inside what could have been a timestamp (a TTY read keeps up
            // to MAX_TS bytes of one): it was not, and its bytes are text like any other.
            self.stats.bad_timestamps += 1;
            let prefix = std::mem::take(&mut self.ts_buf);
            self.append(&prefix);
        }
        if !cur.skipping && (!self.line.is_empty() || self.truncated) {
            self.finish(cur.rec, out);
        }
    }

    /// Whether part of a line is waiting for its newline.
    pub fn pending(&self) -> bool {
        !self.line.is_empty() || self.have_ts || self.truncated || !self.ts_buf.is_empty()
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

    /// `String::from_utf8_lossy` within the cap: a replacement character takes 3 bytes where
    /// the bad sequence may have taken 1, so a line of stray bytes would triple past
    /// `max_line`. What does not fit is cut like any long line, and counted.
    fn lossy(&mut self, raw: &[u8]) -> String {
        let mut text = String::with_capacity(raw.len().min(self.max_line));
        let mut kept = 0;
        for chunk in raw.utf8_chunks() {
            let valid = chunk.valid();
            let room = self.max_line - text.len();
            if valid.len() > room {
                let mut cut = room;
                while !valid.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.push_str(&valid[..cut]);
                kept += cut;
                break;
            }
            text.push_str(valid);
            kept += valid.len();
            let bad = chunk.invalid().len();
            if bad > 0 {
                if self.max_line - text.len() < char::REPLACEMENT_CHARACTER.len_utf8() {
                    break;
                }
                text.push(char::REPLACEMENT_CHARACTER);
                kept += bad;
            }
        }
        if kept < raw.len() {
            self.stats.skipped_bytes += (raw.len() - kept) as u64;
            self.truncated = true;
        }
        text
    }

    fn finish(&mut self, end: Option<Pos>, out: &mut Vec<Line>) {
        let bytes = std::mem::take(&mut self.line);
        let text = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                self.stats.invalid_utf8 += 1;
                self.lossy(e.as_bytes())
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
            end,
        });
        self.have_ts = false;
    }

    /// Consumes the timestamp prefix at a record start; returns the rest of `b`, or None
    /// when `b` ended inside the prefix (TTY reads may split it).
    fn strip_ts<'a>(&mut self, b: &'a [u8], cur: &mut RecordCursor) -> Option<&'a [u8]> {
        match b.iter().position(|&c| c == b' ' || c == b'\n') {
            Some(i) if b[i] == b' ' && self.ts_buf.len() + i <= MAX_TS => {
                self.ts_buf.extend_from_slice(&b[..i]);
                let parsed = std::str::from_utf8(&self.ts_buf)
                    .ok()
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
                let rest = match parsed {
                    Some(t) => {
                        cur.start(t.with_timezone(&Utc));
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
    pub fn push(&mut self, chunk: &[u8], cur: &mut RecordCursor, out: &mut Vec<Line>) {
        let mut rest = chunk;
        if self.records && !rest.is_empty() {
            self.at_record_start = true;
        }
        while !rest.is_empty() {
            if self.at_record_start {
                match self.strip_ts(rest, cur) {
                    Some(r) => {
                        rest = r;
                        self.at_record_start = false;
                    }
                    None => return,
                }
            }
            let nl = rest.iter().position(|&c| c == b'\n');
            let seg = &rest[..nl.unwrap_or(rest.len())];
            cur.digest(seg);
            if !cur.skipping {
                self.append(seg);
            }
            match nl {
                Some(i) => {
                    if !cur.skipping {
                        self.finish(cur.rec, out);
                    }
                    self.end_record(cur);
                    rest = &rest[i + 1..];
                    self.at_record_start = true;
                }
                None => rest = &[],
            }
        }
        if self.records && !chunk.is_empty() {
            // A chunk is one whole record, partial or not.
            self.end_record(cur);
        }
    }

    fn end_record(&mut self, cur: &mut RecordCursor) {
        if cur.end() {
            // Skipped records belong to lines consumed before: none of their state carries
            // over to the next line.
            self.ts = None;
            self.have_ts = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: &str = "2026-11-22T10:00:00.123456789Z";

    fn lines(records: bool, max: usize, chunks: &[&[u8]]) -> (Vec<Line>, LineStats) {
        let mut a = LineAssembler::new(records, max);
        let mut cur = RecordCursor::default();
        let mut out = Vec::new();
        for c in chunks {
            a.push(c, &mut cur, &mut out);
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

    fn record(ts: &str, text: &str) -> Vec<u8> {
        format!("{ts} {text}").into_bytes()
    }

    #[test]
    fn resuming_at_a_line_end_neither_repeats_nor_skips() {
        const T1: &str = "2026-11-22T10:00:01Z";
        const T2: &str = "2026-11-22T10:00:02Z";
        // Two lines share T1; a long line is split into partials at T1 and T2.
        let recs = [
            record(T1, "one\n"),
            record(T1, "two\n"),
            record(T1, "long "),
            record(T2, "line\n"),
            record(T2, "three\n"),
            record(T2, "four\n"),
        ];
        let chunks: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
        let (all, _) = lines(true, MAX_LINE, &chunks);
        let texts: Vec<&str> = all.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "long line", "three", "four"]);
        for (i, l) in all.iter().enumerate() {
            let pos = l.end.unwrap();
            // Docker resends every record at or after the saved instant.
            let since = all[i].end.unwrap().ts_ns;
            let resent: Vec<&[u8]> = recs
                .iter()
                .filter(|r| {
                    let t = DateTime::parse_from_rfc3339(std::str::from_utf8(&r[..20]).unwrap())
                        .unwrap();
                    t.timestamp_nanos_opt().unwrap() >= since
                })
                .map(Vec::as_slice)
                .collect();
            let mut a = LineAssembler::new(true, MAX_LINE);
            let mut cur = RecordCursor::resuming(Some(pos));
            let mut out = Vec::new();
            for c in &resent {
                a.push(c, &mut cur, &mut out);
            }
            let got: Vec<&str> = out.iter().map(|l| l.text.as_str()).collect();
            assert_eq!(got, texts[i + 1..], "resumed after line {i}");
            assert_eq!(cur.resume_mismatches, 0, "resumed after line {i}");
            assert_eq!(
                out.first().map(|l| l.ts.is_some()),
                (i + 1 < texts.len()).then_some(true)
            );
        }
        // A rewritten record is counted, and nothing after it is lost.
        let mut pos = all[1].end.unwrap();
        pos.digest ^= 1;
        let mut a = LineAssembler::new(true, MAX_LINE);
        let mut cur = RecordCursor::resuming(Some(pos));
        let mut out = Vec::new();
        for c in &chunks {
            a.push(c, &mut cur, &mut out);
        }
        assert_eq!(out.len(), 3);
        assert_eq!(cur.resume_mismatches, 1);
        assert_eq!(cur.resumed_skipped, 2);
    }

    #[test]
    fn resuming_a_tty_stream_skips_by_newline() {
        let body = format!("{TS} one\n{TS} two\n{TS} three\n");
        let (all, _) = lines(false, MAX_LINE, &[body.as_bytes()]);
        let pos = all[1].end.unwrap();
        assert_eq!(pos.rank, 2);
        assert_eq!(pos.since_param(), "1795341600.123456789");
        let bytes = body.as_bytes();
        for cut in 1..bytes.len() {
            let mut a = LineAssembler::new(false, MAX_LINE);
            let mut cur = RecordCursor::resuming(Some(pos));
            let mut out = Vec::new();
            a.push(&bytes[..cut], &mut cur, &mut out);
            a.push(&bytes[cut..], &mut cur, &mut out);
            let got: Vec<&str> = out.iter().map(|l| l.text.as_str()).collect();
            assert_eq!(got, ["three"], "cut at {cut}");
        }
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
    fn replaced_bytes_stay_within_the_cap() {
        // Found by tests/hostile_bytes.rs: 8 stray bytes under a cap of 8 became 24 bytes of
        // U+FFFD. Now 2 replacements fit, the other 6 bytes are cut and counted.
        let mut rec = format!("{TS} ").into_bytes();
        rec.extend_from_slice(&[0xff; 8]);
        rec.push(b'\n');
        let (out, st) = lines(true, 8, &[&rec]);
        assert_eq!(out[0].text, "\u{fffd}\u{fffd}");
        assert!(out[0].truncated);
        assert_eq!((st.invalid_utf8, st.truncated, st.skipped_bytes), (1, 1, 6));
        // Valid text before the bad byte is cut on a character boundary.
        let mut rec = format!("{TS} ab\u{e9}").into_bytes();
        rec.extend_from_slice(&[0xff, b'c', b'\n']);
        let (out, st) = lines(true, 5, &[&rec]);
        assert_eq!(out[0].text, "ab\u{e9}");
        assert_eq!((st.truncated, st.skipped_bytes), (1, 2));
    }

    #[test]
    fn a_tty_stream_ending_inside_a_timestamp_keeps_its_bytes() {
        // Found by tests/hostile_bytes.rs: a TTY stream whose last bytes held no space were
        // kept as a possible timestamp prefix and silently lost at the end of the stream.
        let mut a = LineAssembler::new(false, MAX_LINE);
        let mut cur = RecordCursor::default();
        let mut out = Vec::new();
        a.push(b"tail-without-space", &mut cur, &mut out);
        assert!(out.is_empty() && a.pending());
        a.flush(&cur, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].text, "tail-without-space");
        assert_eq!(a.stats().bad_timestamps, 1);
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
