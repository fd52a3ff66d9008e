//! The soak's command line.

use std::time::Duration;

pub(crate) const USAGE: &str = "\
soak [--messages N] [--rate N] [--writers N] [--keys N] [--hot-share PCT] [--rollback-pct PCT]
     [--batch N] [--kill-every-ms MS] [--lease-ttl-ms MS] [--partitions N] [--consumers N]
     [--relay-bin PATH] [--bootstrap HOST:PORT|mock | --cluster N [--broker-kill-every-ms MS]]

  --messages       committed messages to stream (default 100000)
  --rate           committed messages per second, all writers together (default 2000; 0: no limit)
  --writers        concurrent writer tasks (default 4); each transaction enqueues 1-10 messages
  --keys           ordinary keys (default 1000), plus one hot key
  --hot-share      percent of messages on the hot key (default 10)
  --rollback-pct   percent of transactions rolled back after enqueueing (default 10)
  --batch          relay --batch-size (default 500)
  --kill-every-ms  SIGKILL and restart the relay this often (default 5000)
  --lease-ttl-ms   relay lease TTL; a restarted relay waits this long for the lanes (default 2000)
  --partitions     topic partitions (default 8)
  --consumers      ConsumerRunners in the consumer group (default 1)
  --relay-bin      outbox-relay binary (default: built with cargo, same profile as this binary)
  --bootstrap      Kafka bootstrap servers (default: the local Kafka broker, started if down);
                   `mock` runs librdkafka's mock cluster in this process instead
  --cluster        start a Kafka cluster of N KRaft nodes for this run (`.ci/kafka`, stopped at
                   the end); with N >= 3, replication factor 3 and min.insync.replicas=2.
                   Not with --bootstrap
  --broker-kill-every-ms
                   with --cluster: SIGKILL one random node this often (at least 1000; default 0:
                   never), restart it on its log dirs 3-5 s later and wait until every partition
                   is fully in sync again before the next kill (never two nodes down); kills go on
                   until the consumers have caught up. Each broker kill adds batch x 32 lanes to
                   the wire-duplicate bound";

#[derive(Debug, Clone)]
pub(crate) struct Args {
    pub(crate) messages: usize,
    pub(crate) rate: u64,
    pub(crate) writers: usize,
    pub(crate) keys: usize,
    pub(crate) hot_share: u32,
    pub(crate) rollback_pct: u32,
    pub(crate) batch: usize,
    pub(crate) kill_every: Duration,
    pub(crate) lease_ttl_ms: u64,
    pub(crate) partitions: i32,
    pub(crate) consumers: usize,
    pub(crate) relay_bin: Option<String>,
    pub(crate) bootstrap: Option<String>,
    pub(crate) cluster: Option<u16>,
    pub(crate) broker_kill_every: Option<Duration>,
}

pub(crate) fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        messages: 100_000,
        rate: 2000,
        writers: 4,
        keys: 1000,
        hot_share: 10,
        rollback_pct: 10,
        batch: 500,
        kill_every: Duration::from_secs(5),
        lease_ttl_ms: 2000,
        partitions: 8,
        consumers: 1,
        relay_bin: None,
        bootstrap: None,
        cluster: None,
        broker_kill_every: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value\n\n{USAGE}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--messages" => a.messages = num(&v)? as usize,
            "--rate" => a.rate = num(&v)?,
            "--writers" => a.writers = num(&v)?.max(1) as usize,
            "--keys" => a.keys = num(&v)?.max(1) as usize,
            "--hot-share" => a.hot_share = num(&v)?.min(100) as u32,
            "--rollback-pct" => a.rollback_pct = num(&v)?.min(90) as u32,
            "--batch" => a.batch = num(&v)?.max(1) as usize,
            "--kill-every-ms" => a.kill_every = Duration::from_millis(num(&v)?.max(500)),
            "--lease-ttl-ms" => a.lease_ttl_ms = num(&v)?.max(1000),
            "--partitions" => a.partitions = num(&v)?.max(1) as i32,
            "--consumers" => a.consumers = num(&v)?.max(1) as usize,
            "--relay-bin" => a.relay_bin = Some(v),
            "--bootstrap" => a.bootstrap = Some(v),
            "--cluster" => match num(&v)? {
                n @ 1..=10 => a.cluster = Some(n as u16),
                _ => return Err(format!("--cluster {v}: between 1 and 10 nodes")),
            },
            "--broker-kill-every-ms" => {
                a.broker_kill_every = match num(&v)? {
                    0 => None,
                    ms => Some(Duration::from_millis(ms.max(1000))),
                }
            }
            _ => return Err(format!("unknown option {flag}\n\n{USAGE}")),
        }
    }
    if a.cluster.is_some() && a.bootstrap.is_some() {
        return Err(format!(
            "--cluster and --bootstrap exclude each other: --cluster starts the cluster it uses\n\n{USAGE}"
        ));
    }
    if a.broker_kill_every.is_some() && a.cluster.is_none() {
        return Err(format!(
            "--broker-kill-every-ms needs --cluster: the soak only kills brokers it started\n\n{USAGE}"
        ));
    }
    Ok(a)
}
