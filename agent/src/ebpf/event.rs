//! The records the eBPF programs write (`agent-ebpf/src/process.h`), decoded as hostile
//! bytes: the size and version are checked and every length is bounded by its field.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::pipeline::process::{LifeKind, ProcessExec, ProcessLife, SocketEvent, SocketOwner};

/// Layout version the programs write.
pub const VERSION: u16 = 1;
/// `kind` of an exec record.
pub const KIND_EXEC: u16 = 1;
/// `kind` of a fork record.
pub const KIND_FORK: u16 = 2;
/// `kind` of an exit record.
pub const KIND_EXIT: u16 = 3;
/// `kind` of a socket record (`agent-ebpf/src/socket.h`).
pub const KIND_SOCKET: u16 = 4;
/// Size of `struct nt_socket`.
pub const SOCKET_SIZE: usize = 96 + COMM_LEN;
const OWNER_KNOWN: u16 = 1;
/// Size of `struct nt_life`.
pub const LIFE_SIZE: usize = 40 + COMM_LEN;
const COMM_LEN: usize = 16;
const FILENAME_LEN: usize = 256;
/// Bytes of arguments kept per process, by the exec program and the /proc snapshot alike.
pub const ARGV_LEN: usize = 1024;
const ARGV_TRUNCATED: u32 = 1;
const FILENAME_TRUNCATED: u32 = 2;
/// Size of `struct nt_exec`.
pub const EXEC_SIZE: usize = HEADER + COMM_LEN + FILENAME_LEN + ARGV_LEN;
/// Bytes before `comm`.
const HEADER: usize = 64;

/// Flags of nattrail's own command line whose values are secrets (`triggers add --secret`,
/// `--header`). The exec program records every process's arguments, and the agent's secrets
/// are write-only: wherever a `nattrail` command line is recorded (itself, or under a
/// wrapper such as `ip netns exec`), the values of these flags are masked before storing.
const SECRET_FLAGS: &[&str] = &["--secret", "--header"];
/// What a masked value reads as.
pub const MASK: &str = "********";

/// Masks the values of nattrail's secret-taking flags in `argv` when it runs nattrail.
pub fn mask_own_secrets(argv: &mut [String]) {
    let ours = argv.iter().any(|a| {
        std::path::Path::new(a)
            .file_name()
            .is_some_and(|n| n == "nattrail")
    });
    if !ours {
        return;
    }
    let mut mask_next = false;
    for a in argv.iter_mut() {
        if std::mem::take(&mut mask_next) {
            *a = MASK.into();
        } else if SECRET_FLAGS.contains(&a.as_str()) {
            mask_next = true;
        } else if let Some((flag, _)) = a.split_once('=')
            && SECRET_FLAGS.contains(&flag)
        {
            *a = format!("{flag}={MASK}");
        }
    }
}

