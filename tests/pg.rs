//! PostgreSQL-only behaviour: migrations beside the application's own sqlx migrator, NOTIFY at commit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use outbox::{Message, Store, StoreAdmin};
use outbox_tests::db::{commit_each, scalar};

#[path = "pg/plans.rs"]
mod plans;
#[path = "pg/renewal.rs"]
mod renewal;
#[path = "pg/together.rs"]
mod together;

// The outbox schema, the inbox's, the source id, the index of waiting rows (0004_waiting_index.sql).
outbox_tests::migration_tests!(postgres, fresh_pg_unmigrated, vec![1, 2, 3, 4]);

#[tokio::test]
async fn lease_rows_match_the_lane_count() {
    let pool = outbox_tests::db::fresh_pg().await;
    let n: i64 = scalar(&pool, "SELECT count(*) FROM outbox_leases").await;
    assert_eq!(n, outbox::LANES as i64);
}

#[tokio::test]
async fn status_reads_leases_that_never_expire_or_were_never_taken() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    // Lane 0 held with no end (a value the column takes, beyond what chrono decodes), lane 1 at the
    // last finite time PostgreSQL has; the others never taken ('-infinity').
    sqlx::query(
        "UPDATE outbox_leases SET owner = 'forever', expires_at = CASE lane WHEN 0 THEN 'infinity'::timestamptz \
         ELSE '294276-12-31 23:59:59+00'::timestamptz END WHERE lane IN (0, 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let status = store.status().await.expect("status of every lane");
    let held: Vec<i32> = status
        .lanes
        .iter()
        .filter(|l| l.owner.is_some() && l.expires_at.is_some())
        .map(|l| l.lane)
        .collect();
    assert_eq!(held, [0, 1], "both held, for as long as time can say");
    assert_eq!(status.unowned_lanes(), outbox::LANES as usize - 2);
}

#[tokio::test]
async fn notify_arrives_at_commit_not_before_and_not_on_rollback() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    // A relay holding every lane, idle: writers notify.
    let mut wake = listening_with_every_lane_idle(&store).await;

    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, &Message::new("t", "x").key("k"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let e = outbox::enqueue(&mut tx, &Message::new("t", "y").key("k2"))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), wake.next())
            .await
            .is_err(),
        "no wake-up before commit (nor for the rolled-back one)"
    );
    tx.commit().await.unwrap();
    let lane = tokio::time::timeout(Duration::from_secs(5), wake.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lane, e.lane);

    // The batch form notifies every lane it wrote to.
    let msgs: Vec<Message> = (0..20).map(|i| Message::new("t", "z").key(format!("b{i}"))).collect();
    let out = outbox_tests::db::commit_batch(&pool, &msgs).await;
    let mut want: Vec<i32> = out.iter().map(|e| e.lane).collect();
    want.sort();
    want.dedup();
    let mut got = Vec::new();
    while got.len() < want.len() {
        got.push(
            tokio::time::timeout(Duration::from_secs(5), wake.next())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    got.sort();
    assert_eq!(got, want);
}

/// The transactions open right after a lane's flag said idle name a writer that is still open
/// (whose enqueue read the flag as busy), and it drops out of them when it commits or rolls back.
#[tokio::test]
async fn an_open_writer_is_among_the_open_transactions_until_it_ends() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let wakeups = store.wakeups().unwrap();
    let mut ids = Vec::new();
    let mut writers = Vec::new();
    for v in ["a", "b"] {
        let mut tx = pool.begin().await.unwrap();
        outbox::enqueue(&mut tx, &Message::new("t", v)).await.unwrap();
        let id: i64 = sqlx::query_scalar("SELECT txid_current()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        ids.push(id);
        writers.push(tx);
    }
    let open = wakeups.open_transactions().await.unwrap();
    assert!(ids.iter().all(|id| open.contains(id)), "{ids:?} not all among {open:?}");
    assert_eq!(wakeups.still_open(&ids).await.unwrap(), ids);
    let (b, a) = (writers.pop().unwrap(), writers.pop().unwrap());
    a.commit().await.unwrap();
    assert_eq!(wakeups.still_open(&ids).await.unwrap(), [ids[1]]);
    b.rollback().await.unwrap();
    assert_eq!(wakeups.still_open(&ids).await.unwrap(), Vec::<i64>::new());
    assert_eq!(wakeups.still_open(&[]).await.unwrap(), Vec::<i64>::new());
}

#[tokio::test]
async fn notify_goes_only_to_idle_lanes() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let mut wake = listening(&store).await;
    let leases = store.acquire("listener", 64, Duration::from_secs(60)).await.unwrap();
    let m = Message::new("t", "x").key("k");
    let lane = outbox::lane_of(Some("k"), m.id(), outbox::LANES);
    let lease = leases.iter().find(|l| l.lane == lane).unwrap();
    // Busy (not idle): no NOTIFY, the relay will claim the row anyway.
    commit_each(&pool, [m]).await;
    assert_eq!(woken_within(&mut wake, Duration::from_millis(500)).await, None);
    // Idle: NOTIFY at commit.
    store.wakeups().unwrap().set_idle(lease, true).await.unwrap();
    commit_each(&pool, [Message::new("t", "y").key("k")]).await;
    assert_eq!(woken_within(&mut wake, Duration::from_secs(5)).await, Some(lane));
    // Released lanes are not idle: nobody is listening for them.
    store.release(lease).await.unwrap();
    commit_each(&pool, [Message::new("t", "z").key("k")]).await;
    assert_eq!(woken_within(&mut wake, Duration::from_millis(500)).await, None);
    assert_eq!(
        store.status().await.unwrap().pending,
        3,
        "every message is written either way"
    );
}

