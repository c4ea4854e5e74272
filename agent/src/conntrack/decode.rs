//! Decoding of ctnetlink datagrams into [`FlowEvent`]s.
//!
//! The netlink and nfnetlink framing comes from `netlink-packet-core` and
//! `netlink-packet-netfilter` (their zero-copy buffer types and message-type enums). The
//! attribute walk is ours: the crate's typed parser allocates a `Vec` per nested attribute
//! and leaves ids, counters, timestamps and zones undecoded, and this is the hot path
//! (millions of events per second per core). A differential test checks our tuples, status
//! and mark against the crate's parser on captured messages.

use netlink_packet_core::{NLM_F_CREATE, NetlinkBuffer};
use netlink_packet_netfilter::NetfilterSubsystem;
use netlink_packet_netfilter::conntrack::ConntrackMessageType;

use crate::pipeline::flow::{Addr, Counters, EventKind, FlowEvent, Tuple};

/// Size of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;
/// Size of `struct nfgenmsg`.
const NFGENMSG_LEN: usize = 4;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

// enum ctattr_type (include/uapi/linux/netfilter/nfnetlink_conntrack.h)
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TIMESTAMP: u16 = 20;
const CTA_TIMESTAMP_EVENT: u16 = 27;

const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;
const CTA_TIMESTAMP_START: u16 = 1;
const CTA_TIMESTAMP_STOP: u16 = 2;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// Why a message could not be decoded. The datagram's other messages are still decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The netlink header is short or its length field disagrees with the datagram.
    #[error("bad netlink header at offset {offset}: {detail}")]
    Header {
        /// Byte offset of the message in the datagram.
        offset: usize,
        /// What was wrong.
        detail: String,
    },
    /// The message is shorter than its fixed nfgenmsg header.
    #[error("ctnetlink message type {msg_type:#06x} too short for nfgenmsg ({len} bytes)")]
    ShortPayload {
        /// nlmsg_type.
        msg_type: u16,
        /// Payload length.
        len: usize,
    },
    /// An attribute has a bad length or value.
    #[error("bad attribute {attr} in ctnetlink message: {detail}")]
    Attribute {
        /// Path of the attribute, e.g. "CTA_TUPLE_ORIG/CTA_TUPLE_IP".
        attr: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A mandatory attribute is absent.
    #[error("ctnetlink message lacks {0}")]
    Missing(&'static str),
    /// The address family is neither IPv4 nor IPv6.
    #[error("unsupported address family {0}")]
    Family(u8),
}

/// One message of a datagram.
#[derive(Debug, PartialEq, Eq)]
// Flows are the common case and move by value: boxing them would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
pub enum Message {
    /// A conntrack event or dump entry.
    Flow(FlowEvent),
    /// End of a multipart dump.
    Done,
    /// NLMSG_ERROR with its (negative errno) code; code 0 is an ACK.
    Error(i32),
    /// Anything else (other subsystems, GET, NOOP); ignored by the reader.
    Ignored(u16),
}

/// Iterates over the messages of one datagram. Stops after a header error, since
/// message boundaries are then unknown.
pub struct Messages<'a> {
    buf: &'a [u8],
    offset: usize,
    from_dump: bool,
}

/// Decodes a datagram received from the event groups or as a dump reply.
/// With `from_dump`, flow messages are tagged [`EventKind::Dump`].
pub fn messages(buf: &[u8], from_dump: bool) -> Messages<'_> {
    Messages {
        buf,
        offset: 0,
        from_dump,
    }
}

impl Iterator for Messages<'_> {
    type Item = Result<Message, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.offset..)?;
        if rest.is_empty() {
            return None;
        }
        let offset = self.offset;
        let packet = match NetlinkBuffer::new_checked(rest) {
            Ok(p) => p,
            Err(e) => {
                self.offset = self.buf.len();
                return Some(Err(DecodeError::Header {
                    offset,
                    detail: e.to_string(),
                }));
            }
        };
        let len = packet.length() as usize;
        // NLMSG_ALIGN: the next message starts on a 4-byte boundary.
        self.offset = offset.saturating_add((len + 3) & !3).min(self.buf.len());
        let msg_type = packet.message_type();
        let flags = packet.flags();
        let payload = &rest[NLMSG_HDRLEN..len];
        Some(decode_message(msg_type, flags, payload, self.from_dump))
    }
}

