//! The writers: transactions of 1-10 messages at the run's rate, some rolled back.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox::Message;
use rand::{Rng, SeedableRng};

use crate::args::Args;

#[derive(Default)]
pub(crate) struct Written {
    pub(crate) committed: Vec<uuid::Uuid>,
    pub(crate) rolled_back: Vec<uuid::Uuid>,
}

pub(crate) async fn write(pool: sqlx::PgPool, topic: String, args: Args, w: usize, left: Arc<AtomicUsize>) -> Written {
    let mut out = Written::default();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let start = Instant::now();
    let per_writer = args.rate as f64 / args.writers as f64;
    loop {
        if per_writer > 0.0 {
            // Keep to the rate: sleep while ahead of schedule.
            let due = Duration::from_secs_f64(out.committed.len() as f64 / per_writer);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(ahead).await;
            }
        }
        let mut n = rng.gen_range(1..=10usize);
        let rollback = rng.gen_range(0..100) < args.rollback_pct;
        if rollback {
            if left.load(Relaxed) == 0 {
                return out;
            }
        } else {
            // Take the messages before committing them, so the writers stop at exactly N.
            match left.fetch_update(Relaxed, Relaxed, |l| l.checked_sub(n.min(l)).filter(|_| l > 0)) {
                Ok(before) => n = n.min(before),
                Err(_) => return out,
            }
        }
        let msgs: Vec<Message> = (0..n)
            .map(|i| {
                let key = if rng.gen_range(0..100) < args.hot_share {
                    "hot".to_owned()
                } else {
                    format!("k{}", rng.gen_range(0..args.keys))
                };
                Message::new(topic.clone(), format!("w{w}-{i}")).key(key)
            })
            .collect();
        let ids = msgs.iter().map(|m| m.id());
        let res: Result<(), sqlx::Error> = async {
            let mut tx = pool.begin().await?;
            outbox::enqueue_batch(&mut tx, &msgs)
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            if rollback {
                tx.rollback().await
            } else {
                tx.commit().await
            }
        }
        .await;
        match res {
            Ok(()) if rollback => out.rolled_back.extend(ids),
            Ok(()) => out.committed.extend(ids),
            Err(e) => panic!("writer {w}: {e}"),
        }
    }
}
