//! Matching lines against a workload's effective rules: one `RegexSet` pass per line that
//! holds a literal some rule needs (the literal gate drops the others), then captures only
//! for the rules that matched; a per-rule cooldown and a per-container token
//! bucket keep a container gone wild from flooding the event log.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::Serialize;

use super::literal_gate::LiteralGate;
use super::rules::{Rule, Severity};
use crate::pipeline::messages::Stream;
use crate::pipeline::metrics::counters;

/// Largest compiled program one rule may produce (regex's size limit), so a pathological
/// pattern is refused when saved instead of eating the agent's memory.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Lazy-DFA cache of a workload's rule set: dozens of patterns with Unicode classes thrash
/// the default 2 MiB cache, and a thrashing lazy DFA falls back to slower engines.
pub const SET_DFA_CACHE: usize = 32 << 20;
/// Longest hit message stored, in bytes.
pub const MAX_MESSAGE: usize = 500;

/// A rule whose pattern does not compile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CompileError {
    /// The rule.
    pub rule_id: u64,
    /// regex's message.
    pub error: String,
}

/// Compiles one pattern under the size limit.
pub fn compile(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}

/// The rules of `rules` whose pattern does not compile, with the compiler's message.
pub fn compile_errors(rules: &[Rule]) -> Vec<CompileError> {
    rules
        .iter()
        .filter_map(|r| {
            compile(&r.pattern).err().map(|error| CompileError {
                rule_id: r.id,
                error,
            })
        })
        .collect()
}

/// The compiled effective rules of one workload.
pub struct WorkloadRules {
    gate: Option<LiteralGate>,
    set: RegexSet,
    rules: Vec<(Rule, Regex)>,
    /// Rules left out because their pattern does not compile.
    pub errors: Vec<CompileError>,
}

impl WorkloadRules {
    /// Compiles `rules`; the ones that fail are reported in `errors`, never silently dropped.
    pub fn build(rules: Vec<Rule>) -> Self {
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        for r in rules {
            match compile(&r.pattern) {
                Ok(re) => ok.push((r, re)),
                Err(error) => errors.push(CompileError {
                    rule_id: r.id,
                    error,
                }),
            }
        }
        let set = RegexSetBuilder::new(ok.iter().map(|(r, _)| r.pattern.as_str()))
            .size_limit(REGEX_SIZE_LIMIT * ok.len().max(1))
            .dfa_size_limit(SET_DFA_CACHE)
            .build()
            .unwrap_or_else(|_| RegexSet::empty());
        WorkloadRules {
            gate: LiteralGate::build(ok.iter().map(|(r, _)| r.pattern.as_str())),
            set,
            rules: ok,
            errors,
        }
    }

    /// Whether any rule reads `stream` (streams nobody reads are not opened).
    pub fn wants(&self, stream: Stream) -> bool {
        self.rules.iter().any(|(r, _)| r.stream.wants(stream))
    }

    /// The rules matching `line` on `stream`, with their captures.
    pub fn matches<'a>(&'a self, line: &str, stream: Stream) -> Vec<(&'a Rule, Captures)> {
        if self.gate.as_ref().is_some_and(|g| !g.may_match(line)) {
            return Vec::new();
        }
        // Most lines match nothing: a plain search answers that faster than the overlapping
        // one that names every matching rule.
        if !self.set.is_match(line) {
            return Vec::new();
        }
        self.set
            .matches(line)
            .into_iter()
            .filter_map(|i| {
                let (rule, re) = &self.rules[i];
                if !rule.stream.wants(stream) {
                    return None;
                }
                Some((rule, captures(re, line)?))
            })
            .collect()
    }

    /// Whether lines pass the literal gate before the set pass (see [`LiteralGate`]).
    pub fn gated(&self) -> bool {
        self.gate.is_some()
    }
}

/// Named groups by name, unnamed ones as `$N`; one value per distinct key.
pub type Captures = BTreeMap<String, String>;

