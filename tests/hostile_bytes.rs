//! Hostile bytes (issue 11, item 7). Container output, netlink datagrams and config text are
//! input the agent does not control, so each decoder is fed random bytes and mutations of
//! valid encodings (flipped bytes, truncations, splices, length fields that lie) and must
//! not panic, must allocate in proportion to its input and its caps (never to what a length
//! field claims), and must account for every bad input in its counters or errors.
//!
//! One campaign per target, each case drawn from its own seeded random bytes through
//! `arbitrary::Unstructured`:
//! - `NATTRAIL_FUZZ_CASES`: cases per target (default: a campaign of a few seconds, so that
//!   `cargo test` runs it; `cargo xtask fuzz` runs millions);
//! - `NATTRAIL_FUZZ_SEED`: base seed (decimal or 0x-hex; default fixed, so CI is repeatable);
//! - `NATTRAIL_FUZZ_FIRST`: index of the first case, to replay one failure with CASES=1.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::Instant;

use arbitrary::Unstructured;
use chrono::{FixedOffset, SecondsFormat, TimeZone, Utc};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use nattrail::config::{self, Config, ConfigError};
use nattrail::conntrack::capture_file::read_datagrams;
use nattrail::conntrack::decode::{self, DecodeError, Message};
use nattrail::docker::frames::{Chunk, FrameDecoder, FrameStats, MAX_FRAME};
use nattrail::docker::lines::{LineAssembler, LineStats, MAX_LINE, RecordCursor};
use nattrail::pipeline::flow::EventKind;
use nattrail::pipeline::messages::{Line, Pos, Stream};

/// Cases per target when NATTRAIL_FUZZ_CASES is unset: a few seconds in all on two cores.
const DEFAULT_CASES: u64 = 100_000;
/// Base seed when NATTRAIL_FUZZ_SEED is unset.
const DEFAULT_SEED: u64 = 0x6e61_7474_7261_696c;

/// Datagrams captured from the lab NAT (`cargo xtask capture-fixture`): the netlink seeds.
const CONNTRACK_FIXTURE: &[u8] = include_bytes!("fixtures/conntrack-lab.bin");
/// The README's configuration, every key with its default: the config seed.
const README: &str = include_str!("../README.md");

// ---------------------------------------------------------------------------------------
// Allocation accounting

/// The system allocator, counting per thread the bytes live and their peak, so a case can
/// assert what it allocated (the campaigns run on parallel test threads).
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // try_with: the allocator also runs while a thread's locals are torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most bytes this thread held meanwhile beyond
/// what it held before (the result's own allocations included).
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, (peak - base).max(0) as usize)
}

// ---------------------------------------------------------------------------------------
// The campaign driver

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?}: {e}")))
}

