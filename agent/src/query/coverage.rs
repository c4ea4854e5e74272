//! Where the trail has holes: recorded capture gaps, and the time no agent was capturing
//! (before the first session, between sessions, after the last one stopped).

use duckdb::Connection;
use serde::{Deserialize, Serialize};

use super::QueryError;
use crate::pipeline::clock::rfc3339_us;

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

/// Holes overlapping `[lo_us, hi_us]`, in time order. With `live`, the newest session is
/// being written by a running agent and counts as covering up to now.
pub fn holes(
    conn: &Connection,
    lo_us: i64,
    hi_us: i64,
    live: bool,
) -> Result<Vec<Hole>, QueryError> {
    let mut out = Vec::new();
    // The sessions and the retention horizon in one query (trail_state has one row).
    let mut stmt = conn
        .prepare_cached(
            "SELECT epoch_us(s.started), epoch_us(coalesce(s.stopped, s.last_seen)),
                    s.stopped IS NULL, t.retained_from
             FROM trail_state t LEFT JOIN capture_sessions s ON true ORDER BY s.id",
        )
        .map_err(QueryError::db("preparing the session query"))?;
    type Row = (Option<i64>, Option<i64>, Option<bool>, Option<i64>);
    let rows: Vec<Row> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map_err(QueryError::db("reading capture sessions"))?
        .collect::<Result<_, _>>()
        .map_err(QueryError::db("reading capture sessions"))?;
    let retained_from = rows.first().and_then(|r| r.3);
    let sessions: Vec<(i64, i64, bool)> = rows
        .iter()
        .filter_map(|r| Some((r.0?, r.1?, r.2?)))
        .collect();
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

    let gaps = crate::store::gaps::overlapping(conn, lo_us, hi_us)
        .map_err(QueryError::db("reading capture gaps"))?;
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