/// The captures of `re`'s first match in `line`, `None` when it does not match.
fn captures(re: &Regex, line: &str) -> Option<Captures> {
    let c = re.captures(line)?;
    let mut out = Captures::new();
    for (i, name) in re.capture_names().enumerate().skip(1) {
        if let Some(m) = c.get(i) {
            let key = name.map(str::to_string).unwrap_or_else(|| format!("${i}"));
            out.entry(key).or_insert_with(|| m.as_str().to_string());
        }
    }
    Some(out)
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with "…".
pub fn cut_message(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let room = max.saturating_sub('…'.len_utf8());
    let mut end = room;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A hit, ready for the event log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// Severity (after the workload's override).
    pub severity: Severity,
    /// The line, cut to [`MAX_MESSAGE`] bytes.
    pub message: String,
    /// Workload, container, rule, stream and captures.
    pub metadata: serde_json::Value,
}

counters! {
    /// Scan counters, shared by every tail.
    pub struct ScanStats as "logscan" =>
    /// A reading of [`ScanStats`].
    ScanCounters {
        /// Lines scanned.
        lines_seen: Counter(Received),
        /// Hits produced.
        hits: Counter(Sent),
        /// Matches held back by a rule's cooldown.
        suppressed_cooldown: Counter(Skipped),
        /// Matches held back by the container's token bucket.
        suppressed_bucket: Counter(Skipped),
    }
}

/// The scan clock: the log's own time (Docker's timestamp of each line), shared by the
/// cooldowns and the token bucket. It never runs backwards: stdout and stderr records
/// interleave, so a line may carry an older time than the one before it.
#[derive(Debug, Clone, Default)]
struct LogClock(Arc<AtomicU64>);

impl LogClock {
    /// Sets the clock (only its one scanner writes it: a plain store, no read-modify-write
    /// on the hot path).
    fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::Relaxed);
    }
}

impl Clock for LogClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// The per-container state: cooldowns and the token bucket, both on the log's clock, so
/// what is kept depends on when the lines were logged, not on when they were read (a
/// backlog read after a restart is limited as it was when live).
pub struct ContainerScanner {
    workload: String,
    container: String,
    last_hit: HashMap<u64, u64>,
    /// The latest log time seen, which the clock shows.
    now: u64,
    clock: LogClock,
    bucket: RateLimiter<NotKeyed, InMemoryState, LogClock, NoOpMiddleware<Duration>>,
}

impl ContainerScanner {
    /// A scanner allowing `rate` hits per second with bursts of `burst`.
    pub fn new(workload: &str, container: &str, rate: NonZeroU32, burst: NonZeroU32) -> Self {
        let clock = LogClock::default();
        ContainerScanner {
            workload: workload.to_string(),
            container: container.to_string(),
            last_hit: HashMap::new(),
            now: 0,
            bucket: RateLimiter::direct_with_clock(
                Quota::per_second(rate).allow_burst(burst),
                clock.clone(),
            ),
            clock,
        }
    }

