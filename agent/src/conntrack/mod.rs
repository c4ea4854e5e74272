//! The conntrack source: netlink sockets, decoding, kernel settings and the reader thread.

pub mod capture_file;
pub mod decode;
pub mod netlink_drops;
pub mod reader;
pub mod socket;
pub mod sysctl;