/// A process's arguments from their bytes in its memory (each NUL-terminated; a cut copy
/// ends mid-argument), invalid UTF-8 replaced, our own secrets masked.
pub fn arguments(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let mut argv: Vec<String> = bytes
        .strip_suffix(&[0])
        .unwrap_or(bytes)
        .split(|&c| c == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    mask_own_secrets(&mut argv);
    argv
}

/// Why a record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    /// Not the size of a record.
    #[error("eBPF record of {0} bytes, expected {EXEC_SIZE}, {LIFE_SIZE} or {SOCKET_SIZE}")]
    Size(usize),
    /// Another layout version, or a kind that does not match the size.
    #[error("eBPF record version {version} kind {kind}: expected version {VERSION}, a known kind")]
    Version {
        /// Version read.
        version: u16,
        /// Kind read.
        kind: u16,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The text of a NUL-terminated field, at most `len` bytes of it.
fn text(b: &[u8], len: usize) -> String {
    let b = &b[..len.min(b.len())];
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A record of the process programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An exec.
    Exec(ProcessExec),
    /// A fork or an exit.
    Life(ProcessLife),
    /// A socket's first packet to a destination.
    Socket(SocketEvent),
}

fn wall(boot: u64, boot_to_wall_ns: i128) -> u64 {
    (i128::from(boot) + boot_to_wall_ns).clamp(0, i128::from(u64::MAX)) as u64
}

/// Decodes any record, by its size and kind.
pub fn decode(b: &[u8], boot_to_wall_ns: i128) -> Result<Record, EventError> {
    match b.len() {
        EXEC_SIZE => decode_exec(b, boot_to_wall_ns).map(Record::Exec),
        LIFE_SIZE => decode_life(b, boot_to_wall_ns).map(Record::Life),
        SOCKET_SIZE => decode_socket(b, boot_to_wall_ns).map(Record::Socket),
        n => Err(EventError::Size(n)),
    }
}

/// Decodes a socket record. A family other than 4 or 6, or a protocol other than TCP or
/// UDP, is refused as the programs never write one.
pub fn decode_socket(b: &[u8], boot_to_wall_ns: i128) -> Result<SocketEvent, EventError> {
    if b.len() != SOCKET_SIZE {
        return Err(EventError::Size(b.len()));
    }
    let (version, kind) = (u16_at(b, 0), u16_at(b, 2));
    let (family, proto) = (b[4], b[5]);
    if version != VERSION || kind != KIND_SOCKET || !matches!(proto, 6 | 17) {
        return Err(EventError::Version { version, kind });
    }
    let addr = |at: usize| -> Option<IpAddr> {
        let raw: [u8; 16] = b[at..at + 16].try_into().expect("16 bytes");
        match family {
            4 => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(raw))),
            _ => None,
        }
    };
    let (Some(src), Some(dst)) = (addr(64), addr(80)) else {
        return Err(EventError::Version { version, kind });
    };
    let owner = (u16_at(b, 10) & OWNER_KNOWN != 0).then(|| SocketOwner {
        pid: u32_at(b, 12),
        tid: u32_at(b, 16),
        uid: u32_at(b, 20),
        netns: u32_at(b, 24),
        start_ns: wall(u64_at(b, 40), boot_to_wall_ns),
        comm: text(&b[96..], COMM_LEN),
    });
    Ok(SocketEvent {
        ts_ns: wall(u64_at(b, 32), boot_to_wall_ns),
        proto,
        src: SocketAddr::new(src, u16_at(b, 6)),
        dst: SocketAddr::new(dst, u16_at(b, 8)),
        owner,
        cgroup_id: u64_at(b, 48),
        cookie: u64_at(b, 56),
    })
}

/// Decodes a fork or exit record.
pub fn decode_life(b: &[u8], boot_to_wall_ns: i128) -> Result<ProcessLife, EventError> {
    if b.len() != LIFE_SIZE {
        return Err(EventError::Size(b.len()));
    }
    let (version, kind) = (u16_at(b, 0), u16_at(b, 2));
    let kind = match (version, kind) {
        (VERSION, KIND_FORK) => LifeKind::Fork,
        (VERSION, KIND_EXIT) => LifeKind::Exit,
        _ => return Err(EventError::Version { version, kind }),
    };
    Ok(ProcessLife {
        kind,
        ts_ns: wall(u64_at(b, 16), boot_to_wall_ns),
        pid: u32_at(b, 4),
        ppid: (kind == LifeKind::Fork).then(|| u32_at(b, 8)),
        wait_status: (kind == LifeKind::Exit).then(|| u32_at(b, 12)),
        start_ns: wall(u64_at(b, 24), boot_to_wall_ns),
        cgroup_id: u64_at(b, 32),
        comm: text(&b[40..], COMM_LEN),
    })
}

