//! Following one container's log. The body is read raw over dockerd's Unix socket and framed
//! by our own decoder (bollard's trusts a frame's claimed size), with only the streams the
//! container's effective rules read, from the saved position on.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::frames::{FrameDecoder, FrameStats, MAX_FRAME};
use super::lines::{LineAssembler, LineStats, RecordCursor};
use crate::pipeline::messages::Pos;
use crate::pipeline::messages::{ContainerInfo, Line, ScanMsg, Stream};
use crate::pipeline::metrics::counters;
use crate::pipeline::stage::StageTx;
use crate::scan::live::LiveRules;

/// Why following a log failed.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// dockerd's socket could not be reached.
    #[error("connecting to dockerd at {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("reading the log of container {container}: {source}")]
    Http {
        /// The container's name.
        container: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// dockerd refused the request.
    #[error("dockerd answered {status} for the log of container {container}: {message}")]
    Status {
        /// The container's name.
        container: String,
        /// HTTP status.
        status: u16,
        /// dockerd's message.
        message: String,
    },
    /// The scan workers are gone (shutdown).
    #[error("scan workers stopped")]
    Closed,
}

/// Which streams to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streams {
    /// Standard output (all of a TTY's output).
    pub stdout: bool,
    /// Standard error.
    pub stderr: bool,
}

impl Streams {
    /// The streams the container's effective rules read now.
    pub fn wanted(live: &LiveRules, c: &ContainerInfo) -> Self {
        let rules = live.load().for_workload(&c.workloads);
        let stdout = rules.wants(Stream::Stdout);
        let stderr = rules.wants(Stream::Stderr);
        if c.tty {
            // A TTY merges both into one stream, which Docker calls stdout.
            Streams {
                stdout: stdout || stderr,
                stderr: false,
            }
        } else {
            Streams { stdout, stderr }
        }
    }

    /// No stream at all.
    pub fn none(self) -> bool {
        !self.stdout && !self.stderr
    }
}

counters! {
    /// Counters over every tail.
    pub struct TailStats as "logscan_tails" =>
    /// A copy of [`TailStats`] for reports.
    TailCounters {
        /// Lines read.
        lines: Counter(Received),
        /// Lines cut at the cap.
        truncated: Counter,
        /// Bytes skipped (past the line cap, oversized or bad frames).
        skipped_bytes: Counter,
        /// Lines whose invalid UTF-8 was replaced.
        invalid_utf8: Counter,
        /// Records without a valid timestamp.
        bad_timestamps: Counter,
        /// Frames refused for their size.
        oversized_frames: Counter,
        /// Frames with an unknown stream byte.
        bad_frames: Counter,
        /// Records skipped on resume (read before).
        resumed_skipped: Counter(Skipped),
        /// Resumes whose saved record was not found as saved (log rotated or rewritten).
        resume_mismatches: Counter,
        /// Log streams opened.
        streams_opened: Counter,
        /// Log streams that failed (dockerd down, HTTP error).
        stream_errors: Counter,
    }
}

/// How a follow ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowEnd {
    /// dockerd closed the stream: the container stopped (or dockerd is going down).
    StreamEnded,
    /// The rules now need other streams: reopen from the position reached.
    StreamsChanged,
}

/// What a tail needs from its owner.
pub struct TailCtx {
    /// dockerd's socket.
    pub socket: std::path::PathBuf,
    /// The rules in force.
    pub live: Arc<LiveRules>,
    /// Cap on one line.
    pub max_line: usize,
    /// Counters.
    pub stats: Arc<TailStats>,
}

/// The decoders of one open stream and the counters already added to the totals.
struct Reading {
    frames: FrameDecoder,
    out: LineAssembler,
    err: LineAssembler,
    cursor: RecordCursor,
    counted: (FrameStats, LineStats, LineStats, u64, u64),
}

impl Reading {
    fn new(tty: bool, max_line: usize, pos: Option<Pos>) -> Self {
        Reading {
            frames: FrameDecoder::new(tty, MAX_FRAME),
            // Without a TTY every frame is one Docker record; with one, bytes are raw.
            out: LineAssembler::new(!tty, max_line),
            err: LineAssembler::new(!tty, max_line),
            cursor: RecordCursor::resuming(pos),
            counted: Default::default(),
        }
    }

    /// Decodes one piece of the body into lines; returns the position they end at, when
    /// it is safe to resume from (no line of the other stream is half read: its records
    /// before that position would be skipped on resume).
    fn feed(&mut self, data: &[u8], lines: &mut Vec<(Stream, Line)>) -> Option<Pos> {
        let mut chunks = Vec::new();
        self.frames.feed(data, &mut chunks);
        let mut safe = None;
        let mut out = Vec::new();
        for c in chunks {
            let (mine, other) = match c.stream {
                Stream::Stdout => (&mut self.out, &self.err),
                Stream::Stderr => (&mut self.err, &self.out),
            };
            mine.push(&c.bytes, &mut self.cursor, &mut out);
            if let Some(end) = out.last().and_then(|l| l.end)
                && !other.pending()
            {
                safe = Some(end);
            }
            lines.extend(out.drain(..).map(|l| (c.stream, l)));
        }
        safe
    }

    /// The stream ended: lines without their newline are complete as they are.
    fn flush(&mut self, lines: &mut Vec<(Stream, Line)>) -> Option<Pos> {
        let mut out = Vec::new();
        self.out.flush(&self.cursor, &mut out);
        lines.extend(out.drain(..).map(|l| (Stream::Stdout, l)));
        self.err.flush(&self.cursor, &mut out);
        lines.extend(out.drain(..).map(|l| (Stream::Stderr, l)));
        lines.last().and_then(|(_, l)| l.end)
    }

