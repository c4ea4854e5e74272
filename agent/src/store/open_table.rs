//! The memory layout of the open-flow set: a dense array of flows and a hash index of 4-byte
//! positions into it, so that a CGNAT's millions of open flows stay within ≤ 64 B each.
//!
//! Written by hand rather than a `HashMap<FlowKey, OpenFlow>` because that map measured
//! 338 B per open flow (`cargo xtask bench open-flows`): 160-byte entries (16-byte aligned
//! IPv6-sized addresses), times the up to 2.3× slack of a table that doubles. Here the
//! common flow (IPv4, source NAT only, which is nearly every flow of a NAT gateway) takes a
//! 36-byte slot in an array that grows by an eighth, and the index holds only positions.
//! Anything else (IPv6, destination NAT, a reply tuple that is not the usual mirror) takes
//! a wide slot in a second table of the same shape.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::reconcile::{FlowKey, OpenFlow};
use super::trail;
use crate::pipeline::flow::{Addr, Tuple};

/// Slot bit: found by a table dump rather than a NEW event.
const BY_DUMP: u8 = 1;
/// Slot bit: the table dump in progress listed the flow, or it opened during that dump.
const SEEN: u8 = 2;

/// One open flow as a table holds it.
pub(super) trait Slot: Copy {
    /// The slot for `key` and `flow`, or None when this layout cannot hold them exactly.
    fn new(key: &FlowKey, flow: &OpenFlow, seen: bool) -> Option<Self>;
    /// The flow's identity.
    fn key(&self) -> FlowKey;
    /// What the trail remembers of the flow.
    fn flow(&self) -> OpenFlow;
    /// Marks the hours up to `hour` as having their interim slice.
    fn set_covered(&mut self, hour: i32);
    /// The slot's bits.
    fn bits(&mut self) -> &mut u8;
    /// The public address (IPv4 mapped) and port, the checkpoint's order.
    fn public(&self) -> (u128, u16);
}

fn bits_of(flow: &OpenFlow, seen: bool) -> u8 {
    (if flow.by_dump { BY_DUMP } else { 0 }) | if seen { SEEN } else { 0 }
}

/// An IPv4 flow with source NAT only: 36 bytes, 4-byte aligned.
#[derive(Clone, Copy, Debug)]
pub(super) struct Narrow {
    src: u32,
    dst: u32,
    public: u32,
    ct_id: u32,
    start_lo: u32,
    start_hi: u32,
    sport: u16,
    dport: u16,
    pub_port: u16,
    zone: u16,
    /// Hours covered by interim slices, counted from the hour before the start's.
    covered: u16,
    proto: u8,
    bits: u8,
}

impl Narrow {
    fn start_ns(&self) -> u64 {
        u64::from(self.start_hi) << 32 | u64::from(self.start_lo)
    }

    fn first_hour(&self) -> i32 {
        trail::hour_of(trail::start_ms(self.start_ns())) - 1
    }
}

impl Slot for Narrow {
    fn new(key: &FlowKey, flow: &OpenFlow, seen: bool) -> Option<Self> {
        let v4 = |a: Addr| a.is_v4().then_some(a.0 as u32);
        let start = flow.start_ns?;
        let mut slot = Narrow {
            src: v4(key.orig.src)?,
            dst: v4(key.orig.dst)?,
            public: v4(flow.reply.dst)?,
            ct_id: key.ct_id,
            start_lo: start as u32,
            start_hi: (start >> 32) as u32,
            sport: key.orig.sport,
            dport: key.orig.dport,
            pub_port: flow.reply.dport,
            zone: key.zone,
            covered: 0,
            proto: key.proto,
            bits: bits_of(flow, seen),
        };
        let from = slot.first_hour();
        if flow.covered < from || flow.covered - from > i32::from(u16::MAX) {
            return None;
        }
        slot.covered = (flow.covered - from) as u16;
        // Exact or nothing: a reply tuple this layout would rebuild differently goes wide.
        (slot.key() == *key && slot.flow() == *flow).then_some(slot)
    }

