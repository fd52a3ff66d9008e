//! Figure 6: the relay daemon's peak memory while draining a small and a large backlog, in a child
//! process (`target/release/outbox-relay ... run`), sampled from `/proc/<pid>/status`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::common::{
    broker_pid, cpu_secs, fill_backlog, new_topic, print_figure, rss_kib, BenchDb, Env, Figure, Row, Target,
};

/// Path of the relay daemon; built with cargo unless `OUTBOX_BENCH_RELAY_BIN` names one.
pub(crate) fn relay_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("OUTBOX_BENCH_RELAY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    eprintln!("memory: cargo build --release -p outbox-cli --bin outbox-relay");
    let st = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "outbox-cli", "--bin", "outbox-relay"])
        .current_dir(&root)
        .status()
        .context("running cargo build for the relay daemon")?;
    anyhow::ensure!(st.success(), "building outbox-relay failed");
    let target = std::env::var("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    Ok(target.join("release/outbox-relay"))
}

fn scrape_published(port: u16) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|l| l.starts_with("outbox_published_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// What one daemon drain measured.
#[derive(Debug, Clone, Copy)]
struct DaemonRun {
    secs: f64,
    hwm_mib: f64,
    max_rss_mib: f64,
    cpu_secs: f64,
    msgs: u64,
}

async fn daemon_drain(env: &Env, bin: &PathBuf, n: usize, bootstrap: &str) -> anyhow::Result<DaemonRun> {
    let topic = new_topic(env, bootstrap, "bench-mem").await?;
    let db = BenchDb::create(env, 4).await?;
    fill_backlog(&db.pool, &topic, n).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = std::fs::File::create(std::env::temp_dir().join("outbox-bench-relay.log"))?;
    let mut child = std::process::Command::new(bin)
        .args([
            "--database-url",
            &db.url,
            "--kafka",
            &format!("bootstrap.servers={bootstrap}"),
        ])
        .args([
            "--admin-listen",
            &format!("127.0.0.1:{port}"),
            "--poll-interval-ms",
            "100",
            "run",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let started = Instant::now();
    let limit = Duration::from_secs(env.pick(600, 120));
    let mut max_rss = 0u64;
    let mut hwm = 0u64;
    let mut cpu = 0.0;
    let mut done = 0.0;
    loop {
        if let Some((rss, h)) = rss_kib(pid) {
            max_rss = max_rss.max(rss);
            hwm = hwm.max(h);
            cpu = cpu_secs(Some(pid));
        }
        if let Some(st) = child.try_wait()? {
            anyhow::bail!(
                "relay daemon exited early ({st}); see {}",
                std::env::temp_dir().join("outbox-bench-relay.log").display()
            );
        }
        if let Some(p) = tokio::task::spawn_blocking(move || scrape_published(port)).await? {
            done = p;
            if p >= n as f64 {
                break;
            }
        }
        if started.elapsed() > limit {
            eprintln!("  daemon drain stopped by its time limit: {done} of {n}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some((rss, h)) = rss_kib(pid) {
        max_rss = max_rss.max(rss);
        hwm = hwm.max(h);
        cpu = cpu_secs(Some(pid));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let waited = Instant::now();
    while child.try_wait()?.is_none() {
        if waited.elapsed() > Duration::from_secs(30) {
            child.kill()?;
            child.wait()?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.drop_db().await;
    crate::common::delete_topic(env, bootstrap, &topic).await;
    Ok(DaemonRun {
        secs,
        hwm_mib: hwm as f64 / 1024.0,
        max_rss_mib: max_rss as f64 / 1024.0,
        cpu_secs: cpu,
        msgs: done as u64,
    })
}

/// The figure's row for one backlog size: peak RSS per round, with the medians of the sampled
/// RSS, the throughput and the relay's CPU time per message.
fn backlog_row(backlog: usize, runs: &[DaemonRun]) -> Row {
    let med = |f: fn(&DaemonRun) -> f64| crate::common::median(&runs.iter().map(f).collect::<Vec<_>>());
    Row::new(
        format!("daemon peak RSS (VmHWM), {backlog}-row backlog"),
        "MiB",
        runs.iter().map(|r| r.hwm_mib).collect(),
    )
    .extra("max_sampled_rss_mib", med(|r| r.max_rss_mib))
    .extra("msg_per_s", med(|r| r.msgs as f64 / r.secs))
    .extra("relay_cpu_us_per_msg", med(|r| r.cpu_secs * 1e6 / r.msgs.max(1) as f64))
}

/// Runs figure 6.
pub(crate) async fn run(env: &Env) -> anyhow::Result<Figure> {
    let t0 = Instant::now();
    let bin = relay_binary()?;
    let (small, large) = env.pick((100_000usize, 1_000_000usize), (20_000, 60_000));
    let rounds = env.rounds(1, 1);
    let bootstrap = env.kafka.clone();
    let _ = broker_pid();
    let mut s_runs = Vec::new();
    let mut l_runs = Vec::new();
    for round in 0..rounds {
        eprintln!("memory: round {}/{rounds}", round + 1);
        for (backlog, runs) in [(small, &mut s_runs), (large, &mut l_runs)] {
            let r = daemon_drain(env, &bin, backlog, &bootstrap).await?;
            eprintln!(
                "  {backlog}: peak RSS {:.1} MiB, {:.0} msg/s",
                r.hwm_mib,
                r.msgs as f64 / r.secs
            );
            runs.push(r);
        }
    }
    let small_row = backlog_row(small, &s_runs);
    let large_row = backlog_row(large, &l_runs)
        .vs(&small_row)
        .target(Target::AtMost(1.25))
        .note("ratio = large/small peak RSS: ~1 means memory does not grow with the backlog");
    let fig = Figure {
        id: "memory".into(),
        title: "6. Relay daemon memory".into(),
        setup: format!(
            "target/release/outbox-relay run as a child process (--poll-interval-ms 100, defaults otherwise: batch 500, \
             32 lanes, pool 16, RUST_LOG=warn) on Apache Kafka ({bootstrap}); VmHWM/VmRSS from /proc/<pid>/status sampled every \
             100 ms; drained when /metrics outbox_published_total reached the backlog; CPU from /proc/<pid>/stat. \
             Rounds alternate {small} and {large}."
        ),
        rounds,
        rows: vec![small_row, large_row],
        seconds: t0.elapsed().as_secs_f64(),
    };
    print_figure(&fig);
    Ok(fig)
}
