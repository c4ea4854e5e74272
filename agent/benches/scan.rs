//! `cargo xtask bench scan`: log lines per second through the scan engine with 50 rules
//! (literal gate, captures only for matching rules, cooldown and bucket bookkeeping), in one
//! run with the same engine when one more rule, lacking a required literal, turns the gate
//! off (one `RegexSet` pass per line), and a loop over the 50 regexes. Median of three runs.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use nattrail::pipeline::messages::Stream;
use nattrail::scan::engine::{ContainerScanner, ScanStats, WorkloadRules, compile};
use nattrail::scan::rules::{Rule, Scope, Severity, StreamSel};

const LINES: usize = 3_000_000;
const REPEATS: usize = 3;

/// 25 literal rules and 25 regexes with classes, alternations and captures.
fn rules() -> Vec<Rule> {
    let literals = [
        "connection refused",
        "OutOfMemoryError",
        "panic:",
        "segfault",
        "Killed process",
        "too many open files",
        "deadlock detected",
        "certificate has expired",
        "disk quota exceeded",
        "broken pipe",
        "permission denied",
        "no space left on device",
        "authentication failure",
        "stack overflow",
        "FATAL",
        "corrupted",
        "unreachable",
        "checksum mismatch",
        "read-only file system",
        "address already in use",
        "timed out waiting",
        "OOMKilled",
        "invalid token",
        "rate limit exceeded",
        "assertion failed",
    ];
    let regexes = [
        r"login failed for user (?P<user>\w+) from (?P<ip>\d+\.\d+\.\d+\.\d+)",
        r"HTTP/1\.[01]\x22 5\d\d \d+",
        r"(?i)sql syntax.*near '(?P<near>[^']{1,40})'",
        r"\bERROR\b.*\b(?P<code>E\d{4})\b",
        r"latency=(?P<ms>[5-9]\d{3,}|\d{5,})ms",
        r"user=(?P<user>root|admin) action=(?P<action>delete|drop)",
        r"(?P<path>/etc/(?:passwd|shadow|sudoers))",
        r"retry (?P<n>\d{2,}) of \d+",
        r"pool exhausted: (?P<used>\d+)/(?P<max>\d+)",
        r"heap usage (?P<pct>9\d|100)%",
        r"failed to connect to (?P<host>[\w.-]+):(?P<port>\d+)",
        r"exit (?:code|status) (?P<code>[1-9]\d*)",
        r"(?P<sig>SIGSEGV|SIGBUS|SIGABRT)",
        r"nginx.*\[crit\]",
        r"replica (?P<id>\d+) lag (?P<s>\d{3,})s",
        r"jwt (?:expired|malformed) for sub=(?P<sub>\w+)",
        r"(?P<n>\d{4,}) goroutines",
        r"upstream prematurely closed .* upstream: \x22(?P<up>[^\x22]+)\x22",
        r"GC pause (?P<ms>\d{4,})ms",
        r"(?P<db>\w+)\.(?P<table>\w+) is locked",
        r"wget|curl .*\|\s*(?:sh|bash)",
        r"base64 -d.*\|\s*(?:sh|bash)",
        r"(?P<ip>\d+\.\d+\.\d+\.\d+) banned",
        r"SELECT .* FROM (?P<t>\w+) WHERE .* OR 1=1",
        r"kernel: \[\s*\d+\.\d+\] (?P<what>oom-kill|BUG):",
    ];
    literals
        .iter()
        .map(|l| regex::escape(l))
        .chain(regexes.iter().map(|r| r.to_string()))
        .enumerate()
        .map(|(i, pattern)| Rule {
            id: i as u64 + 1,
            name: format!("rule-{i}"),
            pattern,
            stream: StreamSel::Both,
            severity: Severity::Warning,
            cooldown: Duration::ZERO,
            enabled: true,
            scope: Scope::Global,
        })
        .collect()
}

