//! File transfer through the real agent: a 64 MiB round trip with matching
//! digests (sent in trailers, after the data), resumed downloads, wrong or
//! missing digests, and paths that try to leave the files root.

use std::io::Write;

use sha2::{Digest, Sha256};
use tentacle_hub::client::{ClientError, hash_file, partial_path};
use tentacle_proto::v1 as pb;
use tentacle_tests::{Fixture, Mode, in_both_modes};
use tonic::Code;

fn random_file(dir: &std::path::Path, bytes: usize) -> std::path::PathBuf {
    let path = dir.join("payload.bin");
    let mut file = std::fs::File::create(&path).expect("create");
    // Cheap, non-repeating content: a running SHA-256 chain.
    let mut block = Sha256::digest(b"tentacle").to_vec();
    let mut written = 0;
    while written < bytes {
        let mut chunk = Vec::with_capacity(1 << 16);
        while chunk.len() < 1 << 16 {
            block = Sha256::digest(&block).to_vec();
            chunk.extend_from_slice(&block);
        }
        let n = chunk.len().min(bytes - written);
        file.write_all(&chunk[..n]).expect("write");
        written += n;
    }
    path
}

async fn a_64_mib_upload_and_download_round_trip_with_matching_hashes(mode: Mode) {
    let fixture = Fixture::start(mode, "[files]\nmin_free_bytes = 0\n").await;
    let (agent, client) = (&fixture.agent, &fixture.client);
    let local = tempfile::tempdir().expect("tempdir");
    let source = random_file(local.path(), 64 * 1024 * 1024);
    let (size, digest) = hash_file(&source).await.expect("hash");

    let stored = client
        .upload(&source, "releases/app.bin", 256 * 1024)
        .await
        .expect("upload");
    assert_eq!(
        (stored.size, stored.sha256.as_str()),
        (size, digest.as_str())
    );
    let on_agent = agent.home().join("files/releases/app.bin");
    assert_eq!(
        hash_file(&on_agent).await.expect("hash on agent"),
        (size, digest.clone())
    );

    let back = local.path().join("back.bin");
    let header = client
        .download("releases/app.bin", &back, true)
        .await
        .expect("download");
    assert_eq!(header.sha256, digest);
    assert_eq!(
        hash_file(&back).await.expect("hash"),
        (size, digest.clone())
    );

    // A partial download resumes from where it stopped.
    let resumed = local.path().join("resumed.bin");
    let partial_bytes = std::fs::read(&source).expect("read")[..10 * 1024 * 1024].to_vec();
    std::fs::write(partial_path(&resumed), &partial_bytes).expect("partial");
    let header = client
        .download("releases/app.bin", &resumed, true)
        .await
        .expect("resume");
    assert_eq!(header.offset, partial_bytes.len() as u64);
    assert_eq!(
        hash_file(&resumed).await.expect("hash"),
        (size, digest.clone())
    );

    // A corrupt partial file is caught by the end-to-end digest.
    let corrupt = local.path().join("corrupt.bin");
    std::fs::write(partial_path(&corrupt), vec![0u8; 1024]).expect("partial");
    let err = client
        .download("releases/app.bin", &corrupt, true)
        .await
        .expect_err("corrupt");
    assert!(matches!(err, ClientError::Integrity { .. }), "{err}");
    assert!(!corrupt.exists() && !partial_path(&corrupt).exists());
}