/// A relay that stops without releasing its lanes (killed, its machine gone) leaves their flags
/// saying idle; once its leases have expired nobody listens for those lanes, so writers stop paying
/// for NOTIFY (which serializes their commits) until a relay takes the lanes again.
#[tokio::test]
async fn a_lane_whose_lease_expired_is_not_notified() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let wakeups = store.wakeups().unwrap();
    let mut wake = listening(&store).await;
    let ttl = Duration::from_millis(300);
    for lease in store.acquire("gone", 64, ttl).await.unwrap() {
        wakeups.set_idle(&lease, true).await.unwrap();
    }
    let m = Message::new("t", "x").key("k");
    let lane = outbox::lane_of(Some("k"), m.id(), outbox::LANES);
    tokio::time::sleep(ttl * 2).await;
    commit_each(&pool, [m]).await;
    let msgs: Vec<Message> = (0..8).map(|i| Message::new("t", "b").key(format!("b{i}"))).collect();
    outbox_tests::db::commit_batch(&pool, &msgs).await;
    assert_eq!(woken_within(&mut wake, Duration::from_millis(500)).await, None);
    // A relay that takes the lanes (a new epoch) and says idle is notified again.
    let leases = store.acquire("next", 64, Duration::from_secs(60)).await.unwrap();
    let lease = leases.iter().find(|l| l.lane == lane).unwrap();
    wakeups.set_idle(lease, true).await.unwrap();
    commit_each(&pool, [Message::new("t", "y").key("k")]).await;
    assert_eq!(woken_within(&mut wake, Duration::from_secs(5)).await, Some(lane));
    assert_eq!(store.status().await.unwrap().pending, 10, "every message is written");
}

/// The LISTEN connection cut (a server restart, a network device): made again at once, or after
/// attempts refused for a while, the wake-ups come back with it, every lane woken once as they do
/// (a commit meanwhile notified nobody), and a commit's NOTIFY is heard again.
#[tokio::test]
async fn listen_comes_back_after_its_connection_is_cut_and_wakes_every_lane() {
    let pool = outbox_tests::db::fresh_pg().await;
    let proxy = outbox_tests::proxy::DbProxy::start().await;
    // Connecting again while the port is closed fails within half a second.
    let options = sqlx::postgres::PgPoolOptions::new().acquire_timeout(Duration::from_millis(500));
    let (_, store, leases) = store_through(&pool, proxy.port, options).await;
    let wakeups = store.wakeups().unwrap();
    // Read on a task of its own, as the relay does, so the cut is seen as it happens.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(listening(&store).await.for_each(move |lane| {
        let _ = tx.send(lane);
        async {}
    }));
    // At once; past a refused attempt; past the attempt a second after that, refused too.
    for refused_for in [0, 1500, 2200].map(Duration::from_millis) {
        proxy.cut();
        tokio::time::sleep(refused_for).await;
        proxy.restore().await;
        let mut woken = std::collections::HashSet::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            while woken.len() < outbox::LANES as usize {
                woken.insert(rx.recv().await.expect("the wake-ups go on after the cut"));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("every lane woken once LISTEN is back, refused for {refused_for:?}"));
    }
    let lease = leases.iter().find(|l| l.lane == lane_of_k()).unwrap();
    wakeups.set_idle(lease, true).await.unwrap();
    commit_each(&pool, [Message::new("t", "x").key("k")]).await;
    let heard = async { while rx.recv().await.expect("the wake-ups go on") != lane_of_k() {} };
    tokio::time::timeout(Duration::from_secs(5), heard)
        .await
        .expect("a commit's NOTIFY heard after the cut");
    reader.abort();
}