    fn key(&self) -> FlowKey {
        FlowKey {
            ct_id: self.ct_id,
            zone: self.zone,
            proto: self.proto,
            orig: Tuple {
                src: Addr::from_v4(self.src.to_be_bytes()),
                dst: Addr::from_v4(self.dst.to_be_bytes()),
                sport: self.sport,
                dport: self.dport,
            },
        }
    }

    fn flow(&self) -> OpenFlow {
        // ICMP carries its id as both ports of each direction (see the decoder).
        let icmp = matches!(self.proto, 1 | 58);
        OpenFlow {
            reply: Tuple {
                src: Addr::from_v4(self.dst.to_be_bytes()),
                dst: Addr::from_v4(self.public.to_be_bytes()),
                sport: if icmp { self.pub_port } else { self.dport },
                dport: self.pub_port,
            },
            start_ns: Some(self.start_ns()),
            by_dump: self.bits & BY_DUMP != 0,
            covered: self.first_hour() + i32::from(self.covered),
        }
    }

    fn set_covered(&mut self, hour: i32) {
        self.covered = (hour - self.first_hour()).clamp(0, i32::from(u16::MAX)) as u16;
    }

    fn bits(&mut self) -> &mut u8 {
        &mut self.bits
    }

    fn public(&self) -> (u128, u16) {
        (Addr::from_v4(self.public.to_be_bytes()).0, self.pub_port)
    }
}

/// Any other flow, as the pipeline hands it over.
#[derive(Clone, Copy, Debug)]
pub(super) struct Wide {
    key: FlowKey,
    flow: OpenFlow,
    bits: u8,
}

impl Slot for Wide {
    fn new(key: &FlowKey, flow: &OpenFlow, seen: bool) -> Option<Self> {
        Some(Wide {
            key: *key,
            flow: *flow,
            bits: bits_of(flow, seen),
        })
    }

    fn key(&self) -> FlowKey {
        self.key
    }

    fn flow(&self) -> OpenFlow {
        self.flow
    }

    fn set_covered(&mut self, hour: i32) {
        self.flow.covered = hour;
    }

    fn bits(&mut self) -> &mut u8 {
        &mut self.bits
    }

    fn public(&self) -> (u128, u16) {
        (self.flow.reply.dst.0, self.flow.reply.dport)
    }
}

