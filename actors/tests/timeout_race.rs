//! A handler that stops because `is_cancelled()` turned true at its
//! deadline must leave its job `timed_out`, not `failed` with the
//! handler's "stopped" error, whichever of the worker and the
//! Dispatcher's timer gets there first.

use std::time::Duration;

use jobd_actors::{JobOptions, JobState, KindOptions, Runtime};

#[test]
fn a_handler_that_obeys_its_deadline_times_out() {
    let rt = Runtime::builder()
        .pool("p", 4)
        .raw_handler("obey", "p", KindOptions::default(), |ctx, _| {
            while !ctx.is_cancelled() {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err("stopped early".to_string())
        })
        .start()
        .unwrap();
    let h = rt.handle();
    let opts = JobOptions::default().timeout(Duration::from_millis(20));
    let ids: Vec<_> = (0..40)
        .map(|_| h.submit("obey", &(), opts.clone()).unwrap())
        .collect();
    for id in ids {
        let rec = h.wait_record(id, Duration::from_secs(10)).unwrap();
        assert_eq!(rec.state, JobState::TimedOut, "{rec:?}");
        assert_eq!(rec.error.unwrap().code, "timed_out");
    }
    rt.shutdown(Duration::from_secs(5)).unwrap();
}
