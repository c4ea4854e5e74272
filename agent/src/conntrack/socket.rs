//! The `NETLINK_NETFILTER` sockets: one subscribed to conntrack events, one for table dumps.

use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::ConntrackMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

/// Multicast group of NEW events (NFNLGRP_CONNTRACK_NEW), not the legacy bitmask.
pub const GROUP_NEW: u32 = 1;
/// Multicast group of DESTROY events (NFNLGRP_CONNTRACK_DESTROY).
pub const GROUP_DESTROY: u32 = 3;

/// Errors of the netlink sockets.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// socket(2), bind(2) or a setsockopt failed.
    #[error("netlink socket setup failed at {step}: {source}")]
    Setup {
        /// Which call failed.
        step: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Sending the dump request failed.
    #[error("sending the conntrack dump request failed: {0}")]
    Send(io::Error),
}

fn setup(step: &'static str) -> impl FnOnce(io::Error) -> SocketError {
    move |source| SocketError::Setup { step, source }
}

/// Outcome of one receive.
pub enum Recv {
    /// A datagram of this many bytes is in the buffer.
    Data(usize),
    /// The receive timeout passed with nothing to read.
    Timeout,
    /// The kernel dropped messages because the receive buffer was full (ENOBUFS).
    Overflow,
}

/// A netlink socket on the netfilter family.
pub struct NfSocket {
    sock: Socket,
}

impl NfSocket {
    /// Opens a socket bound to an automatic port id, with a receive timeout so the reading
    /// thread can notice shutdown.
    pub fn open(rcvbuf_bytes: usize, timeout: Duration) -> Result<Self, SocketError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(setup("socket"))?;
        sock.bind_auto().map_err(setup("bind"))?;
        let this = NfSocket { sock };
        this.set_rcvbuf(rcvbuf_bytes)?;
        this.set_timeout(timeout)?;
        Ok(this)
    }

    /// Opens a socket subscribed to the NEW and DESTROY groups.
    pub fn events(rcvbuf_bytes: usize, timeout: Duration) -> Result<Self, SocketError> {
        let this = Self::open(rcvbuf_bytes, timeout)?;
        this.sock
            .add_membership(GROUP_NEW)
            .map_err(setup("join NEW group"))?;
        this.sock
            .add_membership(GROUP_DESTROY)
            .map_err(setup("join DESTROY group"))?;
        Ok(this)
    }

    /// SO_RCVBUFFORCE (needs CAP_NET_ADMIN, bypasses net.core.rmem_max); falls back to
    /// SO_RCVBUF when forcing is not permitted.
    fn set_rcvbuf(&self, bytes: usize) -> Result<(), SocketError> {
        if setsockopt(&self.sock, sockopt::RcvBufForce, &bytes).is_err() {
            self.sock.set_rx_buf_sz(bytes).map_err(setup("SO_RCVBUF"))?;
        }
        Ok(())
    }

    fn set_timeout(&self, timeout: Duration) -> Result<(), SocketError> {
        setsockopt(
            &self.sock,
            sockopt::ReceiveTimeout,
            &TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _),
        )
        .map_err(|e| SocketError::Setup {
            step: "SO_RCVTIMEO",
            source: e.into(),
        })
    }

    /// The effective receive buffer (the kernel reports twice the requested size).
    pub fn rcvbuf(&self) -> usize {
        self.sock.get_rx_buf_sz().unwrap_or(0)
    }

    /// The socket's netlink port id, the key of its row in /proc/net/netlink.
    pub fn port_id(&self) -> u32 {
        let mut addr = SocketAddr::new(0, 0);
        match self.sock.get_address(&mut addr) {
            Ok(()) => addr.port_number(),
            Err(_) => 0,
        }
    }

    /// Receives one datagram into `buf` (whose capacity must be at least 64 KiB), waiting
    /// up to the socket's timeout.
    pub fn recv(&self, buf: &mut Vec<u8>) -> io::Result<Recv> {
        self.recv_flags(buf, 0)
    }

    /// Receives one datagram if one is queued; `Recv::Timeout` when the queue is empty.
    pub fn recv_nowait(&self, buf: &mut Vec<u8>) -> io::Result<Recv> {
        self.recv_flags(buf, libc::MSG_DONTWAIT)
    }

    fn recv_flags(&self, buf: &mut Vec<u8>, flags: libc::c_int) -> io::Result<Recv> {
        buf.clear();
        match self.sock.recv(buf, flags) {
            Ok(n) => Ok(Recv::Data(n)),
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOBUFS) => Ok(Recv::Overflow),
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Recv::Timeout),
                _ => Err(e),
            },
        }
    }

    /// Asks the kernel for every conntrack entry of both families.
    pub fn request_dump(&self, seq: u32) -> Result<(), SocketError> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
                ConntrackMessage::Get(vec![]),
            )),
        );
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        let kernel = SocketAddr::new(0, 0);
        self.sock
            .send_to(&buf, &kernel, 0)
            .map_err(SocketError::Send)?;
        Ok(())
    }
}