/// Runs `body` on `NATTRAIL_FUZZ_CASES` cases, each on up to `max_entropy` random bytes of
/// its own (so one case replays alone from the seed and its index), and reports the rate.
/// `body` names the outcome of its case, one of `outcomes`; a campaign of 10,000 cases or
/// more must reach each of them, or its generator has stopped reaching the error paths.
fn campaign(
    target: &str,
    max_entropy: usize,
    outcomes: &[&'static str],
    mut body: impl FnMut(&mut Src<'_>) -> &'static str,
) {
    let cases = env_u64("NATTRAIL_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    let seed = env_u64("NATTRAIL_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let first = env_u64("NATTRAIL_FUZZ_FIRST").unwrap_or(0);
    let mut entropy = vec![0u8; max_entropy];
    let mut seen = vec![0u64; outcomes.len()];
    let start = Instant::now();
    for case in first..first.saturating_add(cases) {
        let mut rng = SmallRng::seed_from_u64(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let len = rng.next_u32() as usize % (max_entropy + 1);
        rng.fill_bytes(&mut entropy[..len]);
        let mut src = Src(Unstructured::new(&entropy[..len]));
        match catch_unwind(AssertUnwindSafe(|| body(&mut src))) {
            Ok(outcome) => {
                let i = outcomes
                    .iter()
                    .position(|&o| o == outcome)
                    .unwrap_or_else(|| panic!("{target}: undeclared outcome {outcome}"));
                seen[i] += 1;
            }
            Err(panic) => {
                eprintln!(
                    "hostile_bytes {target}: case {case} failed; replay it with \
                     NATTRAIL_FUZZ_SEED={seed} NATTRAIL_FUZZ_FIRST={case} NATTRAIL_FUZZ_CASES=1 \
                     cargo test --release -p nattrail --test hostile_bytes {target}"
                );
                resume_unwind(panic);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let tally: Vec<String> = outcomes
        .iter()
        .zip(&seen)
        .map(|(o, n)| format!("{o} {n}"))
        .collect();
    eprintln!(
        "hostile_bytes {target}: {cases} cases in {secs:.1} s = {:.0} cases/s (seed {seed}; {})",
        cases as f64 / secs.max(1e-9),
        tally.join(", ")
    );
    if cases >= 10_000 {
        for (o, n) in outcomes.iter().zip(&seen) {
            assert!(*n > 0, "{target}: no case reached {o} in {cases}");
        }
    }
}

/// The choices of one case, drawn from its random bytes. Once they run out every draw is its
/// smallest value and every chance is lost, so a short input is a small case.
struct Src<'a>(Unstructured<'a>);

impl Src<'_> {
    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        self.0.int_in_range(0..=n - 1).unwrap_or(0)
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) >= den - num
    }

    fn byte(&mut self) -> u8 {
        self.0.arbitrary().unwrap_or(0)
    }

    fn u64(&mut self) -> u64 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// Appends up to `n` random bytes (fewer when the case's bytes run out).
    fn fill(&mut self, n: usize, out: &mut Vec<u8>) {
        let n = n.min(self.0.len());
        out.extend_from_slice(self.0.bytes(n).unwrap_or_default());
    }

    fn pick<'b, T>(&mut self, items: &'b [T]) -> &'b T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------
// Mutations

/// Where a valid encoding keeps a length, so that a mutation can make it lie.
#[derive(Debug, Clone, Copy)]
struct LenField {
    at: usize,
    width: usize,
    big_endian: bool,
}

impl LenField {
    fn read(&self, b: &[u8]) -> u64 {
        let bytes = b[self.at..self.at + self.width].iter();
        let fold = |v: u64, &byte: &u8| (v << 8) | u64::from(byte);
        if self.big_endian {
            bytes.fold(0, fold)
        } else {
            bytes.rev().fold(0, fold)
        }
    }

    fn write(&self, b: &mut [u8], v: u64) {
        for (i, byte) in b[self.at..self.at + self.width].iter_mut().enumerate() {
            let shift = 8 * if self.big_endian {
                self.width - 1 - i
            } else {
                i
            };
            *byte = (v >> shift) as u8;
        }
    }
}

/// Bytes that change a decoder's path: zero, sign bits, all ones, separators.
const INTERESTING: &[u8] = &[
    0, 1, 2, 0x7f, 0x80, 0xff, b' ', b'\n', b'0', b'Z', 0xc3, 0xef,
];

/// Applies one to four mutations to `buf`; returns whether it changed. Lies in length fields
/// come first, while the offsets in `fields` are still right: the edges of the field's
/// width, off-by-ones, doubling and the decoder's `cap` and one past it. Then bit flips,
/// interesting bytes, truncation, deletion, duplication of a slice of itself, random
/// insertions, tokens of `dict`, and splices with `other` (another valid encoding).
fn mutate(
    src: &mut Src<'_>,
    buf: &mut Vec<u8>,
    fields: &[LenField],
    cap: u64,
    dict: &[&[u8]],
    other: &[u8],
) -> bool {
    let before = buf.clone();
    for _ in 0..1 + src.below(4) {
        let len = buf.len();
        match src.below(10) {
            0 | 1 if !fields.is_empty() => {
                let f = *src.pick(fields);
                if f.at + f.width > len {
                    continue;
                }
                let max = (1u64 << (8 * f.width)) - 1;
                let orig = f.read(buf);
                let lie = match src.below(10) {
                    0 => 0,
                    1 => max,
                    2 => max - 1,
                    3 => orig + 1,
                    4 => orig.saturating_sub(1),
                    5 => orig.saturating_mul(2),
                    6 => cap,
                    7 => cap.saturating_add(1),
                    8 => src.below(24) as u64,
                    _ => src.u64(),
                };
                f.write(buf, lie & max);
            }
            2 if len > 0 => {
                let i = src.below(len);
                buf[i] ^= 1 << src.below(8);
            }
            3 if len > 0 => {
                let i = src.below(len);
                buf[i] = *src.pick(INTERESTING);
            }
            4 => buf.truncate(src.below(len + 1)),
            5 if len > 0 => {
                let i = src.below(len);
                let n = 1 + src.below((len - i).min(64));
                buf.drain(i..i + n);
            }
            6 if len > 0 => {
                let i = src.below(len);
                let n = 1 + src.below((len - i).min(64));
                let at = src.below(len + 1);
                let copy = buf[i..i + n].to_vec();
                buf.splice(at..at, copy);
            }
            7 => {
                let at = src.below(len + 1);
                let mut ins = Vec::new();
                let n = 1 + src.below(16);
                src.fill(n, &mut ins);
                buf.splice(at..at, ins);
            }
            8 if !dict.is_empty() => {
                let at = src.below(len + 1);
                let token = *src.pick(dict);
                buf.splice(at..at, token.iter().copied());
            }
            _ if !other.is_empty() => {
                let at = src.below(len + 1);
                let from = src.below(other.len());
                let n = src.below(other.len() - from + 1);
                buf.truncate(at);
                buf.extend_from_slice(&other[from..from + n]);
            }
            _ => {}
        }
    }
    *buf != before
}

/// Cuts `buf` into up to eight pieces at random places (empty pieces included), as reads
/// of a socket would.
fn split<'a>(src: &mut Src<'_>, buf: &'a [u8]) -> Vec<&'a [u8]> {
    let n = src.below(8);
    let mut cuts: Vec<usize> = (0..n).map(|_| src.below(buf.len() + 1)).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::with_capacity(n + 1);
    let mut from = 0;
    for c in cuts {
        pieces.push(&buf[from..c]);
        from = c;
    }
    pieces.push(&buf[from..]);
    pieces
}

// ---------------------------------------------------------------------------------------
// Docker frames

/// The multiplexed stream decoded at once, the simplest way: what the incremental decoder
/// must deliver and count whatever the read boundaries. Also returns the bytes left
/// undecided at the end (a partial header, or a header and part of its payload).
fn reference_frames(body: &[u8], max_frame: usize) -> (Vec<Chunk>, FrameStats, usize) {
    let mut chunks = Vec::new();
    let mut st = FrameStats::default();
    let mut at = 0;
    while body.len() - at >= 8 {
        let h = &body[at..at + 8];
        let size = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let after = body.len() - at - 8;
        let stream = match h[0] {
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
        };
        match stream {
            Some(stream) if size <= max_frame => {
                if after < size {
                    break;
                }
                chunks.push(Chunk {
                    stream,
                    bytes: body[at + 8..at + 8 + size].to_vec(),
                });
                st.frames += 1;
                at += 8 + size;
            }
            _ => {
                if size > max_frame {
                    st.oversized += 1;
                } else {
                    st.bad_stream += 1;
                }
                let skipped = size.min(after);
                st.skipped_bytes += skipped as u64;
                at += 8 + skipped;
            }
        }
    }
    (chunks, st, body.len() - at)
}

/// Random bytes or a few frames (some with a bad stream byte or over the cap), mutated, fed
/// in random pieces to a decoder with a random cap; checked against the reference.
fn frames_case(src: &mut Src<'_>) -> &'static str {
    let tty = src.chance(1, 8);
    let max_frame = match src.below(4) {
        0 => MAX_FRAME,
        1 => src.below(4),
        _ => src.below(256),
    };
    let mut body = Vec::new();
    let mut fields = Vec::new();
    if src.chance(1, 8) {
        let n = src.below(512);
        src.fill(n, &mut body);
    } else {
        for _ in 0..src.below(8) {
            let stream = match src.below(8) {
                0..=2 => 1,
                3..=5 => 2,
                6 => 0,
                _ => src.byte(),
            };
            let size = src.below(max_frame.min(128) + 16);
            fields.push(LenField {
                at: body.len() + 4,
                width: 4,
                big_endian: true,
            });
            body.extend_from_slice(&[stream, 0, 0, 0]);
            body.extend_from_slice(&(size as u32).to_be_bytes());
            // Fewer bytes when the case's entropy runs out: a frame cut by the end of input.
            src.fill(size, &mut body);
        }
        if src.chance(3, 4) {
            mutate(src, &mut body, &fields, max_frame as u64, &[], &[]);
        }
    }
    let pieces = split(src, &body);
    let mut dec = FrameDecoder::new(tty, max_frame);
    let (out, peak) = peak_during(|| {
        let mut out = Vec::new();
        for p in &pieces {
            dec.feed(p, &mut out);
        }
        out
    });
    let stats = dec.stats();
    // A header may make the decoder reserve up to 1 MiB for a frame within the cap.
    let bound = 16 * body.len() + max_frame.min(1 << 20) + 4096;
    assert!(peak <= bound, "allocated {peak} B for {} B", body.len());
    if tty {
        let want: Vec<Chunk> = pieces
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| Chunk {
                stream: Stream::Stdout,
                bytes: p.to_vec(),
            })
            .collect();
        assert_eq!(
            stats,
            FrameStats {
                frames: want.len() as u64,
                ..FrameStats::default()
            }
        );
        assert_eq!(out, want);
        return "tty";
    }
    let (want, want_stats, pending) = reference_frames(&body, max_frame);
    assert_eq!(stats, want_stats, "body {body:02x?} cut {pieces:02x?}");
    assert_eq!(out, want);
    // Every byte is a header counted as delivered, oversized or bad, a delivered payload
    // byte, a counted skipped byte, or one of the few still waiting for the rest of a frame.
    let delivered: usize = out.iter().map(|c| c.bytes.len()).sum();
    let headers = (stats.frames + stats.oversized + stats.bad_stream) as usize;
    assert_eq!(
        8 * headers + delivered + stats.skipped_bytes as usize + pending,
        body.len()
    );
    assert!(pending < 8 + max_frame, "{pending} bytes pending");
    assert!(out.iter().all(|c| c.bytes.len() <= max_frame));
    match stats {
        FrameStats { oversized: 1.., .. } => "oversized",
        FrameStats {
            bad_stream: 1.., ..
        } => "bad stream",
        _ if pending > 0 => "cut",
        _ => "clean",
    }
}

#[test]
fn docker_frames() {
    campaign(
        "docker_frames",
        2048,
        &["clean", "oversized", "bad stream", "cut", "tty"],
        frames_case,
    );
}

// ---------------------------------------------------------------------------------------
// Log lines

/// Docker's timestamps as a hostile stream may get them wrong: impossible dates, a missing
/// space, a prefix too long to be one, an empty one.
const BAD_TS: &[&[u8]] = &[
    b"2026-13-45T10:00:00Z ",
    b"2026-11-22T25:61:00.5+07:00 ",
    b"2026-11-22T10:00:00Z",
    b"2026-11-22T10:00:00.1234567890123456789012345678Z ",
    b" ",
    b"not-a-time ",
    b"\n",
];

/// Characters of 1 to 4 bytes for text that is valid UTF-8.
const UTF8_CHARS: &[char] = &['a', 'z', ' ', '.', 'é', 'ß', '€', '你', '𝄞', '\t'];

/// Record starts of `buf` (its start, and after each newline with bytes after it): how many
/// carry a timestamp the assembler must strip, the bytes stripped (with the space), and
/// how many carry none it must count as bad.
fn ts_accounting(buf: &[u8]) -> (usize, u64, u64) {
    let (mut stripped, mut valid, mut bad) = (0, 0, 0);
    let mut at = 0;
    while at < buf.len() {
        let rest = &buf[at..];
        let ok = match rest.iter().position(|&c| c == b' ' || c == b'\n') {
            Some(q) if rest[q] == b' ' && q <= 40 => std::str::from_utf8(&rest[..q])
                .is_ok_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok())
                .then_some(q),
            _ => None,
        };
        match ok {
            Some(q) => {
                valid += 1;
                stripped += q + 1;
            }
            None => bad += 1,
        }
        match rest.iter().position(|&c| c == b'\n') {
            Some(n) => at += n + 1,
            None => break,
        }
    }
    (stripped, valid, bad)
}

/// What holds for any output: the counters agree with the lines, and no line exceeds the
/// cap (a cut one ends within one character of it).
fn check_lines(out: &[Line], st: &LineStats, max_line: usize, input: &[&[u8]]) {
    assert_eq!(st.lines, out.len() as u64);
    assert_eq!(
        st.truncated,
        out.iter().filter(|l| l.truncated).count() as u64
    );
    assert!(st.invalid_utf8 <= st.lines);
    for l in out {
        assert!(
            l.text.len() <= max_line,
            "line of {} B over the {max_line} B cap: {:?} from {input:02x?}",
            l.text.len(),
            l.text
        );
        if l.truncated {
            assert!(l.text.len() + 3 >= max_line, "cut short: {l:?}");
        }
    }
}

/// Feeds every chunk to a new assembler and flushes it, as at the end of a stream.
fn run_lines(
    records: bool,
    max_line: usize,
    chunks: &[&[u8]],
    cur: &mut RecordCursor,
) -> (Vec<Line>, LineStats, usize) {
    let mut asm = LineAssembler::new(records, max_line);
    let (out, peak) = peak_during(|| {
        let mut out = Vec::new();
        for c in chunks {
            asm.push(c, cur, &mut out);
        }
        asm.flush(cur, &mut out);
        out
    });
    (out, asm.stats(), peak)
}

/// Records with good, bad or no timestamps and ASCII, UTF-8 or random text, mutated, fed as
/// records or as TTY reads cut anywhere, under a random cap; then resumed from a position.
fn lines_case(src: &mut Src<'_>) -> &'static str {
    let records = src.chance(1, 2);
    let max_line = match src.below(4) {
        0 => MAX_LINE,
        1 => src.below(4),
        _ => 1 + src.below(96),
    };
    let alphabet = src.below(3);
    let mut ts_ns = 1_795_341_600_000_000_000 + src.below(1 << 20) as i64 * 1_000_000;
    let mut recs: Vec<Vec<u8>> = Vec::new();
    for _ in 0..src.below(12) {
        let mut r = Vec::new();
        match src.below(8) {
            0 => {}
            1 => r.extend_from_slice(src.pick::<&[u8]>(BAD_TS)),
            _ => {
                // Records often share an instant: ranks tell them apart on resume.
                ts_ns += [0, 1, 1_000, 999_999_999][src.below(4)];
                let t = Utc.timestamp_nanos(ts_ns);
                let form = *src.pick(&[
                    SecondsFormat::Nanos,
                    SecondsFormat::AutoSi,
                    SecondsFormat::Secs,
                ]);
                let s = if src.chance(1, 4) {
                    let east = FixedOffset::east_opt(7 * 3600).expect("valid offset");
                    t.with_timezone(&east).to_rfc3339_opts(form, false)
                } else {
                    t.to_rfc3339_opts(form, true)
                };
                r.extend_from_slice(s.as_bytes());
                r.push(b' ');
            }
        }
        let n = if src.chance(1, 8) {
            src.below(2 * max_line.min(256) + 8)
        } else {
            src.below(24)
        };
        match alphabet {
            0 => r.extend((0..n).map(|_| b' ' + src.below(95) as u8)),
            1 => {
                for _ in 0..n {
                    let mut b = [0u8; 4];
                    r.extend_from_slice(src.pick(UTF8_CHARS).encode_utf8(&mut b).as_bytes());
                }
            }
            _ => src.fill(n, &mut r),
        }
        if !src.chance(1, 4) {
            r.push(b'\n');
        }
        recs.push(r);
    }
    let stream: Vec<u8>;
    let chunks: Vec<&[u8]> = if records {
        for _ in 0..src.below(3) {
            if recs.is_empty() {
                break;
            }
            let i = src.below(recs.len());
            let other = recs[src.below(recs.len())].clone();
            mutate(src, &mut recs[i], &[], 0, BAD_TS, &other);
        }
        stream = Vec::new();
        recs.iter().map(Vec::as_slice).collect()
    } else {
        let mut s = recs.concat();
        if src.chance(1, 2) {
            let other = s.clone();
            mutate(src, &mut s, &[], 0, BAD_TS, &other);
        }
        stream = s;
        split(src, &stream)
    };
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let (out, st, peak) = run_lines(records, max_line, &chunks, &mut RecordCursor::default());
    check_lines(&out, &st, max_line, &chunks);
    let line_size = std::mem::size_of::<Line>();
    let bound = 8 * total + 2 * line_size * (out.len() + 1) + 4096;
    assert!(peak <= bound, "allocated {peak} B for {total} B");

    // In records mode every chunk starts a record; without records the stream is one.
    let starts: Vec<&[u8]> = if records {
        chunks.clone()
    } else {
        vec![&stream]
    };
    let (mut stripped, mut valid, mut bad) = (0, 0, 0);
    for s in &starts {
        let (a, b, c) = ts_accounting(s);
        stripped += a;
        valid += b;
        bad += c;
    }
    assert_eq!(
        st.bad_timestamps, bad,
        "records {records} chunks {chunks:?}"
    );
    let concat = chunks.concat();
    if std::str::from_utf8(&concat).is_ok() {
        // Text that was valid stays so, and every byte is a stripped timestamp, a newline,
        // text delivered or a counted skipped byte: none vanishes.
        assert_eq!(st.invalid_utf8, 0);
        let newlines = concat.iter().filter(|&&c| c == b'\n').count();
        let text: usize = out.iter().map(|l| l.text.len()).sum();
        assert_eq!(
            stripped + newlines + text + st.skipped_bytes as usize,
            total,
            "records {records} max {max_line} chunks {chunks:?} -> {out:?} {st:?}"
        );
    }

    if src.chance(1, 2) {
        let pos = match out.iter().filter_map(|l| l.end).collect::<Vec<Pos>>() {
            ends if !ends.is_empty() && src.chance(3, 4) => Some(ends[src.below(ends.len())]),
            _ => Some(Pos {
                ts_ns: ts_ns - src.below(3) as i64,
                rank: src.below(4) as u32,
                digest: src.u64(),
            }),
        };
        let mut cur = RecordCursor::resuming(pos);
        let (again, st2, _) = run_lines(records, max_line, &chunks, &mut cur);
        check_lines(&again, &st2, max_line, &chunks);
        assert!(cur.resume_mismatches <= 1);
        assert!(cur.resumed_skipped <= valid);
        assert!(again.len() <= out.len());
        assert_eq!(st2.bad_timestamps, st.bad_timestamps);
    }
    match st {
        LineStats { truncated: 1.., .. } => "truncated",
        LineStats {
            invalid_utf8: 1.., ..
        } => "invalid utf-8",
        LineStats {
            bad_timestamps: 1..,
            ..
        } => "bad timestamp",
        _ => "clean",
    }
}

#[test]
fn docker_lines() {
    campaign(
        "docker_lines",
        2048,
        &["clean", "truncated", "invalid utf-8", "bad timestamp"],
        lines_case,
    );
}

// ---------------------------------------------------------------------------------------
// ctnetlink datagrams

/// The length fields of a datagram: each message's nlmsg_len and, inside, each attribute's
/// nla_len, nested ones included (host byte order, as the kernel writes them).
fn netlink_fields(buf: &[u8]) -> Vec<LenField> {
    fn attrs(buf: &[u8], mut at: usize, end: usize, out: &mut Vec<LenField>) {
        while at + 4 <= end {
            let len = usize::from(u16::from_ne_bytes([buf[at], buf[at + 1]]));
            let kind = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]);
            if len < 4 || at + len > end {
                return;
            }
            out.push(LenField {
                at,
                width: 2,
                big_endian: cfg!(target_endian = "big"),
            });
            if kind & 0x8000 != 0 {
                attrs(buf, at + 4, at + len, out);
            }
            at += (len + 3) & !3;
        }
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        out.push(LenField {
            at,
            width: 4,
            big_endian: cfg!(target_endian = "big"),
        });
        // Attributes start after nlmsghdr (16 bytes) and nfgenmsg (4).
        attrs(buf, at + 20, at + len, &mut out);
        at += (len + 3) & !3;
    }
    out
}

/// What one well-framed message must decode to: DONE, ERROR and NOOP by their type, a
/// conntrack NEW or DELETE to a flow of the right kind or an error of its own, anything
/// else to `Ignored`.
fn check_message(msg: &[u8], from_dump: bool, item: &Result<Message, DecodeError>) {
    let ty = u16::from_ne_bytes([msg[4], msg[5]]);
    let flags = u16::from_ne_bytes([msg[6], msg[7]]);
    let payload = &msg[16..];
    match ty {
        3 => assert_eq!(item, &Ok(Message::Done)),
        2 => match payload.get(..4) {
            Some(b) => assert_eq!(
                item,
                &Ok(Message::Error(i32::from_ne_bytes(
                    b.try_into().expect("4 bytes")
                )))
            ),
            None => assert!(matches!(item, Err(DecodeError::ShortPayload { .. }))),
        },
        1 | 4 => assert_eq!(item, &Ok(Message::Ignored(ty))),
        _ if ty >> 8 == 1 && matches!(ty & 0xff, 0 | 2) => {
            let kind = match ty & 0xff {
                2 => EventKind::Destroy,
                _ if from_dump => EventKind::Dump,
                _ if flags & 0x400 != 0 => EventKind::New,
                _ => EventKind::Update,
            };
            match item {
                Ok(Message::Flow(f)) => {
                    assert_eq!(f.kind, kind);
                    assert!(f.family == 4 || f.family == 6, "family {}", f.family);
                    assert!(f.family != 4 || payload[0] == 2);
                }
                Err(DecodeError::Header { .. }) => panic!("header error for a framed message"),
                Err(e) => {
                    let m = e.to_string();
                    assert!(!m.is_empty() && m.len() <= 512, "error message {m:?}");
                }
                other => panic!("conntrack message type {ty:#x} gave {other:?}"),
            }
        }
        _ => assert_eq!(item, &Ok(Message::Ignored(ty))),
    }
}

/// Walks the datagram's framing alongside the decoder: every message is an item, a broken
/// header is an error at its offset and the last item, and nothing is left unreported.
/// Returns the number of errors, and whether the framing broke.
fn check_datagram(buf: &[u8], from_dump: bool) -> (usize, bool) {
    let mut items = decode::messages(buf, from_dump);
    let mut at = 0;
    let mut errors = 0;
    loop {
        let item = items.next();
        let rest = &buf[at..];
        if rest.is_empty() {
            assert!(item.is_none(), "an item past the end: {item:?}");
            return (errors, false);
        }
        let item = item.unwrap_or_else(|| panic!("{} bytes at {at} not reported", rest.len()));
        errors += usize::from(item.is_err());
        let len = rest.get(..4).map_or(0, |b| {
            u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize
        });
        if rest.len() < 16 || len < 16 || len > rest.len() {
            match &item {
                Err(e @ DecodeError::Header { offset, .. }) => {
                    assert_eq!(*offset, at);
                    assert!(e.to_string().len() <= 512);
                }
                other => panic!("broken header at {at} gave {other:?}"),
            }
            assert!(items.next().is_none(), "items after a broken header");
            return (errors, true);
        }
        check_message(&rest[..len], from_dump, &item);
        at = (at + ((len + 3) & !3)).min(buf.len());
    }
}

/// One or two captured datagrams (or random bytes), mutated, decoded as events or a dump.
fn netlink_case(src: &mut Src<'_>, seeds: &[&[u8]]) -> &'static str {
    let mut buf = Vec::new();
    let mut pristine = false;
    if src.chance(1, 16) {
        let n = src.below(512);
        src.fill(n, &mut buf);
    } else {
        buf.extend_from_slice(src.pick::<&[u8]>(seeds));
        if src.chance(1, 4) {
            buf.extend_from_slice(src.pick::<&[u8]>(seeds));
        }
        let fields = netlink_fields(&buf);
        let other = *src.pick(seeds);
        pristine = !(src.chance(7, 8) && mutate(src, &mut buf, &fields, 0xffff, &[], other));
        if !pristine && buf.len() >= 16 && src.chance(1, 2) {
            // Framing made whole again, so that the attribute walk gets the hostile bytes.
            let len = buf.len() as u32;
            buf[..4].copy_from_slice(&len.to_ne_bytes());
        }
    }
    let from_dump = src.chance(1, 2);
    let ((errors, broken), peak) = peak_during(|| check_datagram(&buf, from_dump));
    assert!(peak <= 2 * buf.len() + 4096, "allocated {peak} B");
    if pristine {
        assert_eq!(errors, 0, "a captured datagram failed to decode");
    }
    match (errors, broken) {
        (0, _) => "decoded",
        (_, true) => "broken framing",
        _ => "bad message",
    }
}

#[test]
fn conntrack_datagrams() {
    let seeds = read_datagrams(CONNTRACK_FIXTURE).expect("fixture is a capture file");
    assert!(seeds.len() >= 10, "{} seed datagrams", seeds.len());
    for s in &seeds {
        // Seeds are concatenated into one datagram too: they must end aligned.
        assert_eq!(s.len() % 4, 0);
        assert_eq!(check_datagram(s, false), (0, false));
    }
    campaign(
        "conntrack_datagrams",
        512,
        &["decoded", "bad message", "broken framing"],
        |src| netlink_case(src, &seeds),
    );
}

// ---------------------------------------------------------------------------------------
// Config text

/// The README's configuration block without its comments (half its size, so more cases per
/// second; `#` is in the mutation dictionary, so comments are still tried).
fn config_seed() -> String {
    let block = README
        .split("```toml\n")
        .find(|b| b.starts_with("db_path"))
        .and_then(|b| b.split("```").next())
        .expect("README has the configuration block");
    block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim_end())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Values and tokens TOML and its readers stumble on: integer edges, floats where integers
/// belong, other types, unbalanced brackets and quotes, duplicate tables.
const TOML_DICT: &[&[u8]] = &[
    b"0",
    b"-1",
    b"4096",
    b"65535",
    b"2147483648",
    b"4294967296",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e400",
    b"nan",
    b"-inf",
    b"0x7fffffff",
    b"1_000_000_000",
    b"\"\"",
    b"\"127.0.0.1:0\"",
    b"\"[::1]:65536\"",
    b"\"10.0.0.0/33\"",
    b"true",
    b"[]",
    b"[1, \"a\"]",
    b"{}",
    b"{ a = 1 }",
    b"1979-05-27T07:32:00Z",
    b"'''",
    b"\"\"\"",
    b"\"\\u0000\"",
    b"\"\\uD800\"",
    b"[",
    b"]",
    b"[[",
    b"=",
    b".",
    b"#",
    b"\n",
    b"\\",
    b"[docker]\n",
    b"[conntrack.x]\n",
    b"[[webhooks]]\n",
    b"a.b.c = 1\n",
];

/// Replaces the value of a random `key = value` line by a dictionary token.
fn replace_value(src: &mut Src<'_>, text: &mut Vec<u8>) {
    let lines: Vec<usize> = std::iter::once(0)
        .chain(
            text.iter()
                .enumerate()
                .filter(|&(_, &c)| c == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    let start = *src.pick(&lines);
    let end = text[start..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(text.len(), |n| start + n);
    if let Some(eq) = text[start..end].iter().position(|&c| c == b'=') {
        let token = *src.pick(TOML_DICT);
        text.splice(start + eq + 1..end, b" ".iter().chain(token).copied());
    }
}

/// What an accepted configuration guarantees: every value its checks bound lies within
/// its bounds, the upper ones included (the sizes allocated at start).
fn check_config(c: &Config, text: &str) {
    let d = &c.docker;
    let w = &c.webhooks;
    for (ok, what) in [
        (c.conntrack.rcvbuf_bytes >= 4096, "conntrack.rcvbuf_bytes"),
        (
            (1..=config::MAX_CONNTRACK_CHANNEL).contains(&c.conntrack.channel_capacity),
            "conntrack.channel_capacity",
        ),
        (d.hits_per_sec >= 1 && d.hits_burst >= 1, "docker.hits_*"),
        (
            (1..=config::MAX_SCAN_WORKERS).contains(&d.scan_workers),
            "docker.scan_workers",
        ),
        (
            (1..=config::MAX_SCAN_CHANNEL).contains(&d.channel_capacity),
            "docker.channel_capacity",
        ),
        (
            (64..=config::MAX_LINE_BYTES).contains(&d.max_line_bytes),
            "docker.max_line_bytes",
        ),
        (
            w.queue_capacity <= config::MAX_WEBHOOK_QUEUE,
            "webhooks.queue_capacity",
        ),
        (w.workers <= config::MAX_WEBHOOK_WORKERS, "webhooks.workers"),
        (
            c.store.batch_rows >= 1 && c.store.commit_interval_ms >= 1,
            "store.*",
        ),
        (
            c.pipeline.warn_interval_secs >= 1,
            "pipeline.warn_interval_secs",
        ),
        (
            c.api.listen.is_empty() || c.api.listen.parse::<std::net::SocketAddr>().is_ok(),
            "api.listen",
        ),
    ] {
        assert!(ok, "{what} out of bounds was accepted in:\n{text}");
    }
}

/// The README's config with values replaced and lines dropped, doubled or moved, then
/// perhaps mutated byte by byte, parsed.
fn config_case(src: &mut Src<'_>, seed: &str) -> &'static str {
    let mut text = seed.as_bytes().to_vec();
    for _ in 0..1 + src.below(3) {
        match src.below(2) {
            0 => replace_value(src, &mut text),
            // Lines are duplicated (duplicate keys), dropped or moved (keys into other tables).
            _ => {
                let mut lines: Vec<Vec<u8>> =
                    text.split(|&c| c == b'\n').map(<[u8]>::to_vec).collect();
                let i = src.below(lines.len());
                let line = if src.chance(1, 2) {
                    lines.remove(i)
                } else {
                    lines[i].clone()
                };
                if src.chance(2, 3) {
                    let at = src.below(lines.len() + 1);
                    lines.insert(at, line);
                }
                text = lines.join(&b'\n');
            }
        }
    }
    if src.chance(1, 3) {
        mutate(src, &mut text, &[], 0, TOML_DICT, seed.as_bytes());
    }
    // Config::load refuses a file that is not UTF-8 before parsing: the parser sees text.
    let text = String::from_utf8_lossy(&text);
    let (res, peak) = peak_during(|| Config::parse(&text, "fuzz.toml"));
    assert!(
        peak <= 128 * text.len() + 65536,
        "allocated {peak} B for {} B",
        text.len()
    );
    match res {
        Ok(c) => {
            check_config(&c, &text);
            "accepted"
        }
        Err(ConfigError::Parse { path, message }) => {
            assert_eq!(path, "fuzz.toml");
            assert!(!message.trim().is_empty());
            "parse error"
        }
        Err(ConfigError::Invalid { key, message }) => {
            assert!(!key.is_empty() && !message.trim().is_empty());
            "invalid value"
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parse read a file: {e}"),
    }
}

#[test]
fn config_text() {
    let seed = config_seed();
    let defaults = Config::parse(&seed, "README.md").expect("the README's config is valid");
    check_config(&defaults, &seed);
    campaign(
        "config_text",
        256,
        &["accepted", "parse error", "invalid value"],
        |src| config_case(src, &seed),
    );
}
