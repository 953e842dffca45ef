//! Backpressure: a pool takes at most `max_queued` waiting jobs; the next
//! submit fails at once with `QueueFull`, and the pool takes jobs again once
//! it drained.

mod common;

use std::time::Duration;

use jobd_actors::{JobError, JobOptions, JobSpec, PoolConfig, Runtime};

use common::{Gate, LONG, held};

const MAX_QUEUED: usize = 3;

#[test]
fn max_queued_reached_gives_queue_full_and_the_pool_recovers() {
    let gate = Gate::new();
    let rt = Runtime::builder()
        .pool_config(PoolConfig {
            max_queued: MAX_QUEUED,
            ..PoolConfig::new("small", 1)
        })
        .handler("hold", "small", held::<u32>(&gate))
        .start()
        .unwrap();
    let h = rt.handle();

    // The running job does not count against the limit: it is not waiting.
    let running = h.submit("hold", &0u32, JobOptions::default()).unwrap();
    gate.started();
    let mut waiting: Vec<_> = (1..=MAX_QUEUED as u32)
        .map(|x| h.submit("hold", &x, JobOptions::default()).unwrap())
        .collect();

    let full = JobError::QueueFull {
        pool: "small".into(),
        max_queued: MAX_QUEUED,
    };
    assert_eq!(
        h.submit("hold", &9u32, JobOptions::default()),
        Err(full.clone())
    );
    assert_eq!(full.code(), "queue_full");
    // Delayed jobs wait too and count against the same limit.
    assert_eq!(
        h.submit(
            "hold",
            &9u32,
            JobOptions::default().delay(Duration::from_millis(1))
        ),
        Err(full.clone())
    );
    // `call` fails at once too instead of waiting out its timeout.
    assert_eq!(h.call::<_, u32>("hold", &9u32, LONG), Err(full.clone()));
    // A batch that would overflow is refused as a whole.
    let spec = JobSpec {
        kind: "hold".into(),
        payload: serde_json::json!(9),
        options: JobOptions::default(),
    };
    assert!(matches!(
        h.submit_batch(vec![spec]),
        Err(JobError::QueueFull { .. })
    ));
    let stats = h.stats().unwrap();
    assert_eq!(stats.pools["small"].queued, MAX_QUEUED);
    assert_eq!(stats.pools["small"].max_queued, MAX_QUEUED);
    assert_eq!(
        stats.kinds["hold"].counters.submitted,
        1 + MAX_QUEUED as u64
    );

    // Drain: one slot frees as soon as one waiting job starts.
    gate.release();
    assert_eq!(h.wait::<u32>(running, LONG).unwrap(), 0);
    gate.started();
    waiting.push(h.submit("hold", &4u32, JobOptions::default()).unwrap());
    assert_eq!(h.submit("hold", &9u32, JobOptions::default()), Err(full));

    gate.release_n(MAX_QUEUED + 1);
    for (i, id) in waiting.into_iter().enumerate() {
        assert_eq!(h.wait::<u32>(id, LONG).unwrap(), i as u32 + 1);
    }
    // Fully drained: the whole limit is available again.
    let again: Vec<_> = (0..MAX_QUEUED as u32 + 1)
        .map(|x| h.submit("hold", &x, JobOptions::default()).unwrap())
        .collect();
    gate.release_n(again.len());
    for (i, id) in again.into_iter().enumerate() {
        assert_eq!(h.wait::<u32>(id, LONG).unwrap(), i as u32);
    }
    rt.shutdown(LONG).unwrap();
}
