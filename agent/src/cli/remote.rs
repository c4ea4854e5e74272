//! The CLI's way to a running agent: its HTTP API, preferably over the Unix socket (reaching
//! it is the authorisation), else over TCP with the token from the token file (or
//! NATTRAIL_TOKEN). The token is sent over TCP only to a listener that belongs to the agent's
//! user, so a process that grabbed the port first learns nothing. When no agent answers, the
//! commands open the database read-only.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::error::ErrorBody;
use crate::api::token;
use crate::config::Config;

/// How requests reach the agent.
enum Transport {
    /// HTTP over TCP with the bearer token.
    Tcp {
        base: String,
        token: String,
        client: reqwest::blocking::Client,
    },
    /// HTTP over the agent's Unix socket.
    Unix {
        socket: PathBuf,
        rt: tokio::runtime::Runtime,
    },
}

/// A reachable agent.
pub struct Api {
    transport: Transport,
}

/// The agent serving `cfg`'s database, if one answers on the configured socket or address.
pub fn agent(cfg: &Config) -> Result<Option<Api>> {
    if !cfg.api.enabled {
        return Ok(None);
    }
    if !cfg.api.socket.is_empty() && Path::new(&cfg.api.socket).exists() {
        match unix_agent(cfg) {
            Ok(Some(api)) => return Ok(Some(api)),
            Ok(None) => {}
            // A socket we may not open (not in the agent's group): TCP with the token may
            // still work for root.
            Err(e) if cfg.api.listen.is_empty() => return Err(e),
            Err(e) => tracing::debug!(error = %e, "the agent's Unix socket did not answer"),
        }
    }
    if cfg.api.listen.is_empty() {
        return Ok(None);
    }
    tcp_agent(cfg)
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Whether `/health` (asked with authority) names `cfg`'s database.
fn serves(health: &serde_json::Value, cfg: &Config) -> bool {
    health["db"]
        .as_str()
        .is_some_and(|p| same_file(Path::new(p), &cfg.db_path))
}

fn unix_agent(cfg: &Config) -> Result<Option<Api>> {
    let socket = PathBuf::from(&cfg.api.socket);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime of the HTTP client")?;
    let api = Api {
        transport: Transport::Unix { socket, rt },
    };
    let health: serde_json::Value = match api.request(reqwest::Method::GET, "/health", None) {
        Ok((200, body)) => serde_json::from_slice(&body).unwrap_or_default(),
        Ok(_) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(serves(&health, cfg).then_some(api))
}

fn tcp_agent(cfg: &Config) -> Result<Option<Api>> {
    let token_file = token::path(&cfg.api, &cfg.db_path);
    let (token, owner_of) = match std::env::var(token::TOKEN_ENV) {
        Ok(t) if !t.trim().is_empty() => (t.trim().to_string(), cfg.db_path.clone()),
        _ => match token::read(&token_file) {
            Ok(Some(t)) => (t, token_file.clone()),
            // No token file: no agent has served this database.
            Ok(None) => return Ok(None),
            Err(e) => {
                return Err(anyhow!(
                    "{e} (run as root, use the agent's Unix socket as a member of its group, or set {})",
                    token::TOKEN_ENV
                ));
            }
        },
    };
    // The agent's user owns its token file (and its database).
    let agent_uid = match std::fs::metadata(&owner_of) {
        Ok(m) => m.uid(),
        Err(_) => return Ok(None),
    };
    let addr: std::net::SocketAddr = match cfg.api.listen.parse() {
        Ok(a) => a,
        Err(_) => bail!(
            "api.listen = {:?} is not an IP address and port",
            cfg.api.listen
        ),
    };
    match listener_uid(addr).context("reading /proc/net/tcp")? {
        None => return Ok(None),
        Some(uid) if uid != agent_uid => bail!(
            "the listener on {addr} belongs to uid {uid}, not to the agent's uid {agent_uid} \
             (owner of {}): not sending it the token",
            owner_of.display()
        ),
        Some(_) => {}
    }
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let api = Api {
        transport: Transport::Tcp {
            base: format!("http://{}", cfg.api.listen),
            token,
            client,
        },
    };
    // Anything listening that is not our agent for this database: query the file instead.
    let health: serde_json::Value = match api.request(reqwest::Method::GET, "/health", None) {
        Ok((200, body)) => serde_json::from_slice(&body).unwrap_or_default(),
        _ => return Ok(None),
    };
    Ok(serves(&health, cfg).then_some(api))
}

/// The uid owning the socket that listens on `addr` in this network namespace, from the
/// kernel's socket tables (`/proc/net/tcp`, `/proc/net/tcp6`: a fixed text format, read
/// here rather than through a crate for one field). A wildcard listener (0.0.0.0, ::) on the
/// port counts.
pub fn listener_uid(addr: std::net::SocketAddr) -> std::io::Result<Option<u32>> {
    const LISTEN: &str = "0A";
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[3] != LISTEN {
                continue;
            }
            let Some((ip_hex, port_hex)) = f[1].split_once(':') else {
                continue;
            };
            if u16::from_str_radix(port_hex, 16).ok() != Some(addr.port()) {
                continue;
            }
            let Some(ip) = proc_ip(ip_hex) else { continue };
            let mapped = match ip {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4),
                std::net::IpAddr::V4(_) => None,
            };
            let matches = ip == addr.ip() || ip.is_unspecified() || mapped == Some(addr.ip());
            if matches {
                return Ok(f[7].parse().ok());
            }
        }
    }
    Ok(None)
}

