//! Hot reload: the rules in force are an immutable snapshot behind an `ArcSwap`. A change
//! builds a new snapshot and swaps it in; every tail sees it from its next line, with no
//! restart and no lock on the line path (a tail re-reads only when the version moved).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::engine::{CompileError, WorkloadRules, compile_errors};
use super::rules::{Override, Rule, effective};

/// One version of the rules, with each workload's compiled set built on first use.
pub struct RuleBook {
    version: u64,
    rules: Vec<Rule>,
    overrides: Vec<Override>,
    errors: Vec<CompileError>,
    compiled: Mutex<HashMap<String, Arc<WorkloadRules>>>,
}

impl RuleBook {
    fn new(version: u64, rules: Vec<Rule>, overrides: Vec<Override>) -> Self {
        let errors = compile_errors(&rules);
        RuleBook {
            version,
            rules,
            overrides,
            errors,
            compiled: Mutex::new(HashMap::new()),
        }
    }

    /// The effective, compiled rules of the workload known by `workloads`.
    pub fn for_workload(&self, workloads: &[String]) -> Arc<WorkloadRules> {
        let mut cache = self.compiled.lock().expect("rule cache lock");
        Arc::clone(cache.entry(workloads.join("\n")).or_insert_with(|| {
            Arc::new(WorkloadRules::build(effective(
                &self.rules,
                &self.overrides,
                workloads,
            )))
        }))
    }

    /// The effective rules of the workload known by `workloads`, uncompiled (for display).
    pub fn effective(&self, workloads: &[String]) -> Vec<Rule> {
        effective(&self.rules, &self.overrides, workloads)
    }

    /// Rules whose pattern does not compile (reported in stats and on the rule).
    pub fn errors(&self) -> &[CompileError] {
        &self.errors
    }

    /// This snapshot's version.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// The rules in force.
pub struct LiveRules {
    book: ArcSwap<RuleBook>,
    version: AtomicU64,
    // Tails wait on this to reopen their stream when the streams they need change.
    changed: tokio::sync::watch::Sender<u64>,
}

impl LiveRules {
    /// Starts with these rules.
    pub fn new(rules: Vec<Rule>, overrides: Vec<Override>) -> Self {
        LiveRules {
            book: ArcSwap::from_pointee(RuleBook::new(1, rules, overrides)),
            version: AtomicU64::new(1),
            changed: tokio::sync::watch::Sender::new(1),
        }
    }

    /// Replaces the rules; tails pick them up from their next line.
    pub fn replace(&self, rules: Vec<Rule>, overrides: Vec<Override>) {
        let v = self.version.load(Ordering::Acquire) + 1;
        self.book
            .store(Arc::new(RuleBook::new(v, rules, overrides)));
        self.version.store(v, Ordering::Release);
        self.changed.send_replace(v);
    }

    /// A receiver told of every replacement.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<RuleBook> {
        self.book.load_full()
    }

    /// A tail's view of one workload's rules.
    pub fn view(self: &Arc<Self>, workloads: &[String]) -> WorkloadView {
        let book = self.load();
        WorkloadView {
            live: Arc::clone(self),
            workloads: workloads.to_vec(),
            version: book.version(),
            rules: book.for_workload(workloads),
        }
    }
}

/// What one tail holds: its workload's compiled rules, refreshed when the version moves.
pub struct WorkloadView {
    live: Arc<LiveRules>,
    workloads: Vec<String>,
    version: u64,
    rules: Arc<WorkloadRules>,
}

impl WorkloadView {
    /// The rules in force now (one atomic load per call when nothing changed).
    pub fn current(&mut self) -> &WorkloadRules {
        if self.live.version.load(Ordering::Acquire) != self.version {
            let book = self.live.load();
            self.version = book.version();
            self.rules = book.for_workload(&self.workloads);
        }
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pipeline::messages::Stream;
    use crate::scan::rules::{Scope, Severity, StreamSel};

    fn rule(id: u64, pattern: &str) -> Rule {
        Rule {
            id,
            name: format!("r{id}"),
            pattern: pattern.into(),
            stream: StreamSel::Both,
            severity: Severity::Info,
            cooldown: Duration::ZERO,
            enabled: true,
            scope: Scope::Global,
        }
    }

    #[test]
    fn a_swap_applies_from_the_next_line() {
        let live = Arc::new(LiveRules::new(vec![rule(1, "alpha")], Vec::new()));
        let mut view = live.view(&["web".to_string()]);
        assert_eq!(view.current().matches("beta here", Stream::Stdout).len(), 0);
        live.replace(
            vec![rule(1, "alpha"), rule(2, "beta"), rule(3, "(bad")],
            Vec::new(),
        );
        assert_eq!(view.current().matches("beta here", Stream::Stdout).len(), 1);
        assert_eq!(live.load().errors().len(), 1);
        assert_eq!(live.load().errors()[0].rule_id, 3);
        live.replace(vec![rule(1, "alpha")], Vec::new());
        assert!(
            view.current()
                .matches("beta here", Stream::Stdout)
                .is_empty()
        );
    }
}
