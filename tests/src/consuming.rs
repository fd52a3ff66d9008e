//! What the RabbitMQ and NATS adapters' own test suites share: their `.ci` scripts, a message as an
//! independent reader received it, a consumer runner running until stopped, the effects it applied,
//! and handlers built on [`EffectRows`].

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use outbox_inbox::{Handler, Incoming};
use uuid::Uuid;

use crate::effects::{EffectRows, PgTx};
pub use crate::embedded::run_until_stopped;
use crate::publisher_suite::Received;

/// The path of the script `.ci/<name>`.
pub fn ci_script(name: &str) -> String {
    format!("{}/../.ci/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `.ci/<name> <args>` with `env` added to the environment; panics with its output when it
/// fails. Returns what it printed on stdout.
pub fn run_ci_script(name: &str, args: &[&str], env: &[(String, String)]) -> String {
    let out = std::process::Command::new("bash")
        .arg(ci_script(name))
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .unwrap_or_else(|e| panic!("run .ci/{name}: {e}"));
    assert!(
        out.status.success(),
        ".ci/{name} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A message as a reader received it: its headers as text, the framework ones parsed.
pub fn received(headers: Vec<(String, String)>, payload: Vec<u8>) -> Received {
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    Received {
        id: get(outbox::HEADER_ID)
            .and_then(|v| v.parse().ok())
            .expect("outbox-id header"),
        key: get(outbox::HEADER_KEY),
        seq: get(outbox::HEADER_SEQ).and_then(|v| v.parse().ok()),
        source: get(outbox::HEADER_SOURCE),
        headers,
        payload,
    }
}

/// Spawns a writer that commits a round of messages to `topic` every 40 ms, `rounds` times: one
/// message for each of the keys `key-0` to `key-<keys - 1>` in one transaction. It returns the ids
/// it committed.
pub fn write_rounds(
    pool: sqlx::PgPool,
    topic: String,
    rounds: usize,
    keys: usize,
) -> tokio::task::JoinHandle<HashSet<Uuid>> {
    tokio::spawn(async move {
        let ids = crate::publisher_suite::commit_rounds(&pool, &topic, keys, rounds, Duration::from_millis(40)).await;
        ids.into_iter().collect()
    })
}

/// The ids of the messages applied so far.
pub async fn applied_ids(pool: &sqlx::PgPool) -> HashSet<Uuid> {
    sqlx::query_scalar("SELECT message_id FROM effects")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Effects applied so far: (rows, distinct messages).
pub async fn effect_counts(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT message_id) FROM effects")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until `n` distinct messages have their effect, failing the test after `within`.
pub async fn wait_effects(pool: &sqlx::PgPool, n: i64, within: Duration) {
    crate::wait::until(&format!("{n} messages applied"), within, || async {
        match effect_counts(pool).await {
            (_, distinct) if distinct >= n => Ok(()),
            (rows, distinct) => Err(format!("{distinct} applied ({rows} effect rows)")),
        }
    })
    .await
}

/// A handler's refusal, which the inbox rolls back and the runner retries, then dead-letters.
#[derive(Debug)]
pub struct Refused(pub &'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Refused {}

/// Refuses the messages `refuse` picks with [`Refused`]`(why)`; writes the effect row of the others
/// (a failed write is refused too).
pub struct RefuseIf<F> {
    why: &'static str,
    refuse: F,
}

impl<F: Fn(&Incoming<'_>) -> bool + Send + Sync> RefuseIf<F> {
    /// Refuses what `refuse` picks, saying `why`.
    pub fn new(why: &'static str, refuse: F) -> Self {
        RefuseIf { why, refuse }
    }
}

#[async_trait]
impl<F: Fn(&Incoming<'_>) -> bool + Send + Sync> Handler<sqlx::Postgres> for RefuseIf<F> {
    type Error = Refused;
    async fn handle(&self, tx: &mut PgTx<'_>, msg: &Incoming<'_>) -> Result<(), Refused> {
        if (self.refuse)(msg) {
            return Err(Refused(self.why));
        }
        EffectRows.handle(tx, msg).await.map_err(|_| Refused(self.why))
    }
}

/// Runs the future `before` makes for each message, then writes its effect row, in the inbox's
/// transaction: a test can cut a connection or hold a message there.
pub struct EffectRowsAfter<F>(pub F);

#[async_trait]
impl<F> Handler<sqlx::Postgres> for EffectRowsAfter<F>
where
    F: Fn(&Incoming<'_>) -> BoxFuture<'static, ()> + Send + Sync,
{
    type Error = sqlx::Error;
    async fn handle(&self, tx: &mut PgTx<'_>, msg: &Incoming<'_>) -> Result<(), sqlx::Error> {
        (self.0)(msg).await;
        EffectRows.handle(tx, msg).await
    }
}
