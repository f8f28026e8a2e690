//! Open-loop load generator for `bench/run.sh` (wrk2 is not packaged here):
//! sends requests at a fixed rate whatever the server does, and measures each
//! latency from the moment the request was *scheduled* to be sent, not from
//! when it was actually sent. A server that stalls therefore shows its stall
//! in every request that should have gone out meanwhile (no coordinated
//! omission, as wrk2 corrects it).
//!
//! ```text
//! open_loop URL PATH RATE SECONDS TOKENS_FILE CONNECTIONS
//! ```
//!
//! `GET URL PATH` with `Authorization: Bearer <token>`, tokens taken in turn
//! from TOKENS_FILE (one per line), RATE requests per second for SECONDS, over
//! at most CONNECTIONS keep-alive connections (as wrk2's `-c`): a request due
//! while all of them are busy waits for one, and that wait is in its latency.
//! Prints one line in the shape of `bench/predict.lua`'s:
//! `RESULT mode=open-loop requests=N secs=S req_per_s=R p50_ms=… p99_ms=…
//! p999_ms=… errors=E non2xx=M rate=RATE`. Requests still unanswered 5 s
//! after the end count as errors.
//!
//! With `OPEN_LOOP_TIMELINE=FILE` it also writes, per 100 ms of schedule, the
//! requests due in it and their p99 and worst latency (`offset_ms requests
//! p99_ms max_ms`): where in a run the slow requests were, to line them up
//! with what else the machine was doing then.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

struct Tally {
    latencies_us: Mutex<Vec<u64>>,
    /// (scheduled offset in ms, latency in µs), for the timeline.
    timeline: Mutex<Vec<(u64, u64)>>,
    errors: AtomicU64,
    non2xx: AtomicU64,
}

fn usage() -> ! {
    eprintln!("usage: open_loop URL PATH RATE SECONDS TOKENS_FILE CONNECTIONS");
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 6 {
        usage();
    }
    let url = format!("{}{}", args[0].trim_end_matches('/'), args[1]);
    let rate: f64 = args[2].parse().unwrap_or_else(|_| usage());
    let seconds: f64 = args[3].parse().unwrap_or_else(|_| usage());
    let tokens: Vec<String> = std::fs::read_to_string(&args[4])
        .unwrap_or_else(|e| {
            eprintln!("open_loop: {}: {e}", args[4]);
            std::process::exit(2)
        })
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|t| format!("Bearer {t}"))
        .collect();
    let connections: usize = args[5].parse().unwrap_or_else(|_| usage());
    if tokens.is_empty() || rate <= 0.0 || seconds <= 0.0 || connections == 0 {
        usage();
    }

    let client = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(usize::MAX)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client");
    let tally = Arc::new(Tally {
        latencies_us: Mutex::new(Vec::with_capacity((rate * seconds) as usize + 1)),
        timeline: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        non2xx: AtomicU64::new(0),
    });

    let slots = Arc::new(tokio::sync::Semaphore::new(connections));
    let total = (rate * seconds).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    let mut i = 0u64;
    while i < total {
        // Send everything whose time has come (the timer wakes us at ~1 ms
        // granularity), then sleep until the next one is due.
        let now = Instant::now();
        while i < total && start + interval.mul_f64(i as f64) <= now {
            let scheduled = start + interval.mul_f64(i as f64);
            let req = client
                .get(&url)
                .header("authorization", &tokens[(i as usize) % tokens.len()]);
            let tally = tally.clone();
            let slots = slots.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(_slot) = slots.acquire().await else {
                    return;
                };
                match req.send().await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        // The whole body counts, as in wrk.
                        let body = resp.bytes().await;
                        let latency = scheduled.elapsed();
                        if body.is_err() {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        if !ok {
                            tally.non2xx.fetch_add(1, Ordering::Relaxed);
                        }
                        let micros = latency.as_micros() as u64;
                        tally
                            .latencies_us
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(micros);
                        let offset = (scheduled - start).as_millis() as u64;
                        tally
                            .timeline
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((offset, micros));
                    }
                    Err(_) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
            i += 1;
        }
        if i < total {
            tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut unfinished = 0u64;
    for t in tasks {
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            unfinished += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();

    let mut lat = tally
        .latencies_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let idx = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[idx.clamp(1, lat.len()) - 1] as f64 / 1000.0
    };
    if let Ok(path) = std::env::var("OPEN_LOOP_TIMELINE") {
        write_timeline(
            &path,
            &tally.timeline.lock().unwrap_or_else(|p| p.into_inner()),
        );
    }
    println!(
        "RESULT mode=open-loop requests={} secs={:.3} req_per_s={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} errors={} non2xx={} rate={}",
        lat.len(),
        secs,
        lat.len() as f64 / secs,
        pct(50.0),
        pct(99.0),
        pct(99.9),
        tally.errors.load(Ordering::Relaxed) + unfinished,
        tally.non2xx.load(Ordering::Relaxed),
        rate,
    );
}

/// Per 100 ms of schedule: requests, p99 and worst latency.
fn write_timeline(path: &str, points: &[(u64, u64)]) {
    let mut slices: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for &(offset, micros) in points {
        slices.entry(offset / 100).or_default().push(micros);
    }
    let mut out = String::new();
    for (slice, mut lat) in slices {
        lat.sort_unstable();
        let p99 = lat[((lat.len() * 99).div_ceil(100)).clamp(1, lat.len()) - 1];
        let max = lat[lat.len() - 1];
        out.push_str(&format!(
            "{} {} {:.3} {:.3}\n",
            slice * 100,
            lat.len(),
            p99 as f64 / 1000.0,
            max as f64 / 1000.0
        ));
    }
    if let Err(e) = std::fs::write(path, out) {
        eprintln!("open_loop: {path}: {e}");
    }
}
