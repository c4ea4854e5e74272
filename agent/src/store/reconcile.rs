//! Flow reconciliation: which flows the trail holds open, which events add a row, and which
//! open flows a table dump shows gone. Pure state, no database: the writer asks it what to
//! write.

use super::open_table::{self, Narrow, Slot, Table, Wide};
use crate::pipeline::flow::{EventKind, FlowEvent, Tuple};

/// Identity of a live conntrack entry: its zone, original tuple and kernel id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The kernel's id of the entry.
    pub ct_id: u32,
    /// conntrack zone.
    pub zone: u16,
    /// IP protocol.
    pub proto: u8,
    /// Original-direction tuple.
    pub orig: Tuple,
}

impl FlowKey {
    /// The key of an event's flow.
    pub fn of(ev: &FlowEvent) -> Self {
        FlowKey {
            ct_id: ev.ct_id,
            zone: ev.zone,
            proto: ev.proto,
            orig: ev.orig,
        }
    }
}

/// What the trail remembers of an open flow: enough to write its slices, and an inexact end
/// when a dump shows it gone. (Its conntrack mark and status bits are not kept: nothing
/// reads them back, and an open flow must stay small.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFlow {
    /// Reply-direction tuple.
    pub reply: Tuple,
    /// When the flow began, if known.
    pub start_ns: Option<u64>,
    /// Found by a table dump rather than a NEW event.
    pub by_dump: bool,
    /// The last hour an interim slice of the flow was written for (the hour before its start
    /// while none was).
    pub covered: i32,
}

/// The hour before the one a start falls in: no interim slice written yet.
fn uncovered(start_ns: Option<u64>) -> i32 {
    start_ns.map_or(i32::MIN, |ns| {
        super::trail::hour_of(super::trail::start_ms(ns)) - 1
    })
}

impl OpenFlow {
    /// An open flow loaded from the trail at start.
    pub fn loaded(reply: Tuple, start_ns: u64, by_dump: bool) -> Self {
        OpenFlow {
            reply,
            start_ns: Some(start_ns),
            by_dump,
            covered: uncovered(Some(start_ns)),
        }
    }
}

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A flow opened: journal it (its key and what the open set holds of it).
    Open(FlowKey, OpenFlow),
    /// A flow ended: write its final slice, with what the trail knew of it while open (none
    /// when it opened before the trail saw it).
    Close(Option<OpenFlow>),
    /// The flow is already open in the trail (a dump entry or a repeated NEW): skip it.
    Duplicate,
    /// Not a trail event (UPDATE).
    Ignore,
}

/// A flow a dump showed gone: the DESTROY to write, and the earliest its end can have been.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// A DESTROY built from what the trail knew of the flow (no counters, no stop time).
    pub ev: FlowEvent,
    /// Lower bound of the unknown end.
    pub end_lo_ns: Option<u64>,
    /// What the trail knew of the flow while open.
    pub flow: OpenFlow,
}

/// The open flows of the trail, and whether a table dump is in progress. A flow lives in
/// the narrow table when its layout fits (see `open_table`), else in the wide one.
#[derive(Debug, Default)]
pub struct OpenFlows {
    narrow: Table<Narrow>,
    wide: Table<Wide>,
    dumping: bool,
}

impl OpenFlows {
    /// Flows open now.
    pub fn len(&self) -> usize {
        self.narrow.len() + self.wide.len()
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows held in the wide layout (IPv6, destination NAT).
    pub fn wide_len(&self) -> usize {
        self.wide.len()
    }

    fn contains(&self, key: &FlowKey) -> bool {
        self.narrow.contains(key) || self.wide.contains(key)
    }

    fn insert(&mut self, key: &FlowKey, flow: &OpenFlow, seen: bool) {
        if !self.narrow.insert(key, flow, seen) {
            self.wide.insert(key, flow, seen);
        }
    }

    /// Adds a flow found open in the trail at start (kept if already there: the first
    /// record of a flow is its start).
    pub fn load(&mut self, key: FlowKey, flow: OpenFlow) {
        if !self.contains(&key) {
            self.insert(&key, &flow, false);
        }
    }

    /// Forgets a flow that ended (replaying the trail at start).
    pub fn unload(&mut self, key: &FlowKey) {
        self.remove(key);
    }

    fn remove(&mut self, key: &FlowKey) -> Option<OpenFlow> {
        self.narrow.remove(key).or_else(|| self.wide.remove(key))
    }

    /// The open flow of `key`, if any.
    pub fn get(&self, key: &FlowKey) -> Option<OpenFlow> {
        self.narrow.get(key).or_else(|| self.wide.get(key))
    }

    /// Every open flow, in no particular order (for the checkpoint).
    pub fn iter(&self) -> impl Iterator<Item = (FlowKey, OpenFlow)> + '_ {
        self.narrow.iter().chain(self.wide.iter())
    }

