//! Where the trail has holes: recorded capture gaps, and the time no agent was capturing
//! (before the first session, between sessions, after the last one stopped).

use std::sync::{Arc, Mutex};

use duckdb::Connection;
use serde::{Deserialize, Serialize};

use super::QueryError;
use crate::pipeline::clock::rfc3339_us;
use crate::store::database::Database;
use crate::store::gaps::GapRecord;
use crate::store::timestamp::Micros;

/// A reader keeps the recorded gaps with the rest of the coverage while there are at most
/// this many; beyond, each lookup reads those of its window.
const KEPT_GAPS: usize = 1_024;

/// Why the trail is incomplete over an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoleKind {
    /// Events were lost while the agent ran (a `capture_gaps` row).
    Gap,
    /// No agent was capturing.
    Stopped,
    /// The trail held it once; retention (`[store] retain_days`) removed those hours.
    Retention,
}

/// One interval the trail does not fully cover. Open ends are unbounded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hole {
    /// gap or stopped.
    pub kind: HoleKind,
    /// Start, RFC 3339 UTC; absent before the first capture session.
    pub start: Option<String>,
    /// End, RFC 3339 UTC; absent after the last session while no agent runs.
    pub end: Option<String>,
    /// Start in µs since the epoch.
    #[serde(skip)]
    pub start_us: Option<i64>,
    /// End in µs since the epoch.
    #[serde(skip)]
    pub end_us: Option<i64>,
    /// For gaps: where events were lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// For gaps: how many events were lost, when counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    /// Human-readable cause.
    pub reason: String,
}

impl Hole {
    /// Whether the hole contains the instant.
    pub fn contains(&self, us: i64) -> bool {
        self.start_us.is_none_or(|s| s <= us) && self.end_us.is_none_or(|e| us <= e)
    }

    fn overlaps(&self, lo: i64, hi: i64) -> bool {
        self.start_us.is_none_or(|s| s <= hi) && self.end_us.is_none_or(|e| lo <= e)
    }

    fn stopped(start_us: Option<i64>, end_us: Option<i64>, reason: &str) -> Hole {
        Hole {
            kind: HoleKind::Stopped,
            start: start_us.map(rfc3339_us),
            end: end_us.map(rfc3339_us),
            start_us,
            end_us,
            source: None,
            lost: None,
            reason: reason.to_string(),
        }
    }
}

/// What the trail covers and how it is laid out: its capture sessions, the retention
/// horizon, and which hours are sealed. Read by one statement without parameters, whose
/// plan the connection keeps (a statement with parameters is planned again each time).
#[derive(Debug, Clone, Default)]
pub(crate) struct Coverage {
    /// (start µs, end or last sign of life µs, still open), oldest first.
    sessions: Vec<(i64, i64, bool)>,
    retained_from_ms: Option<i64>,
    /// Hours up to this one are sorted into `flow_sealed`.
    pub(crate) sealed_hour: Option<i32>,
    /// The oldest sealed hour with late slices still in `trail_recent`.
    pub(crate) late_hour: Option<i32>,
    /// The days with sealed tables (schema 13 on); `None`: a trail older than that, read as
    /// it is, whose one table `flow_sealed` holds every hour.
    days: Option<Vec<i32>>,
    /// The last hour the tables of schema 12 hold, kept beside the days.
    legacy_until: Option<i32>,
    /// The first hour whose seal wrote its long flows' ends (schema 14 on).
    ends_from: Option<i32>,
    /// Every recorded gap, when read (`with_gaps`) and at most `KEPT_GAPS`.
    gaps: Option<Vec<GapRecord>>,
}

/// The sealed tables holding some hours: a day's pair (or an older trail's one pair), and
/// the hours of the window in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Partition {
    /// The slices.
    pub(crate) sealed: String,
    /// Their destinations.
    pub(crate) dst: String,
    /// First hour of the window in these tables.
    pub(crate) first: i32,
    /// Last hour of the window in these tables.
    pub(crate) last: i32,
}