    /// Adds what changed since the last call to the totals.
    fn count(&mut self, s: &TailStats) {
        let f = self.frames.stats();
        let o = self.out.stats();
        let e = self.err.stats();
        let (pf, po, pe, skipped, mismatches) = self.counted;
        // The assemblers' counters are cumulative: add the difference since the last call.
        let totals =
            |f: &FrameStats, o: &LineStats, e: &LineStats, skipped: u64, mismatches: u64| {
                [
                    o.lines + e.lines,
                    o.truncated + e.truncated,
                    o.skipped_bytes + e.skipped_bytes + f.skipped_bytes,
                    o.invalid_utf8 + e.invalid_utf8,
                    o.bad_timestamps + e.bad_timestamps,
                    f.oversized,
                    f.bad_stream,
                    skipped,
                    mismatches,
                ]
            };
        let now = totals(
            &f,
            &o,
            &e,
            self.cursor.resumed_skipped,
            self.cursor.resume_mismatches,
        );
        let before = totals(&pf, &po, &pe, skipped, mismatches);
        let into = [
            &s.lines,
            &s.truncated,
            &s.skipped_bytes,
            &s.invalid_utf8,
            &s.bad_timestamps,
            &s.oversized_frames,
            &s.bad_frames,
            &s.resumed_skipped,
            &s.resume_mismatches,
        ];
        for ((total, now), before) in into.into_iter().zip(now).zip(before) {
            if now > before {
                total.fetch_add(now - before, Ordering::Relaxed);
            }
        }
        self.counted = (
            f,
            o,
            e,
            self.cursor.resumed_skipped,
            self.cursor.resume_mismatches,
        );
    }
}

fn logs_uri(id: &str, streams: Streams, pos: Option<Pos>) -> String {
    format!(
        "/containers/{id}/logs?follow=1&timestamps=1&stdout={}&stderr={}&since={}",
        u8::from(streams.stdout),
        u8::from(streams.stderr),
        pos.map(|p| p.since_param()).unwrap_or_else(|| "0".into())
    )
}

async fn open(
    socket: &Path,
    c: &ContainerInfo,
    uri: String,
) -> Result<hyper::body::Incoming, TailError> {
    let io = UnixStream::connect(socket)
        .await
        .map_err(|source| TailError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let http = |source| TailError::Http {
        container: c.name.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http)?;
    // The connection task ends with the body (or when dockerd goes away).
    tokio::spawn(conn);
    let req = Request::get(uri)
        .header(hyper::header::HOST, "docker")
        .body(Empty::<Bytes>::new())
        .expect("a GET with a path and a host header is a valid request");
    let resp = sender.send_request(req).await.map_err(http)?;
    if !resp.status().is_success() {
        let status = resp.status().as_u16();
        // dockerd's error bodies are a short JSON message; read at most 4 KiB of it.
        let body = http_body_util::Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(TailError::Status {
            container: c.name.clone(),
            status,
            message: body,
        });
    }
    Ok(resp.into_body())
}

/// Sends lines to the scan worker and, when they end at a safe position, moves `pos` there.
/// Waits (yielding to the runtime) while the workers are behind: dockerd keeps the log, so
/// waiting loses nothing.
async fn hand_over(
    shard: &StageTx<ScanMsg>,
    c: &Arc<ContainerInfo>,
    lines: Vec<(Stream, Line)>,
    safe: Option<Pos>,
    pos: &mut Option<Pos>,
) -> Result<(), TailError> {
    shard
        .send_async(ScanMsg::Lines {
            container: Arc::clone(c),
            lines,
            cursor: safe,
        })
        .await
        .map_err(|_| TailError::Closed)?;
    *pos = safe.or(*pos);
    Ok(())
}

/// Follows the log of `c` from `pos` with `streams` open, sending lines to `shard`, until
/// the stream ends or the rules need other streams. `pos` is advanced as lines are handed
/// over, so a reopen continues exactly after them.
pub async fn follow(
    ctx: &TailCtx,
    c: &Arc<ContainerInfo>,
    streams: Streams,
    pos: &mut Option<Pos>,
    shard: &StageTx<ScanMsg>,
    rules_changed: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<FollowEnd, TailError> {
    let mut body = open(&ctx.socket, c, logs_uri(&c.id, streams, *pos)).await?;
    ctx.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    let mut reading = Reading::new(c.tty, ctx.max_line, *pos);
    loop {
        tokio::select! {
            frame = body.frame() => {
                let data = match frame {
                    None => {
                        let mut lines = Vec::new();
                        let safe = reading.flush(&mut lines);
                        reading.count(&ctx.stats);
                        if !lines.is_empty() {
                            hand_over(shard, c, lines, safe, pos).await?;
                        }
                        return Ok(FollowEnd::StreamEnded);
                    }
                    Some(Err(source)) => {
                        return Err(TailError::Http { container: c.name.clone(), source });
                    }
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                };
                let mut lines = Vec::new();
                let safe = reading.feed(&data, &mut lines);
                reading.count(&ctx.stats);
                if lines.is_empty() && safe.is_none() {
                    continue;
                }
                hand_over(shard, c, lines, safe, pos).await?;
            }
            changed = rules_changed.changed() => {
                if changed.is_ok() && Streams::wanted(&ctx.live, c) != streams {
                    return Ok(FollowEnd::StreamsChanged);
                }
            }
        }
    }
}
