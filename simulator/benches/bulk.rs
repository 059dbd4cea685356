//! Bulk transfer through both modes, in one process: a file is streamed
//! from each agent with `DownloadFile` and the bytes are counted and
//! dropped (the trailer's digest is not checked), so the transport is what
//! is timed, along with the agent hashing the bytes as it sends them; the
//! clock starts at the first chunk and stops after the trailer. Rounds
//! alternate between the modes. Prints MiB/s per round, the medians and the
//! polling/listening ratio.
//!
//! Run: `cargo bench -p tentacle-sim --bench bulk` (BULK_MIB=256 and
//! ROUNDS=5 by default).

mod common;

use std::time::{Duration, Instant};

use tentacle_hub::client::AgentClient;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::download_file_response::Part;

/// Streams `path` from the agent; returns the bytes and the time from the
/// first chunk to the end.
async fn stream(client: &AgentClient, path: &str) -> (u64, Duration) {
    let mut stream = client
        .files()
        .download_file(pb::DownloadFileRequest {
            path: path.to_owned(),
            offset: 0,
        })
        .await
        .expect("download")
        .into_inner();
    let mut bytes = 0u64;
    let mut first_chunk = None;
    while let Some(message) = stream.message().await.expect("chunk") {
        if let Some(Part::Chunk(chunk)) = message.part {
            first_chunk.get_or_insert_with(Instant::now);
            bytes += chunk.len() as u64;
        }
    }
    (bytes, first_chunk.map_or(Duration::ZERO, |t| t.elapsed()))
}

fn write_file(dir: &std::path::Path, mib: usize) {
    std::fs::create_dir_all(dir).expect("files root");
    let block: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let mut file = std::fs::File::create(dir.join("bulk.bin")).expect("create");
    for _ in 0..mib {
        std::io::Write::write_all(&mut file, &block).expect("write");
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let _telemetry = common::telemetry();
    let mib = common::env_number("BULK_MIB", 256);
    let rounds = common::env_number("ROUNDS", 5);
    let pair = common::start().await;
    write_file(&pair.listening_files, mib);
    write_file(&pair.polling_files, mib);
    // Warm the page cache and both connections.
    stream(&pair.listening, "bulk.bin").await;
    stream(&pair.polling, "bulk.bin").await;

    let mut rates = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        for (i, (label, client)) in [("listening", &pair.listening), ("polling", &pair.polling)]
            .into_iter()
            .enumerate()
        {
            let (bytes, took) = stream(client, "bulk.bin").await;
            assert_eq!(bytes, (mib * 1024 * 1024) as u64, "{label}: every byte");
            let rate = bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64();
            println!("round {round} {label:<10} {mib} MiB in {took:.2?} = {rate:.0} MiB/s");
            rates[i].push(rate);
        }
    }
    let [listening, polling] = rates.map(median);
    println!("median listening {listening:.0} MiB/s, polling {polling:.0} MiB/s");
    println!("bulk ratio polling/listening = {:.2}", polling / listening);
    pair.stop.cancel();
}
