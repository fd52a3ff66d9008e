//! `outbox-bench`: benchmarks for the outbox on real PostgreSQL and a Kafka-API broker.
//!
//! ```text
//! cargo run --release -p outbox-bench -- all            # everything, ~25 min
//! cargo run --release -p outbox-bench -- all --mock     # also drain to the mock cluster, ~35 min
//! cargo run --release -p outbox-bench -- --quick all    # smoke run, ~3 min
//! cargo run --release -p outbox-bench -- drain          # one figure
//! ```
//!
//! Every figure is a ratio against a baseline measured in the same run, in interleaved rounds,
//! with medians reported: the machine is shared and noisy. Results print as Markdown tables and
//! are written as JSON (`--json`, default `target/outbox-bench/results.json`). See BENCHMARKS.md.

mod brokers;
mod common;
mod consumer;
mod drain;
mod interference;
mod latency;
mod memory;
mod probe;
mod write;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};

use crate::common::{machine, Env, Figure};

#[derive(Parser)]
#[command(
    name = "outbox-bench",
    about = "Benchmarks for the outbox (PostgreSQL + Kafka-API broker)"
)]
struct Cli {
    /// Shrink sizes and rounds for a smoke run.
    #[arg(long, global = true)]
    quick: bool,
    /// PostgreSQL server URL; a fresh database is created (and dropped) per benchmark.
    #[arg(
        long,
        global = true,
        env = "OUTBOX_BENCH_PG",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg_url: String,
    /// Also drain to librdkafka's in-process mock cluster (figure 2), besides Kafka. Adds about
    /// 7 minutes per drain round at full size.
    #[arg(long, global = true)]
    mock: bool,
    /// Create the benchmark databases with PostgreSQL's JIT off (`ALTER DATABASE ... SET jit =
    /// off`): an experiment for the relay's claim query, not the default.
    #[arg(long, global = true)]
    jit_off: bool,
    /// Measure just the variants with these labels (separated by `;`). Figure 3: the variants as
    /// printed, and the raw producer at each one's `linger.ms`. Figure 1: `minimal`, `order` (no
    /// relay) and the relay settings as their rows name them (`relay draining, linger 0`, ...).
    #[arg(long, global = true, value_delimiter = ';')]
    only: Vec<String>,
    /// Rounds per figure (overrides the defaults: 3-5 full, 1-2 quick).
    #[arg(long, global = true)]
    rounds: Option<usize>,
    /// Where to write the JSON results.
    #[arg(long, global = true, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/outbox-bench/results.json"))]
    json: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// 1. Write overhead: business transactions with vs without an outbox message.
    Write,
    /// 2. Relay drain of a large backlog vs SQL-only drain, raw producer and naive relay.
    Drain,
    /// 3. Latency commit -> delivery report at a steady rate, NOTIFY vs polling.
    Latency,
    /// 4. Business throughput while the relay drains vs without it.
    Interference,
    /// 5. Inbox-deduplicated consumption vs plain consumption.
    Consumer,
    /// 6. Relay daemon peak memory, small vs large backlog.
    Memory,
    /// 7. Relay drain per broker (Kafka, RabbitMQ, NATS) vs SQL-only and each broker's own client.
    Brokers,
    /// Everything, in priority order: write, drain, memory, latency, interference, consumer.
    All,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The relay's own warnings (retries, slow shutdown) show up in the benchmark's output.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The mock cluster lives on this thread for the whole run (it is not Send).
    let wants_mock = cli.mock;
    let mock = if wants_mock {
        Some(rdkafka::mocking::MockCluster::new(1)?)
    } else {
        None
    };
    let mock_topics: Vec<String> = match &mock {
        Some(m) => (0..64)
            .map(|i| {
                let name = format!("bench-mock-{i}");
                m.create_topic(&name, common::PARTITIONS, 1).map(|()| name)
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let env = Env {
        pg_url: cli.pg_url.clone(),
        kafka: common::kafka_bootstrap()?,
        mock: mock.as_ref().map(|m| m.bootstrap_servers()),
        mock_topics: std::sync::Arc::new(std::sync::Mutex::new(mock_topics)),
        quick: cli.quick,
        rounds: cli.rounds,
        jit_off: cli.jit_off,
        only: cli.only.clone(),
    };
    let result = rt.block_on(run(&cli, &env));
    drop(mock);
    result
}

async fn run(cli: &Cli, env: &Env) -> anyhow::Result<()> {
    let started = Instant::now();
    let machine = machine(env).await;
    eprintln!("machine: {machine:?}");
    let order = match cli.command {
        Command::All => vec![
            Command::Write,
            Command::Drain,
            Command::Memory,
            Command::Latency,
            Command::Interference,
            Command::Consumer,
        ],
        c => vec![c],
    };
    let mut figures: Vec<Figure> = Vec::new();
    for c in order {
        let fig = match c {
            Command::Write => write::run(env).await?,
            Command::Drain => drain::run(env).await?,
            Command::Latency => latency::run(env).await?,
            Command::Interference => interference::run(env).await?,
            Command::Consumer => consumer::run(env).await?,
            Command::Memory => memory::run(env).await?,
            Command::Brokers => brokers::run(env).await?,
            Command::All => unreachable!("expanded above"),
        };
        figures.push(fig);
        // Written after every figure so a long run leaves its results behind.
        write_json(cli, env, &machine, &figures, started)?;
    }
    println!(
        "\nTotal {:.0} s; JSON in {}",
        started.elapsed().as_secs_f64(),
        cli.json.display()
    );
    Ok(())
}

fn write_json(
    cli: &Cli,
    env: &Env,
    machine: &std::collections::BTreeMap<String, String>,
    figures: &[Figure],
    started: Instant,
) -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let doc = serde_json::json!({
        "command": format!("cargo run --release -p outbox-bench -- {}", args.join(" ")),
        "started_at": chrono::Utc::now() - chrono::Duration::milliseconds(started.elapsed().as_millis() as i64),
        "seconds": started.elapsed().as_secs_f64(),
        "machine": machine,
        "loadavg_at_write": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "brokers": { "kafka": env.kafka, "mock": env.mock },
        "figures": figures,
    });
    if let Some(dir) = cli.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cli.json, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}
