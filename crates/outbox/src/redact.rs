//! The one place secrets are kept out of logs, errors and `Debug` output: database and broker URLs
//! and key-value settings (librdkafka's, a URL's query).

use std::fmt;

/// Setting keys whose values are never printed.
const SECRET_KEYS: &[&str] = &["ssl_key", "ssl.key.pem", "sasl.oauthbearer.config", "pass"];

/// Parts of a key that mark its value as secret: passwords, client secrets, private keys and
/// their passphrases (e.g. `sasl.oauthbearer.assertion.private.key.passphrase`,
/// `sasl.oauthbearer.assertion.private.key.pem`), tokens.
const SECRET_PARTS: &[&str] = &["password", "secret", "passphrase", "private.key", "token", "credential"];

/// Schemes whose user info without a `:` is a token (NATS), not a user name.
const TOKEN_SCHEMES: &[&str] = &["nats", "tls", "ws", "wss"];

/// True for a setting (a librdkafka key, a URL query parameter) whose value must never be shown.
///
/// ```
/// assert!(outbox::redact::is_secret("sasl.password"));
/// assert!(outbox::redact::is_secret("sslpassword"));
/// assert!(!outbox::redact::is_secret("bootstrap.servers"));
/// ```
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEYS.contains(&key.as_str()) || SECRET_PARTS.iter().any(|p| key.contains(p))
}

/// `url` as it may be shown: each password (`user:***@host`), NATS token (`nats://***@host`) and
/// secret query parameter (`?password=***`) replaced by `***`. Comma-separated lists of URLs (NATS
/// server lists) are redacted one by one; anything that is not a URL is returned as it is.
///
/// ```
/// use outbox::redact::redact_url;
/// assert_eq!(redact_url("postgres://u:secret@h/db?sslmode=disable&password=s"), "postgres://u:***@h/db?sslmode=disable&password=***");
/// assert_eq!(redact_url("amqp://relay@h:5672/%2f"), "amqp://relay@h:5672/%2f");
/// assert_eq!(redact_url("nats://a:b@h1:4222,nats://tok@h2"), "nats://a:***@h1:4222,nats://***@h2");
/// assert_eq!(redact_url("sqlite:x.db"), "sqlite:x.db");
/// ```
pub fn redact_url(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

/// Writes [`redact_url`] of `url`: for `Debug` impls of settings that hold one.
pub fn debug_url(url: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    fmt::Debug::fmt(&redact_url(url), f)
}

fn redact_one(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let shown = match userinfo.split_once(':') {
                        Some((user, _)) => format!("{user}:***"),
                        None if TOKEN_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) => "***".to_owned(),
                        None => userinfo.to_owned(),
                    };
                    format!("{scheme}://{shown}@{host}{tail}")
                }
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_secret(k) => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_tokens_and_secret_parameters_are_hidden() {
        let cases = [
            ("postgres://u:secret@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://u@h/db?sslmode=disable&password=s&sslpassword=t",
                "postgres://u@h/db?sslmode=disable&password=***&sslpassword=***",
            ),
            ("mysql://u:p@h/db?x=a@b", "mysql://u:***@h/db?x=a@b"),
            ("mysql://u:p@h/db?pass=x", "mysql://u:***@h/db?pass=***"),
            ("amqp://relay:s3cret@h/%2f", "amqp://relay:***@h/%2f"),
            ("amqps://a:b:c@h:5671", "amqps://a:***@h:5671"),
            ("amqp://relay@h", "amqp://relay@h"),
            ("amqp://u:p%40ss@h:5672/v", "amqp://u:***@h:5672/v"),
            (
                "nats://relay:hunter2@h:4222,nats://tok@h2",
                "nats://relay:***@h:4222,nats://***@h2",
            ),
            ("tls://tok@h", "tls://***@h"),
            ("nats://h:4222", "nats://h:4222"),
            ("sqlite:x.db", "sqlite:x.db"),
            ("not a url", "not a url"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn debug_output_is_the_redacted_url() {
        struct Shown<'a>(&'a str);
        impl fmt::Debug for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                debug_url(self.0, f)
            }
        }
        assert_eq!(format!("{:?}", Shown("amqp://u:p@h")), "\"amqp://u:***@h\"");
    }
}