    /// Every open flow, IPv4 source NAT first, each layout by public address and port.
    pub fn iter_by_public(&self) -> impl Iterator<Item = (FlowKey, OpenFlow)> + '_ {
        self.narrow
            .iter_by_public()
            .chain(self.wide.iter_by_public())
    }

    /// Takes one event: updates the open set and says whether it makes a row.
    pub fn on_event(&mut self, ev: &FlowEvent, received_ns: u64) -> Verdict {
        let key = FlowKey::of(ev);
        match ev.kind {
            EventKind::Update => Verdict::Ignore,
            EventKind::New | EventKind::Dump => {
                let listed = ev.kind == EventKind::Dump && self.dumping;
                if listed && (self.narrow.mark_seen(&key) || self.wide.mark_seen(&key)) {
                    return Verdict::Duplicate;
                }
                if self.contains(&key) {
                    return Verdict::Duplicate;
                }
                let start_ns = ev.start_ns.or(ev.event_ns).or(Some(received_ns));
                let flow = OpenFlow {
                    reply: ev.reply,
                    start_ns,
                    by_dump: ev.kind == EventKind::Dump,
                    covered: uncovered(start_ns),
                };
                // Opened while a dump runs: that dump cannot be expected to list it.
                self.insert(&key, &flow, self.dumping);
                Verdict::Open(key, flow)
            }
            EventKind::Destroy => Verdict::Close(self.remove(&key)),
        }
    }

    /// The hour `hour` ended: calls `f` once for each hour up to it that an open flow
    /// (started by then) has no interim slice for yet, and marks those hours covered.
    pub fn sweep(&mut self, hour: i32, mut f: impl FnMut(&FlowKey, &OpenFlow, i32)) {
        self.narrow.for_each_mut(|s| {
            if let Some((flow, hours)) = open_table::cover(s, hour) {
                let key = s.key();
                hours.for_each(|h| f(&key, &flow, h));
            }
        });
        self.wide.for_each_mut(|s| {
            if let Some((flow, hours)) = open_table::cover(s, hour) {
                let key = s.key();
                hours.for_each(|h| f(&key, &flow, h));
            }
        });
    }

    /// A dump of the table begins: flows open now are judged by what it lists.
    pub fn dump_begin(&mut self) {
        self.narrow.for_each_mut(open_table::unsee);
        self.wide.for_each_mut(open_table::unsee);
        self.dumping = true;
    }

    /// The dump ended at `at_ns`: every flow open before it began and not listed is gone,
    /// at some instant after `alive_until_ns` (when it was last known alive) and before
    /// `at_ns`. Returns those flows, closed, in no particular order.
    pub fn dump_end(&mut self, at_ns: u64, alive_until_ns: Option<u64>) -> Vec<Closed> {
        if !std::mem::take(&mut self.dumping) {
            return Vec::new();
        }
        let mut gone = self.narrow.remove_where(|s| !open_table::seen(s));
        gone.extend(self.wide.remove_where(|s| !open_table::seen(s)));
        gone.into_iter()
            .map(|(key, flow)| {
                let lo = alive_until_ns.max(flow.start_ns).map(|lo| lo.min(at_ns));
                Closed {
                    ev: FlowEvent {
                        kind: EventKind::Destroy,
                        family: if key.orig.src.is_v4() { 4 } else { 6 },
                        proto: key.proto,
                        orig: key.orig,
                        reply: flow.reply,
                        ct_id: key.ct_id,
                        zone: key.zone,
                        mark: 0,
                        status: 0,
                        tcp_state: None,
                        icmp: None,
                        counters_orig: None,
                        counters_reply: None,
                        start_ns: flow.start_ns,
                        stop_ns: None,
                        event_ns: None,
                    },
                    end_lo_ns: lo,
                    flow,
                }
            })
            .collect()
    }
}