fn decode_message(
    msg_type: u16,
    flags: u16,
    payload: &[u8],
    from_dump: bool,
) -> Result<Message, DecodeError> {
    match msg_type {
        NLMSG_DONE => return Ok(Message::Done),
        NLMSG_ERROR => {
            let code = payload
                .get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(DecodeError::ShortPayload {
                    msg_type,
                    len: payload.len(),
                })?;
            return Ok(Message::Error(code));
        }
        NLMSG_NOOP | NLMSG_OVERRUN => return Ok(Message::Ignored(msg_type)),
        _ => {}
    }
    let subsys = NetfilterSubsystem::from((msg_type >> 8) as u8);
    if subsys != NetfilterSubsystem::Conntrack {
        return Ok(Message::Ignored(msg_type));
    }
    let kind = match ConntrackMessageType::from(msg_type as u8) {
        ConntrackMessageType::New if from_dump => EventKind::Dump,
        ConntrackMessageType::New if flags & NLM_F_CREATE != 0 => EventKind::New,
        ConntrackMessageType::New => EventKind::Update,
        ConntrackMessageType::Delete => EventKind::Destroy,
        _ => return Ok(Message::Ignored(msg_type)),
    };
    if payload.len() < NFGENMSG_LEN {
        return Err(DecodeError::ShortPayload {
            msg_type,
            len: payload.len(),
        });
    }
    let family = match payload[0] {
        NFPROTO_IPV4 => 4,
        NFPROTO_IPV6 => 6,
        other => return Err(DecodeError::Family(other)),
    };
    decode_flow(kind, family, &payload[NFGENMSG_LEN..]).map(Message::Flow)
}

fn attr_err(attr: &'static str, detail: impl ToString) -> DecodeError {
    DecodeError::Attribute {
        attr,
        detail: detail.to_string(),
    }
}

/// A zero-copy walk over netlink attributes (`struct nlattr` + value, 4-byte aligned).
/// Hand-written because it is the innermost loop of the hot path; stops after an error.
struct Nlas<'a> {
    buf: &'a [u8],
    attr: &'static str,
}

/// Netlink attribute flags carried in the type field (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = netlink_packet_core::NLA_TYPE_MASK;

/// One attribute: its type (flags masked off) and value.
#[derive(Clone, Copy)]
struct Attr<'a> {
    kind: u16,
    value: &'a [u8],
}

impl<'a> Attr<'a> {
    fn kind(&self) -> u16 {
        self.kind
    }

    fn value(&self) -> &'a [u8] {
        self.value
    }
}

/// A malformed attribute header, kept small and `Copy` so the walk's return value stays in
/// registers; turned into a [`DecodeError`] only when it happens.
#[derive(Clone, Copy, Debug)]
struct BadAttr {
    attr: &'static str,
    len: usize,
    left: usize,
}

impl From<BadAttr> for DecodeError {
    fn from(b: BadAttr) -> Self {
        if b.left < 4 {
            attr_err(b.attr, format!("{} trailing bytes", b.left))
        } else {
            attr_err(
                b.attr,
                format!("attribute length {} with {} bytes left", b.len, b.left),
            )
        }
    }
}

