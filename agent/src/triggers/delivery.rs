//! Sending one webhook: signed per Standard Webhooks, to a vetted address only, no proxy,
//! no redirect followed, a timeout per attempt, and retries with exponential backoff and
//! jitter that honour Retry-After. 2xx is success; 410 means the receiver wants no more.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use reqwest::StatusCode;
use serde::Serialize;

use super::signature::sign;
use super::ssrf::{Guard, GuardedResolver, SsrfError};

/// Where and how to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL.
    pub url: String,
    /// Signing secret; unsigned without one.
    pub secret: Option<String>,
    /// Extra headers.
    pub headers: BTreeMap<String, String>,
}

/// Retry and timeout settings.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Time limit of one attempt.
    pub timeout: Duration,
    /// Attempts in all.
    pub max_attempts: u32,
    /// Wait after the first failure; doubled each time.
    pub backoff_base: Duration,
    /// Longest wait, Retry-After included.
    pub backoff_max: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: Duration::from_secs(5),
            max_attempts: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A 2xx answer.
    Delivered {
        /// Its status.
        status: u16,
        /// Attempts made.
        attempts: u32,
    },
    /// 410 Gone: the trigger should be disabled.
    Gone {
        /// Attempts made.
        attempts: u32,
    },
    /// The SSRF guard refused the destination; nothing was sent.
    Refused {
        /// Why.
        error: String,
    },
    /// No success within the attempts, or an answer not worth retrying (3xx, most 4xx).
    Failed {
        /// The last status, if any answer came.
        status: Option<u16>,
        /// What went wrong last.
        error: String,
        /// Attempts made.
        attempts: u32,
    },
}

/// The sending side, shared by every trigger.
#[derive(Debug, Clone)]
pub struct Deliverer {
    client: reqwest::Client,
    guard: Arc<Guard>,
    cfg: DeliveryConfig,
}

fn ssrf_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a SsrfError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(s) = err.downcast_ref::<SsrfError>() {
            return Some(s);
        }
        cur = err.source();
    }
    None
}