/// An address as /proc/net/tcp prints it: 32-bit words in host (little-endian) order.
fn proc_ip(hex: &str) -> Option<std::net::IpAddr> {
    let words: Option<Vec<u32>> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect();
    let bytes: Vec<u8> = words?.iter().flat_map(|w| w.to_le_bytes()).collect();
    match bytes.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

impl Api {
    /// One exchange: (status, body).
    fn request(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        json: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>)> {
        match &self.transport {
            Transport::Tcp {
                base,
                token,
                client,
            } => {
                let mut req = client
                    .request(method, format!("{base}{path_and_query}"))
                    .bearer_auth(token);
                if let Some(b) = json {
                    req = req.header("content-type", "application/json").body(b);
                }
                let r = req
                    .send()
                    .map_err(|e| anyhow!("asking the agent at {base}: {}", e.without_url()))?;
                let status = r.status().as_u16();
                Ok((
                    status,
                    r.bytes().context("reading the agent's answer")?.to_vec(),
                ))
            }
            Transport::Unix { socket, rt } => rt
                .block_on(unix_request(socket, method, path_and_query, json))
                .with_context(|| format!("asking the agent on {}", socket.display())),
        }
    }

    fn answer<T: DeserializeOwned>(&self, (status, body): (u16, Vec<u8>)) -> Result<T> {
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).context("decoding the agent's answer");
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(anyhow!("agent API ({status}): {}: {}", e.error, e.detail)),
            Err(_) => Err(anyhow!(
                "agent API ({status}): {}",
                String::from_utf8_lossy(&body).trim()
            )),
        }
    }

    /// GET `path` with `query` as the query string.
    pub fn get_json<Q: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
    ) -> Result<T> {
        let qs = serde_urlencoded::to_string(query).context("encoding the query string")?;
        let target = if qs.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{qs}")
        };
        self.answer(self.request(reqwest::Method::GET, &target, None)?)
    }

    /// POST `body` as JSON to `path`.
    pub fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let json = serde_json::to_vec(body).context("encoding the request")?;
        self.answer(self.request(reqwest::Method::POST, path, Some(json))?)
    }

    /// DELETE `path`; success has no body.
    pub fn delete(&self, path: &str) -> Result<()> {
        let (status, body) = self.request(reqwest::Method::DELETE, path, None)?;
        if (200..300).contains(&status) {
            return Ok(());
        }
        self.answer::<serde_json::Value>((status, body)).map(|_| ())
    }
}

/// One HTTP/1.1 exchange over the Unix socket (reqwest speaks only TCP).
async fn unix_request(
    socket: &Path,
    method: reqwest::Method,
    path_and_query: &str,
    json: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>)> {
    let stream = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::UnixStream::connect(socket),
    )
    .await
    .map_err(|_| anyhow!("connecting timed out"))??;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method.as_str())
        .uri(path_and_query)
        .header("host", "nattrail");
    if json.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(json.unwrap_or_default())))?;
    let resp = tokio::time::timeout(Duration::from_secs(120), sender.send_request(req))
        .await
        .map_err(|_| anyhow!("the agent did not answer within 120 s"))??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    driver.abort();
    Ok((status, body))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_table_names_the_owner_of_a_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let ours = nix::unistd::geteuid().as_raw();
        assert_eq!(listener_uid(addr).unwrap(), Some(ours));
        drop(l);
        assert_eq!(listener_uid(addr).unwrap(), None);
        assert_eq!(
            proc_ip("0100007F"),
            Some(std::net::IpAddr::from([127, 0, 0, 1]))
        );
    }
}
