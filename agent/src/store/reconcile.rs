//! Flow reconciliation: which flows the trail holds open, which events add a row, and which
//! open flows a table dump shows gone. Pure state, no database: the writer asks it what to
//! write.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

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

/// What the trail remembers of an open flow, enough to write an inexact DESTROY row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFlow {
    /// Reply-direction tuple.
    pub reply: Tuple,
    /// 4 or 6.
    pub family: u8,
    /// conntrack mark.
    pub mark: u32,
    /// conntrack status bits.
    pub status: u32,
    /// When the flow began, if known.
    pub start_ns: Option<u64>,
    /// Found by a table dump rather than a NEW event.
    pub by_dump: bool,
    /// The last hour an interim slice of the flow was written for (the hour before its start
    /// while none was).
    pub covered: i32,
    /// Dump generation at insertion: flows added after a dump began are not judged by it.
    generation: u64,
}

/// The hour before the one a start falls in: no interim slice written yet.
fn uncovered(start_ns: Option<u64>) -> i32 {
    start_ns.map_or(i32::MIN, |ns| {
        super::trail::hour_of(super::trail::start_ms(ns)) - 1
    })
}

impl OpenFlow {
    /// An open flow loaded from the trail at start (older than any dump).
    pub fn loaded(
        reply: Tuple,
        family: u8,
        mark: u32,
        status: u32,
        start_ns: u64,
        by_dump: bool,
    ) -> Self {
        OpenFlow {
            reply,
            family,
            mark,
            status,
            start_ns: Some(start_ns),
            by_dump,
            covered: uncovered(Some(start_ns)),
            generation: 0,
        }
    }
}

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A flow opened: journal it.
    Open,
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

/// The open flows of the trail, and the table dump in progress.
#[derive(Debug)]
pub struct OpenFlows {
    open: HashMap<FlowKey, OpenFlow>,
    generation: u64,
    dump: Option<(u64, HashSet<FlowKey>)>,
}

impl Default for OpenFlows {
    fn default() -> Self {
        OpenFlows {
            open: HashMap::new(),
            generation: 1,
            dump: None,
        }
    }
}

impl OpenFlows {
    /// Flows open now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Adds a flow found open in the trail at start (kept if already there: the first
    /// record of a flow is its start).
    pub fn load(&mut self, key: FlowKey, flow: OpenFlow) {
        self.open.entry(key).or_insert(flow);
    }

    /// Forgets a flow that ended (replaying the trail at start).
    pub fn unload(&mut self, key: &FlowKey) {
        self.open.remove(key);
    }

    /// The open flow of `key`, if any.
    pub fn get(&self, key: &FlowKey) -> Option<&OpenFlow> {
        self.open.get(key)
    }

    /// Every open flow, in no particular order (for the checkpoint).
    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &OpenFlow)> {
        self.open.iter()
    }

    /// Takes one event: updates the open set and says whether it makes a row.
    pub fn on_event(&mut self, ev: &FlowEvent, received_ns: u64) -> Verdict {
        let key = FlowKey::of(ev);
        match ev.kind {
            EventKind::Update => Verdict::Ignore,
            EventKind::New | EventKind::Dump => {
                if ev.kind == EventKind::Dump
                    && let Some((_, seen)) = self.dump.as_mut()
                {
                    seen.insert(key);
                }
                if self.open.contains_key(&key) {
                    return Verdict::Duplicate;
                }
                let start_ns = ev.start_ns.or(ev.event_ns).or(Some(received_ns));
                self.open.insert(
                    key,
                    OpenFlow {
                        reply: ev.reply,
                        family: ev.family,
                        mark: ev.mark,
                        status: ev.status,
                        start_ns,
                        by_dump: ev.kind == EventKind::Dump,
                        covered: uncovered(start_ns),
                        generation: self.generation,
                    },
                );
                Verdict::Open
            }
            EventKind::Destroy => Verdict::Close(self.open.remove(&key)),
        }
    }

    /// The hour `hour` ended: calls `f` once for each hour up to it that an open flow
    /// (started by then) has no interim slice for yet, and marks those hours covered.
    pub fn sweep(&mut self, hour: i32, mut f: impl FnMut(&FlowKey, &OpenFlow, i32)) {
        for (k, v) in self.open.iter_mut() {
            let first = uncovered(v.start_ns) + 1;
            if first > hour || v.covered >= hour {
                continue;
            }
            for h in (v.covered + 1).max(first)..=hour {
                f(k, v, h);
            }
            v.covered = hour;
        }
    }

    /// A dump of the table begins: flows open now are judged by what it lists.
    pub fn dump_begin(&mut self) {
        self.dump = Some((self.generation, HashSet::new()));
        self.generation += 1;
    }

    /// The dump ended at `at_ns`: every flow open before it began and not listed is gone,
    /// at some instant after `alive_until_ns` (when it was last known alive) and before
    /// `at_ns`. Returns those flows, closed, in no particular order.
    pub fn dump_end(&mut self, at_ns: u64, alive_until_ns: Option<u64>) -> Vec<Closed> {
        let Some((dump_gen, seen)) = self.dump.take() else {
            return Vec::new();
        };
        let gone: Vec<FlowKey> = self
            .open
            .iter()
            .filter(|(k, v)| v.generation <= dump_gen && !seen.contains(k))
            .map(|(k, _)| *k)
            .collect();
        gone.into_iter()
            .filter_map(|key| {
                let flow = self.open.remove(&key)?;
                let lo = alive_until_ns.max(flow.start_ns).map(|lo| lo.min(at_ns));
                Some(Closed {
                    ev: FlowEvent {
                        kind: EventKind::Destroy,
                        family: flow.family,
                        proto: key.proto,
                        orig: key.orig,
                        reply: flow.reply,
                        ct_id: key.ct_id,
                        zone: key.zone,
                        mark: flow.mark,
                        status: flow.status,
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
                })
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
    use crate::pipeline::flow::IPS_SRC_NAT;

    fn ev(kind: EventKind, id: u32, sport: u16) -> FlowEvent {
        test_flow(kind, id, sport)
    }

    #[test]
    fn new_then_destroy_writes_both_and_closes_the_flow() {
        let mut o = OpenFlows::default();
        assert_eq!(o.on_event(&ev(EventKind::New, 1, 1000), 5), Verdict::Open);
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
        assert_eq!(o.on_event(&ev(EventKind::New, 2, 1000), 10), Verdict::Open);
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
            OpenFlow::loaded(
                ev(EventKind::New, 3, 3000).reply,
                4,
                0,
                IPS_SRC_NAT,
                50,
                false,
            ),
        );
        o.dump_begin();
        // Opened while the dump runs: the dump cannot be expected to list it.
        assert_eq!(o.on_event(&ev(EventKind::New, 4, 4000), 0), Verdict::Open);
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
