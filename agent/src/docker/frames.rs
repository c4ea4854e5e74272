//! Docker's multiplexed log stream (`[stream, 0, 0, 0, size: u32 BE]` + payload), decoded
//! with hard caps. bollard's decoder trusts the header's size (a frame may claim 4 GiB), so
//! the raw body is framed here: an oversized frame is refused, counted and skipped without
//! being buffered. TTY containers send no headers; their bytes are stdout.

use crate::pipeline::messages::Stream;

/// Default cap on one frame's payload: 16 MiB.
pub const MAX_FRAME: usize = 16 << 20;

/// Counters of one decoder.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames delivered.
    pub frames: u64,
    /// Frames refused for their size (their bytes skipped).
    pub oversized: u64,
    /// Frames with an unknown stream byte (skipped).
    pub bad_stream: u64,
    /// Bytes skipped.
    pub skipped_bytes: u64,
}

/// One decoded piece of a stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The stream.
    pub stream: Stream,
    /// Its bytes (a frame payload, or what a TTY stream delivered).
    pub bytes: Vec<u8>,
}

enum State {
    Header,
    Payload { stream: Stream, left: usize },
    Skip { left: usize },
}

/// Incremental decoder: feed it the body as it arrives, take the chunks out.
pub struct FrameDecoder {
    tty: bool,
    max_frame: usize,
    header: Vec<u8>,
    payload: Vec<u8>,
    state: State,
    stats: FrameStats,
}

impl FrameDecoder {
    /// A decoder for a container with or without a TTY.
    pub fn new(tty: bool, max_frame: usize) -> Self {
        FrameDecoder {
            tty,
            max_frame,
            header: Vec::with_capacity(8),
            payload: Vec::new(),
            state: State::Header,
            stats: FrameStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> FrameStats {
        self.stats
    }

    /// Decodes `input`, appending finished chunks to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<Chunk>) {
        if self.tty {
            if !input.is_empty() {
                self.stats.frames += 1;
                out.push(Chunk {
                    stream: Stream::Stdout,
                    bytes: input.to_vec(),
                });
            }
            return;
        }
        while !input.is_empty() {
            match self.state {
                State::Header => {
                    let need = 8 - self.header.len();
                    let take = need.min(input.len());
                    self.header.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.header.len() < 8 {
                        return;
                    }
                    let size = u32::from_be_bytes([
                        self.header[4],
                        self.header[5],
                        self.header[6],
                        self.header[7],
                    ]) as usize;
                    let stream = match self.header[0] {
                        1 => Some(Stream::Stdout),
                        2 => Some(Stream::Stderr),
                        _ => None,
                    };
                    self.header.clear();
                    self.state = match stream {
                        _ if size > self.max_frame => {
                            self.stats.oversized += 1;
                            State::Skip { left: size }
                        }
                        None => {
                            self.stats.bad_stream += 1;
                            State::Skip { left: size }
                        }
                        Some(stream) => {
                            self.payload.clear();
                            self.payload.reserve(size.min(1 << 20));
                            State::Payload { stream, left: size }
                        }
                    };
                    if size == 0 {
                        self.finish_payload(out);
                    }
                }
                State::Payload { stream, left } => {
                    let take = left.min(input.len());
                    self.payload.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = State::Payload {
                        stream,
                        left: left - take,
                    };
                    if left == take {
                        self.finish_payload(out);
                    }
                }
                State::Skip { left } => {
                    let take = left.min(input.len());
                    self.stats.skipped_bytes += take as u64;
                    input = &input[take..];
                    self.state = if left == take {
                        State::Header
                    } else {
                        State::Skip { left: left - take }
                    };
                }
            }
        }
    }

    fn finish_payload(&mut self, out: &mut Vec<Chunk>) {
        match self.state {
            State::Payload { stream, .. } => {
                self.stats.frames += 1;
                out.push(Chunk {
                    stream,
                    bytes: std::mem::take(&mut self.payload),
                });
            }
            State::Skip { .. } | State::Header => {}
        }
        self.state = State::Header;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stream: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![stream, 0, 0, 0];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frames_split_anywhere_decode_the_same() {
        let mut body = frame(1, b"hello\n");
        body.extend(frame(2, b"oops\n"));
        body.extend(frame(1, b""));
        body.extend(frame(1, b"bye\n"));
        for cut in 1..body.len() {
            let mut d = FrameDecoder::new(false, MAX_FRAME);
            let mut out = Vec::new();
            d.feed(&body[..cut], &mut out);
            d.feed(&body[cut..], &mut out);
            let got: Vec<(Stream, &[u8])> =
                out.iter().map(|c| (c.stream, c.bytes.as_slice())).collect();
            assert_eq!(
                got,
                vec![
                    (Stream::Stdout, &b"hello\n"[..]),
                    (Stream::Stderr, &b"oops\n"[..]),
                    (Stream::Stdout, &b""[..]),
                    (Stream::Stdout, &b"bye\n"[..]),
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_and_bad_frames_are_skipped_and_counted() {
        let mut body = frame(1, &[b'x'; 100]);
        body.extend(frame(7, b"what stream\n"));
        body.extend(frame(1, b"after\n"));
        let mut d = FrameDecoder::new(false, 64);
        let mut out = Vec::new();
        for b in body.chunks(5) {
            d.feed(b, &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes, b"after\n");
        let s = d.stats();
        assert_eq!((s.oversized, s.bad_stream, s.skipped_bytes), (1, 1, 112));
    }

    #[test]
    fn a_header_claiming_4_gib_is_never_buffered() {
        let mut d = FrameDecoder::new(false, MAX_FRAME);
        let mut out = Vec::new();
        d.feed(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff], &mut out);
        d.feed(&vec![0u8; 1 << 20], &mut out);
        assert!(out.is_empty());
        assert_eq!(d.stats().oversized, 1);
        assert!(d.payload.capacity() < 1 << 20);
    }

    #[test]
    fn tty_output_is_stdout_as_is() {
        let mut d = FrameDecoder::new(true, MAX_FRAME);
        let mut out = Vec::new();
        d.feed(b"\x01\x00raw tty bytes\n", &mut out);
        assert_eq!(out[0].stream, Stream::Stdout);
        assert_eq!(out[0].bytes, b"\x01\x00raw tty bytes\n");
    }
}