impl Coverage {
    /// Reads the sessions and the partitions' state (no join, no sort: each operator of a
    /// plan costs a lookup its scheduling, 0.1-0.3 ms here).
    pub(crate) fn read(conn: &Connection) -> Result<Coverage, QueryError> {
        let mut stmt = conn
            .prepare_cached(
                // By name: a trail older than schema 11 (read as it is, the CLI does not
                // migrate) has no late_hour, and its lookups then read every table.
                "SELECT id, started, coalesce(stopped, last_seen) AS ended,
                        stopped IS NULL AS open
                 FROM capture_sessions
                 UNION ALL BY NAME
                 SELECT * FROM trail_state",
            )
            .map_err(QueryError::db("preparing the session query"))?;
        type Row = (
            Option<u64>,
            Option<Micros>,
            Option<Micros>,
            Option<bool>,
            Option<i32>,
            Option<i64>,
            Option<i32>,
            Option<Vec<i32>>,
            Option<i32>,
            Option<i32>,
        );
        let rows: Vec<Row> = stmt
            .query_map([], |r| {
                let columns = r.as_ref().column_count();
                let late = if columns > 6 {
                    r.get(6)?
                } else {
                    Some(i32::MIN)
                };
                let (days, legacy) = if columns > 8 {
                    (Some(crate::store::days::from_value(&r.get(7)?)), r.get(8)?)
                } else {
                    (None, None)
                };
                let ends_from = if columns > 9 { r.get(9)? } else { None };
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    late,
                    days,
                    legacy,
                    ends_from,
                ))
            })
            .map_err(QueryError::db("reading capture sessions"))?
            .collect::<Result<_, _>>()
            .map_err(QueryError::db("reading capture sessions"))?;
        let mut cov = Coverage::default();
        let mut sessions = Vec::new();
        for r in rows {
            match r.0 {
                Some(id) => {
                    if let (Some(start), Some(end), Some(open)) = (r.1, r.2, r.3) {
                        sessions.push((id, (start.0, end.0, open)));
                    }
                }
                None => {
                    cov.sealed_hour = r.4;
                    cov.retained_from_ms = r.5;
                    cov.late_hour = r.6;
                    cov.days = r.7;
                    cov.legacy_until = r.8;
                    cov.ends_from = r.9;
                }
            }
        }
        sessions.sort_unstable_by_key(|s| s.0);
        cov.sessions = sessions.into_iter().map(|s| s.1).collect();
        Ok(cov)
    }

    /// Adds every recorded gap when there are at most `KEPT_GAPS`, so that a kept coverage
    /// answers the holes of any window without reading the table again.
    pub(crate) fn with_gaps(mut self, conn: &Connection) -> Result<Coverage, QueryError> {
        let gaps = crate::store::gaps::first(conn, KEPT_GAPS + 1)
            .map_err(QueryError::db("reading capture gaps"))?;
        self.gaps = (gaps.len() <= KEPT_GAPS).then_some(gaps);
        Ok(self)
    }

    /// The sealed tables holding hours of `first..=last`, oldest first, each with the hours
    /// of the window it holds.
    pub(crate) fn partitions(&self, first: i32, last: i32) -> Vec<Partition> {
        use crate::store::days::{
            LEGACY_DST, LEGACY_SEALED, Layout, day_of, dst_table, sealed_table,
        };
        let Some(days) = &self.days else {
            return vec![Partition {
                sealed: sealed_table(Layout::Single, 0),
                dst: dst_table(Layout::Single, 0),
                first,
                last,
            }];
        };
        // The legacy tables hold the hours sealed before schema 13; a late slice of one of
        // them sealed since is in its day's tables.
        let legacy = self
            .legacy_until
            .filter(|l| first <= *l)
            .map(|l| Partition {
                sealed: LEGACY_SEALED.into(),
                dst: LEGACY_DST.into(),
                first,
                last: last.min(l),
            });
        legacy
            .into_iter()
            .chain(
                days.iter()
                    .filter(|d| (day_of(first)..=day_of(last)).contains(d))
                    .map(|&d| Partition {
                        sealed: sealed_table(Layout::Daily, d),
                        dst: dst_table(Layout::Daily, d),
                        first: first.max(d * 24),
                        last: last.min(d * 24 + 23),
                    }),
            )
            .collect()
    }

    /// Where the sealed final slice of a flow found by an interim slice of `hour`, started at
    /// `start_ms`, is if anywhere after the hour following its start: `Some(Some(table))` its
    /// start day's ends table, `Some(None)` nowhere (no flow of that day that lived through a
    /// whole hour ended in a sealed hour since), `None` when the ends tables cannot tell (an
    /// hour sealed before schema 14, no start, a start before the retention horizon) and the
    /// hours after must be searched.
    pub(crate) fn ends_of(&self, hour: i32, start_ms: Option<i64>) -> Option<Option<String>> {
        use crate::store::days::{day_of, ends_table};
        use crate::store::trail::hour_of;
        let (from, start, days) = (self.ends_from?, start_ms?, self.days.as_ref()?);
        if hour < from || self.retained_from_ms.is_some_and(|r| start < r) {
            return None;
        }
        let day = day_of(hour_of(start));
        Some(days.contains(&day).then(|| ends_table(day)))
    }

    /// Whether the sorted trail alone may miss a flow of the hours up to `hour`: they are not
    /// all sealed, or one of them lacks slices that `trail_recent` or the open flows hold.
    pub(crate) fn recent_reaches(&self, hour: i32) -> bool {
        self.sealed_hour.is_none_or(|s| hour > s) || self.late_hour.is_some_and(|l| l <= hour)
    }

    /// Holes overlapping `[lo_us, hi_us]`, in time order. With `live`, the newest session
    /// is being written by a running agent and counts as covering up to now.
    pub(crate) fn holes(
        &self,
        conn: &Connection,
        lo_us: i64,
        hi_us: i64,
        live: bool,
    ) -> Result<Vec<Hole>, QueryError> {
        let mut out = Vec::new();
        let (sessions, retained_from) = (&self.sessions, self.retained_from_ms);
        match sessions.first() {
            None => out.push(Hole::stopped(
                None,
                None,
                "no agent has captured into this trail",
            )),
            Some(&(first, _, _)) => out.push(Hole::stopped(
                None,
                Some(first),
                "before the first capture session",
            )),
        }
        for w in sessions.windows(2) {
            let ((_, prev_end, prev_open), (next_start, _, _)) = (w[0], w[1]);
            let reason = if prev_open {
                "agent not running (it ended without a clean stop; last commit to restart)"
            } else {
                "agent not running (between capture sessions)"
            };
            out.push(Hole::stopped(Some(prev_end), Some(next_start), reason));
        }
        if let Some(&(_, end, open)) = sessions.last()
            && !(open && live)
        {
            let reason = if open {
                "agent not running (it ended without a clean stop; after its last commit)"
            } else {
                "agent stopped"
            };
            out.push(Hole::stopped(Some(end), None, reason));
        }
        let gaps = match &self.gaps {
            Some(all) => all
                .iter()
                .filter(|g| g.start_us <= hi_us && lo_us <= g.end_us)
                .cloned()
                .collect(),
            None => crate::store::gaps::overlapping(conn, lo_us, hi_us)
                .map_err(QueryError::db("reading capture gaps"))?,
        };
        out.extend(gaps.into_iter().map(|g| Hole {
            kind: HoleKind::Gap,
            start: Some(g.start),
            end: Some(g.end),
            start_us: Some(g.start_us),
            end_us: Some(g.end_us),
            source: Some(g.source),
            lost: g.lost,
            reason: g.reason,
        }));
        if let Some(from_ms) = retained_from {
            let end = from_ms * 1_000;
            out.push(Hole {
                kind: HoleKind::Retention,
                start: None,
                end: Some(rfc3339_us(end)),
                start_us: None,
                end_us: Some(end - 1),
                source: None,
                lost: None,
                reason: "removed by retention ([store] retain_days)".into(),
            });
        }
        out.retain(|h| h.overlaps(lo_us, hi_us));
        out.sort_by_key(|h| h.start_us.unwrap_or(i64::MIN));
        Ok(out)
    }
}