/// Ordinary access and application log lines; one in a hundred matches some rule.
fn lines() -> Vec<String> {
    let matching = [
        "2026-11-22 10:00:01 login failed for user bob from 10.1.2.3",
        "worker 7: connection refused while talking to cache",
        "kernel: [ 1234.567] oom-kill: constraint=CONSTRAINT_NONE",
        "GET /api HTTP/1.1\" 503 1234",
        "pool exhausted: 100/100 connections",
    ];
    (0..10_000)
        .map(|i| {
            if i % 100 == 0 {
                matching[(i / 100) % matching.len()].to_string()
            } else if i % 3 == 0 {
                format!(
                    "10.0.{}.{} - - [22/Nov/2026:10:00:{:02} +0000] \"GET /items/{i} HTTP/1.1\" 200 {} \"-\" \"Mozilla/5.0\"",
                    i % 250,
                    i % 200,
                    i % 60,
                    400 + i % 900
                )
            } else if i % 3 == 1 {
                format!("level=info ts=2026-11-22T10:00:00Z msg=\"request done\" id={i} latency={}ms status=200", i % 400)
            } else {
                format!("INFO  [main] c.e.OrderService - order {i} placed by customer {} total {}.{:02}", i * 7 % 9973, i % 500, i % 100)
            }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Lines per second of `engine` over `lines`, and the hits it found.
fn scan_rate(engine: &WorkloadRules, lines: &[String]) -> (f64, usize) {
    let n = NonZeroU32::new(u32::MAX).unwrap();
    let stats = ScanStats::default();
    let mut scanner = ContainerScanner::new("bench", "bench-1", n, n);
    let logged_ns = nattrail::pipeline::clock::now_ns();
    let t = Instant::now();
    let mut hits = 0;
    for l in lines.iter().cycle().take(LINES) {
        hits += scanner
            .scan(engine, l, Stream::Stdout, logged_ns, &stats)
            .len();
    }
    (LINES as f64 / t.elapsed().as_secs_f64(), hits)
}

fn main() {
    let rules = rules();
    let lines = lines();
    let engine = WorkloadRules::build(rules.clone());
    assert!(engine.errors.is_empty(), "{:?}", engine.errors);
    assert!(engine.gated(), "every bench rule has a required literal");
    // Matches none of the lines, so both engines find the same hits.
    let mut ungated_rules = rules.clone();
    ungated_rules.push(Rule {
        id: 1000,
        name: "no-literal".into(),
        pattern: r"\d{3}-\d{4}-\d{4}".into(),
        ..rules[0].clone()
    });
    let ungated = WorkloadRules::build(ungated_rules);
    assert!(!ungated.gated());
    let baseline: Vec<regex::Regex> = rules.iter().map(|r| compile(&r.pattern).unwrap()).collect();

    let mut engine_runs = Vec::new();
    let mut ungated_runs = Vec::new();
    let mut loop_runs = Vec::new();
    let mut hits = 0;
    for _ in 0..REPEATS {
        let (rate, h) = scan_rate(&engine, &lines);
        engine_runs.push(rate);
        hits = h;
        let (rate, h) = scan_rate(&ungated, &lines);
        ungated_runs.push(rate);
        assert_eq!(h, hits, "the gate changes no hit");

        let t = Instant::now();
        let mut loop_hits = 0;
        for l in lines.iter().cycle().take(LINES) {
            for re in &baseline {
                if re.is_match(l) {
                    loop_hits += 1;
                }
            }
        }
        loop_runs.push(LINES as f64 / t.elapsed().as_secs_f64());
        assert_eq!(loop_hits, hits, "both ways find the same matches");
    }
    println!(
        "{} rules, {LINES} lines per run ({:.2} % matching, {hits} hits); median of {REPEATS} runs",
        rules.len(),
        100.0 * hits as f64 / LINES as f64
    );
    let e = median(engine_runs.clone());
    let u = median(ungated_runs.clone());
    let b = median(loop_runs.clone());
    println!("engine (literal gate):          {e:>10.0} lines/s  (runs: {engine_runs:.0?})");
    println!("engine without gate (RegexSet): {u:>10.0} lines/s  (runs: {ungated_runs:.0?})");
    println!("loop over rules (is_match):     {b:>10.0} lines/s  (runs: {loop_runs:.0?})");
    println!(
        "ratios: engine {:.1}x the loop, {:.1}x without gate; target: engine >= 3,000,000 lines/s",
        e / b,
        e / u
    );
}