#[tokio::test]
async fn notify_can_be_turned_off() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let mut wake = listening_with_every_lane_idle(&store).await;
    let quiet = outbox::Outbox::new().notify(false);
    let mut tx = pool.begin().await.unwrap();
    quiet.enqueue(&mut tx, &Message::new("t", "x")).await.unwrap();
    quiet
        .enqueue_batch(&mut tx, &[Message::new("t", "x"), Message::new("t", "y")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(woken_within(&mut wake, Duration::from_millis(500)).await, None);
    assert_eq!(store.status().await.unwrap().pending, 3);
}

#[tokio::test]
async fn a_row_locked_by_another_session_never_lets_its_key_skip_ahead() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let leases = store.acquire("relay", 64, Duration::from_secs(60)).await.unwrap();
    let lane = commit_each(&pool, (0..4).map(|i| Message::new("t", format!("{i}")).key("k"))).await[0].lane;
    let lease = leases.iter().find(|l| l.lane == lane).unwrap();
    // Another session (a relay frozen inside its claim, an operator) holds seq 1..2 locked.
    let mut other = pool.begin().await.unwrap();
    outbox_tests::db::exec(
        &mut *other,
        "SELECT 1 FROM outbox_messages WHERE key = 'k' AND seq <= 2 FOR UPDATE",
    )
    .await;
    let seqs: Vec<i64> = tokio::time::timeout(Duration::from_secs(5), store.claim(lease, 10, &[]))
        .await
        .expect("the claim does not wait for row locks")
        .unwrap()
        .iter()
        .map(|r| r.seq.unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "the key's rows from its first, locks or not");
    other.rollback().await.unwrap();
}

/// The seqs of the rows one claim of `lease`'s lane takes, up to `limit`.
async fn seqs_claimed(store: &outbox::postgres::PgStore, lease: &outbox::Lease, limit: usize) -> Vec<i64> {
    let rows = store.claim(lease, limit, &[]).await.expect("the claim");
    rows.iter().map(|r| r.seq.unwrap()).collect()
}

/// A pool of at most one connection that records, in `seen`, the settings each new connection
/// starts with (its `after_connect` hook): `jit`, `enable_bitmapscan`, `enable_seqscan`, as
/// "off on on".
async fn recording_settings(opts: sqlx::postgres::PgConnectOptions, seen: &Arc<Mutex<Vec<String>>>) -> sqlx::PgPool {
    let seen = seen.clone();
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            let seen = seen.clone();
            Box::pin(async move {
                let settings: String = sqlx::query_scalar(
                    "SELECT concat_ws(' ', current_setting('jit'), current_setting('enable_bitmapscan'), \
                     current_setting('enable_seqscan'))",
                )
                .fetch_one(&mut *conn)
                .await?;
                seen.lock().unwrap().push(settings);
                Ok(())
            })
        })
        .connect_with(opts)
        .await
        .unwrap()
}

