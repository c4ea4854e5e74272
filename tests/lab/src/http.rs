//! One HTTP exchange from inside a lab namespace (the agent's API listens there).

use std::time::Duration;

use anyhow::Result;

use crate::netns::run_in;

/// `method url` from namespace `ns`, with the bearer `token` and a JSON `body` if given:
/// (status, body).
pub fn request(
    ns: &str,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<String>,
) -> Result<(u16, String)> {
    let (method, url) = (method.to_string(), url.to_string());
    let token = token.map(str::to_string);
    run_in(ns, move || {
        let client = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()?;
        let mut req = client.request(method.parse()?, &url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let r = req.send()?;
        Ok((r.status().as_u16(), r.text()?))
    })
}
