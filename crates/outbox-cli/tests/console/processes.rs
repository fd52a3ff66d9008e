//! The processes a console test starts (chromedriver and its browser, the daemon), killed with
//! their descendants when dropped, and the headless Chromium session.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};

use super::{free_port, until};

/// An executable called `name` on `PATH` (or in /usr/bin).
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Pids of every descendant of `pid` (from /proc).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((p, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent_of {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// A process this test started, killed with its descendants (the browser under chromedriver)
/// when dropped; its output goes to a log file, quoted when the test fails.
pub(crate) struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn start(cmd: &mut Command, name: &str) -> Proc {
        let log = std::env::temp_dir().join(format!("outbox-console-{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { child, log }
    }

    pub(crate) fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM; asserts a clean exit within 30 s.
    pub(crate) fn terminate(&mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM:\n{}",
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(0), "{}", self.tail());
    }
}

impl Proc {
    /// Kills the process and its descendants if it still runs.
    fn kill_all(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            for pid in descendants(self.child.id()) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_all();
        if !std::thread::panicking() {
            std::fs::remove_file(&self.log).ok();
        }
    }
}

/// chromedriver and the browser profile: the processes are killed and the profile removed on drop.
pub(crate) struct Browser {
    driver: Proc,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.driver.kill_all();
        std::fs::remove_dir_all(&self.profile).ok();
    }
}

/// Starts chromedriver on a port of its own and opens a headless Chromium session.
pub(crate) async fn browser() -> (Browser, Client) {
    let hint = "run `bash .ci/services` (it installs Debian's chromium and chromium-driver through .ci/chromium)";
    let driver_bin = on_path("chromedriver").unwrap_or_else(|| panic!("chromedriver not found: {hint}"));
    let chromium = on_path("chromium").unwrap_or_else(|| panic!("chromium not found: {hint}"));
    let port = free_port();
    let driver = Proc::start(Command::new(driver_bin).arg(format!("--port={port}")), "chromedriver");
    let profile = std::env::temp_dir().join(format!("outbox-console-chromium-{}", uuid::Uuid::new_v4().simple()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--hide-scrollbars",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let webdriver = format!("http://127.0.0.1:{port}");
    let (caps, webdriver) = (&caps, webdriver.as_str());
    let client = until("chromedriver answers", Duration::from_secs(30), || async move {
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(webdriver)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    (Browser { driver, profile }, client)
}