#[tokio::test]
async fn claims_run_with_jit_off_in_one_statement_whatever_the_pool() {
    let pool = outbox_tests::db::fresh_pg().await;
    commit_each(&pool, (0..6).map(|i| Message::new("t", format!("{i}")).key("k"))).await;
    let opts = pool.connect_options().as_ref().clone();
    let lane = lane_of_k();
    let seen = Arc::new(Mutex::new(Vec::new()));
    // A pool whose connections start with JIT off, as the daemon's do; and a pool as a service
    // makes it, whose connections keep the server's JIT setting.
    for (name, opts) in [
        ("jit off in the pool", opts.clone().options([("jit", "off")])),
        ("default pool", opts),
    ] {
        seen.lock().unwrap().clear();
        let p = recording_settings(opts, &seen).await;
        let store = outbox::postgres::PgStore::new(p.clone());
        let leases = store.acquire(name, 64, Duration::from_secs(60)).await.unwrap();
        let lease = leases.iter().find(|l| l.lane == lane).unwrap();
        assert_eq!(seqs_claimed(&store, lease, 10).await, vec![1, 2, 3, 4, 5, 6], "{name}");
        store.leave(name).await.unwrap();
        for l in &leases {
            store.release(l).await.unwrap();
        }
        // The claim ran on a connection the store opened with the pool's settings and hooks (the
        // hook saw it), JIT, bitmap scans and sequential scans off, so that the pool's own connection
        // keeps its settings.
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.len(),
            2,
            "the pool's connection, then the store's for claims: {seen:?}"
        );
        assert_eq!(
            seen[0] == "off on on",
            name == "jit off in the pool",
            "the pool's settings: {seen:?}"
        );
        assert_eq!(seen[1], "off off off", "{seen:?}");
        let jit: String = scalar(&p, "SHOW jit").await;
        assert_eq!(jit == "off", name == "jit off in the pool", "{name}: {jit}");
    }
}

/// A store on a pool of `options` (at most 2 connections) that reaches `pool`'s database through
/// `port` (a proxy), and the leases it took of every lane.
async fn store_through(
    pool: &sqlx::PgPool,
    port: u16,
    options: sqlx::postgres::PgPoolOptions,
) -> (sqlx::PgPool, outbox::postgres::PgStore, Vec<outbox::Lease>) {
    let through = options
        .max_connections(2)
        .connect_with(pool.connect_options().as_ref().clone().port(port))
        .await
        .unwrap();
    let store = outbox::postgres::PgStore::new(through.clone());
    let leases = store.acquire("relay", 64, Duration::from_secs(60)).await.unwrap();
    (through, store, leases)
}

/// The lane of key `k`.
fn lane_of_k() -> i32 {
    outbox::lane_of(Some("k"), uuid::Uuid::nil(), outbox::LANES)
}

#[tokio::test]
async fn behind_a_pooler_that_refuses_startup_options_claims_and_marks_run_on_the_given_pool() {
    let pool = outbox_tests::db::fresh_pg().await;
    commit_each(&pool, (0..6).map(|i| Message::new("t", format!("{i}")).key("k"))).await;
    let pooler = outbox_tests::proxy::OptionsRefused::start().await;
    let (through, store, leases) = store_through(&pool, pooler.port, sqlx::postgres::PgPoolOptions::new()).await;
    let lease = leases.iter().find(|l| l.lane == lane_of_k()).unwrap();
    assert_eq!(seqs_claimed(&store, lease, 2).await, vec![1, 2]);
    let rows = store.claim(lease, 10, &[]).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.seq.unwrap()).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    // The marks run on the given pool too.
    store
        .mark_published(lease, &[outbox::Delivered::new(rows[0].pos)])
        .await
        .unwrap();
    assert_eq!(seqs_claimed(&store, lease, 10).await, vec![2, 3, 4, 5, 6]);
    // The first claim's connection with JIT off was refused; nothing asked again.
    assert_eq!(pooler.refused(), 1);
    let jit: String = scalar(&through, "SHOW jit").await;
    assert_ne!(jit, "off", "SET LOCAL ends with the claim's transaction");
}

