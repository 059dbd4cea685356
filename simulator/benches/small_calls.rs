//! Sequential small calls through both modes, in one process: a listening
//! agent dialled directly, and a polling agent reached through a hub over
//! its tunnel. Prints per-mode latency and the polling/listening ratio.
//!
//! Run: `cargo bench -p tentacle-sim --bench small_calls` (CALLS=1000 by
//! default). Telemetry is set up as in the binaries, so the cost of the
//! tracing code with export off is included; set OTEL_EXPORTER_OTLP_ENDPOINT
//! to measure with export on. MODE=listening or MODE=polling measures one
//! mode only, for instruction counts under `valgrind --tool=callgrind`.

mod common;

use std::time::{Duration, Instant};

use tentacle_hub::client::AgentClient;

fn summary(label: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let total: Duration = samples.iter().sum();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    println!(
        "{label:<10} calls={} total={:.1}ms p50={:.1}us p99={:.1}us",
        samples.len(),
        total.as_secs_f64() * 1000.0,
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    p50
}

async fn measure(client: &AgentClient, calls: usize) -> Vec<Duration> {
    for _ in 0..50 {
        client.capabilities().await.expect("warm-up call");
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        client.capabilities().await.expect("call");
        samples.push(started.elapsed());
    }
    samples
}

#[tokio::main]
async fn main() {
    let _telemetry = common::telemetry();
    let calls = common::env_number("CALLS", 1000);
    let mode = std::env::var("MODE").unwrap_or_default();
    let pair = common::start().await;
    match mode.as_str() {
        "listening" => drop(summary("listening", measure(&pair.listening, calls).await)),
        "polling" => drop(summary("polling", measure(&pair.polling, calls).await)),
        _ => {
            let listening_p50 = summary("listening", measure(&pair.listening, calls).await);
            let polling_p50 = summary("polling", measure(&pair.polling, calls).await);
            println!(
                "p50 ratio polling/listening = {:.2}",
                polling_p50.as_secs_f64() / listening_p50.as_secs_f64()
            );
        }
    }
    pair.stop.cancel();
}
