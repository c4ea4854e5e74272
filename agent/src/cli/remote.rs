//! The CLI's way to a running agent: its HTTP API, with the token from the token file (or
//! NATTRAIL_TOKEN). When no agent answers, the commands open the database read-only.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::error::ErrorBody;
use crate::api::token;
use crate::config::Config;

/// A reachable agent.
pub struct Api {
    base: String,
    token: String,
    client: reqwest::blocking::Client,
}

/// The agent serving `cfg`'s database, if one answers on the configured address.
pub fn agent(cfg: &Config) -> Result<Option<Api>> {
    if !cfg.api.enabled || cfg.api.listen.is_empty() {
        return Ok(None);
    }
    let token = match std::env::var(token::TOKEN_ENV) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let path = cfg.api.token_path(&cfg.db_path);
            match token::read(&path) {
                Ok(Some(t)) => t,
                // No token file: no agent has served this database.
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(anyhow!(
                        "reading the API token {}: {e} (run as root, or set {})",
                        path.display(),
                        token::TOKEN_ENV
                    ));
                }
            }
        }
    };
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let base = format!("http://{}", cfg.api.listen);
    // Anything listening that is not our agent for this database: query the file instead.
    let health: serde_json::Value = match client.get(format!("{base}/health")).send() {
        Ok(r) if r.status().is_success() => r.json().unwrap_or_default(),
        _ => return Ok(None),
    };
    let serves = health["db"].as_str().map(std::path::PathBuf::from);
    let same = |a: &std::path::Path, b: &std::path::Path| {
        a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    if !serves.is_some_and(|p| same(&p, &cfg.db_path)) {
        return Ok(None);
    }
    Ok(Some(Api {
        base,
        token,
        client,
    }))
}

impl Api {
    fn answer<T: DeserializeOwned>(&self, r: reqwest::blocking::Response) -> Result<T> {
        let status = r.status();
        if status.is_success() {
            return r.json().context("decoding the agent's answer");
        }
        let text = r.text().unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => Err(anyhow!("agent API ({status}): {}: {}", e.error, e.detail)),
            Err(_) => Err(anyhow!("agent API ({status}): {}", text.trim())),
        }
    }

    fn send<T: DeserializeOwned>(&self, req: reqwest::blocking::RequestBuilder) -> Result<T> {
        let r = req
            .bearer_auth(&self.token)
            .send()
            .with_context(|| format!("asking the agent at {}", self.base))?;
        self.answer(r)
    }

    /// GET `path` with `query` as the query string.
    pub fn get_json<Q: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<T> {
        self.send(self.client.get(format!("{}{path}", self.base)).query(query))
    }

    /// POST `body` as JSON to `path`.
    pub fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send(self.client.post(format!("{}{path}", self.base)).json(body))
    }

    /// DELETE `path`; success has no body.
    pub fn delete(&self, path: &str) -> Result<()> {
        let r = self
            .client
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .with_context(|| format!("asking the agent at {}", self.base))?;
        if r.status().is_success() {
            return Ok(());
        }
        self.answer::<serde_json::Value>(r).map(|_| ())
    }
}

/// Where an administrative command (rules, triggers) goes: the running agent, which applies
/// the change at once, or the database file when no agent runs.
pub enum Target {
    /// Through the agent's API.
    Agent(Api),
    /// Straight into the file (created and migrated if new).
    File(duckdb::Connection),
}

/// The agent serving `cfg`'s database, else the file opened read-write.
pub fn target(cfg: &Config) -> Result<Target> {
    if let Some(api) = agent(cfg)? {
        return Ok(Target::Agent(api));
    }
    let db = crate::store::database::Database::open_rw(&cfg.db_path)
        .with_context(|| format!("opening {}", cfg.db_path.display()))?;
    Ok(Target::File(db.connect()?))
}
