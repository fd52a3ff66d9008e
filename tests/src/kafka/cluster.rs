//! Kafka clusters started by `.ci/kafka`: the shared single broker and clusters of a test's own,
//! whose nodes a test can kill and restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::client;

fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/kafka")
}

fn run_script(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("run .ci/kafka");
    assert!(
        out.status.success(),
        ".ci/kafka {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where `.ci/kafka` keeps the brokers' storage and logs: `target/kafka` of the workspace.
/// (`.ci/services` starts the shared broker there too.)
fn kafka_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/kafka"))
}

/// A Kafka cluster of a test's own: `nodes` KRaft nodes (each controller and broker) with their
/// own ports, storage and logs under `target/kafka/`. With 3 nodes, topics are created with
/// replication factor 3 and `min.insync.replicas=2`. Stopped on drop; its directory is kept when
/// the test failed (the nodes' `server.log` explain what the brokers did).
pub struct Cluster {
    dir: PathBuf,
    base: u16,
    nodes: u16,
    /// Stopped and removed on drop (false for the shared broker).
    owned: bool,
}

impl Cluster {
    /// Formats and starts the cluster, waiting until every node listens.
    pub fn start(nodes: u16) -> Cluster {
        let base = free_base();
        let dir = kafka_dir().join(format!("cluster-{}", uuid::Uuid::new_v4().simple()));
        // The guard first: a start that fails (a node not listening in time) stops the nodes that
        // did start, instead of leaving their JVMs running.
        let cluster = Cluster {
            dir,
            base,
            nodes,
            owned: true,
        };
        run_script(&[
            "up",
            cluster.dir.to_str().unwrap(),
            &nodes.to_string(),
            &base.to_string(),
        ]);
        cluster
    }

    /// The shared single broker on 127.0.0.1:19092 (started by `.ci/kafka up` if it is down; never
    /// stopped by the tests): its SASL and SSL listeners serve the authentication tests.
    pub fn shared() -> Cluster {
        let mut dir = kafka_dir().join("single");
        let base = 19092;
        if std::net::TcpStream::connect(("127.0.0.1", base)).is_err() {
            run_script(&["up", dir.to_str().unwrap(), "1", &base.to_string()]);
        } else if let Ok(running) = std::fs::read_to_string(format!("/tmp/outbox-kafka-{base}.dir")) {
            // Started from another checkout: its certificates are there.
            dir = PathBuf::from(running.trim());
        }
        Cluster {
            dir,
            base,
            nodes: 1,
            owned: false,
        }
    }

    fn port(&self, node: u16, offset: u16) -> u16 {
        self.base + 10 * (node - 1) + offset
    }

    fn list(&self, offset: u16) -> String {
        (1..=self.nodes)
            .map(|n| format!("127.0.0.1:{}", self.port(n, offset)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// PLAINTEXT bootstrap list (every node).
    pub fn bootstrap(&self) -> String {
        self.list(0)
    }

    /// SASL_PLAINTEXT (SCRAM-SHA-512) bootstrap list.
    pub fn sasl_bootstrap(&self) -> String {
        self.list(1)
    }

    /// SSL bootstrap list (certificate signed by [`Cluster::ca`]).
    pub fn ssl_bootstrap(&self) -> String {
        self.list(2)
    }

    /// The CA that signed the brokers' certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    /// A CA that signed nothing the brokers present.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("tls/other-ca.pem")
    }

    /// SIGKILLs node `n` and waits until it has exited.
    pub fn kill(&self, n: u16) {
        run_script(&["kill", self.dir.to_str().unwrap(), &n.to_string(), "KILL"]);
    }

    /// Starts node `n` again on its storage and waits for its listener.
    pub fn restart(&self, n: u16) {
        run_script(&["start", self.dir.to_str().unwrap(), &n.to_string()]);
    }

    /// Runs one of Kafka's command-line tools (`class`, e.g. `org.apache.kafka.tools.AclCommand`)
    /// against node 1, returning what it printed.
    pub fn admin(&self, class: &str, args: &[&str]) -> String {
        let mut all = vec!["admin", self.dir.to_str().unwrap(), class];
        all.extend_from_slice(args);
        run_script(&all)
    }

    /// Node `n`'s log.
    pub fn log(&self, n: u16) -> PathBuf {
        self.dir.join(format!("n{n}/server.log"))
    }

    /// The node that leads most partitions of `topic` (ties: the lowest id).
    pub fn busiest_leader(&self, topic: &str) -> u16 {
        let consumer: BaseConsumer = client(&self.bootstrap()).create().expect("metadata client");
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut counts = std::collections::BTreeMap::new();
        for p in md.topics()[0].partitions() {
            *counts.entry(p.leader()).or_insert(0) += 1;
        }
        let (leader, _) = counts.iter().max_by_key(|(id, c)| (**c, -**id)).expect("partitions");
        *leader as u16
    }

    /// The storage and logs directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("bash")
            .arg(script())
            .args(["down", self.dir.to_str().unwrap()])
            .output();
        std::fs::remove_file(reservation(self.base)).ok();
        if std::thread::panicking() {
            eprintln!("kafka cluster kept for inspection: {}", self.dir.display());
        } else {
            std::fs::remove_dir_all(&self.dir).ok();
            std::fs::remove_file(self.dir.with_extension("lock")).ok();
        }
    }
}

/// A base port with the 40 ports above it free (4 per node, up to 10 nodes), below the ephemeral
/// range (where a client's connection could take one), and reserved: a cluster that formats is
/// not listening yet, so a free port alone would let two clusters started together pick the same.
/// The reservation is a file `base-N` beside the clusters, removed when the cluster is dropped.
fn free_base() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    std::fs::create_dir_all(kafka_dir()).expect("create target/kafka");
    loop {
        let base = rng.gen_range(200..320u16) * 100;
        if (base..base + 40).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) && reserve(base) {
            return base;
        }
    }
}

fn reservation(base: u16) -> PathBuf {
    kafka_dir().join(format!("base-{base}"))
}

/// Takes `base`'s reservation. One older than a day is left from a test process that was killed
/// before its clusters were dropped, and is taken over.
fn reserve(base: u16) -> bool {
    let path = reservation(base);
    let stale = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(24 * 3600));
    if stale {
        std::fs::remove_file(&path).ok();
    }
    std::fs::File::create_new(path).is_ok()
}