fn retry_after(r: &reqwest::Response) -> Option<Duration> {
    let v = r
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    if let Ok(s) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

impl Deliverer {
    /// A deliverer whose every connection goes through `guard`.
    pub fn new(guard: Arc<Guard>, cfg: DeliveryConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .dns_resolver(Arc::new(GuardedResolver(Arc::clone(&guard))))
            .user_agent(concat!("nattrail/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Deliverer { client, guard, cfg })
    }

    fn backoff(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let exp = self
            .cfg
            .backoff_base
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.cfg.backoff_max);
        // Full jitter in [exp/2, exp): receivers recovering from an outage are not hit by
        // every agent at once.
        let jittered = exp.mul_f64(rand::rng().random_range(0.5..1.0));
        match hint {
            Some(h) => h.min(self.cfg.backoff_max).max(jittered),
            None => jittered,
        }
    }

    /// Sends `body` with a `webhook-id` that stays the same across retries.
    pub async fn deliver(&self, target: &Target, webhook_id: &str, body: &[u8]) -> Outcome {
        let url = match self.guard.check_url(&target.url) {
            Ok(u) => u,
            Err(e) => {
                return Outcome::Refused {
                    error: e.to_string(),
                };
            }
        };
        let mut last: (Option<u16>, String) = (None, String::new());
        for attempt in 1..=self.cfg.max_attempts {
            let ts = chrono::Utc::now().timestamp();
            let mut req = self
                .client
                .post(url.clone())
                .header("content-type", "application/json")
                .header("webhook-id", webhook_id)
                .header("webhook-timestamp", ts.to_string())
                .body(body.to_vec());
            if let Some(secret) = &target.secret {
                req = req.header("webhook-signature", sign(secret, webhook_id, ts, body));
            }
            for (k, v) in &target.headers {
                req = req.header(k, v);
            }
            let hint = match req.send().await {
                Ok(r) => {
                    let status = r.status();
                    if status.is_success() {
                        return Outcome::Delivered {
                            status: status.as_u16(),
                            attempts: attempt,
                        };
                    }
                    if status == StatusCode::GONE {
                        return Outcome::Gone { attempts: attempt };
                    }
                    last = (Some(status.as_u16()), format!("answered {status}"));
                    let retryable = status.is_server_error()
                        || status == StatusCode::REQUEST_TIMEOUT
                        || status == StatusCode::TOO_MANY_REQUESTS;
                    if !retryable {
                        if status.is_redirection() {
                            last.1 = format!("answered {status}; redirects are not followed");
                        }
                        return Outcome::Failed {
                            status: last.0,
                            error: last.1,
                            attempts: attempt,
                        };
                    }
                    retry_after(&r)
                }
                Err(e) => {
                    if let Some(s) = ssrf_cause(&e) {
                        return Outcome::Refused {
                            error: s.to_string(),
                        };
                    }
                    // The URL may carry a token in its query; this text goes to the delivery
                    // log and the agent's log.
                    let e = e.without_url();
                    last = (None, format!("{e}: {}", source_chain(&e)));
                    None
                }
            };
            if attempt < self.cfg.max_attempts {
                tokio::time::sleep(self.backoff(attempt, hint)).await;
            }
        }
        Outcome::Failed {
            status: last.0,
            error: last.1,
            attempts: self.cfg.max_attempts,
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode as S};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    use super::*;

    type Answers = Vec<(u16, Vec<(&'static str, &'static str)>)>;

    /// What the receiver saw: (webhook-id, timestamp, signature, body, when).
    type Seen = Arc<Mutex<Vec<(String, String, String, Vec<u8>, Instant)>>>;

    /// A receiver answering each request with the next of `answers` (the last repeats).
    async fn receiver(answers: Answers) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let state = (Arc::clone(&seen), Arc::new(answers));
        let app = Router::new()
            .route(
                "/hook",
                post(
                    |State((seen, answers)): State<(Seen, Arc<Answers>)>,
                     h: HeaderMap,
                     body: Bytes| async move {
                        let mut s = seen.lock().unwrap();
                        let g = |k: &str| {
                            h.get(k)
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default()
                        };
                        s.push((
                            g("webhook-id"),
                            g("webhook-timestamp"),
                            g("webhook-signature"),
                            body.to_vec(),
                            Instant::now(),
                        ));
                        let (code, headers) = answers[(s.len() - 1).min(answers.len() - 1)].clone();
                        let mut r: Response = S::from_u16(code).unwrap().into_response();
                        for (k, v) in headers {
                            r.headers_mut().insert(k, v.parse().unwrap());
                        }
                        r
                    },
                ),
            )
            .with_state(state);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        (format!("http://{addr}/hook"), seen)
    }

    fn deliverer(allow_loopback: bool) -> Deliverer {
        let allow = if allow_loopback {
            vec!["127.0.0.1/32".parse().unwrap()]
        } else {
            Vec::new()
        };
        Deliverer::new(
            Arc::new(Guard::new(allow)),
            DeliveryConfig {
                timeout: Duration::from_secs(2),
                max_attempts: 3,
                backoff_base: Duration::from_millis(50),
                backoff_max: Duration::from_secs(2),
            },
        )
        .unwrap()
    }

    fn target(url: &str) -> Target {
        Target {
            url: url.into(),
            secret: Some("whsec_c2VjcmV0LWtleS1ieXRlcw==".into()),
            headers: [("x-team".to_string(), "netops".to_string())].into(),
        }
    }

    /// The receiver's own check: HMAC-SHA256 over "id.timestamp.body" with the key bytes.
    fn verify(secret_b64: &str, id: &str, ts: &str, body: &[u8], header: &str) -> bool {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret_b64)
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        header.split(' ').any(|s| s == format!("v1,{want}"))
    }

    #[tokio::test]
    async fn a_500_is_retried_with_the_same_id_and_a_valid_signature() {
        let (url, seen) = receiver(vec![(500, vec![]), (200, vec![])]).await;
        let out = deliverer(true)
            .deliver(&target(&url), "evt_7_1", br#"{"x":1}"#)
            .await;
        assert_eq!(
            out,
            Outcome::Delivered {
                status: 200,
                attempts: 2
            }
        );
        let s = seen.lock().unwrap();
        assert_eq!(s.len(), 2);
        for (id, ts, sig, body, _) in s.iter() {
            assert_eq!(id, "evt_7_1");
            assert!(
                verify("c2VjcmV0LWtleS1ieXRlcw==", id, ts, body, sig),
                "{sig}"
            );
        }
    }

    #[tokio::test]
    async fn redirects_are_failures_gone_disables_and_retry_after_is_honoured() {
        let (url, seen) = receiver(vec![(302, vec![("location", "http://127.0.0.1:1/x")])]).await;
        let out = deliverer(true).deliver(&target(&url), "a", b"{}").await;
        assert!(
            matches!(
                out,
                Outcome::Failed {
                    status: Some(302),
                    attempts: 1,
                    ..
                }
            ),
            "{out:?}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);

        let (url, _) = receiver(vec![(410, vec![])]).await;
        let out = deliverer(true).deliver(&target(&url), "b", b"{}").await;
        assert_eq!(out, Outcome::Gone { attempts: 1 });

        let (url, seen) = receiver(vec![(503, vec![("retry-after", "1")]), (204, vec![])]).await;
        let out = deliverer(true).deliver(&target(&url), "c", b"{}").await;
        assert_eq!(
            out,
            Outcome::Delivered {
                status: 204,
                attempts: 2
            }
        );
        let gap = {
            let s = seen.lock().unwrap();
            s[1].4 - s[0].4
        };
        assert!(gap >= Duration::from_millis(950), "Retry-After ignored");

        let (url, seen) = receiver(vec![(500, vec![])]).await;
        let out = deliverer(true).deliver(&target(&url), "d", b"{}").await;
        assert!(matches!(
            out,
            Outcome::Failed {
                status: Some(500),
                attempts: 3,
                ..
            }
        ));
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_failed_delivery_does_not_tell_the_url() {
        // A port nobody listens on: the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/hook?token=SECRETQ");
        let out = deliverer(true).deliver(&target(&url), "f", b"{}").await;
        assert_eq!(
            out,
            Outcome::Failed {
                status: None,
                error: "error sending request: client error (Connect): tcp connect error: \
                        Connection refused (os error 111)"
                    .into(),
                attempts: 3,
            }
        );
    }

    #[tokio::test]
    async fn loopback_is_refused_before_anything_is_sent() {
        let (url, seen) = receiver(vec![(200, vec![])]).await;
        let d = deliverer(false);
        let port = url
            .split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        for u in [
            url.clone(),
            format!("http://localhost:{port}/hook"),
            format!("http://127.1:{port}/hook"),
            format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        ] {
            let out = d.deliver(&target(&u), "e", b"{}").await;
            assert!(matches!(out, Outcome::Refused { .. }), "{u}: {out:?}");
        }
        assert!(seen.lock().unwrap().is_empty());
    }
}
