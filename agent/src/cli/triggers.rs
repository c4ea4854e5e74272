//! `nattrail triggers`: webhook triggers, through the running agent (which applies a change
//! at once) or on the database directly when no agent runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use super::output::{Format, pick, print_csv, print_json, print_table};
use super::remote::{Target, target};
use crate::config::Config;
use crate::scan::rules::Severity;
use crate::store::triggers::{self, NewTrigger, Trigger};
use crate::triggers::delivery::{Deliverer, DeliveryConfig, Outcome};
use crate::triggers::dispatcher::{sample, target as delivery_target};
use crate::triggers::filter::Filter;
use crate::triggers::ssrf::Guard;

/// Arguments of `triggers`.
#[derive(Debug, Args)]
pub struct TriggersArgs {
    #[command(subcommand)]
    command: TriggersCommand,
}

#[derive(Debug, Subcommand)]
enum TriggersCommand {
    /// Add a trigger.
    Add(Box<AddArgs>),
    /// List triggers (secrets redacted).
    List {
        /// Output format.
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Shorthand for --format json.
        #[arg(long)]
        json: bool,
    },
    /// Remove a trigger by id or name.
    Rm {
        /// The trigger's id or name.
        trigger: String,
    },
    /// Send a sample payload of the real shape to a trigger's webhook now.
    Test {
        /// The trigger's id or name.
        trigger: String,
    },
}

#[derive(Debug, Args)]
struct AddArgs {
    /// Unique name.
    #[arg(long)]
    name: String,
    /// Webhook URL (loopback, link-local and the like are refused unless allowed by
    /// [webhooks] allow).
    #[arg(long)]
    url: String,
    /// Signing secret (whsec_<base64> per Standard Webhooks, or any string).
    #[arg(long)]
    secret: Option<String>,
    /// Severities, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = Severity::parse)]
    severity: Vec<Severity>,
    /// Sources (logscan, conntrack, agent), comma-separated.
    #[arg(long, value_delimiter = ',')]
    source: Vec<String>,
    /// The message matches this regex.
    #[arg(long)]
    message: Option<String>,
    /// Connection events: destination networks, comma-separated CIDRs.
    #[arg(long, value_delimiter = ',')]
    dst: Vec<ipnet::IpNet>,
    /// Connection events: destination ports, comma-separated.
    #[arg(long = "dst-port", value_delimiter = ',')]
    dst_port: Vec<u16>,
    /// Connection events: internal networks, comma-separated CIDRs.
    #[arg(long, value_delimiter = ',')]
    internal: Vec<ipnet::IpNet>,
    /// Connection events: tcp, udp or icmp.
    #[arg(long)]
    proto: Option<String>,
    /// Deliveries per minute (0: no limit).
    #[arg(long, default_value_t = 0)]
    rate_per_min: u32,
    /// Extra header NAME=VALUE (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
}

fn all(t: &Target) -> Result<Vec<Trigger>> {
    Ok(match t {
        Target::Agent(api) => api.get_json("/api/v1/triggers", &())?,
        Target::File(c) => triggers::list(c)?
            .into_iter()
            .map(Trigger::redacted)
            .collect(),
    })
}

/// Runs `triggers`.
pub fn run(cfg: &Config, a: &TriggersArgs) -> Result<()> {
    let guard = Guard::new(cfg.webhooks.allow.clone());
    let t = target(cfg)?;
    match &a.command {
        TriggersCommand::Add(a) => {
            let mut headers = BTreeMap::new();
            for h in &a.headers {
                let Some((k, v)) = h.split_once('=') else {
                    bail!("--header {h:?}: expected NAME=VALUE");
                };
                headers.insert(k.trim().to_string(), v.trim().to_string());
            }
            let n = NewTrigger {
                name: a.name.clone(),
                url: a.url.clone(),
                secret: a.secret.clone(),
                filter: Filter {
                    severities: a.severity.clone(),
                    sources: a.source.clone(),
                    message: a.message.clone(),
                    dst: a.dst.clone(),
                    dst_ports: a.dst_port.clone(),
                    internal: a.internal.clone(),
                    proto: a.proto.clone(),
                },
                rate_per_min: a.rate_per_min,
                headers,
                enabled: true,
            };
            let created: Trigger = match &t {
                Target::Agent(api) => api.post_json("/api/v1/triggers", &n)?,
                Target::File(c) => triggers::insert(c, &n, &guard)?.redacted(),
            };
            println!("trigger {} ({}) added", created.id, created.name);
            Ok(())
        }
        TriggersCommand::List { format, json } => {
            let list = all(&t)?;
            let header = ["id", "name", "enabled", "url", "filter", "rate/min", "note"];
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|t| {
                    vec![
                        t.id.to_string(),
                        t.name.clone(),
                        t.enabled.to_string(),
                        t.url.clone(),
                        serde_json::to_string(&t.filter).unwrap_or_default(),
                        t.rate_per_min.to_string(),
                        t.disabled_reason.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            match pick(*format, *json) {
                Format::Json => print_json(&list),
                Format::Csv => print_csv(&header, &rows),
                Format::Table => {
                    print_table(&header, &rows);
                    Ok(())
                }
            }
        }
        TriggersCommand::Rm { trigger } => {
            let tr = triggers::pick(&all(&t)?, trigger)?;
            match &t {
                Target::Agent(api) => api.delete(&format!("/api/v1/triggers/{}", tr.id))?,
                Target::File(c) => {
                    triggers::delete(c, tr.id)?;
                }
            }
            println!("trigger {} ({}) removed", tr.id, tr.name);
            Ok(())
        }
        TriggersCommand::Test { trigger } => {
            let out: Outcome = match &t {
                Target::Agent(api) => {
                    let tr = triggers::pick(&all(&t)?, trigger)?;
                    api.post_json(&format!("/api/v1/triggers/{}/test", tr.id), &())?
                }
                Target::File(c) => {
                    // No agent: send from here, through the same guard and signing.
                    let tr = triggers::resolve(c, trigger)?;
                    let d = Deliverer::new(Arc::new(guard), DeliveryConfig::default())?;
                    let (id, body) = sample(&tr);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(d.deliver(&delivery_target(&tr), &id, &body))
                }
            };
            println!("{}", serde_json::to_string(&out)?);
            match out {
                Outcome::Delivered { .. } => Ok(()),
                other => bail!("test delivery did not succeed: {other:?}"),
            }
        }
    }
}
