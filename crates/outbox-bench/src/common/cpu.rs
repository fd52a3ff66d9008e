//! CPU and memory probes read from `/proc`.

use serde::Serialize;

fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system) used so far by process `pid` (`None`: this process).
pub(crate) fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; index 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / clk_tck()
}

/// CPU seconds used so far by all `postgres` server processes.
pub(crate) fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(|pid| cpu_secs(Some(pid)))
        .sum()
}

/// CPU use of this process, the broker process and PostgreSQL over an interval.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuProbe {
    me: f64,
    broker: f64,
    pg: f64,
    broker_pid: Option<u32>,
}

/// CPU seconds spent during a [`CpuProbe`] interval.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct CpuUsed {
    /// This process (relay, producer, load generator; with the mock cluster, the broker too).
    pub(crate) bench: f64,
    /// The Kafka broker process (0 when the broker was the in-process mock cluster).
    pub(crate) broker: f64,
    /// All PostgreSQL server processes.
    pub(crate) postgres: f64,
}

impl CpuProbe {
    /// Starts measuring; `broker_pid` is the broker's process, if it has one.
    pub(crate) fn start(broker_pid: Option<u32>) -> Self {
        CpuProbe {
            me: cpu_secs(None),
            broker: broker_pid.map_or(0.0, |p| cpu_secs(Some(p))),
            pg: postgres_cpu_secs(),
            broker_pid,
        }
    }

    /// CPU used since `start`.
    pub(crate) fn stop(&self) -> CpuUsed {
        CpuUsed {
            bench: cpu_secs(None) - self.me,
            broker: self.broker_pid.map_or(0.0, |p| cpu_secs(Some(p))) - self.broker,
            postgres: postgres_cpu_secs() - self.pg,
        }
    }
}

/// `VmRSS` and `VmHWM` of `pid` in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
