//! The literal gate in front of the rule set. Most log lines contain none of the words the
//! rules need, and a SIMD multi-literal search (Teddy) proves that faster than the set's
//! lazy-DFA pass over every byte; only lines holding such a word go on to the set.
//!
//! It is sound by construction: a rule is gated on literals that occur in every one of its
//! matches, and any rule without such literals turns the gate off for its workload.

use aho_corasick::packed;
use regex_syntax::hir::literal::{Extractor, Seq};
use regex_syntax::hir::{Hir, HirKind};

/// Shortest literal worth gating on: shorter ones occur in most lines and blunt Teddy.
const MIN_LITERAL: usize = 3;
/// Most literals one rule may be gated on (a case-insensitive word expands fast).
const MAX_RULE_LITERALS: usize = 16;
/// Positions of one concatenation examined, so analysis time stays bounded on huge patterns.
const MAX_CONCAT_POSITIONS: usize = 64;

/// Literals every match of `pattern` contains (one of them, at least), or `None` when no
/// such set of literals of [`MIN_LITERAL`] bytes or more exists.
fn required_literals(pattern: &str) -> Option<Vec<Vec<u8>>> {
    // The parser's defaults are the regex crate's, so the tree is the one the rule runs.
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    required(&hir)
}

/// The best literal set among those found at this node and below. Each candidate is sound
/// on its own: a concatenation's match contains a match of every suffix of it, a
/// repetition of at least one contains its body, an alternation one of its branches.
fn required(hir: &Hir) -> Option<Vec<Vec<u8>>> {
    let mut found = Vec::new();
    found.extend(prefixes(hir));
    match hir.kind() {
        HirKind::Concat(children) => {
            for i in 0..children.len().min(MAX_CONCAT_POSITIONS) {
                // The whole concatenation's prefixes (i = 0) are taken above.
                if i > 0 {
                    found.extend(prefixes(&Hir::concat(children[i..].to_vec())));
                }
                found.extend(required(&children[i]));
            }
        }
        HirKind::Alternation(branches) => {
            let union: Option<Vec<Vec<u8>>> = branches.iter().try_fold(Vec::new(), |mut all, b| {
                all.extend(required(b)?);
                Some(all)
            });
            if let Some(mut all) = union {
                all.sort();
                all.dedup();
                if all.len() <= MAX_RULE_LITERALS {
                    found.push(all);
                }
            }
        }
        HirKind::Capture(c) => found.extend(required(&c.sub)),
        HirKind::Repetition(r) if r.min >= 1 => found.extend(required(&r.sub)),
        _ => {}
    }
    // Longer literals are rarer in text; among equals, fewer literals verify less often.
    found.into_iter().max_by_key(|set| {
        let shortest = set.iter().map(Vec::len).min().unwrap_or(0);
        (shortest.min(8), std::cmp::Reverse(set.len()))
    })
}

/// The prefix literals of `hir` when they form a small finite set of long-enough literals:
/// then every match of `hir` starts with one of them.
fn prefixes(hir: &Hir) -> Option<Vec<Vec<u8>>> {
    let seq: Seq = Extractor::new().extract(hir);
    let lits = seq.literals()?;
    if lits.is_empty()
        || lits.len() > MAX_RULE_LITERALS
        || lits.iter().any(|l| l.as_bytes().len() < MIN_LITERAL)
    {
        return None;
    }
    Some(lits.iter().map(|l| l.as_bytes().to_vec()).collect())
}

/// One Teddy searcher over the required literals of every rule of a workload.
pub struct LiteralGate {
    searcher: packed::Searcher,
}

impl LiteralGate {
    /// A gate over `patterns`, or `None` when some rule has no required literal, or the
    /// literals are too many or the CPU too old for Teddy.
    pub fn build<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut literals = Vec::new();
        for pattern in patterns {
            literals.extend(required_literals(pattern)?);
        }
        literals.sort();
        literals.dedup();
        let mut builder = packed::Config::new()
            // Teddy's own limit (64 literals) is a speed guess for generic text; ours is
            // measured by `cargo xtask bench scan`, and its hard limit (128) still holds.
            .heuristic_pattern_limits(false)
            .builder();
        builder.extend(&literals);
        Some(LiteralGate {
            searcher: builder.build()?,
        })
    }

    /// Whether `line` holds a literal some rule needs; when not, no rule can match it.
    pub fn may_match(&self, line: &str) -> bool {
        self.searcher.find(line).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lits(pattern: &str) -> Option<Vec<String>> {
        required_literals(pattern).map(|v| {
            v.into_iter()
                .map(|l| String::from_utf8(l).unwrap())
                .collect()
        })
    }

    #[test]
    fn literals_are_taken_from_anywhere_in_the_pattern() {
        assert_eq!(lits("connection refused").unwrap(), ["connection refused"]);
        assert_eq!(
            lits(r"(?P<n>\d{4,}) goroutines").unwrap(),
            [" goroutines"],
            "a suffix after a class"
        );
        assert_eq!(
            lits(r"(?P<sig>SIGSEGV|SIGBUS)").unwrap(),
            ["SIGBUS", "SIGSEGV"]
        );
        assert_eq!(lits(r"wget|curl .*\|\s*sh").unwrap(), ["curl ", "wget"]);
        assert_eq!(
            lits(r"[a-z](?:abcd)+").unwrap(),
            ["abcd"],
            "a repetition of one or more keeps its body"
        );
        assert_eq!(lits(r"^\s*FATAL\b").unwrap(), ["FATAL"]);
        let folded = lits("(?i)connection refused").unwrap();
        assert!(
            folded.iter().any(|l| l == "ſed"),
            "Unicode case folding is kept: {folded:?}"
        );
    }

    #[test]
    fn rules_without_a_required_literal_have_none() {
        for p in [r"\d{5}", r"ab\w+", r"(?:abcd)?x", r"foo|\d+", ""] {
            assert_eq!(lits(p), None, "{p}");
        }
    }

    #[test]
    fn only_lines_holding_a_required_literal_pass() {
        let gate =
            LiteralGate::build([r"HTTP/1\.[01]\x22 5\d\d", r"(?P<n>\d{4,}) goroutines"]).unwrap();
        assert!(gate.may_match(r#"GET / HTTP/1.1" 503 12"#));
        assert!(gate.may_match("1234 goroutines"));
        assert!(!gate.may_match(r#"GET / HTTP/1.1" 200 12"#));
        assert!(!gate.may_match("goroutines: 1234"));
        assert!(LiteralGate::build(["abc", r"\d+"]).is_none());
    }

    #[test]
    fn more_literals_than_teddy_holds_turn_the_gate_off() {
        let words: Vec<String> = (0..200).map(|i| format!("word{i:03}")).collect();
        assert!(LiteralGate::build(words[..100].iter().map(String::as_str)).is_some());
        assert!(LiteralGate::build(words.iter().map(String::as_str)).is_none());
    }
}