#[tokio::test]
async fn behind_a_pooler_that_refuses_startup_options_the_look_runs_under_the_planner_settings() {
    let setup = outbox_tests::db::fresh_pg().await;
    // Statistics of an empty table: the default settings plan the look as a sequential scan.
    sqlx::query("VACUUM outbox_messages").execute(&setup).await.unwrap();
    commit_each(&setup, (0..3).map(|i| Message::new("t", format!("{i}")).key("k"))).await;
    // The scans so far (the migrations') are counted when their backends exit.
    setup.close().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(setup.connect_options().as_ref().clone())
        .await
        .unwrap();
    let before = settled_scans(&pool).await;
    let pooler = outbox_tests::proxy::OptionsRefused::start().await;
    let (through, store, _leases) = store_through(&pool, pooler.port, sqlx::postgres::PgPoolOptions::new()).await;
    let other = (lane_of_k() + 1) % outbox::LANES;
    let wakeups = store.wakeups().unwrap();
    let ready = wakeups.ready_lanes(&[(other, 0), (lane_of_k(), 0)]).await.unwrap();
    assert_eq!(ready, vec![lane_of_k()]);
    let beyond = wakeups.ready_lanes(&[(lane_of_k(), 3)]).await.unwrap();
    assert!(beyond.is_empty(), "nothing beyond the third row: {beyond:?}");
    assert_eq!(
        pooler.refused(),
        1,
        "the look's connection of the store's own was refused"
    );
    // The server counts scans per table when the backend that made them goes idle (within ~10 s):
    // wait until both looks are counted, one scan each at least.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now = table_scans(&pool).await;
        if now.0 + now.1 >= before.0 + before.1 + 2 || std::time::Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        after.0, before.0,
        "no sequential scan of outbox_messages: {before:?} -> {after:?}"
    );
    assert!(
        after.1 >= before.1 + 2,
        "the looks probed the index: {before:?} -> {after:?}"
    );
    let seqscan: String = scalar(&through, "SHOW enable_seqscan").await;
    assert_eq!(seqscan, "on", "SET LOCAL ends with the look's implicit transaction");
}

/// [`table_scans`] once no other backend is connected to the database and two reads agree.
async fn settled_scans(pool: &sqlx::PgPool) -> (i64, i64) {
    let others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = table_scans(pool).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = table_scans(pool).await;
        let alone = scalar::<_, i64>(pool, others).await == 0;
        if (alone && now == last) || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// `outbox_messages`'s sequential and index scans so far, as the server has counted them.
async fn table_scans(pool: &sqlx::PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'outbox_messages'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn claims_and_marks_whose_connections_were_cut_run_again_on_new_ones() {
    let pool = outbox_tests::db::fresh_pg().await;
    commit_each(&pool, (0..6).map(|i| Message::new("t", format!("{i}")).key("k"))).await;
    let proxy = outbox_tests::proxy::DbProxy::start().await;
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = opened.clone();
    let options = sqlx::postgres::PgPoolOptions::new().after_connect(move |_, _| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    });
    let (_, store, leases) = store_through(&pool, proxy.port, options).await;
    let lease = leases.iter().find(|l| l.lane == lane_of_k()).unwrap();
    let other = leases.iter().find(|l| l.lane != lane_of_k()).unwrap();
    let cut = || async {
        // Every connection through the proxy is dropped, as a server restart or a network device
        // would: the store's idle connections are all broken, and it has not noticed.
        proxy.cut();
        proxy.restore().await;
    };
    for round in 0..3i64 {
        // Two claims at once, the second one asked while the first one's statement runs (held up
        // by a lock on the table), so that the store holds two connections.
        let mut holder = pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE outbox_messages IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *holder)
            .await
            .unwrap();
        let (a, b, ()) = tokio::join!(
            seqs_claimed(&store, lease, 10),
            async {
                statements_waiting(&pool, 1, Duration::from_secs(30)).await;
                seqs_claimed(&store, other, 10).await
            },
            async {
                statements_waiting(&pool, 2, Duration::from_secs(30)).await;
                holder.commit().await.unwrap();
            }
        );
        let left: Vec<i64> = (round + 1..=6).collect();
        assert_eq!((&a, &b), (&left, &vec![]), "round {round}, before the cuts");
        let before = opened.load(std::sync::atomic::Ordering::SeqCst);
        // The pool's connection and the store's two; from then on, each of the two cuts of a round
        // costs the store a new connection, and the second claim at once one more.
        assert_eq!(before as i64, 3 + 3 * round, "connections opened");
        cut().await;
        let rows = store.claim(lease, 10, &[]).await.expect("the first claim after a cut");
        assert_eq!(
            rows.iter().map(|r| r.seq.unwrap()).collect::<Vec<_>>(),
            left,
            "round {round}"
        );
        cut().await;
        store
            .mark_published(lease, &[outbox::Delivered::new(rows[0].pos)])
            .await
            .expect("the first mark after a cut");
    }
    assert_eq!(
        seqs_claimed(&store, lease, 10).await,
        vec![4, 5, 6],
        "three rows marked"
    );
}

/// Waits until `n` statements of the database wait for a lock; fails after `within`.
async fn statements_waiting(pool: &sqlx::PgPool, n: i64, within: Duration) {
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let deadline = std::time::Instant::now() + within;
    while scalar::<_, i64>(pool, waiting).await < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} statements did not wait for a lock within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes rows of key `k` as (seq, created_at, available_at), both as milliseconds from the
