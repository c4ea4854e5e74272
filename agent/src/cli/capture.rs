//! `nattrail capture`: raw conntrack datagrams to a file, for fixtures and bug reports.
//!
//! File format: per datagram, a little-endian u32 length then the bytes as received.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use crate::config::Config;
use crate::conntrack::capture_file::write_datagram;
use crate::conntrack::socket::{NfSocket, Recv};

/// Arguments of `capture`.
#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Stop after this many datagrams.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Stop after this long.
    #[arg(long, default_value = "10s")]
    duration: String,
}

/// Runs `capture`.
pub fn run(cfg: &Config, a: &CaptureArgs) -> Result<()> {
    let limit = crate::query::instant::parse_duration(&a.duration)?;
    let sock = NfSocket::events(cfg.conntrack.rcvbuf_bytes, Duration::from_millis(100))?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?,
    );
    let mut buf = Vec::with_capacity(1 << 20);
    let (mut n, mut overflows) = (0u64, 0u64);
    let start = Instant::now();
    while n < a.count && start.elapsed() < limit {
        match sock.recv(&mut buf)? {
            Recv::Data(len) => {
                write_datagram(&mut out, &buf[..len])?;
                n += 1;
            }
            Recv::Timeout => {}
            Recv::Overflow => overflows += 1,
        }
    }
    out.flush()?;
    eprintln!(
        "captured {n} datagrams to {} ({overflows} overflows)",
        a.out.display()
    );
    Ok(())
}
