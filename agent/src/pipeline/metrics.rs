//! The one metrics registry. Every counter and gauge of the agent is declared once, with the
//! [`counters!`] macro (or, for a stage, by [`CounterSet`] by hand); the declaration yields
//! the atomics the hot path bumps, the serialisable copy `status --json` shows, and the
//! fields `/metrics` renders. Vector's convention rides on top: each field may say it counts
//! events received, sent or discarded (with `intentional`), and `/metrics` sums those per
//! component.
//!
//! The exposition is rendered here rather than by prometheus-client: that crate writes
//! OpenMetrics only (counter families named without `_total`, a trailing `# EOF`), which
//! `promtool check metrics` (Debian 12's 2.42) refuses with "no help text". The classic text
//! format is three kinds of line.

use std::fmt::Write;
use std::sync::{Arc, RwLock};

/// Whether a value only grows (a counter) or goes up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows; rendered with the `_total` suffix.
    Counter,
    /// A level.
    Gauge,
}

/// What a field counts, in Vector's component model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Neither received, sent nor discarded events.
    Other,
    /// Events that entered the component.
    Received,
    /// Events the component passed on.
    Sent,
    /// Events discarded by policy (a filter, a cooldown, a rate limit): `intentional="true"`.
    Skipped,
    /// Events lost (overflow, decode error, failed delivery): `intentional="false"`.
    Lost,
}

impl Role {
    /// The role in `roles`, or `Other` if none is given (the macro's optional role).
    pub const fn or_other(roles: &[Role]) -> Role {
        match roles {
            [r] => *r,
            _ => Role::Other,
        }
    }
}

/// One declared counter or gauge of a component.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Its key in the component's status section.
    pub name: &'static str,
    /// Its name in `/metrics`, after `nattrail_<component>_` (and before `_total`).
    pub metric: &'static str,
    /// One line of help (the field's doc comment).
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// What it counts.
    pub role: Role,
    /// Factor from the status value to the metric's base unit (milliseconds to seconds).
    pub scale: f64,
}

impl Field {
    /// A field whose metric is named as its status key, in the same unit.
    pub const fn new(name: &'static str, help: &'static str, kind: Kind, role: Role) -> Self {
        Field {
            name,
            metric: name,
            help,
            kind,
            role,
            scale: 1.0,
        }
    }
}

/// A component's counters, as the registry reads them.
pub trait CounterSet: Send + Sync {
    /// The fields, in a fixed order.
    fn fields(&self) -> &'static [Field];
    /// Their values now, in the order of [`CounterSet::fields`].
    fn values(&self) -> Vec<u64>;
}