/// Decodes an exec record; `boot_to_wall_ns` turns CLOCK_BOOTTIME into ns since the epoch.
pub fn decode_exec(b: &[u8], boot_to_wall_ns: i128) -> Result<ProcessExec, EventError> {
    if b.len() != EXEC_SIZE {
        return Err(EventError::Size(b.len()));
    }
    let (version, kind) = (u16_at(b, 0), u16_at(b, 2));
    if version != VERSION || kind != KIND_EXEC {
        return Err(EventError::Version { version, kind });
    }
    let flags = u32_at(b, 4);
    let wall = |boot: u64| wall(boot, boot_to_wall_ns);
    let (comm_at, filename_at) = (HEADER, HEADER + COMM_LEN);
    let argv_at = filename_at + FILENAME_LEN;
    let filename_len = u32_at(b, 56) as usize;
    let argv_len = (u32_at(b, 60) as usize).min(ARGV_LEN);
    let argv = arguments(&b[argv_at..argv_at + argv_len]);
    Ok(ProcessExec {
        snapshot: false,
        ts_ns: wall(u64_at(b, 24)),
        pid: u32_at(b, 8),
        tid: u32_at(b, 12),
        ppid: u32_at(b, 16),
        uid: u32_at(b, 20),
        comm: text(&b[comm_at..], COMM_LEN),
        filename: text(&b[filename_at..], filename_len.min(FILENAME_LEN)),
        filename_truncated: flags & FILENAME_TRUNCATED != 0,
        argv,
        argv_truncated: flags & ARGV_TRUNCATED != 0,
        start_ns: wall(u64_at(b, 32)),
        cgroup_id: u64_at(b, 40),
        netns: u32_at(b, 48),
        mntns: u32_at(b, 52),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(argv: &[u8], flags: u32) -> Vec<u8> {
        let mut b = vec![0u8; EXEC_SIZE];
        b[0..2].copy_from_slice(&VERSION.to_ne_bytes());
        b[2..4].copy_from_slice(&KIND_EXEC.to_ne_bytes());
        b[4..8].copy_from_slice(&flags.to_ne_bytes());
        b[8..12].copy_from_slice(&42u32.to_ne_bytes());
        b[24..32].copy_from_slice(&1_000u64.to_ne_bytes());
        b[56..60].copy_from_slice(&7u32.to_ne_bytes());
        b[60..64].copy_from_slice(&(argv.len() as u32).to_ne_bytes());
        b[64..68].copy_from_slice(b"true");
        b[80..87].copy_from_slice(b"/bin/tr");
        b[336..336 + argv.len()].copy_from_slice(argv);
        b
    }

    fn socket_record(family: u8, proto: u8, flags: u16) -> Vec<u8> {
        let mut b = vec![0u8; SOCKET_SIZE];
        b[0..2].copy_from_slice(&VERSION.to_ne_bytes());
        b[2..4].copy_from_slice(&KIND_SOCKET.to_ne_bytes());
        b[4] = family;
        b[5] = proto;
        b[6..8].copy_from_slice(&40000u16.to_ne_bytes());
        b[8..10].copy_from_slice(&443u16.to_ne_bytes());
        b[10..12].copy_from_slice(&flags.to_ne_bytes());
        b[12..16].copy_from_slice(&77u32.to_ne_bytes());
        b[32..40].copy_from_slice(&2_000u64.to_ne_bytes());
        b[40..48].copy_from_slice(&1_000u64.to_ne_bytes());
        b[48..56].copy_from_slice(&9u64.to_ne_bytes());
        b[64..68].copy_from_slice(&[172, 17, 0, 2]);
        b[80..84].copy_from_slice(&[192, 0, 2, 1]);
        b[96..98].copy_from_slice(b"nc");
        b
    }

    #[test]
    fn a_socket_record_decodes_with_or_without_its_owner() {
        let e = decode_socket(&socket_record(4, 6, OWNER_KNOWN), 10).unwrap();
        assert_eq!(
            (
                e.ts_ns,
                e.proto,
                e.src.to_string(),
                e.dst.to_string(),
                e.cgroup_id
            ),
            (
                2_010,
                6,
                "172.17.0.2:40000".into(),
                "192.0.2.1:443".into(),
                9
            )
        );
        let o = e.owner.unwrap();
        assert_eq!((o.pid, o.start_ns, o.comm.as_str()), (77, 1_010, "nc"));
        assert_eq!(
            decode_socket(&socket_record(4, 17, 0), 0).unwrap().owner,
            None
        );
        let v6 = decode_socket(&socket_record(6, 17, 0), 0).unwrap();
        assert_eq!(v6.src.ip().to_string(), "ac11:2::");
        // What the programs never write is refused, not guessed at.
        assert!(decode_socket(&socket_record(5, 6, 0), 0).is_err());
        assert!(decode_socket(&socket_record(4, 1, 0), 0).is_err());
        assert_eq!(
            decode(&socket_record(4, 6, 0)[..SOCKET_SIZE - 1], 0),
            Err(EventError::Size(SOCKET_SIZE - 1))
        );
    }

    #[test]
    fn an_exec_record_decodes_with_its_arguments() {
        let e = decode_exec(&record(b"true\0a b\0\xff\0", 0), 5).unwrap();
        assert_eq!(
            (e.pid, e.ts_ns, e.comm.as_str(), e.filename.as_str()),
            (42, 1_005, "true", "/bin/tr")
        );
        assert_eq!(e.argv, ["true", "a b", "\u{fffd}"]);
        assert!(!e.argv_truncated);
        let cut = decode_exec(&record(b"true\0abc", ARGV_TRUNCATED), 0).unwrap();
        assert_eq!(
            (cut.argv, cut.argv_truncated),
            (vec!["true".into(), "abc".into()], true)
        );
        assert!(decode_exec(&record(b"", 0), 0).unwrap().argv.is_empty());
    }

    #[test]
    fn the_values_of_our_own_secret_flags_are_never_stored() {
        let mut argv: Vec<String> = [
            "ip",
            "netns",
            "exec",
            "gw",
            "/usr/bin/nattrail",
            "triggers",
            "add",
            "--secret",
            "whsec_x",
            "--header=x-a=1",
            "--header",
            "x-b=2",
            "--url",
            "https://h/",
        ]
        .map(String::from)
        .to_vec();
        mask_own_secrets(&mut argv);
        assert_eq!(
            argv[7..],
            [
                "--secret",
                MASK,
                "--header=********",
                "--header",
                MASK,
                "--url",
                "https://h/"
            ]
        );
        // Another program's arguments are its own business.
        let mut other: Vec<String> = ["curl", "--header", "a=b"].map(String::from).to_vec();
        mask_own_secrets(&mut other);
        assert_eq!(other, ["curl", "--header", "a=b"]);
    }

    #[test]
    fn fork_and_exit_records_decode() {
        let mut b = vec![0u8; LIFE_SIZE];
        b[0..2].copy_from_slice(&VERSION.to_ne_bytes());
        b[2..4].copy_from_slice(&KIND_EXIT.to_ne_bytes());
        b[4..8].copy_from_slice(&77u32.to_ne_bytes());
        b[8..12].copy_from_slice(&5u32.to_ne_bytes());
        b[12..16].copy_from_slice(&(7u32 << 8).to_ne_bytes());
        b[16..24].copy_from_slice(&100u64.to_ne_bytes());
        b[40..42].copy_from_slice(b"sh");
        let Ok(Record::Life(e)) = decode(&b, 1) else {
            panic!("not a life record")
        };
        assert_eq!(
            (
                e.kind,
                e.pid,
                e.ppid,
                e.wait_status,
                e.ts_ns,
                e.comm.as_str()
            ),
            (LifeKind::Exit, 77, None, Some(7 << 8), 101, "sh")
        );
        b[2..4].copy_from_slice(&KIND_FORK.to_ne_bytes());
        let Ok(Record::Life(f)) = decode(&b, 0) else {
            panic!("not a life record")
        };
        assert_eq!(
            (f.kind, f.ppid, f.wait_status),
            (LifeKind::Fork, Some(5), None)
        );
        // A fork-sized record claiming to be an exec is refused.
        b[2..4].copy_from_slice(&KIND_EXEC.to_ne_bytes());
        assert!(decode(&b, 0).is_err());
    }

    #[test]
    fn hostile_records_are_refused_or_bounded() {
        assert_eq!(decode_exec(&[0; 10], 0), Err(EventError::Size(10)));
        let mut b = record(b"x\0", 0);
        b[0] = 9;
        assert!(matches!(
            decode_exec(&b, 0),
            Err(EventError::Version { version: 9, .. })
        ));
        // Lengths past their fields are cut to the field.
        let mut b = record(b"x\0", 0);
        b[56..60].copy_from_slice(&u32::MAX.to_ne_bytes());
        b[60..64].copy_from_slice(&u32::MAX.to_ne_bytes());
        let e = decode_exec(&b, 0).unwrap();
        assert!(e.filename.len() <= FILENAME_LEN);
        assert_eq!(e.argv[0], "x");
        assert!(e.argv.len() <= ARGV_LEN, "{} arguments", e.argv.len());
    }
}