/// server's now(), then returns the seqs one claim of their lane takes.
async fn claimed_seqs(rows: &[(i64, i64, i64)]) -> Vec<i64> {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let leases = store.acquire("relay", 64, Duration::from_secs(60)).await.unwrap();
    let lane = lane_of_k();
    let lease = leases.iter().find(|l| l.lane == lane).unwrap();
    for (seq, created_ms, available_ms) in rows {
        sqlx::query(
            "INSERT INTO outbox_messages (lane, id, topic, payload, headers, key, seq, created_at, available_at) \
             VALUES ($1, $2, 't', '\\x00', '[]', 'k', $3, now() + $4 * interval '1 ms', now() + $5 * interval '1 ms')",
        )
        .bind(lane)
        .bind(uuid::Uuid::now_v7())
        .bind(seq)
        .bind(created_ms)
        .bind(available_ms)
        .execute(&pool)
        .await
        .unwrap();
    }
    store
        .claim(lease, 10, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq.unwrap())
        .collect()
}

#[tokio::test]
async fn a_row_whose_writer_began_after_the_claims_clock_is_not_skipped() {
    // Seq 1's writer began (created_at = available_at = its now()) after the claim's clock, seq 2's
    // writer before it; both committed. Per key, seq 1 must still come first.
    assert_eq!(
        claimed_seqs(&[(1, 2_000, 2_000), (2, -2_000, -2_000)]).await,
        vec![1, 2]
    );
}

#[tokio::test]
async fn a_row_skipped_for_its_delivery_time_always_holds_back_its_key() {
    // Seq 1 asks to be delivered in 1 h, and its writer's clock (created_at) reads 2 h ahead of the
    // claim's: it is not due, so it is skipped, and seq 2 must wait for it.
    const HOUR: i64 = 3_600_000;
    assert_eq!(
        claimed_seqs(&[(1, 2 * HOUR, HOUR), (2, 0, 0)]).await,
        Vec::<i64>::new(),
        "seq 2 went ahead of a seq 1 that was not due"
    );
}

/// Whether `lane` is held and its flag says idle (writers notify it).
async fn lane_idle(pool: &sqlx::PgPool, lane: i32) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT idle FROM outbox_leases WHERE lane = $1 AND owner IS NOT NULL")
        .bind(lane)
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or(false)
}

/// After its lane found work, a relay keeps the lane's flag busy for `linger` (writers send no
/// NOTIFY, whose commits take turns) and still publishes new rows within milliseconds, found by one
/// query over the lingering lanes; when the linger ends the flag says idle and writers notify again.
#[tokio::test]
async fn a_lane_that_found_work_lingers_busy_so_writers_skip_notify() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let mut notified = listening(&store).await;
    let kafka = outbox_tests::kafka::Cluster::shared();
    let topic = outbox_tests::kafka::topic("linger");
    outbox_tests::kafka::create_topic(&kafka.bootstrap(), &topic, 1).await;
    // No poll could explain a delivery within the test: only NOTIFY and the linger's watch.
    let cfg = outbox_tests::embedded::test_config()
        .poll_interval(Duration::from_secs(60))
        // Long enough that a loaded machine still sees the second row inside it.
        .linger(Duration::from_secs(10))
        .linger_above_writes(0.0);
    let relay = outbox_tests::embedded::start(
        store.clone(),
        outbox_tests::embedded::kafka(&kafka.bootstrap(), &[]),
        cfg,
    );
    let idle = |lane: i32| {
        let pool = pool.clone();
        async move { lane_idle(&pool, lane).await }
    };
    let send = |key: &'static str| {
        let pool = pool.clone();
        let topic = topic.clone();
        async move { commit_each(&pool, [Message::new(topic, "x").key(key)]).await[0].lane }
    };
    let published = || async { store.status().await.unwrap().pending == 0 };
    let lane = lane_of_k();
    outbox_tests::embedded::wait_for("the lane idle before any work", Duration::from_secs(10), || idle(lane)).await;

    assert_eq!(send("k").await, lane);
    let first = tokio::time::timeout(Duration::from_secs(5), notified.next()).await;
    assert_eq!(first.unwrap(), Some(lane), "an idle lane is notified");
    outbox_tests::embedded::wait_for("the first row published", Duration::from_secs(10), published).await;
    assert!(!idle(lane).await, "a lane that found work says busy while it lingers");

    send("k").await;
    // Within the linger, and long before the 60 s poll: found by the linger's watch.
    outbox_tests::embedded::wait_for("the second row published", Duration::from_secs(8), published).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), notified.next())
            .await
            .is_err(),
        "no NOTIFY from a commit into a lingering lane"
    );

    outbox_tests::embedded::wait_for("the linger to end", Duration::from_secs(20), || idle(lane)).await;
    send("k").await;
    let third = tokio::time::timeout(Duration::from_secs(5), notified.next()).await;
    assert_eq!(third.unwrap(), Some(lane), "after the linger writers notify again");
    outbox_tests::embedded::wait_for("the third row published", Duration::from_secs(10), published).await;
    relay.stop().await;
}