/// Open flows of one slot layout: slots kept dense (a removal moves the last one into the
/// hole), found through an index of their positions.
#[derive(Debug)]
pub(super) struct Table<S> {
    slots: Vec<S>,
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl<S> Default for Table<S> {
    fn default() -> Self {
        Table {
            slots: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<S: Slot> Table<S> {
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    fn position(&self, key: &FlowKey) -> Option<usize> {
        let h = self.hasher.hash_one(key);
        self.index
            .find(h, |&i| self.slots[i as usize].key() == *key)
            .map(|&i| i as usize)
    }

    pub(super) fn contains(&self, key: &FlowKey) -> bool {
        self.position(key).is_some()
    }

    pub(super) fn get(&self, key: &FlowKey) -> Option<OpenFlow> {
        self.position(key).map(|i| self.slots[i].flow())
    }

    /// Sets the dump's SEEN bit of `key`'s flow; false when it is not here.
    pub(super) fn mark_seen(&mut self, key: &FlowKey) -> bool {
        match self.position(key) {
            Some(i) => {
                *self.slots[i].bits() |= SEEN;
                true
            }
            None => false,
        }
    }

    /// Adds a flow not held yet; gives it back when this layout cannot hold it.
    pub(super) fn insert(&mut self, key: &FlowKey, flow: &OpenFlow, seen: bool) -> bool {
        let Some(slot) = S::new(key, flow, seen) else {
            return false;
        };
        if self.slots.len() == self.slots.capacity() {
            // Grow by an eighth, not double: the slack is what a million flows pay for.
            self.slots.reserve_exact((self.slots.len() / 8).max(1024));
        }
        let at = self.slots.len() as u32;
        self.slots.push(slot);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index.insert_unique(hasher.hash_one(key), at, |&i| {
            hasher.hash_one(slots[i as usize].key())
        });
        true
    }

    /// Removes `key`'s flow and returns it.
    pub(super) fn remove(&mut self, key: &FlowKey) -> Option<OpenFlow> {
        let h = self.hasher.hash_one(key);
        let slots = &self.slots;
        let at = match self
            .index
            .find_entry(h, |&i| slots[i as usize].key() == *key)
        {
            Ok(entry) => entry.remove().0 as usize,
            Err(_) => return None,
        };
        let gone = self.slots.swap_remove(at);
        if at < self.slots.len() {
            // The last slot moved into the hole: its index entry follows it.
            let moved = self.slots.len() as u32;
            let h = self.hasher.hash_one(self.slots[at].key());
            if let Some(i) = self.index.find_mut(h, |&i| i == moved) {
                *i = at as u32;
            }
        }
        self.shrink();
        Some(gone.flow())
    }

    /// Gives memory back after a wave of flows has ended.
    fn shrink(&mut self) {
        let n = self.slots.len();
        if self.slots.capacity() > n + n / 4 + 4096 {
            self.slots.shrink_to(n + n / 8);
        }
        if self.index.capacity() > 4 * n + 4096 {
            let (slots, hasher) = (&self.slots, &self.hasher);
            self.index
                .shrink_to(2 * n, |&i| hasher.hash_one(slots[i as usize].key()));
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (FlowKey, OpenFlow)> + '_ {
        self.slots.iter().map(|s| (s.key(), s.flow()))
    }

    /// Every flow, by public address and port: sorted here, through 4-byte positions, rather
    /// than by the database, whose sort of millions of rows costs more than the flows.
    pub(super) fn iter_by_public(&self) -> impl Iterator<Item = (FlowKey, OpenFlow)> + '_ {
        let mut order: Vec<u32> = (0..self.slots.len() as u32).collect();
        order.sort_unstable_by_key(|&i| self.slots[i as usize].public());
        order.into_iter().map(|i| {
            let s = &self.slots[i as usize];
            (s.key(), s.flow())
        })
    }

    /// Calls `f` on every flow, which may change its covered hour and its bits.
    pub(super) fn for_each_mut(&mut self, mut f: impl FnMut(&mut S)) {
        self.slots.iter_mut().for_each(&mut f);
    }

    /// Removes every flow `gone` picks, and returns them.
    pub(super) fn remove_where(
        &mut self,
        mut gone: impl FnMut(&mut S) -> bool,
    ) -> Vec<(FlowKey, OpenFlow)> {
        let keys: Vec<FlowKey> = self
            .slots
            .iter_mut()
            .filter_map(|s| gone(s).then(|| s.key()))
            .collect();
        keys.into_iter()
            .filter_map(|k| self.remove(&k).map(|f| (k, f)))
            .collect()
    }
}

/// The SEEN bit of a slot.
pub(super) fn seen<S: Slot>(s: &mut S) -> bool {
    *s.bits() & SEEN != 0
}

/// Clears the SEEN bit of a slot (a dump begins).
pub(super) fn unsee<S: Slot>(s: &mut S) {
    *s.bits() &= !SEEN;
}

/// The hours up to `hour` an open flow has no interim slice for yet (None when none), and
/// marks them covered.
pub(super) fn cover<S: Slot>(
    s: &mut S,
    hour: i32,
) -> Option<(OpenFlow, std::ops::RangeInclusive<i32>)> {
    let flow = s.flow();
    let first = flow
        .start_ns
        .map_or(i32::MIN, |ns| trail::hour_of(trail::start_ms(ns)));
    if first > hour || flow.covered >= hour {
        return None;
    }
    s.set_covered(hour);
    let floor = hour.saturating_sub(trail::BACKFILL_HOURS - 1);
    Some((flow, (flow.covered + 1).max(first).max(floor)..=hour))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::pipeline::flow::EventKind;
    use crate::store::reconcile::{OpenFlows, test_flow};

    /// Flow `i` of a mix: TCP with source NAT, ICMP, destination NAT, IPv6.
    fn flow(i: u32) -> (FlowKey, OpenFlow) {
        let mut ev = test_flow(EventKind::New, i, 1024 + (i % 5000) as u16);
        ev.reply.dport = 30_000 + (i % 7000) as u16;
        match i % 4 {
            1 => {
                ev.proto = 1;
                ev.orig.dport = ev.orig.sport;
                ev.reply.sport = ev.reply.dport;
            }
            2 => ev.reply.src = Addr::from_v4([192, 168, 1, 9]),
            3 => {
                ev.orig.src = Addr(0x2001_0db8 << 96 | u128::from(i));
                ev.reply.dst = ev.orig.src;
            }
            _ => {}
        }
        let start = 1_700_000_000_000_000_000 + u64::from(i) * 1_000_003;
        (
            FlowKey::of(&ev),
            OpenFlow::loaded(ev.reply, start, i.is_multiple_of(3)),
        )
    }

    #[test]
    fn a_flow_goes_narrow_only_when_it_comes_back_exactly() {
        let narrow: Vec<bool> = (0..4)
            .map(|i| {
                let (k, f) = flow(i);
                Narrow::new(&k, &f, false).is_some()
            })
            .collect();
        assert_eq!(narrow, [true, true, false, false], "TCP, ICMP, DNAT, IPv6");
        assert_eq!(std::mem::size_of::<Narrow>(), 36);
        // A covered hour far past the start saturates rather than wraps.
        let (k, mut f) = flow(0);
        f.covered += 70_000;
        assert!(Narrow::new(&k, &f, false).is_none());
    }

    /// The table against a plain map, through inserts, removals (which move slots) and
    /// sweeps, over flows of every layout.
    #[test]
    fn the_table_answers_as_a_map_would() {
        let mut model: HashMap<FlowKey, OpenFlow> = HashMap::new();
        let mut table = OpenFlows::default();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for step in 0..60_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (k, f) = flow((x % 20_000) as u32);
            if x & (1 << 40) == 0 {
                table.load(k, f);
                model.entry(k).or_insert(f);
            } else {
                table.unload(&k);
                model.remove(&k);
            }
            if step % 10_000 == 9_999 {
                let hour = trail::hour_of(1_700_000_000_000 + i64::from(step) * 10);
                let mut swept = 0;
                table.sweep(hour, |_, _, _| swept += 1);
                let mut want = 0;
                for f in model.values_mut() {
                    let first = trail::hour_of(trail::start_ms(f.start_ns.unwrap()));
                    if first <= hour && f.covered < hour {
                        want += hour - (f.covered + 1).max(first) + 1;
                        f.covered = hour;
                    }
                }
                assert_eq!(swept, want, "one slice per flow and hour not covered yet");
            }
            assert_eq!(table.get(&k), model.get(&k).copied());
        }
        assert_eq!(table.len(), model.len());
        let mut held: Vec<(FlowKey, OpenFlow)> = table.iter().collect();
        held.sort_by_key(|(k, _)| (k.ct_id, k.orig.sport));
        let mut want: Vec<(FlowKey, OpenFlow)> = model.into_iter().collect();
        want.sort_by_key(|(k, _)| (k.ct_id, k.orig.sport));
        assert_eq!(held, want);
        assert!(table.wide_len() > 0 && table.wide_len() < table.len());
        let by_public: Vec<(u128, u16)> = table
            .iter_by_public()
            .take(table.len() - table.wide_len())
            .map(|(_, f)| (f.reply.dst.0, f.reply.dport))
            .collect();
        assert!(
            by_public.is_sorted(),
            "the narrow flows come by public port"
        );
    }
}
