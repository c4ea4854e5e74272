//! The kernel's count of messages dropped on one netlink socket, from /proc/net/netlink: the
//! exact number of events lost at a receive-buffer overflow (ENOBUFS only says "some").

/// NETLINK_NETFILTER, the `Eth` column of our sockets.
const NETLINK_NETFILTER: u32 = 12;

/// Reads the drop counter of the netfilter socket bound to `port_id` in this network
/// namespace; None when the file or the socket's line is unreadable.
pub fn read(port_id: u32) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netlink").ok()?;
    parse(&text, port_id)
}

/// Finds the `Drops` column of the line with protocol NETLINK_NETFILTER and `Pid` = `port_id`.
pub fn parse(text: &str, port_id: u32) -> Option<u64> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (eth, pid, drops) = (col("Eth")?, col("Pid")?, col("Drops")?);
    lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| {
            f.get(eth).and_then(|v| v.parse::<u32>().ok()) == Some(NETLINK_NETFILTER)
                && f.get(pid).and_then(|v| v.parse::<u32>().ok()) == Some(port_id)
        })
        .and_then(|f| f.get(drops)?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
000000004ba2d952 0   0          00000000 0        0        0     2        0        4
00000000aa11bb22 12  4021       00000005 8704     0        0     2        1873     99120
00000000aa11bb23 12  -4021      00000000 0        0        0     2        5        99121
00000000aa11bb24 0   4021       00000000 0        0        0     2        7        99122
";

    #[test]
    fn finds_our_socket_by_protocol_and_port() {
        assert_eq!(parse(SAMPLE, 4021), Some(1873));
        assert_eq!(parse(SAMPLE, 4022), None);
        assert_eq!(parse("garbage", 1), None);
        assert_eq!(parse("", 1), None);
    }

    #[test]
    fn reads_a_live_socket() {
        // Tests run as root (xtask and CI); a netfilter socket needs no group for this.
        let sock =
            crate::conntrack::socket::NfSocket::open(65536, std::time::Duration::from_millis(10))
                .expect("opening a netfilter socket");
        assert_eq!(read(sock.port_id()), Some(0));
    }
}
