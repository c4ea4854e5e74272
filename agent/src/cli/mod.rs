//! The `nattrail` command line: the daemon and the forensic commands.

mod capture;
mod events;
mod flows;
mod generate;
mod heap;
mod output;
mod remote;
mod rules;
mod sql;
mod status;
mod triggers;
mod who;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_DB_PATH};

/// Where the packaged config lives; read when present and no --config is given.
const SYSTEM_CONFIG: &str = "/etc/nattrail/nattrail.toml";

/// nattrail: who owned that public IP:port behind the NAT, and when.
#[derive(Debug, Parser)]
#[command(name = "nattrail", version, about)]
pub struct Cli {
    /// DuckDB file (overrides the config's db_path).
    #[arg(long, global = true, env = "NATTRAIL_DB")]
    pub db: Option<PathBuf>,
    /// TOML config file (default: /etc/nattrail/nattrail.toml when present).
    #[arg(long, global = true, env = "NATTRAIL_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: read conntrack events and store the trail.
    Run,
    /// Which internal client owned public IP:PORT at time T.
    Who(who::WhoArgs),
    /// List flows by address, port, protocol and time window.
    Flows(flows::FlowsArgs),
    /// The starts and ends of flows as events, in time order, a page at a time.
    Events(events::EventsArgs),
    /// Run a read-only SQL query on the trail.
    Sql(sql::SqlArgs),
    /// The agent's pipeline counters, recent capture gaps and database size.
    Status(status::StatusArgs),
    /// Log-scan rules: add, list, remove, try a line.
    Rules(rules::RulesArgs),
    /// Webhook triggers: add, list, remove, send a test payload.
    Triggers(triggers::TriggersArgs),
    /// Record raw conntrack netlink datagrams to a file (test fixtures, bug reports).
    Capture(capture::CaptureArgs),
    /// Generate the packaged config file, man pages or shell completions (for packaging).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

impl Cli {
    /// Loads the config named on the command line (or the system one), with --db applied.
    pub fn load_config(&self) -> Result<Config> {
        let mut cfg = match &self.config {
            Some(path) => Config::load(path)?,
            None if std::path::Path::new(SYSTEM_CONFIG).exists() => {
                Config::load(std::path::Path::new(SYSTEM_CONFIG))?
            }
            None => Config::default(),
        };
        if let Some(db) = &self.db {
            cfg.db_path = db.clone();
        }
        Ok(cfg)
    }
}

/// Entry point of the binary.
pub fn main() -> Result<()> {
    match run() {
        // The reader of our output went away (`| head`): nothing left to say, nor anyone
        // to say it to.
        Err(e) if e.chain().any(|c| c.is::<output::StdoutClosed>()) => std::process::exit(0),
        other => other,
    }
}

fn run() -> Result<()> {
    // Everything nattrail writes (the trail, its WAL and spill files, the token, secrets,
    // captures) is private, whatever umask it was started under; files it must share are
    // opened up explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    if let Command::Generate(a) = &cli.command {
        return generate::run(a);
    }
    let cfg = cli.load_config().context("loading configuration")?;
    init_tracing(matches!(cli.command, Command::Run | Command::Capture(_)));
    match &cli.command {
        Command::Run => crate::daemon::run(cfg),
        Command::Who(a) => who::run(&cfg, a),
        Command::Flows(a) => flows::run(&cfg, a),
        Command::Sql(a) => sql::run(&cfg, a),
        Command::Events(a) => events::run(&cfg, a),
        Command::Status(a) => status::run(&cfg, a),
        Command::Capture(a) => capture::run(&cfg, a),
        Command::Rules(a) => rules::run(&cfg, a),
        Command::Triggers(a) => triggers::run(&cfg, a),
        Command::Generate(a) => generate::run(a),
    }
}

fn init_tracing(daemon: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if daemon { "info" } else { "warn" };
    let filter =
        EnvFilter::try_from_env("NATTRAIL_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The trail a query command opened; kept until the process ends.
static QUERY_DB: std::sync::OnceLock<crate::store::database::Database> = std::sync::OnceLock::new();

/// Opens the trail for a query command, explaining the lock held by a running agent. The
/// database lives in a static, never dropped: it is read-only, so there is nothing to flush,
/// and DuckDB's teardown (4-5 ms) would only delay the exit that follows the answer.
/// `opts` are the DuckDB settings of the command (`OpenOptions::query`).
fn open_for_query(
    cfg: &Config,
    opts: crate::store::database::OpenOptions,
) -> Result<&'static crate::store::database::Database> {
    if let Some(db) = QUERY_DB.get() {
        return Ok(db);
    }
    heap::prepare_for_query();
    let db = match crate::store::database::Database::open(&cfg.db_path, opts) {
        Ok(c) => c,
        Err(e @ crate::store::schema::StoreError::Locked { .. }) => {
            return Err(anyhow::anyhow!(
                "{e}\nThe running agent holds the database and its API did not answer on \
                 api.listen = {:?} (is [api] enabled, and is this the same --db and --config?).",
                cfg.api.listen
            ));
        }
        Err(e) => {
            return if cfg.db_path == std::path::Path::new(DEFAULT_DB_PATH) {
                Err(anyhow::Error::new(e).context("use --db or NATTRAIL_DB to name another file"))
            } else {
                Err(e.into())
            };
        }
    };
    Ok(QUERY_DB.get_or_init(|| db))
}
