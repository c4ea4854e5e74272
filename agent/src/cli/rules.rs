//! `nattrail rules`: log-scan rules, through the running agent (which applies a change at
//! once) or on the database directly when no agent runs.

use anyhow::Result;
use clap::{Args, Subcommand};

use super::output::{Format, outln, pick, print_csv, print_json, print_table};
use super::remote::{Target, target};
use crate::config::Config;
use crate::scan::admin::{self, RuleList, RuleRequest, TrialAnswer, TrialRequest};
use crate::scan::rules::{Rule, Scope, Severity, StreamSel};

/// Arguments of `rules`.
#[derive(Debug, Args)]
pub struct RulesArgs {
    #[command(subcommand)]
    command: RulesCommand,
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Add a rule.
    Add(AddArgs),
    /// List rules and overrides.
    List(ListArgs),
    /// Remove a rule (and its overrides) by id or name.
    Rm {
        /// The rule's id or name.
        rule: String,
    },
    /// Try a sample line against the rules (or one pattern).
    Test(TestArgs),
}

#[derive(Debug, Args)]
struct AddArgs {
    /// Short name, shown in hits.
    #[arg(long)]
    name: String,
    /// Regular expression (Rust regex syntax).
    #[arg(long)]
    pattern: String,
    /// stdout, stderr or both.
    #[arg(long, default_value = "both", value_parser = StreamSel::parse)]
    stream: StreamSel,
    /// info, warning, error or critical.
    #[arg(long, default_value = "warning", value_parser = Severity::parse)]
    severity: Severity,
    /// No second hit per container within this long (e.g. 30s, 5m).
    #[arg(long, default_value = "0s")]
    cooldown: humantime::Duration,
    /// Only for this workload (container name, compose service or workload label).
    #[arg(long)]
    workload: Option<String>,
    /// Store it switched off.
    #[arg(long)]
    disabled: bool,
    /// Print the stored rule as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Output format.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Shorthand for --format json.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TestArgs {
    /// The sample line.
    #[arg(long)]
    line: String,
    /// Use this workload's effective rules (default: the global rules).
    #[arg(long)]
    workload: Option<String>,
    /// Try this pattern alone instead of the stored rules.
    #[arg(long)]
    pattern: Option<String>,
    /// The stream the line came on (default: either).
    #[arg(long, value_parser = StreamSel::parse)]
    stream: Option<StreamSel>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

fn list_rules(t: &Target) -> Result<RuleList> {
    Ok(match t {
        Target::Agent(api) => api.get_json("/api/v1/rules", &())?,
        Target::File(c) => admin::list(c)?,
    })
}

/// Runs `rules`.
pub fn run(cfg: &Config, a: &RulesArgs) -> Result<()> {
    let t = target(cfg)?;
    match &a.command {
        RulesCommand::Add(a) => {
            let req = RuleRequest {
                name: a.name.clone(),
                pattern: a.pattern.clone(),
                stream: a.stream,
                severity: a.severity,
                cooldown_s: a.cooldown.as_secs(),
                enabled: !a.disabled,
                workload: a.workload.clone(),
            };
            let rule: Rule = match &t {
                Target::Agent(api) => api.post_json("/api/v1/rules", &req)?,
                Target::File(c) => admin::add(c, &req)?,
            };
            if a.json {
                print_json(&rule)
            } else {
                outln!("rule {} ({}) added", rule.id, rule.name)?;
                Ok(())
            }
        }
        RulesCommand::List(a) => {
            let list = list_rules(&t)?;
            let header = [
                "id", "name", "workload", "stream", "severity", "cooldown", "enabled", "pattern",
            ];
            let rows: Vec<Vec<String>> = list
                .rules
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.name.clone(),
                        match &r.scope {
                            Scope::Global => "(global)".into(),
                            Scope::Workload(w) => w.clone(),
                        },
                        r.stream.as_str().into(),
                        r.severity.as_str().into(),
                        format!("{}s", r.cooldown.as_secs()),
                        r.enabled.to_string(),
                        r.pattern.clone(),
                    ]
                })
                .collect();
            match pick(a.format, a.json) {
                Format::Json => print_json(&list),
                Format::Csv => print_csv(&header, &rows),
                Format::Table => {
                    print_table(&header, &rows)?;
                    for e in &list.compile_errors {
                        outln!("rule {} does not compile: {}", e.rule_id, e.error)?;
                    }
                    for o in &list.overrides {
                        outln!(
                            "override: rule {} for {}: enabled={} severity={}",
                            o.rule_id,
                            o.workload,
                            o.enabled.map(|e| e.to_string()).unwrap_or("-".into()),
                            o.severity.map(Severity::as_str).unwrap_or("-")
                        )?;
                    }
                    Ok(())
                }
            }
        }
        RulesCommand::Rm { rule } => {
            let list = list_rules(&t)?;
            let r = admin::resolve(&list.rules, rule)?;
            match &t {
                Target::Agent(api) => api.delete(&format!("/api/v1/rules/{}", r.id))?,
                Target::File(c) => {
                    crate::scan::rule_store::delete(c, r.id)?;
                }
            }
            outln!("rule {} ({}) removed", r.id, r.name)?;
            Ok(())
        }
        RulesCommand::Test(a) => {
            let req = TrialRequest {
                line: a.line.clone(),
                workload: a.workload.clone(),
                pattern: a.pattern.clone(),
                stream: a.stream,
            };
            let ans: TrialAnswer = match &t {
                Target::Agent(api) => api.post_json("/api/v1/rules/test", &req)?,
                Target::File(c) => admin::trial(c, &req)?,
            };
            if a.json {
                return print_json(&ans);
            }
            if !ans.matched {
                outln!("no rule matched")?;
            }
            for m in &ans.matches {
                outln!(
                    "matched rule {} ({}), severity {}, captures {}",
                    m.rule_id,
                    m.rule_name,
                    m.severity.as_str(),
                    serde_json::to_string(&m.captures)?
                )?;
            }
            Ok(())
        }
    }
}