/// The coverage kept between lookups on one trail, read again once the writer has changed it
/// (`Changes`). Reading it costs a lookup two table scans, 1.5 of its 5-6 ms on the 1-day
/// bench trail; the sessions, gaps and sealed hours change at the writer's commits, not at
/// each lookup.
#[derive(Default)]
pub struct KeptCoverage {
    /// The database whose writer's changes void what is kept; none for a file opened
    /// read-only, which DuckDB's lock keeps every writer out of while it is open.
    db: Option<Arc<Database>>,
    kept: Mutex<Option<(u64, Arc<Coverage>)>>,
}

impl KeptCoverage {
    /// For the agent's database: kept until its writer's next change.
    pub fn of(db: Arc<Database>) -> Self {
        KeptCoverage {
            db: Some(db),
            kept: Mutex::default(),
        }
    }

    /// For a file this process opened read-only and does not also write.
    pub fn read_only() -> Self {
        KeptCoverage::default()
    }

    /// The writer's change count now (always even with no writer).
    pub(crate) fn count(&self) -> u64 {
        self.db.as_ref().map_or(0, |d| d.changes().count())
    }

    /// The coverage kept at `count`, if any.
    pub(crate) fn at(&self, count: u64) -> Option<Arc<Coverage>> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.as_ref()
            .filter(|(c, _)| *c == count)
            .map(|(_, cov)| Arc::clone(cov))
    }

    /// Keeps `cov`, read in a snapshot taken while the count stayed at `count`.
    pub(crate) fn keep(&self, count: u64, cov: Arc<Coverage>) {
        if count.is_multiple_of(2) {
            *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some((count, cov));
        }
    }
}
