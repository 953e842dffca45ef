//! Priorities: with the single worker held, queued jobs run highest
//! priority first and in submission order within a priority.

mod common;

use jobd_actors::JobOptions;

use common::{HeldWorker, LONG, held_worker};

#[test]
fn higher_priority_first_fifo_within_equal() {
    let HeldWorker(rt, h, gate, holder, ran_rx) = held_worker::<String>("one", "tag");

    let submitted = [
        ("p1", 1),
        ("p5", 5),
        ("p3-first", 3),
        ("p3-second", 3),
        ("p3-third", 3),
        ("p-neg", -2),
        ("p5-second", 5),
    ];
    let ids: Vec<_> = submitted
        .iter()
        .map(|(tag, prio)| {
            h.submit("tag", tag, JobOptions::default().priority(*prio))
                .unwrap()
        })
        .collect();
    assert_eq!(h.stats().unwrap().pools["one"].queued, submitted.len());
    // Nothing ran while the worker was held.
    assert!(ran_rx.is_empty());

    gate.release();
    h.wait::<()>(holder, LONG).unwrap();
    for id in ids {
        h.wait::<()>(id, LONG).unwrap();
    }
    let order: Vec<String> = ran_rx.try_iter().collect();
    assert_eq!(
        order,
        [
            "p5",
            "p5-second",
            "p3-first",
            "p3-second",
            "p3-third",
            "p1",
            "p-neg"
        ]
    );
    rt.shutdown(LONG).unwrap();
}

#[test]
fn order_holds_after_many_queued_jobs_were_cancelled() {
    let HeldWorker(rt, h, gate, holder, ran_rx) = held_worker::<u32>("one", "n");

    // 400 queued jobs over 3 priorities; cancel all but every 8th, which
    // leaves far more cancelled entries than live ones behind the held
    // worker.
    let prio = |n: u32| ((n / 8) % 3) as i32;
    let ids: Vec<_> = (0..400u32)
        .map(|n| {
            h.submit("n", &n, JobOptions::default().priority(prio(n)))
                .unwrap()
        })
        .collect();
    let mut kept = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        if n % 8 == 0 {
            kept.push(n as u32);
        } else {
            h.cancel(*id).unwrap();
        }
    }
    assert_eq!(h.stats().unwrap().pools["one"].queued, kept.len());

    gate.release();
    h.wait::<()>(holder, LONG).unwrap();
    for n in &kept {
        h.wait::<()>(ids[*n as usize], LONG).unwrap();
    }
    let order: Vec<u32> = ran_rx.try_iter().collect();
    // Highest priority first, submission order within a priority.
    kept.sort_by_key(|&n| (-prio(n), n));
    assert_eq!(order, kept);
    rt.shutdown(LONG).unwrap();
}
