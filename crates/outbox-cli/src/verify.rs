//! `outbox-relay verify`: reads Kafka topics (or NATS JetStream streams) from the earliest retained
//! message to the end they had at start and audits them against the outbox database (lost,
//! reordered, duplicated messages).
//!
//! The database is read first, then the topics' end offsets: a message published in between is on
//! the topic but above the counters read (not judged), never counted lost.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::settings::{resolve, Broker, Overrides};

mod audit;
mod db;
mod nats;

use audit::{Audit, Counts, Findings};

/// Exit code: the topics hold everything, in order (duplicates allowed).
pub(crate) const EXIT_CLEAN: i32 = 0;
/// Exit code: messages were lost or reordered.
pub(crate) const EXIT_FAILED: i32 = 1;
/// Exit code: bad usage, or the database or the broker could not be read.
pub(crate) const EXIT_ERROR: i32 = 2;

/// How long the read may go without a record or an end-of-partition before it gives up.
const STALL: Duration = Duration::from_secs(60);
/// Timeout of metadata and watermark requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys listed in the human summary (`--json` lists up to [`JSON_KEYS`]).
const SUMMARY_KEYS: usize = 20;
/// Keys listed in the JSON report.
const JSON_KEYS: usize = 1000;

/// `verify` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// Topic to read (repeatable). Give every topic the database's keys publish to: seqs are
    /// numbered per key across topics.
    #[arg(long = "topic", required = true, value_name = "TOPIC")]
    pub(crate) topics: Vec<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The report `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    /// True when nothing was lost or reordered.
    ok: bool,
    /// The database's source id.
    source: String,
    /// Per topic: partitions and records read.
    topics: Vec<TopicRead>,
    #[serde(flatten)]
    counts: Counts,
    #[serde(flatten)]
    findings: Findings,
    /// The problem list was cut to its first keys.
    problems_truncated: bool,
}

/// What was read of one topic.
#[derive(Debug, Serialize)]
struct TopicRead {
    topic: String,
    partitions: usize,
    records: u64,
}

/// Runs the command; returns the exit code. Errors are printed here, so that they exit with
/// [`EXIT_ERROR`] rather than the generic failure code.
pub(crate) async fn main(overrides: &Overrides, args: VerifyArgs) -> i32 {
    match verify(overrides, args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_ERROR
        }
    }
}

async fn verify(overrides: &Overrides, args: VerifyArgs) -> anyhow::Result<i32> {
    let s = resolve(overrides)?;
    let target = s.one_database()?.clone();
    let broker = match s.broker {
        Some(Broker::Rabbitmq(_)) => anyhow::bail!(
            "verify reads Kafka topics and NATS JetStream streams; a RabbitMQ queue cannot be read without consuming it"
        ),
        Some(b) => b,
        None => anyhow::bail!(
            "no broker configured: add a [kafka] section (or --kafka bootstrap.servers=...) or a [nats] section"
        ),
    };
    let database = db::Db::connect(&target.url, target.schema.as_deref()).await?;
    let snap = database.snapshot(&args.topics).await?;
    let keys = snap.keys;
    let source = snap.source;
    let topics = args.topics.clone();
    let kept = snap.kept;
    let (audit, reads, windows) = match broker {
        Broker::Kafka(kafka) => {
            let reader_source = source.clone();
            tokio::task::spawn_blocking(move || read_topics(&kafka, &topics, &reader_source, kept))
                .await
                .context("the topic reader panicked")??
        }
        Broker::Nats(cfg) => nats::read_topics(&cfg, &topics, &source, kept).await?,
        Broker::Rabbitmq(_) => unreachable!("refused above"),
    };
    let counts = audit.counts.clone();
    let findings = audit.finish(&keys, |t, p, o| {
        windows.get(&(t, p)).is_some_and(|&(low, high)| o >= low && o < high)
    });
    let ok = findings.missing == 0 && findings.reordered == 0 && findings.unkeyed_missing == 0;
    let mut report = Report {
        ok,
        source,
        topics: reads,
        counts,
        findings,
        problems_truncated: false,
    };
    if args.json {
        report.problems_truncated = report.findings.problems.len() > JSON_KEYS;
        report.findings.problems.truncate(JSON_KEYS);
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(if ok { EXIT_CLEAN } else { EXIT_FAILED })
}

/// Per (topic index, partition): the offsets read, `low..high`.
type Windows = HashMap<(usize, i32), (i64, i64)>;

/// Reads every partition of each topic in turn, from the low to the high watermark taken when the
/// topic's read starts, feeding the audit. Blocking (librdkafka's poll).
fn read_topics(
    kafka: &BTreeMap<String, String>,
    topics: &[String],
    source: &str,
    kept: HashMap<uuid::Uuid, audit::Kept>,
) -> anyhow::Result<(Audit, Vec<TopicRead>, Windows)> {
    let meta = consumer(kafka)?;

    // All watermarks first, so the progress bar knows the total.
    let mut plan: Vec<Vec<(i32, i64, i64)>> = Vec::new();
    for topic in topics {
        let md = meta
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .with_context(|| format!("reading the metadata of topic {topic}"))?;
        let t = md.topics().first().context("no metadata for the topic")?;
        if let Some(err) = t.error() {
            anyhow::bail!("topic {topic}: {:?}", rdkafka::types::RDKafkaErrorCode::from(err));
        }
        anyhow::ensure!(!t.partitions().is_empty(), "topic {topic} does not exist");
        let mut parts = Vec::new();
        for p in t.partitions() {
            let (low, high) = meta
                .fetch_watermarks(topic, p.id(), REQUEST_TIMEOUT)
                .with_context(|| format!("reading the offsets of {topic}[{}]", p.id()))?;
            parts.push((p.id(), low, high));
        }
        plan.push(parts);
    }
    let total: i64 = plan.iter().flatten().map(|(_, l, h)| h - l).sum();
    let bar = progress(total as u64);

    let mut audit = Audit::new(kept);
    let mut reads = Vec::new();
    let mut windows = Windows::new();
    for (t, (topic, parts)) in topics.iter().zip(&plan).enumerate() {
        let before = audit.counts.records;
        let mut tpl = TopicPartitionList::new();
        // Partitions still to read, with the offset where their read ends.
        let mut open: HashMap<i32, i64> = HashMap::new();
        for &(p, low, high) in parts {
            windows.insert((t, p), (low, high));
            if high > low {
                tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
                open.insert(p, high);
            }
        }
        // A consumer per topic: nothing queued for the previous topic (an end-of-partition event
        // names no topic) can reach this read.
        let consumer = self::consumer(kafka)?;
        if !open.is_empty() {
            consumer.assign(&tpl).context("assigning the partitions")?;
        }
        let mut progress_at = Instant::now();
        while !open.is_empty() {
            anyhow::ensure!(
                progress_at.elapsed() < STALL,
                "no progress reading {topic} for {}s (partitions left: {:?})",
                STALL.as_secs(),
                open.keys().collect::<Vec<_>>()
            );
            let Some(res) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            // Only a record or an end of partition is progress: an error (a broker gone, reported
            // at every reconnect) is not, or a read that fails for good would never give up.
            let m = match res {
                Ok(m) => m,
                // The end of the log, which is past the end taken at start.
                Err(KafkaError::PartitionEOF(p)) => {
                    progress_at = Instant::now();
                    open.remove(&p);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading {topic}");
                    continue;
                }
            };
            progress_at = Instant::now();
            let Some(&end) = open.get(&m.partition()) else {
                continue;
            };
            if m.topic() != topic {
                continue;
            }
            if m.offset() >= end {
                open.remove(&m.partition());
                continue;
            }
            if m.offset() + 1 >= end {
                open.remove(&m.partition());
            }
            audit.counts.records += 1;
            bar.inc(1);
            let headers = m.headers().into_iter().flat_map(|h| h.iter());
            record(
                &mut audit,
                t,
                source,
                headers.map(|h| (h.key, h.value.unwrap_or_default())),
            );
        }
        reads.push(TopicRead {
            topic: topic.clone(),
            partitions: parts.len(),
            records: audit.counts.records - before,
        });
    }
    bar.finish_and_clear();
    Ok((audit, reads, windows))
}

/// A consumer that reads assigned partitions only: no group membership, no commits.
fn consumer(kafka: &BTreeMap<String, String>) -> anyhow::Result<BaseConsumer> {
    let mut cfg = rdkafka::ClientConfig::new();
    for (k, v) in kafka {
        cfg.set(k, v);
    }
    // Producer-only settings are ignored by a consumer (librdkafka logs it once).
    if !kafka.contains_key("group.id") {
        cfg.set("group.id", "outbox-relay-verify");
    }
    cfg.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    cfg.create().context("creating the Kafka consumer")
}

/// Classifies one record by its outbox headers (name, value) and feeds the audit.
fn record<'a>(audit: &mut Audit, topic: usize, source: &str, headers: impl Iterator<Item = (&'a str, &'a [u8])>) {
    let (mut id, mut key, mut seq, mut src) = (None, None, None, None);
    for (name, v) in headers {
        match name {
            outbox::HEADER_ID => id = std::str::from_utf8(v).ok().and_then(|s| s.parse::<uuid::Uuid>().ok()),
            outbox::HEADER_KEY => key = Some(v),
            outbox::HEADER_SEQ => seq = std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()),
            outbox::HEADER_SOURCE => src = Some(v),
            _ => {}
        }
    }
    let c = &mut audit.counts;
    let Some(id) = id else {
        c.foreign += 1;
        return;
    };
    // A record without a source was sent by a relay that predates the header: taken as ours.
    if src.is_some_and(|s| s != source.as_bytes()) {
        c.other_source += 1;
        return;
    }
    match (key, seq) {
        (Some(k), Some(s)) => audit.keyed(topic, k, s),
        (Some(_), None) => c.malformed += 1,
        (None, _) => audit.unkeyed(id),
    }
}

/// A progress bar on stderr when it is a terminal; hidden otherwise.
fn progress(total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} records ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn print_summary(r: &Report) {
    let c = &r.counts;
    let f = &r.findings;
    println!("source:     {}", r.source);
    for t in &r.topics {
        println!(
            "topic:      {} ({} partitions, {} records)",
            t.topic, t.partitions, t.records
        );
    }
    println!(
        "read:       {} records: {} keyed over {} keys, {} unkeyed",
        c.records, c.keyed, f.keys, c.unkeyed
    );
    let skipped = [
        (c.other_source, "from other outbox databases"),
        (c.foreign, "without outbox headers"),
        (c.malformed, "keyed without a valid outbox-seq"),
    ];
    for (n, what) in skipped.iter().filter(|(n, _)| *n > 0) {
        println!("skipped:    {n} {what}");
    }
    println!("missing:    {}", f.missing);
    println!("reordered:  {}", f.reordered);
    println!("duplicates: {} (allowed by at-least-once delivery)", f.duplicates);
    if f.unkeyed_checked > 0 {
        println!(
            "unkeyed:    {} kept published rows checked, {} missing, {} duplicated",
            f.unkeyed_checked, f.unkeyed_missing, c.unkeyed_duplicates
        );
        for id in &f.unkeyed_missing_ids {
            println!("  missing unkeyed {id}");
        }
    }
    if f.unknown_keys > 0 {
        println!(
            "note:       {} keys on the topics have no counter in the database",
            f.unknown_keys
        );
    }
    if f.after_start > 0 {
        println!(
            "note:       {} keys got messages after the start (not judged)",
            f.after_start
        );
    }
    for p in f.problems.iter().take(SUMMARY_KEYS) {
        let mut parts = Vec::new();
        if p.missing > 0 {
            let ranges: Vec<String> = p
                .missing_seqs
                .iter()
                .map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
                .collect();
            parts.push(format!("{} missing ({})", p.missing, ranges.join(", ")));
        }
        if p.reordered > 0 {
            parts.push(format!("{} reordered ({})", p.reordered, list(&p.reordered_seqs)));
        }
        if p.duplicates > 0 {
            parts.push(format!("{} duplicated ({})", p.duplicates, list(&p.duplicate_seqs)));
        }
        println!("  key {:?}: {}", p.key, parts.join("; "));
    }
    if f.problems.len() > SUMMARY_KEYS {
        println!(
            "  ... and {} more keys (--json lists them)",
            f.problems.len() - SUMMARY_KEYS
        );
    }
    println!(
        "{}",
        if r.ok {
            "OK: nothing lost or reordered"
        } else {
            "FAILED: messages lost or reordered"
        }
    );
}

fn list(seqs: &[i64]) -> String {
    seqs.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}
