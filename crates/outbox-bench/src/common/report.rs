//! The report: medians, targets, table rows and figures, the Markdown table, and the machine facts
//! written beside the JSON.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::Env;

/// Median of `v` (mean of the middle two for an even count); NaN when empty.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// How a target compares: the ratio (or value) must be at least, or at most, the bound.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) enum Target {
    /// Value must be >= this.
    AtLeast(f64),
    /// Value must be <= this.
    AtMost(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtLeast(t) => v >= t,
            Target::AtMost(t) => v <= t,
        }
    }

    fn show(self) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {}", fmt_num(t)),
            Target::AtMost(t) => format!("<= {}", fmt_num(t)),
        }
    }
}

/// One line of a figure: a measured quantity over rounds, optionally as a ratio to a baseline.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    /// What was measured.
    pub(crate) name: String,
    /// Unit of `values`.
    pub(crate) unit: String,
    /// One value per round.
    pub(crate) values: Vec<f64>,
    /// Median of `values`.
    pub(crate) median: f64,
    /// The baseline row's name, when this row is compared with one.
    pub(crate) baseline: Option<String>,
    /// Per-round ratio to the baseline (same round).
    pub(crate) ratios: Vec<f64>,
    /// Median of `ratios`.
    pub(crate) ratio: Option<f64>,
    /// The target, on the ratio when there is a baseline, else on the median.
    pub(crate) target: Option<Target>,
    /// Whether the target is met.
    pub(crate) met: Option<bool>,
    /// Extra facts (CPU per message, phases, achieved rate...).
    pub(crate) extra: BTreeMap<String, f64>,
    /// Free text.
    pub(crate) note: String,
}

impl Row {
    /// A row of raw values.
    pub(crate) fn new(name: impl Into<String>, unit: impl Into<String>, values: Vec<f64>) -> Self {
        Row {
            name: name.into(),
            unit: unit.into(),
            median: median(&values),
            values,
            baseline: None,
            ratios: Vec::new(),
            ratio: None,
            target: None,
            met: None,
            extra: BTreeMap::new(),
            note: String::new(),
        }
    }

    /// A throughput row: `values` in messages per second.
    pub(crate) fn rate(name: impl Into<String>, values: Vec<f64>) -> Self {
        Row::new(name, "msg/s", values)
    }

    /// Compares with `base` round by round (`value / base`).
    pub(crate) fn vs(mut self, base: &Row) -> Self {
        self.ratios = self.values.iter().zip(&base.values).map(|(v, b)| v / b).collect();
        self.ratio = Some(median(&self.ratios));
        self.baseline = Some(base.name.clone());
        self.check();
        self
    }

    /// Sets the target.
    pub(crate) fn target(mut self, t: Target) -> Self {
        self.target = Some(t);
        self.check();
        self
    }

    /// Adds an extra fact.
    pub(crate) fn extra(mut self, k: &str, v: f64) -> Self {
        self.extra.insert(k.into(), v);
        self
    }

    /// Sets the note.
    pub(crate) fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }

    fn check(&mut self) {
        if let Some(t) = self.target {
            self.met = Some(t.met(self.ratio.unwrap_or(self.median)));
        }
    }
}

/// One benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    /// Subcommand that produced it.
    pub(crate) id: String,
    /// Title.
    pub(crate) title: String,
    /// Broker used, and other conditions.
    pub(crate) setup: String,
    /// Rounds run.
    pub(crate) rounds: usize,
    /// Rows.
    pub(crate) rows: Vec<Row>,
    /// Wall time of the benchmark in seconds.
    pub(crate) seconds: f64,
}

/// Formats a number compactly.
pub(crate) fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Prints a figure as a Markdown table.
pub(crate) fn print_figure(f: &Figure) {
    println!("\n### {} ({} rounds, {:.0} s)\n", f.title, f.rounds, f.seconds);
    println!("{}\n", f.setup);
    println!("| measurement | median | unit | per round | vs | ratio (median) | target | met | notes |");
    println!("|---|---:|---|---|---|---:|---|---|---|");
    for r in &f.rows {
        let rounds: Vec<String> = r.values.iter().map(|v| fmt_num(*v)).collect();
        let mut notes: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k}={}", fmt_num(*v))).collect();
        if !r.note.is_empty() {
            notes.push(r.note.clone());
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            fmt_num(r.median),
            r.unit,
            rounds.join(", "),
            r.baseline.as_deref().unwrap_or(""),
            r.ratio.map_or(String::new(), fmt_num),
            r.target.map_or(String::new(), |t| t.show()),
            match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            },
            notes.join("; ")
        );
    }
}

/// Facts about the machine the benchmark ran on.
pub(crate) async fn machine(env: &Env) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?".into(), |(_, v)| v.trim().to_owned());
    m.insert("cpu".into(), model);
    m.insert(
        "cores".into(),
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string()),
    );
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(l) = mem.lines().next() {
        m.insert("memory".into(), l.replace("MemTotal:", "").trim().to_owned());
    }
    m.insert(
        "kernel".into(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    );
    m.insert(
        "loadavg_at_start".into(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    );
    m.insert("librdkafka".into(), rdkafka::util::get_rdkafka_version().1);
    if let Ok(opts) = env.pg_url.parse::<PgConnectOptions>() {
        if let Ok(mut c) = opts.connect().await {
            for (k, q) in [
                ("postgres", "SELECT version()"),
                ("pg_synchronous_commit", "SHOW synchronous_commit"),
                ("pg_fsync", "SHOW fsync"),
                ("pg_shared_buffers", "SHOW shared_buffers"),
            ] {
                if let Ok(v) = sqlx::query_scalar::<_, String>(q).fetch_one(&mut c).await {
                    m.insert(k.into(), v);
                }
            }
            c.close().await.ok();
        }
    }
    m.insert("quick".into(), env.quick.to_string());
    m
}