/// Declares `$stats` (one `AtomicU64` per field, bumped where the thing happens), `$counters`
/// (the same fields as `u64`, serialisable, for status) and their registry entry: component
/// name, and each field's kind and role.
macro_rules! counters {
    (
        $(#[$stats_meta:meta])*
        pub struct $stats:ident as $component:literal =>
        $(#[$counters_meta:meta])* $counters:ident {
            $( $(#[doc = $doc:literal])* $field:ident : $kind:ident $(($role:ident))?, )*
        }
    ) => {
        $(#[$stats_meta])*
        #[derive(Debug, Default)]
        pub struct $stats {
            $( $(#[doc = $doc])* pub $field: ::std::sync::atomic::AtomicU64, )*
        }

        $(#[$counters_meta])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, ::serde::Serialize, ::serde::Deserialize,
        )]
        pub struct $counters {
            $( $(#[doc = $doc])* #[serde(default)] pub $field: u64, )*
        }

        impl $stats {
            /// The component's name in `/metrics` and in the registry.
            pub const COMPONENT: &'static str = $component;
            /// The declared fields.
            pub const FIELDS: &'static [$crate::pipeline::metrics::Field] = &[$(
                $crate::pipeline::metrics::Field::new(
                    stringify!($field),
                    concat!($($doc),*),
                    $crate::pipeline::metrics::Kind::$kind,
                    $crate::pipeline::metrics::Role::or_other(
                        &[$($crate::pipeline::metrics::Role::$role)?],
                    ),
                ),
            )*];

            /// The counters now.
            pub fn snapshot(&self) -> $counters {
                $counters {
                    $( $field: self.$field.load(::std::sync::atomic::Ordering::Relaxed), )*
                }
            }
        }

        impl $crate::pipeline::metrics::CounterSet for $stats {
            fn fields(&self) -> &'static [$crate::pipeline::metrics::Field] {
                Self::FIELDS
            }
            fn values(&self) -> Vec<u64> {
                vec![$( self.$field.load(::std::sync::atomic::Ordering::Relaxed), )*]
            }
        }
    };
}

pub(crate) use counters;

/// A registered component: its name, an optional identifying label, and its counters.
struct Entry {
    component: &'static str,
    label: Option<(&'static str, String)>,
    set: Arc<dyn CounterSet>,
}

/// One value of the registry, as `/metrics` and the counter test see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The component.
    pub component: &'static str,
    /// The label that tells instances of the component apart (`stage="docker->scan0"`).
    pub label: Option<(&'static str, String)>,
    /// The declaration.
    pub field: Field,
    /// The value in the status unit.
    pub value: u64,
}

impl Reading {
    /// Its sample name in `/metrics`.
    pub fn metric_name(&self) -> String {
        let suffix = match self.field.kind {
            Kind::Counter => "_total",
            Kind::Gauge => "",
        };
        format!("nattrail_{}_{}{suffix}", self.component, self.field.metric)
    }
}

impl PartialEq for Field {
    fn eq(&self, o: &Self) -> bool {
        (self.name, self.metric, self.kind, self.role) == (o.name, o.metric, o.kind, o.role)
    }
}

/// Every component's counters.
#[derive(Default)]
pub struct Metrics {
    entries: RwLock<Vec<Entry>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.read().map(|e| e.len()).unwrap_or(0);
        f.debug_struct("Metrics").field("components", &n).finish()
    }
}

impl Metrics {
    /// Adds a component; `label` tells apart several instances of one kind (stages).
    pub fn register(
        &self,
        component: &'static str,
        label: Option<(&'static str, String)>,
        set: Arc<dyn CounterSet>,
    ) {
        self.entries
            .write()
            .expect("metrics registry lock")
            .push(Entry {
                component,
                label,
                set,
            });
    }

    /// Every value now, in registration and declaration order.
    pub fn readings(&self) -> Vec<Reading> {
        let entries = self.entries.read().expect("metrics registry lock");
        let mut out = Vec::new();
        for e in entries.iter() {
            for (field, value) in e.set.fields().iter().zip(e.set.values()) {
                out.push(Reading {
                    component: e.component,
                    label: e.label.clone(),
                    field: *field,
                    value,
                });
            }
        }
        out
    }

    /// The Prometheus text exposition (format 0.0.4) of every value, then Vector's
    /// per-component `received`, `sent` and `discarded` event totals.
    pub fn render(&self) -> String {
        let readings = self.readings();
        let mut out = String::new();
        // Families in first-seen order, each with all its samples.
        let mut names: Vec<String> = Vec::new();
        let mut samples: Vec<Vec<&Reading>> = Vec::new();
        for r in &readings {
            let name = r.metric_name();
            match names.iter().position(|n| *n == name) {
                Some(i) => samples[i].push(r),
                None => {
                    names.push(name);
                    samples.push(vec![r]);
                }
            }
        }
        for (name, rs) in names.iter().zip(&samples) {
            let f = rs[0].field;
            family(&mut out, name, f.kind, f.help.trim());
            for r in rs {
                let labels = r
                    .label
                    .as_ref()
                    .map(|(k, v)| vec![(*k, v.clone())])
                    .unwrap_or_default();
                sample(&mut out, name, &labels, r.value as f64 * f.scale);
            }
        }
        self.render_vector(&readings, &mut out);
        out
    }

    fn render_vector(&self, readings: &[Reading], out: &mut String) {
        let ident = |r: &Reading| {
            let mut l = vec![("component", r.component.to_string())];
            if let Some((k, v)) = &r.label {
                l.push((k, v.clone()));
            }
            l
        };
        for (name, role, help) in [
            (
                "nattrail_component_received_events_total",
                Role::Received,
                "Events that entered the component.",
            ),
            (
                "nattrail_component_sent_events_total",
                Role::Sent,
                "Events the component passed on.",
            ),
        ] {
            family(out, name, Kind::Counter, help);
            // One sample per component instance: the sum of its fields of this role.
            let mut sums: Vec<(Vec<(&str, String)>, u64)> = Vec::new();
            for r in readings.iter().filter(|r| r.field.role == role) {
                let l = ident(r);
                match sums.iter_mut().find(|(k, _)| *k == l) {
                    Some((_, v)) => *v += r.value,
                    None => sums.push((l, r.value)),
                }
            }
            for (l, v) in sums {
                sample(out, name, &l, v as f64);
            }
        }
        let name = "nattrail_component_discarded_events_total";
        family(
            out,
            name,
            Kind::Counter,
            "Events the component discarded, by reason; intentional=\"true\" when by policy.",
        );
        for r in readings {
            let intentional = match r.field.role {
                Role::Skipped => "true",
                Role::Lost => "false",
                _ => continue,
            };
            let mut l = ident(r);
            l.push(("reason", r.field.name.to_string()));
            l.push(("intentional", intentional.to_string()));
            sample(out, name, &l, r.value as f64);
        }
    }
}

fn family(out: &mut String, name: &str, kind: Kind, help: &str) {
    let kind = match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    };
    let _ = writeln!(out, "# HELP {name} {}", escape(help, false));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, String)], v: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(val, true));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {v}");
}

/// The text format's escapes: backslash and newline everywhere, the double quote in labels.
fn escape(s: &str, label: bool) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '"' if label => o.push_str("\\\""),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    counters! {
        /// Test counters.
        pub struct DemoStats as "demo" =>
        /// Their copy.
        DemoCounters {
            /// Things in.
            taken: Counter(Received),
            /// Things out.
            given: Counter(Sent),
            /// Things refused by a rule.
            refused: Counter(Skipped),
            /// Things lost.
            lost: Counter(Lost),
            /// Things held.
            held: Gauge,
        }
    }

    #[test]
    fn one_declaration_gives_status_fields_and_exposition() {
        let m = Metrics::default();
        let a = Arc::new(DemoStats::default());
        let b = Arc::new(DemoStats::default());
        a.taken.store(5, Ordering::Relaxed);
        a.given.store(3, Ordering::Relaxed);
        a.refused.store(1, Ordering::Relaxed);
        a.lost.store(1, Ordering::Relaxed);
        b.taken.store(2, Ordering::Relaxed);
        b.held.store(7, Ordering::Relaxed);
        m.register(
            DemoStats::COMPONENT,
            Some(("unit", "a\"1".into())),
            a.clone(),
        );
        m.register(DemoStats::COMPONENT, Some(("unit", "b".into())), b.clone());
        let json = serde_json::to_value(a.snapshot()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"taken": 5, "given": 3, "refused": 1, "lost": 1, "held": 0})
        );
        let text = m.render();
        let expect = [
            "# HELP nattrail_demo_taken_total Things in.",
            "# TYPE nattrail_demo_taken_total counter",
            "nattrail_demo_taken_total{unit=\"a\\\"1\"} 5",
            "nattrail_demo_taken_total{unit=\"b\"} 2",
            "# TYPE nattrail_demo_held gauge",
            "nattrail_demo_held{unit=\"b\"} 7",
            "nattrail_component_received_events_total{component=\"demo\",unit=\"b\"} 2",
            "nattrail_component_sent_events_total{component=\"demo\",unit=\"a\\\"1\"} 3",
            "nattrail_component_discarded_events_total{component=\"demo\",unit=\"a\\\"1\",reason=\"refused\",intentional=\"true\"} 1",
            "nattrail_component_discarded_events_total{component=\"demo\",unit=\"a\\\"1\",reason=\"lost\",intentional=\"false\"} 1",
        ];
        for line in expect {
            assert_eq!(
                text.lines().filter(|l| *l == line).count(),
                1,
                "{line} in:\n{text}"
            );
        }
        // HELP and TYPE once per family, whatever the number of instances.
        assert_eq!(text.matches("# TYPE nattrail_demo_taken_total").count(), 1);
        assert_eq!(m.readings().len(), 10);
    }
}