/// A TCP flow of client port `sport` and kernel id `id` through 203.0.113.1, for the store's
/// unit tests.
#[cfg(test)]
pub(crate) fn test_flow(kind: EventKind, id: u32, sport: u16) -> FlowEvent {
    FlowEvent {
        kind,
        family: 4,
        proto: 6,
        orig: Tuple {
            src: crate::pipeline::flow::Addr::from_v4([10, 0, 0, 2]),
            dst: crate::pipeline::flow::Addr::from_v4([198, 51, 100, 2]),
            sport,
            dport: 443,
        },
        reply: Tuple {
            src: crate::pipeline::flow::Addr::from_v4([198, 51, 100, 2]),
            dst: crate::pipeline::flow::Addr::from_v4([203, 0, 113, 1]),
            sport: 443,
            dport: sport,
        },
        ct_id: id,
        zone: 0,
        mark: 0,
        status: crate::pipeline::flow::IPS_SRC_NAT,
        tcp_state: None,
        icmp: None,
        counters_orig: None,
        counters_reply: None,
        start_ns: None,
        stop_ns: None,
        event_ns: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, id: u32, sport: u16) -> FlowEvent {
        test_flow(kind, id, sport)
    }

    #[test]
    fn new_then_destroy_writes_both_and_closes_the_flow() {
        let mut o = OpenFlows::default();
        assert!(matches!(
            o.on_event(&ev(EventKind::New, 1, 1000), 5),
            Verdict::Open(..)
        ));
        assert_eq!(o.len(), 1);
        // A repeated NEW or a dump entry of an open flow adds nothing.
        assert_eq!(
            o.on_event(&ev(EventKind::New, 1, 1000), 6),
            Verdict::Duplicate
        );
        assert_eq!(
            o.on_event(&ev(EventKind::Dump, 1, 1000), 7),
            Verdict::Duplicate
        );
        assert_eq!(
            o.on_event(&ev(EventKind::Update, 1, 1000), 8),
            Verdict::Ignore
        );
        assert!(matches!(
            o.on_event(&ev(EventKind::Destroy, 1, 1000), 9),
            Verdict::Close(Some(f)) if f.start_ns == Some(5) && !f.by_dump
        ));
        assert_eq!(
            o.on_event(&ev(EventKind::Destroy, 1, 1000), 9),
            Verdict::Close(None)
        );
        assert!(o.is_empty());
        // The same tuple with another kernel id is another flow.
        assert!(matches!(
            o.on_event(&ev(EventKind::New, 2, 1000), 10),
            Verdict::Open(..)
        ));
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn a_dump_closes_flows_it_does_not_list_with_a_bounded_end() {
        let mut o = OpenFlows::default();
        let mut kept = ev(EventKind::New, 1, 1000);
        kept.start_ns = Some(100);
        let mut gone = ev(EventKind::New, 2, 2000);
        gone.start_ns = Some(200);
        o.on_event(&kept, 0);
        o.on_event(&gone, 0);
        o.load(
            FlowKey::of(&ev(EventKind::New, 3, 3000)),
            OpenFlow::loaded(ev(EventKind::New, 3, 3000).reply, 50, false),
        );
        o.dump_begin();
        // Opened while the dump runs: the dump cannot be expected to list it.
        assert!(matches!(
            o.on_event(&ev(EventKind::New, 4, 4000), 0),
            Verdict::Open(..)
        ));
        assert_eq!(
            o.on_event(&ev(EventKind::Dump, 1, 1000), 0),
            Verdict::Duplicate
        );
        let mut closed = o.dump_end(1_000, Some(150));
        closed.sort_by_key(|c| c.ev.ct_id);
        let got: Vec<(u32, Option<u64>, Option<u64>)> = closed
            .iter()
            .map(|c| (c.ev.ct_id, c.ev.start_ns, c.end_lo_ns))
            .collect();
        // Flow 2 started after the last sign of life: its end is after its start. Flow 3
        // (loaded at start) was last known alive at 150.
        assert_eq!(got, [(2, Some(200), Some(200)), (3, Some(50), Some(150))]);
        assert!(
            closed
                .iter()
                .all(|c| c.ev.kind == EventKind::Destroy && c.ev.reply.dport == c.ev.orig.sport)
        );
        assert_eq!(o.len(), 2, "flows 1 and 4 stay open");
        // A second DumpEnd without a DumpBegin closes nothing.
        assert!(o.dump_end(2_000, None).is_empty());
    }

    #[test]
    fn the_end_bound_never_passes_the_dump() {
        let mut o = OpenFlows::default();
        let mut f = ev(EventKind::New, 1, 1000);
        f.start_ns = Some(5_000);
        o.on_event(&f, 0);
        o.dump_begin();
        let closed = o.dump_end(1_000, Some(9_000));
        assert_eq!(closed[0].end_lo_ns, Some(1_000));
    }
}
