//! `nattrail triggers`: webhook triggers, through the running agent (which applies a change
//! at once) or on the database directly when no agent runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::output::{Format, outln, pick, print_csv, print_json, print_table};
use super::remote::{Target, target};
use crate::config::Config;
use crate::scan::rules::Severity;
use crate::store::secrets::SecretStore;
use crate::triggers::delivery::{Deliverer, DeliveryConfig, Outcome};
use crate::triggers::dispatcher::{sample, target as delivery_target};
use crate::triggers::filter::Filter;
use crate::triggers::ssrf::Guard;
use crate::triggers::trigger_store::{self as triggers, NewTrigger, Trigger};

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
    /// Signing secret (whsec_<base64> per Standard Webhooks, or any string). Visible to every
    /// local user in /proc while the command runs: prefer --secret-file.
    #[arg(long, conflicts_with = "secret_file")]
    secret: Option<String>,
    /// Read the signing secret from this file ("-": standard input); surrounding white space
    /// is dropped.
    #[arg(long)]
    secret_file: Option<PathBuf>,
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
    /// Extra header NAME=VALUE (repeatable; visible in /proc: prefer --header-file).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Read extra headers from this file ("-": standard input), one NAME: VALUE or
    /// NAME=VALUE a line; blank lines and lines starting with # are skipped.
    #[arg(long)]
    header_file: Option<PathBuf>,
}

/// The contents of `path`, or of standard input for "-".
fn read_input(path: &Path, what: &str) -> Result<String> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("reading the {what} from standard input"))?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} from {}", path.display()))?;
    }
    Ok(text)
}

/// One header line, NAME: VALUE or NAME=VALUE (the first separator splits).
fn header_line(line: &str) -> Result<(String, String)> {
    let split = match (line.find(':'), line.find('=')) {
        (Some(c), Some(e)) => c.min(e),
        (Some(c), None) => c,
        (None, Some(e)) => e,
        (None, None) => bail!(
            "header line {:?}: expected NAME: VALUE or NAME=VALUE",
            redact(line)
        ),
    };
    let (k, v) = (line[..split].trim(), line[split + 1..].trim());
    if k.is_empty() {
        bail!("header line {:?}: empty name", redact(line));
    }
    Ok((k.to_string(), v.to_string()))
}

/// A bad header line for an error message: its name part only, since the value may be a
/// credential.
fn redact(line: &str) -> String {
    let name: String = line
        .chars()
        .take_while(|c| *c != ':' && *c != '=')
        .take(64)
        .collect();
    format!("{name}…")
}

fn all(t: &Target, secrets: &SecretStore) -> Result<Vec<Trigger>> {
    Ok(match t {
        Target::Agent(api) => api.get_json("/api/v1/triggers", &())?,
        Target::File(c) => triggers::list(c, secrets)?
            .into_iter()
            .map(Trigger::redacted)
            .collect(),
    })
}

/// Runs `triggers`.
pub fn run(cfg: &Config, a: &TriggersArgs) -> Result<()> {
    let guard = Guard::new(cfg.webhooks.allow.clone());
    let t = target(cfg)?;
    let secrets = SecretStore::for_db(&cfg.db_path);
    match &a.command {
        TriggersCommand::Add(a) => {
            let mut headers = BTreeMap::new();
            for h in &a.headers {
                let Some((k, v)) = h.split_once('=') else {
                    bail!("--header {:?}: expected NAME=VALUE", redact(h));
                };
                headers.insert(k.trim().to_string(), v.trim().to_string());
            }
            if a.secret_file.is_some() && a.secret_file == a.header_file {
                bail!("--secret-file and --header-file name the same input");
            }
            if let Some(p) = &a.header_file {
                for line in read_input(p, "headers")?.lines() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let (k, v) = header_line(line)?;
                    headers.insert(k, v);
                }
            }
            let secret = match &a.secret_file {
                Some(p) => {
                    let s = read_input(p, "secret")?.trim().to_string();
                    if s.is_empty() {
                        bail!("the secret read from {} is empty", p.display());
                    }
                    Some(s)
                }
                None => a.secret.clone(),
            };
            let n = NewTrigger {
                name: a.name.clone(),
                url: a.url.clone(),
                secret,
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
                Target::File(c) => triggers::insert(c, &secrets, &n, &guard)?.redacted(),
            };
            outln!("trigger {} ({}) added", created.id, created.name)?;
            Ok(())
        }
        TriggersCommand::List { format, json } => {
            let list = all(&t, &secrets)?;
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
                    print_table(&header, &rows)?;
                    Ok(())
                }
            }
        }
        TriggersCommand::Rm { trigger } => {
            let tr = triggers::pick(&all(&t, &secrets)?, trigger)?;
            match &t {
                Target::Agent(api) => api.delete(&format!("/api/v1/triggers/{}", tr.id))?,
                Target::File(c) => {
                    triggers::delete(c, &secrets, tr.id)?;
                }
            }
            outln!("trigger {} ({}) removed", tr.id, tr.name)?;
            Ok(())
        }
        TriggersCommand::Test { trigger } => {
            let out: Outcome = match &t {
                Target::Agent(api) => {
                    let tr = triggers::pick(&all(&t, &secrets)?, trigger)?;
                    api.post_json(&format!("/api/v1/triggers/{}/test", tr.id), &())?
                }
                Target::File(c) => {
                    // No agent: send from here, through the same guard and signing.
                    let tr = triggers::resolve(c, &secrets, trigger)?;
                    let d = Deliverer::new(Arc::new(guard), DeliveryConfig::default())?;
                    let (id, body) = sample(&tr);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(d.deliver(&delivery_target(&tr), &id, &body))
                }
            };
            outln!("{}", serde_json::to_string(&out)?)?;
            match out {
                Outcome::Delivered { .. } => Ok(()),
                other => bail!("test delivery did not succeed: {other:?}"),
            }
        }
    }
}
