//! `NatsConfig`, the publisher's settings, and the one place server URLs are taken apart: the
//! credentials in a URL go to the client as options and never appear in a log line or an error.

use std::time::Duration;

use derive_setters::Setters;
use educe::Educe;
use outbox::redact::redact_url;
use serde::Deserialize;

use crate::NatsError;

/// Default server URL: the local nats-server of `.ci/nats`.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
/// Default time a publish waits for its JetStream ack: 10 s.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection attempt may take: 5 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The publisher's settings. Parsed from a file with serde (`deny_unknown_fields`: a typo is an
/// error); every field has a default, so `NatsConfig::default()` talks to 127.0.0.1:4222.
///
/// ```
/// let cfg: outbox_nats::NatsConfig = toml::from_str(r#"
///     url = "nats://relay:secret@127.0.0.1:4222"
///     subject_prefix = "outbox."
///     ack_timeout_ms = 5000
/// "#).unwrap();
/// assert_eq!(cfg.ack_timeout, std::time::Duration::from_secs(5));
/// assert!(!format!("{cfg:?}").contains("secret"));
/// ```
#[derive(Clone, Deserialize, Educe, Setters)]
#[educe(Debug)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URLs, comma-separated (`nats://host:4222,nats://other:4222`; `tls://` for TLS). A
    /// user and password (`nats://user:pass@host`) or a token (`nats://token@host`) in the URL are
    /// handed to the client as credentials and are never logged. Defaults to
    /// `nats://127.0.0.1:4222` ([`DEFAULT_URL`]).
    #[educe(Debug(method(outbox::redact::debug_url)))]
    #[setters(into)]
    pub url: String,
    /// Prepended to every topic to make its subject: with `"outbox."`, topic `orders` and key
    /// `order-42` go to `outbox.orders.order-42`. Defaults to `""` (the subject starts with the
    /// topic). See [`subject_for`](crate::subject_for) for the whole mapping.
    #[setters(into)]
    pub subject_prefix: String,
    /// How long a publish waits for its JetStream ack before the message is reported
    /// [`Unavailable`](outbox::FailureKind::Unavailable) (possibly persisted: it is sent again with
    /// the same `Nats-Msg-Id`); `ack_timeout_ms` in a file. Defaults to 10 s ([`DEFAULT_ACK_TIMEOUT`]).
    #[serde(rename = "ack_timeout_ms", deserialize_with = "outbox::millis::deserialize")]
    pub ack_timeout: Duration,
    /// How long one connection attempt may take (`connect_timeout_ms` in a file). Defaults to 5 s
    /// ([`DEFAULT_CONNECT_TIMEOUT`]).
    #[serde(rename = "connect_timeout_ms", deserialize_with = "outbox::millis::deserialize")]
    pub connect_timeout: Duration,
    /// The connection name the server shows (`nats server report connections`). Defaults to
    /// `"outbox-relay"`.
    #[setters(into)]
    pub connection_name: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: DEFAULT_URL.to_owned(),
            subject_prefix: String::new(),
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            connection_name: "outbox-relay".to_owned(),
        }
    }
}