async fn paths_outside_the_files_root_are_refused(mode: Mode) {
    let fixture = Fixture::start(mode, "[files]\nmin_free_bytes = 0\n").await;
    let (agent, client) = (&fixture.agent, &fixture.client);
    let outside = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(outside.path(), agent.home().join("files/escape")).expect("symlink");
    let local = tempfile::tempdir().expect("tempdir");
    let source = random_file(local.path(), 1000);

    for remote in [
        "../tentacle.toml",
        "a/../../x",
        "/etc/passwd",
        "escape/planted",
    ] {
        match client.upload(&source, remote, 4096).await {
            Err(ClientError::Rpc(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{remote}: {status:?}")
            }
            other => panic!("upload to {remote} was not refused: {other:?}"),
        }
        let status = client
            .files()
            .download_file(pb::DownloadFileRequest {
                path: remote.into(),
                offset: 0,
            })
            .await
            .expect_err("download refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{remote}: {status:?}");
    }
    assert!(
        std::fs::read_dir(outside.path())
            .expect("dir")
            .next()
            .is_none()
    );
}

async fn a_wrong_digest_leaves_nothing_at_the_destination(mode: Mode) {
    let fixture = Fixture::start(mode, "[files]\nmin_free_bytes = 0\n").await;
    let (agent, client) = (&fixture.agent, &fixture.client);
    let header = pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Header(pb::UploadHeader {
            path: "bad.bin".into(),
            size: 4,
            sha256: hex::encode(Sha256::digest(b"abcd")),
        })),
    };
    let chunk = pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Chunk(b"abce".to_vec())),
    };
    let status = client
        .files()
        .upload_file(tokio_stream::iter(vec![header, chunk]))
        .await
        .expect_err("digest mismatch");
    assert_eq!(status.code(), Code::DataLoss);

    // The digest may travel only in the trailer, after the bytes; a wrong
    // one is caught the same way, and so is one that never arrives.
    let trailer_only = pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Header(pb::UploadHeader {
            path: "bad.bin".into(),
            size: 4,
            sha256: String::new(),
        })),
    };
    let chunk = pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Chunk(b"abcd".to_vec())),
    };
    let wrong_trailer = pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Trailer(pb::UploadTrailer {
            sha256: hex::encode(Sha256::digest(b"abce")),
        })),
    };
    let status = client
        .files()
        .upload_file(tokio_stream::iter(vec![
            trailer_only.clone(),
            chunk.clone(),
            wrong_trailer,
        ]))
        .await
        .expect_err("trailer mismatch");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let status = client
        .files()
        .upload_file(tokio_stream::iter(vec![trailer_only, chunk]))
        .await
        .expect_err("no digest");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("trailer"), "{status:?}");

    let left: Vec<_> = std::fs::read_dir(agent.home().join("files"))
        .expect("files root")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The agent's peak resident memory in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

async fn agent_memory_stays_flat_during_a_large_upload(mode: Mode) {
    let fixture = Fixture::start(mode, "[files]\nmin_free_bytes = 0\n").await;
    let (agent, client) = (&fixture.agent, &fixture.client);
    let local = tempfile::tempdir().expect("tempdir");
    let source = random_file(local.path(), 256 * 1024 * 1024);
    client.capabilities().await.expect("connected");
    let before = peak_rss_kib(agent.pid());
    let stored = client
        .upload(&source, "big.bin", 256 * 1024)
        .await
        .expect("upload");
    assert_eq!(stored.size, 256 * 1024 * 1024);
    let after = peak_rss_kib(agent.pid());
    eprintln!("agent peak RSS: {before} KiB before, {after} KiB after a 256 MiB upload");
    // The file is 262,144 KiB; a streaming agent grows by a small fraction.
    assert!(
        after - before < 48 * 1024,
        "peak RSS grew by {} KiB",
        after - before
    );
}

async fn an_upload_that_would_fill_the_disk_is_refused_before_writing(mode: Mode) {
    // Demand more free space than any test machine has.
    let fixture = Fixture::start(mode, "[files]\nmin_free_bytes = 1000000000000000\n").await;
    let (agent, client) = (&fixture.agent, &fixture.client);
    let local = tempfile::tempdir().expect("tempdir");
    let source = random_file(local.path(), 1000);
    match client.upload(&source, "x.bin", 4096).await {
        Err(ClientError::Rpc(status)) => {
            assert_eq!(status.code(), Code::ResourceExhausted);
            assert!(
                status.message().contains("disk space"),
                "{}",
                status.message()
            );
        }
        other => panic!("upload was not refused: {other:?}"),
    }
    assert!(!agent.home().join("files/x.bin").exists());
}

in_both_modes!(
    a_64_mib_upload_and_download_round_trip_with_matching_hashes,
    super::a_64_mib_upload_and_download_round_trip_with_matching_hashes
);

in_both_modes!(
    paths_outside_the_files_root_are_refused,
    super::paths_outside_the_files_root_are_refused
);

in_both_modes!(
    a_wrong_digest_leaves_nothing_at_the_destination,
    super::a_wrong_digest_leaves_nothing_at_the_destination
);

in_both_modes!(
    agent_memory_stays_flat_during_a_large_upload,
    super::agent_memory_stays_flat_during_a_large_upload
);

in_both_modes!(
    an_upload_that_would_fill_the_disk_is_refused_before_writing,
    super::an_upload_that_would_fill_the_disk_is_refused_before_writing
);