/// The pace's probe commits and answers PostgreSQL's counts: finished transactions, which grow
/// with every client's transactions (each connection reports them about once a second), and
/// transaction ids handed out, which grow with every writing transaction at once.
#[tokio::test]
async fn the_probe_answers_the_databases_transaction_counts() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    outbox_tests::db::exec(&pool, "CREATE TABLE probed (x INT)").await;
    let before = store.probe().await.unwrap();
    let (finished, writes) = (before.finished.expect("finished"), before.writes.expect("writes"));
    for _ in 0..20 {
        outbox_tests::db::exec(&pool, "INSERT INTO probed VALUES (1)").await;
    }
    let after = store.probe().await.unwrap();
    assert!(
        after.writes.unwrap() > writes + 20,
        "20 writes and the probe's own, at once: {before:?} then {after:?}"
    );
    for _ in 0..30 {
        outbox_tests::db::exec(&pool, "SELECT 1").await;
    }
    outbox_tests::embedded::wait_for("the count to include them", Duration::from_secs(15), || async {
        store.probe().await.unwrap().finished.unwrap() >= finished + 50
    })
    .await;
}

/// The lane of the next NOTIFY if one arrives within `within`.
async fn woken_within(wake: &mut (impl futures::Stream<Item = i32> + Unpin), within: Duration) -> Option<i32> {
    tokio::time::timeout(within, wake.next()).await.ok().flatten()
}

/// Under the adaptive pace, lanes linger only while the database takes more writes a second than
/// `linger_above_writes` besides the relay's: below, a lane that ran dry says idle at once and the
/// next commit notifies it.
#[tokio::test]
async fn a_lane_of_a_database_that_takes_few_writes_asks_for_notify_as_soon_as_it_runs_dry() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let mut notified = listening(&store).await;
    // A threshold no test run reaches (other tests write to the same server).
    let cfg = outbox_tests::embedded::test_config()
        .poll_interval(Duration::from_secs(60))
        .linger(Duration::from_secs(30))
        .linger_above_writes(1e9);
    let kafka = outbox_tests::kafka::Cluster::shared();
    let topic = outbox_tests::kafka::topic("notify-at-once");
    outbox_tests::kafka::create_topic(&kafka.bootstrap(), &topic, 1).await;
    let relay = outbox_tests::embedded::start(
        store.clone(),
        outbox_tests::embedded::kafka(&kafka.bootstrap(), &[]),
        cfg,
    );
    let lane = lane_of_k();
    let idle = || lane_idle(&pool, lane);
    outbox_tests::embedded::wait_for("the lane idle before any work", Duration::from_secs(10), idle).await;
    // The pace's counts tell once they span a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in 1..=2 {
        commit_each(&pool, [Message::new(topic.as_str(), "x").key("k")]).await;
        let woken = tokio::time::timeout(Duration::from_secs(5), notified.next()).await;
        assert_eq!(woken.unwrap(), Some(lane), "commit {n} notified its lane");
        outbox_tests::embedded::wait_for("the row published", Duration::from_secs(5), || async {
            store.status().await.unwrap().pending == 0
        })
        .await;
        // Well within the 30 s linger.
        outbox_tests::embedded::wait_for("the lane idle again", Duration::from_secs(3), idle).await;
    }
    relay.stop().await;
}