impl NatsConfig {
    /// Refuses settings under which nothing could be sent: a timeout of 0 (every publish would
    /// answer `Unavailable`, and the backlog wait for ever) and a URL that cannot be taken apart.
    pub fn validate(&self) -> Result<(), NatsError> {
        if self.ack_timeout.is_zero() {
            return Err(NatsError::Config(
                "ack_timeout_ms must be positive: a publish must get its ack in bounded time".into(),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(NatsError::Config("connect_timeout_ms must be positive".into()));
        }
        split_servers(&self.url).map(|_| ())
    }

    /// A client of these servers under the connection name `name`, as the publisher makes it:
    /// credentials from the URL, several servers, reconnects for ever; requests time out after
    /// `ack_timeout`. A server that cannot be reached yet is not an error: the first connection
    /// is made in the background.
    pub async fn client(&self, name: &str) -> Result<async_nats::Client, NatsError> {
        self.validate()?;
        connect(&self.url, name, self.connect_timeout, self.ack_timeout).await
    }
}

/// Credentials taken out of a server URL.
#[derive(Default, PartialEq, Eq)]
pub(crate) enum Credentials {
    #[default]
    None,
    UserPassword(String, String),
    Token(String),
}

/// Server URLs without credentials, and the credentials they carried.
pub(crate) struct Servers {
    pub(crate) addrs: Vec<String>,
    pub(crate) credentials: Credentials,
}

/// Splits `url` (comma-separated) into addresses without user info and the one set of credentials
/// they carry. Different credentials on different servers are refused.
pub(crate) fn split_servers(url: &str) -> Result<Servers, NatsError> {
    let mut servers = Servers {
        addrs: Vec::new(),
        credentials: Credentials::None,
    };
    for one in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (scheme, rest) = match one.split_once("://") {
            Some((s, r)) => (s, r),
            None => ("nats", one),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (creds, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let creds = match userinfo.split_once(':') {
                    Some((u, p)) => Credentials::UserPassword(percent_decode(u), percent_decode(p)),
                    None => Credentials::Token(percent_decode(userinfo)),
                };
                (creds, host)
            }
            None => (Credentials::None, authority),
        };
        if host.is_empty() {
            return Err(NatsError::Config(format!("no host in server URL {}", redact_url(one))));
        }
        if creds != Credentials::None {
            if servers.credentials != Credentials::None && servers.credentials != creds {
                return Err(NatsError::Config(
                    "the server URLs carry different credentials; use one user or token".into(),
                ));
            }
            servers.credentials = creds;
        }
        servers.addrs.push(format!("{scheme}://{host}{path}"));
    }
    if servers.addrs.is_empty() {
        return Err(NatsError::Config("no server URL".into()));
    }
    Ok(servers)
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Client options shared by the publisher and the consumer runner: credentials from the URL,
/// reconnects forever, and a first connection that is retried in the background (a relay that
/// starts while the server is down reports `Unavailable` instead of failing).
pub(crate) async fn connect(
    url: &str,
    name: &str,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<async_nats::Client, NatsError> {
    let servers = split_servers(url)?;
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(connect_timeout)
        .request_timeout(Some(request_timeout))
        .max_reconnects(None)
        .retry_on_initial_connect()
        // Reconnect attempts back off to at most 2 s: a restarted server is found again quickly.
        .reconnect_delay_callback(|attempts| Duration::from_millis((50u64 << attempts.min(6) as u64).min(2_000)))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to nats-server"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from nats-server; reconnecting"),
                async_nats::Event::Closed => tracing::debug!("nats connection closed"),
                other => tracing::warn!(event = %other, "nats client event"),
            }
        });
    match servers.credentials {
        Credentials::None => {}
        Credentials::UserPassword(u, p) => opts = opts.user_and_password(u, p),
        Credentials::Token(t) => opts = opts.token(t),
    }
    let addrs: Vec<async_nats::ServerAddr> = servers
        .addrs
        .iter()
        .map(|a| a.parse().map_err(|e| NatsError::Config(format!("server URL {a}: {e}"))))
        .collect::<Result<_, _>>()?;
    let client = opts.connect(addrs).await.map_err(|e| NatsError::Connect {
        url: redact_url(url),
        reason: e.to_string(),
    })?;
    // The first connection is made in the background: give it up to the connect timeout, so a
    // reachable server is used from the first publish on.
    let until = tokio::time::Instant::now() + connect_timeout;
    while client.connection_state() != async_nats::connection::State::Connected && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if client.connection_state() != async_nats::connection::State::Connected {
        tracing::warn!(url = %redact_url(url), "nats-server not reachable yet; connecting in the background");
    }
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url() {
        let s = split_servers("nats://relay:p%40ss@127.0.0.1:4222, tls://relay:p%40ss@other:4223").unwrap();
        assert_eq!(s.addrs, ["nats://127.0.0.1:4222", "tls://other:4223"]);
        assert!(s.credentials == Credentials::UserPassword("relay".into(), "p@ss".into()));
        let s = split_servers("s3cr3t@127.0.0.1").unwrap();
        assert_eq!(s.addrs, ["nats://127.0.0.1"]);
        assert!(s.credentials == Credentials::Token("s3cr3t".into()));
        assert!(split_servers("nats://a:b@h1,nats://c:d@h2").is_err());
        assert!(split_servers("").is_err());
    }

    #[test]
    fn redaction_hides_passwords_and_tokens() {
        let cfg = NatsConfig::default().url("nats://u:hunter2@h");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn config_files_refuse_unknown_keys_and_fill_in_defaults() {
        let cfg: NatsConfig = toml::from_str("url = 'nats://h:1'").unwrap();
        assert_eq!(cfg.ack_timeout, DEFAULT_ACK_TIMEOUT);
        assert_eq!(cfg.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(cfg.subject_prefix, "");
        let err = toml::from_str::<NatsConfig>("ack_timeout = 5").err().unwrap();
        assert!(err.to_string().contains("ack_timeout"), "{err}");
    }
}