impl<'a> Iterator for Nlas<'a> {
    type Item = Result<Attr<'a>, BadAttr>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let buf = std::mem::take(&mut self.buf);
        let Some(&[l0, l1, k0, k1]) = buf.first_chunk::<4>() else {
            return Some(Err(BadAttr {
                attr: self.attr,
                len: 0,
                left: buf.len(),
            }));
        };
        let len = usize::from(u16::from_ne_bytes([l0, l1]));
        let kind = u16::from_ne_bytes([k0, k1]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Some(Err(BadAttr {
                attr: self.attr,
                len,
                left: buf.len(),
            }));
        }
        self.buf = buf.get((len + 3) & !3..).unwrap_or_default();
        Some(Ok(Attr {
            kind,
            value: &buf[4..len],
        }))
    }
}

fn nlas<'a>(buf: &'a [u8], attr: &'static str) -> Nlas<'a> {
    Nlas { buf, attr }
}

fn be_u16(v: &[u8], attr: &'static str) -> Result<u16, DecodeError> {
    v.get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| attr_err(attr, format!("{} bytes, need 2", v.len())))
}

fn be_u32(v: &[u8], attr: &'static str) -> Result<u32, DecodeError> {
    v.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| attr_err(attr, format!("{} bytes, need 4", v.len())))
}

fn be_u64(v: &[u8], attr: &'static str) -> Result<u64, DecodeError> {
    v.get(..8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| attr_err(attr, format!("{} bytes, need 8", v.len())))
}

fn byte(v: &[u8], attr: &'static str) -> Result<u8, DecodeError> {
    v.first()
        .copied()
        .ok_or_else(|| attr_err(attr, "empty value"))
}

struct DecodedTuple {
    tuple: Tuple,
    proto: Option<u8>,
    icmp: Option<(u8, u8)>,
}