/// Listens for NOTIFY: the stream past the wake-up of every lane it begins with (LISTEN may come
/// after a commit that notified nobody), which it checks.
async fn listening(store: &outbox::postgres::PgStore) -> futures::stream::BoxStream<'static, i32> {
    let mut wake = store
        .wakeups()
        .expect("PostgreSQL supports LISTEN")
        .listen()
        .await
        .unwrap();
    let mut first = Vec::new();
    for _ in 0..outbox::LANES {
        first.push(wake.next().await.expect("the stream goes on"));
    }
    first.sort();
    assert_eq!(
        first,
        (0..outbox::LANES).collect::<Vec<_>>(),
        "every lane once as it begins"
    );
    wake
}

/// Listens for NOTIFY, holding every lane with its flag idle (writers notify).
async fn listening_with_every_lane_idle(store: &outbox::postgres::PgStore) -> futures::stream::BoxStream<'static, i32> {
    let wakeups = store.wakeups().expect("PostgreSQL supports LISTEN");
    let wake = listening(store).await;
    for lease in store.acquire("listener", 64, Duration::from_secs(60)).await.unwrap() {
        wakeups.set_idle(&lease, true).await.unwrap();
    }
    wake
}

/// `n` random characters: PostgreSQL cannot compress them (it would a key of one repeated byte).
fn random_key(n: usize) -> String {
    let hex: String = (0..n.div_ceil(32))
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    hex[..n].to_owned()
}

/// A key longer than PostgreSQL can index once its row waits (the index of waiting rows, a parked
/// dead letter's key) is refused at enqueue as bad input: accepted, a row with a key of 2,688 bytes
/// made its first failed attempt fail (54000, index row size) and its lane retried that for ever.
/// The longest key accepted goes through a failed attempt, a parked dead letter and its retry.
#[tokio::test]
async fn keys_postgres_cannot_index_once_their_row_waits_are_refused_at_enqueue() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let mut tx = pool.begin().await.unwrap();
    let err = outbox::enqueue(&mut tx, &Message::new("t", "x").key(random_key(2688)))
        .await
        .expect_err("a key of 2,688 bytes");
    assert!(err.is_bad_input(), "{err}");
    tx.rollback().await.unwrap();

    let key = random_key(outbox::postgres::MAX_KEY_BYTES);
    let sent = outbox_tests::db::commit_batch(&pool, &[Message::new("t", "x").key(key.clone())]).await;
    let leases = store.acquire("relay", 64, Duration::from_secs(60)).await.unwrap();
    let lease = leases.iter().find(|l| l.lane == sent[0].lane).unwrap();
    let claim = || async { store.claim(lease, 10, &[]).await.unwrap() };
    let row = claim().await.remove(0);
    assert_eq!(row.key.as_deref(), Some(key.as_str()));
    store
        .mark_failed(lease, row.pos, "broker said no", Duration::from_millis(10))
        .await
        .expect("a failed attempt of the longest key");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let row = claim().await.remove(0);
    store
        .dead_letter(lease, row.pos, "broker said no", true)
        .await
        .expect("the longest key parked");
    assert!(store.retry_dead_letter(row.id).await.expect("its retry"));
    assert_eq!(claim().await.len(), 1, "back in the outbox");
}

/// Discarding a parked dead letter lets its key move on: like its retry, the discard wakes the
/// lane, which found the key's next row only at its next poll before.
#[tokio::test]
async fn discarding_a_parked_dead_letter_wakes_its_lane() {
    let (pool, store) = outbox_tests::db::fresh_pg_store().await;
    let sent = outbox_tests::db::commit_batch(
        &pool,
        &[Message::new("t", "x").key("k"), Message::new("t", "y").key("k")],
    )
    .await;
    let leases = store.acquire("relay", 64, Duration::from_secs(60)).await.unwrap();
    let lease = leases.iter().find(|l| l.lane == sent[0].lane).unwrap();
    let row = store.claim(lease, 1, &[]).await.unwrap().remove(0);
    store.dead_letter(lease, row.pos, "poison", true).await.unwrap();
    let mut wake = listening(&store).await;
    store.wakeups().unwrap().set_idle(lease, true).await.unwrap();
    assert!(store.discard_dead_letter(row.id).await.unwrap());
    assert_eq!(woken_within(&mut wake, Duration::from_secs(5)).await, Some(lease.lane));
    assert_eq!(
        store.claim(lease, 10, &[]).await.unwrap().len(),
        1,
        "the key's next row"
    );
}