    /// Scans one line logged at `logged_ns` (ns since the epoch), which drives the
    /// cooldowns and the bucket.
    pub fn scan(
        &mut self,
        rules: &WorkloadRules,
        line: &str,
        stream: Stream,
        logged_ns: u64,
        stats: &ScanStats,
    ) -> Vec<Hit> {
        stats.lines_seen.fetch_add(1, Ordering::Relaxed);
        if logged_ns > self.now {
            self.now = logged_ns;
            self.clock.set(logged_ns);
        }
        let now = self.now;
        let mut hits = Vec::new();
        for (rule, caps) in rules.matches(line, stream) {
            if let Some(last) = self.last_hit.get(&rule.id)
                && Duration::from_nanos(now.saturating_sub(*last)) < rule.cooldown
            {
                stats.suppressed_cooldown.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if self.bucket.check().is_err() {
                stats.suppressed_bucket.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.last_hit.insert(rule.id, now);
            stats.hits.fetch_add(1, Ordering::Relaxed);
            hits.push(Hit {
                severity: rule.severity,
                message: cut_message(line, MAX_MESSAGE),
                metadata: serde_json::json!({
                    "workload": self.workload,
                    "container": self.container,
                    "rule_id": rule.id,
                    "rule_name": rule.name,
                    "stream": match stream { Stream::Stdout => "stdout", Stream::Stderr => "stderr" },
                    "captures": caps,
                }),
            });
        }
        hits
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::scan::rules::{Scope, StreamSel};

    fn rule(id: u64, pattern: &str, stream: StreamSel, cooldown_s: u64) -> Rule {
        Rule {
            id,
            name: format!("rule-{id}"),
            pattern: pattern.into(),
            stream,
            severity: Severity::Error,
            cooldown: Duration::from_secs(cooldown_s),
            enabled: true,
            scope: Scope::Global,
        }
    }

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn one_pass_then_captures_of_the_matching_rules_only() {
        let w = WorkloadRules::build(vec![
            rule(
                1,
                r"login failed for (?P<user>\w+) from (\S+)",
                StreamSel::Both,
                0,
            ),
            rule(2, r"panic", StreamSel::Stderr, 0),
            rule(3, r"(unclosed", StreamSel::Both, 0),
        ]);
        assert_eq!(w.errors.len(), 1);
        assert_eq!(w.errors[0].rule_id, 3);
        let m = w.matches("login failed for bob from 10.0.0.9", Stream::Stdout);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].0.id, 1);
        assert_eq!(m[0].1["user"], "bob");
        assert_eq!(m[0].1["$2"], "10.0.0.9");
        assert!(
            w.matches("panic: x", Stream::Stdout).is_empty(),
            "stderr-only rule"
        );
        assert_eq!(w.matches("panic: x", Stream::Stderr).len(), 1);
        assert!(w.wants(Stream::Stderr) && w.wants(Stream::Stdout));
    }

    /// What a loop over every rule's own regex finds: the oracle for both engine paths.
    fn by_loop(rules: &[(u64, Regex)], line: &str) -> Vec<(u64, Captures)> {
        rules
            .iter()
            .filter_map(|(id, re)| Some((*id, captures(re, line)?)))
            .collect()
    }

    #[test]
    fn gated_and_ungated_engines_find_what_a_loop_over_the_rules_finds() {
        use rand::{Rng, SeedableRng, seq::IndexedRandom};
        let patterns = [
            "connection refused",
            "HTTP",
            r"HTTP/1\.[01]\x22 5\d\d",
            "ERRORS",
            "ORSON",
            r"(?i)sql syntax.*near '(?P<near>[^']{1,40})'",
            r"(?P<n>\d{4,}) goroutines",
            r"wget|curl .*\|\s*(?:sh|bash)",
            r"^\s*FATAL\b",
            r"\bERROR\b.*\b(?P<code>E\d{4})\b",
            r"user=(?P<user>root|admin) action=(?:delete|drop)",
            r"(?P<db>\w+)\.(?P<table>\w+) is locked",
            "señal perdida",
            r"abc\d",
        ];
        let fragments = [
            "connection refused",
            "Connection Refused",
            "HTTP",
            "HTTP/1.1\" 503",
            "HTTP/1.0\" 404",
            "ERRORSON",
            "ERRORS",
            "ORSO",
            "SQL SYNTAX",
            "ſql syntax",
            "near 'x'",
            "NEAR 'users'",
            "12345 goroutines",
            "123 goroutines",
            "wget",
            "curl x | sh",
            "curl",
            "FATAL",
            "  FATAL:",
            "ERROR",
            "E1234",
            "user=root",
            "action=drop",
            "user=admin action=delete",
            "db.t",
            "is locked",
            "señal perdida",
            "SEÑAL",
            "ab1",
            "abc",
            "é",
            "  ",
            "|",
            "'",
            "x",
        ];
        let ungated = Rule {
            pattern: r"\d{3}-\d{4}".into(),
            ..rule(99, "", StreamSel::Both, 0)
        };
        let mut gated: Vec<Rule> = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| rule(i as u64 + 1, p, StreamSel::Both, 0))
            .collect();
        let oracle = |rules: &[Rule]| -> Vec<(u64, Regex)> {
            rules
                .iter()
                .map(|r| (r.id, compile(&r.pattern).unwrap()))
                .collect()
        };
        let engines = [(WorkloadRules::build(gated.clone()), oracle(&gated)), {
            gated.push(ungated);
            (WorkloadRules::build(gated.clone()), oracle(&gated))
        }];
        assert!(engines[0].0.gated(), "every rule has a required literal");
        assert!(
            !engines[1].0.gated(),
            "a rule without one turns the gate off"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut matched = 0;
        for _ in 0..20_000 {
            let n = rng.random_range(0..8);
            let line: String = (0..n)
                .map(|_| *fragments.choose(&mut rng).unwrap())
                .collect::<Vec<_>>()
                .join(if rng.random_bool(0.5) { " " } else { "" });
            for (engine, rules) in &engines {
                let got: Vec<(u64, Captures)> = engine
                    .matches(&line, Stream::Stdout)
                    .into_iter()
                    .map(|(r, c)| (r.id, c))
                    .collect();
                assert_eq!(got, by_loop(rules, &line), "line {line:?}");
                matched += usize::from(!got.is_empty());
            }
        }
        assert!(matched > 10_000, "the lines exercise the rules: {matched}");
    }

    #[test]
    fn huge_patterns_are_refused() {
        assert!(compile(r"\w{1000}\w{1000}\w{1000}").is_err());
    }

    #[test]
    fn cooldown_per_rule_and_bucket_per_container_on_the_log_clock() {
        let w = WorkloadRules::build(vec![
            rule(1, "error", StreamSel::Both, 10),
            rule(2, "boom", StreamSel::Both, 0),
        ]);
        let stats = ScanStats::default();
        let mut c = ContainerScanner::new("web", "web-1", nz(1), nz(3));
        let t0 = 1_700_000_000_000_000_000u64;
        let s = |sec: f64| t0 + (sec * 1e9) as u64;
        let mut scan = |line: &str, at: u64| c.scan(&w, line, Stream::Stdout, at, &stats).len();
        assert_eq!(scan("error 1", s(0.0)), 1);
        // Within the rule's 10 s cooldown: held back, and no token spent.
        assert_eq!(scan("error 2", s(5.0)), 0);
        // Five seconds of log time refilled the bucket to its burst of 3.
        let booms: usize = (0..10).map(|_| scan("boom", s(5.0))).sum();
        assert_eq!(booms, 3);
        // One more second of log time, one more token, whatever the time it takes to scan.
        let booms: usize = (0..5).map(|_| scan("boom", s(6.0))).sum();
        assert_eq!(booms, 1);
        // An older line (the other stream, read late) does not turn the clock back.
        assert_eq!(scan("boom", s(1.0)), 0);
        assert_eq!(scan("error 3", s(10.0)), 1);
        assert_eq!(stats.hits.load(Ordering::Relaxed), 6);
        assert_eq!(stats.suppressed_cooldown.load(Ordering::Relaxed), 1);
        assert_eq!(stats.suppressed_bucket.load(Ordering::Relaxed), 12);
        assert_eq!(stats.lines_seen.load(Ordering::Relaxed), 19);
    }

    #[test]
    fn messages_are_cut_on_a_char_boundary_with_an_ellipsis() {
        let s = "é".repeat(300);
        let m = cut_message(&s, MAX_MESSAGE);
        assert!(m.len() <= MAX_MESSAGE && m.ends_with('…'));
        assert_eq!(cut_message("short", MAX_MESSAGE), "short");
        let hit = {
            let w = WorkloadRules::build(vec![rule(7, "é", StreamSel::Both, 0)]);
            let mut c = ContainerScanner::new("web", "web-1", nz(10), nz(10));
            c.scan(&w, &s, Stream::Stderr, 0, &ScanStats::default())
        };
        assert_eq!(hit[0].metadata["stream"], "stderr");
        assert_eq!(hit[0].metadata["rule_id"], 7);
        assert!(hit[0].message.len() <= MAX_MESSAGE);
    }
}