fn decode_tuple(buf: &[u8], attr: &'static str) -> Result<DecodedTuple, DecodeError> {
    let mut out = DecodedTuple {
        tuple: Tuple::default(),
        proto: None,
        icmp: None,
    };
    let (mut have_src, mut have_dst) = (false, false);
    let (mut icmp_type, mut icmp_code) = (None, None);
    for nla in nlas(buf, attr) {
        let nla = nla?;
        match nla.kind() {
            CTA_TUPLE_IP => {
                for ip in nlas(nla.value(), "CTA_TUPLE_IP") {
                    let ip = ip?;
                    let v = ip.value();
                    let addr = match ip.kind() {
                        CTA_IP_V4_SRC | CTA_IP_V4_DST => Addr::from_v4(
                            v.get(..4)
                                .ok_or_else(|| attr_err("CTA_IP_V4", "short address"))?
                                .try_into()
                                .expect("4 bytes"),
                        ),
                        CTA_IP_V6_SRC | CTA_IP_V6_DST => Addr::from_v6(
                            v.get(..16)
                                .ok_or_else(|| attr_err("CTA_IP_V6", "short address"))?
                                .try_into()
                                .expect("16 bytes"),
                        ),
                        _ => continue,
                    };
                    if matches!(ip.kind(), CTA_IP_V4_SRC | CTA_IP_V6_SRC) {
                        out.tuple.src = addr;
                        have_src = true;
                    } else {
                        out.tuple.dst = addr;
                        have_dst = true;
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for p in nlas(nla.value(), "CTA_TUPLE_PROTO") {
                    let p = p?;
                    let v = p.value();
                    match p.kind() {
                        CTA_PROTO_NUM => out.proto = Some(byte(v, "CTA_PROTO_NUM")?),
                        CTA_PROTO_SRC_PORT => out.tuple.sport = be_u16(v, "CTA_PROTO_SRC_PORT")?,
                        CTA_PROTO_DST_PORT => out.tuple.dport = be_u16(v, "CTA_PROTO_DST_PORT")?,
                        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                            out.tuple.sport = be_u16(v, "CTA_PROTO_ICMP_ID")?
                        }
                        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                            icmp_type = Some(byte(v, "CTA_PROTO_ICMP_TYPE")?)
                        }
                        CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                            icmp_code = Some(byte(v, "CTA_PROTO_ICMP_CODE")?)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !have_src || !have_dst {
        return Err(attr_err(
            attr,
            "tuple without source or destination address",
        ));
    }
    if let Some(t) = icmp_type {
        out.icmp = Some((t, icmp_code.unwrap_or(0)));
        // The ICMP id plays the port on both sides, so that "public port" lookups (the reply
        // tuple's destination port) find ICMP flows by their translated id.
        out.tuple.dport = out.tuple.sport;
    }
    Ok(out)
}

fn decode_counters(buf: &[u8], attr: &'static str) -> Result<Counters, DecodeError> {
    let mut c = Counters::default();
    for nla in nlas(buf, attr) {
        let nla = nla?;
        let v = nla.value();
        match nla.kind() {
            CTA_COUNTERS_PACKETS => c.packets = be_u64(v, attr)?,
            CTA_COUNTERS_BYTES => c.bytes = be_u64(v, attr)?,
            CTA_COUNTERS32_PACKETS => c.packets = u64::from(be_u32(v, attr)?),
            CTA_COUNTERS32_BYTES => c.bytes = u64::from(be_u32(v, attr)?),
            _ => {}
        }
    }
    Ok(c)
}

fn decode_flow(kind: EventKind, family: u8, attrs: &[u8]) -> Result<FlowEvent, DecodeError> {
    let mut ev = FlowEvent {
        kind,
        family,
        proto: 0,
        orig: Tuple::default(),
        reply: Tuple::default(),
        ct_id: 0,
        zone: 0,
        mark: 0,
        status: 0,
        tcp_state: None,
        icmp: None,
        counters_orig: None,
        counters_reply: None,
        start_ns: None,
        stop_ns: None,
        event_ns: None,
    };
    let (mut have_orig, mut have_reply) = (false, false);
    for nla in nlas(attrs, "ctnetlink message") {
        let nla = nla?;
        let v = nla.value();
        match nla.kind() {
            CTA_TUPLE_ORIG => {
                let t = decode_tuple(v, "CTA_TUPLE_ORIG")?;
                ev.orig = t.tuple;
                ev.proto = t.proto.ok_or(DecodeError::Missing("CTA_PROTO_NUM"))?;
                ev.icmp = t.icmp;
                have_orig = true;
            }
            CTA_TUPLE_REPLY => {
                let t = decode_tuple(v, "CTA_TUPLE_REPLY")?;
                ev.reply = t.tuple;
                have_reply = true;
            }
            CTA_STATUS => ev.status = be_u32(v, "CTA_STATUS")?,
            CTA_MARK => ev.mark = be_u32(v, "CTA_MARK")?,
            CTA_ID => ev.ct_id = be_u32(v, "CTA_ID")?,
            CTA_ZONE => ev.zone = be_u16(v, "CTA_ZONE")?,
            CTA_COUNTERS_ORIG => ev.counters_orig = Some(decode_counters(v, "CTA_COUNTERS_ORIG")?),
            CTA_COUNTERS_REPLY => {
                ev.counters_reply = Some(decode_counters(v, "CTA_COUNTERS_REPLY")?)
            }
            CTA_TIMESTAMP => {
                for ts in nlas(v, "CTA_TIMESTAMP") {
                    let ts = ts?;
                    match ts.kind() {
                        CTA_TIMESTAMP_START => {
                            ev.start_ns = Some(be_u64(ts.value(), "CTA_TIMESTAMP_START")?)
                        }
                        CTA_TIMESTAMP_STOP => {
                            ev.stop_ns = Some(be_u64(ts.value(), "CTA_TIMESTAMP_STOP")?)
                        }
                        _ => {}
                    }
                }
            }
            CTA_TIMESTAMP_EVENT => ev.event_ns = Some(be_u64(v, "CTA_TIMESTAMP_EVENT")?),
            CTA_PROTOINFO => {
                for pi in nlas(v, "CTA_PROTOINFO") {
                    let pi = pi?;
                    if pi.kind() != CTA_PROTOINFO_TCP {
                        continue;
                    }
                    for tcp in nlas(pi.value(), "CTA_PROTOINFO_TCP") {
                        let tcp = tcp?;
                        if tcp.kind() == CTA_PROTOINFO_TCP_STATE {
                            ev.tcp_state = Some(byte(tcp.value(), "CTA_PROTOINFO_TCP_STATE")?);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if !have_orig {
        return Err(DecodeError::Missing("CTA_TUPLE_ORIG"));
    }
    if !have_reply {
        return Err(DecodeError::Missing("CTA_TUPLE_REPLY"));
    }
    if ev.stop_ns == Some(0) {
        ev.stop_ns = None;
    }
    if ev.start_ns == Some(0) {
        ev.start_ns = None;
    }
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_netfilter::conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple as NfTuple,
    };
    use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};

    /// Datagrams captured from the lab by `cargo xtask capture-fixture`.
    const FIXTURE: &[u8] = include_bytes!("../../../tests/fixtures/conntrack-lab.bin");

    fn datagrams() -> Vec<&'static [u8]> {
        crate::conntrack::capture_file::read_datagrams(FIXTURE).expect("fixture is a capture file")
    }

    fn flows(buf: &[u8]) -> Vec<FlowEvent> {
        messages(buf, false)
            .map(|m| m.expect("fixture message decodes"))
            .filter_map(|m| match m {
                Message::Flow(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fixture_decodes_completely() {
        let all: Vec<FlowEvent> = datagrams().into_iter().flat_map(flows).collect();
        assert!(all.len() >= 150, "fixture too small: {}", all.len());
        let news = all.iter().filter(|e| e.kind == EventKind::New).count();
        let destroys: Vec<&FlowEvent> = all
            .iter()
            .filter(|e| e.kind == EventKind::Destroy)
            .collect();
        assert!(news > 50 && destroys.len() > 50);
        assert!(all.iter().any(|e| e.family == 4) && all.iter().any(|e| e.family == 6));
        for proto in [6u8, 17, 1] {
            assert!(
                all.iter().any(|e| e.proto == proto),
                "no proto {proto} in fixture"
            );
        }
        for e in &all {
            assert_ne!(e.ct_id, 0, "every event carries CTA_ID");
            assert!(e.is_src_nat(), "lab flows are masqueraded: {e:?}");
            assert_ne!(
                e.orig.src, e.reply.dst,
                "SNAT changes the reply destination"
            );
        }
        for d in &destroys {
            let (o, r) = (d.counters_orig.unwrap(), d.counters_reply.unwrap());
            assert!(o.packets >= 1 && o.bytes >= 28 && r.packets >= 1, "{d:?}");
            let (start, stop) = (d.start_ns.unwrap(), d.stop_ns.unwrap());
            assert!(stop >= start && start > 1_600_000_000_000_000_000, "{d:?}");
        }
        let icmp = all.iter().find(|e| e.proto == 1).unwrap();
        assert!(icmp.icmp.is_some() && icmp.reply.dport == icmp.reply.sport);
    }

    /// Our tuples, status and mark agree with netlink-packet-netfilter's own parser.
    #[test]
    fn agrees_with_the_crate_parser() {
        let mut compared = 0;
        for g in datagrams() {
            let ours = flows(g);
            let mut theirs = Vec::new();
            let mut off = 0;
            while off < g.len() {
                let len = u32::from_ne_bytes(g[off..off + 4].try_into().unwrap()) as usize;
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&g[off..off + len])
                    .expect("crate parses the fixture");
                if let NetlinkPayload::InnerMessage(nf) = msg.payload
                    && let NetfilterMessageInner::Conntrack(ct) = nf.inner
                {
                    theirs.push(ct);
                }
                off += (len + 3) & !3;
            }
            assert_eq!(ours.len(), theirs.len());
            for (o, t) in ours.iter().zip(theirs) {
                let attrs = match t {
                    ConntrackMessage::New(a) | ConntrackMessage::Delete(a) => a,
                    other => panic!("unexpected {other:?}"),
                };
                for a in attrs {
                    match a {
                        ConntrackAttribute::CtaTupleOrig(t) => {
                            check_tuple(&t, &o.orig, o.proto, o.icmp.is_some())
                        }
                        ConntrackAttribute::CtaTupleReply(t) => {
                            check_tuple(&t, &o.reply, o.proto, o.icmp.is_some())
                        }
                        ConntrackAttribute::CtaStatus(s) => assert_eq!(s.bits(), o.status),
                        ConntrackAttribute::CtaMark(m) => assert_eq!(m, o.mark),
                        _ => {}
                    }
                }
                compared += 1;
            }
        }
        assert!(compared >= 150);
    }

    fn check_tuple(t: &[NfTuple], ours: &super::Tuple, proto: u8, icmp: bool) {
        for part in t {
            match part {
                NfTuple::Ip(ips) => {
                    for ip in ips {
                        match ip {
                            IPTuple::SourceAddress(a) => assert_eq!(Addr::from(*a), ours.src),
                            IPTuple::DestinationAddress(a) => assert_eq!(Addr::from(*a), ours.dst),
                            _ => {}
                        }
                    }
                }
                NfTuple::Proto(ps) => {
                    for p in ps {
                        match p {
                            ProtoTuple::Protocol(n) => assert_eq!(u8::from(*n), proto),
                            ProtoTuple::SourcePort(sp) if !icmp => assert_eq!(*sp, ours.sport),
                            ProtoTuple::DestinationPort(dp) if !icmp => assert_eq!(*dp, ours.dport),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Every truncation and every single-byte corruption of every captured datagram decodes
    /// to values or errors, never a panic.
    #[test]
    fn truncated_and_corrupted_input_never_panics() {
        let mut errors = 0usize;
        for g in datagrams().into_iter().take(60) {
            for cut in 0..g.len() {
                errors += messages(&g[..cut], false).filter(|m| m.is_err()).count();
            }
            let mut buf = g.to_vec();
            for i in 0..buf.len() {
                for x in [0xffu8, 0x80, 0x01] {
                    buf[i] ^= x;
                    errors += messages(&buf, i % 2 == 0).filter(|m| m.is_err()).count();
                    buf[i] ^= x;
                }
            }
        }
        assert!(errors > 0, "corruptions must be reported as errors");
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn message(msg_type: u16, flags: u16, family: u8, attrs: &[u8]) -> Vec<u8> {
        let len = 16 + 4 + attrs.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&msg_type.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&[family, 0, 0, 0]);
        v.extend_from_slice(attrs);
        v
    }

    fn tuple(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let ip = [nla(CTA_IP_V4_SRC, &src), nla(CTA_IP_V4_DST, &dst)].concat();
        let proto = [
            nla(CTA_PROTO_NUM, &[17]),
            nla(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
            nla(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
        ]
        .concat();
        [
            nla(CTA_TUPLE_IP | 0x8000, &ip),
            nla(CTA_TUPLE_PROTO | 0x8000, &proto),
        ]
        .concat()
    }

    fn udp_new_attrs() -> Vec<u8> {
        [
            nla(
                CTA_TUPLE_ORIG | 0x8000,
                &tuple([10, 77, 0, 10], [198, 51, 100, 2], 5000, 53),
            ),
            nla(
                CTA_TUPLE_REPLY | 0x8000,
                &tuple([198, 51, 100, 2], [198, 51, 100, 1], 53, 40001),
            ),
            nla(CTA_STATUS, &0x1d8u32.to_be_bytes()),
            nla(CTA_ID, &77u32.to_be_bytes()),
            nla(CTA_ZONE, &3u16.to_be_bytes()),
            nla(
                CTA_TIMESTAMP_EVENT,
                &1_700_000_000_000_000_123u64.to_be_bytes(),
            ),
        ]
        .concat()
    }

    #[test]
    fn crafted_message_decodes_and_new_needs_create_flag() {
        let m = message(0x100, NLM_F_CREATE, 2, &udp_new_attrs());
        let got: Vec<_> = messages(&m, false).collect();
        let Ok(Message::Flow(ev)) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(ev.kind, EventKind::New);
        assert_eq!((ev.ct_id, ev.zone, ev.proto), (77, 3, 17));
        assert_eq!(ev.reply.dst.to_string(), "198.51.100.1");
        assert_eq!(ev.reply.dport, 40001);
        assert_eq!(ev.event_ns, Some(1_700_000_000_000_000_123));
        assert!(ev.is_src_nat());
        let upd = message(0x100, 0, 2, &udp_new_attrs());
        assert!(matches!(
            messages(&upd, false).next(),
            Some(Ok(Message::Flow(FlowEvent {
                kind: EventKind::Update,
                ..
            })))
        ));
        let dump = message(0x100, 0, 2, &udp_new_attrs());
        assert!(matches!(
            messages(&dump, true).next(),
            Some(Ok(Message::Flow(FlowEvent {
                kind: EventKind::Dump,
                ..
            })))
        ));
    }

    #[test]
    fn malformed_messages_are_errors() {
        // Header length beyond the datagram.
        let mut m = message(0x100, NLM_F_CREATE, 2, &udp_new_attrs());
        m[0] = 0xff;
        m[1] = 0x7f;
        assert!(matches!(
            messages(&m, false).next(),
            Some(Err(DecodeError::Header { .. }))
        ));
        // Short nfgenmsg.
        let mut m = message(0x100, NLM_F_CREATE, 2, &[]);
        m.truncate(18);
        m[0] = 18;
        assert!(matches!(
            messages(&m, false).next(),
            Some(Err(DecodeError::ShortPayload { .. }))
        ));
        // Unknown family.
        let m = message(0x100, NLM_F_CREATE, 7, &udp_new_attrs());
        assert_eq!(
            messages(&m, false).next(),
            Some(Err(DecodeError::Family(7)))
        );
        // Missing reply tuple.
        let attrs = nla(
            CTA_TUPLE_ORIG | 0x8000,
            &tuple([10, 0, 0, 1], [10, 0, 0, 2], 1, 2),
        );
        let m = message(0x102, 0, 2, &attrs);
        assert_eq!(
            messages(&m, false).next(),
            Some(Err(DecodeError::Missing("CTA_TUPLE_REPLY")))
        );
        // A 2-byte CTA_ID.
        let attrs = [udp_new_attrs(), nla(CTA_ID, &[0, 1])].concat();
        let m = message(0x102, 0, 2, &attrs);
        assert!(matches!(
            messages(&m, false).next(),
            Some(Err(DecodeError::Attribute { attr: "CTA_ID", .. }))
        ));
        // An attribute claiming more bytes than remain.
        let mut attrs = udp_new_attrs();
        attrs.extend_from_slice(&[200, 0, 12, 0]);
        let m = message(0x102, 0, 2, &attrs);
        assert!(matches!(
            messages(&m, false).next(),
            Some(Err(DecodeError::Attribute { .. }))
        ));
        // A good message after a bad one in the same datagram still decodes.
        let bad = message(0x100, NLM_F_CREATE, 7, &udp_new_attrs());
        let good = message(0x102, 0, 2, &udp_new_attrs());
        let both = [bad, good].concat();
        let got: Vec<_> = messages(&both, false).collect();
        assert!(got[0].is_err() && matches!(got[1], Ok(Message::Flow(_))));
    }

    #[test]
    fn done_and_error_messages() {
        let mut done = message(NLMSG_DONE, 0, 0, &[]);
        done.truncate(20);
        assert_eq!(messages(&done, true).next(), Some(Ok(Message::Done)));
        let mut err = message(NLMSG_ERROR, 0, 0, &[]);
        err[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(messages(&err, true).next(), Some(Ok(Message::Error(-1))));
    }
}
