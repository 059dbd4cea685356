use super::*;

fn files() -> (tempfile::TempDir, Files) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = FileSettings::new(dir.path().join("files"));
    settings.min_free_bytes = 0;
    settings.chunk_bytes = 7;
    let files = Files::new(settings).expect("files");
    (dir, files)
}

fn chunks(parts: &[&[u8]]) -> impl Stream<Item = Result<Vec<u8>, FileError>> + Unpin {
    futures::stream::iter(parts.iter().map(|p| Ok(p.to_vec())).collect::<Vec<_>>())
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn header(path: &str, bytes: &[u8]) -> UploadHeader {
    UploadHeader {
        path: path.into(),
        size: bytes.len() as u64,
        sha256: sha(bytes),
    }
}

/// The parts of an upload whose digest comes only in the trailer.
fn with_trailer(
    parts: &[&[u8]],
    sha256: String,
) -> impl Stream<Item = Result<UploadPart, FileError>> + Unpin {
    let mut all: Vec<_> = parts
        .iter()
        .map(|p| Ok(UploadPart::Chunk(p.to_vec())))
        .collect();
    all.push(Ok(UploadPart::Trailer { sha256 }));
    futures::stream::iter(all)
}

fn trailer_only(path: &str, bytes: &[u8]) -> UploadHeader {
    UploadHeader {
        sha256: String::new(),
        ..header(path, bytes)
    }
}

/// Every part of a download: the chunks' bytes, then the trailer's digest,
/// or the error that ended it.
async fn drain(download: &mut Download) -> (Vec<u8>, Result<String, FileError>) {
    let mut got = Vec::new();
    while let Some(part) = download.parts.recv().await {
        match part {
            Ok(DownloadPart::Chunk(chunk)) => {
                assert!(chunk.len() <= 7, "chunks keep to chunk_bytes");
                got.extend(chunk);
            }
            Ok(DownloadPart::Trailer { sha256 }) => {
                assert!(download.parts.recv().await.is_none(), "the trailer is last");
                return (got, Ok(sha256));
            }
            Err(error) => return (got, Err(error)),
        }
    }
    panic!("the download ended without a trailer or an error");
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn upload_then_download_round_trips_and_resumes() {
    let (_dir, files) = files();
    let body = b"hello tentacle, this is a file";
    let stored = files
        .upload(header("a/b.txt", body), chunks(&[&body[..10], &body[10..]]))
        .await
        .expect("upload");
    assert_eq!(stored.size, body.len() as u64);
    assert_eq!(stored.sha256, sha(body));
    assert_eq!(
        std::fs::read(files.root().join("a/b.txt")).expect("read"),
        body
    );

    let mut whole = files.download("a/b.txt", 0).await.expect("download");
    assert_eq!((whole.size, whole.offset), (body.len() as u64, 0));
    let (got, trailer) = drain(&mut whole).await;
    assert_eq!((got, trailer.expect("trailer")), (body.to_vec(), sha(body)));

    // A resumed download sends only the rest, but its trailer still covers
    // the whole file.
    let mut resumed = files.download("a/b.txt", 6).await.expect("download");
    assert_eq!(resumed.offset, 6);
    let (got, trailer) = drain(&mut resumed).await;
    assert_eq!(got, &body[6..]);
    assert_eq!(trailer.expect("trailer"), sha(body));

    let mut at_end = files
        .download("a/b.txt", body.len() as u64)
        .await
        .expect("download");
    let (got, trailer) = drain(&mut at_end).await;
    assert!(got.is_empty());
    assert_eq!(trailer.expect("trailer"), sha(body));
}

#[tokio::test]
async fn a_file_that_changes_size_during_a_download_fails_it() {
    let (_dir, files) = files();
    let body = vec![b'x'; 100];
    files
        .upload(header("grows.bin", &body), chunks(&[&body]))
        .await
        .expect("upload");
    files
        .upload(header("shrinks.bin", &body), chunks(&[&body]))
        .await
        .expect("upload");
    // Two parts are in flight at most, so the sender cannot reach the end
    // of either file before the change below.
    let mut grows = files.download("grows.bin", 0).await.expect("download");
    let mut shrinks = files.download("shrinks.bin", 0).await.expect("download");
    let mut append = std::fs::OpenOptions::new()
        .append(true)
        .open(files.root().join("grows.bin"))
        .expect("open");
    std::io::Write::write_all(&mut append, b"more").expect("append");
    std::fs::OpenOptions::new()
        .write(true)
        .open(files.root().join("shrinks.bin"))
        .expect("open")
        .set_len(50)
        .expect("truncate");

    let (_, grown) = drain(&mut grows).await;
    assert!(
        matches!(
            grown,
            Err(FileError::ChangedDuringDownload {
                expected: 100,
                actual: 104,
                ..
            })
        ),
        "{grown:?}"
    );
    let (got, shrunk) = drain(&mut shrinks).await;
    assert!(got.len() <= 50);
    assert!(
        matches!(
            shrunk,
            Err(FileError::ChangedDuringDownload {
                expected: 100,
                actual: 50,
                ..
            })
        ),
        "{shrunk:?}"
    );
}

#[tokio::test]
async fn an_upload_may_carry_its_digest_only_in_the_trailer() {
    let (_dir, files) = files();
    let body = b"hashed while it streamed";
    let stored = files
        .upload_parts(
            trailer_only("t/only.txt", body),
            with_trailer(&[&body[..5], &body[5..]], sha(body)),
        )
        .await
        .expect("upload");
    assert_eq!((stored.size, stored.sha256), (body.len() as u64, sha(body)));
    assert_eq!(
        std::fs::read(files.root().join("t/only.txt")).expect("read"),
        body
    );
    // With a digest in the header as well, a matching trailer is accepted.
    files
        .upload_parts(header("t/both.txt", body), with_trailer(&[body], sha(body)))
        .await
        .expect("both digests match");
    assert_eq!(leftovers(&files.root().join("t")).len(), 2);
}

#[tokio::test]
async fn a_mismatching_trailer_leaves_nothing_behind() {
    let (_dir, files) = files();
    files
        .upload(header("keep.txt", b"old"), chunks(&[b"old"]))
        .await
        .expect("first upload");
    let body = b"new bytes";
    let err = files
        .upload_parts(
            trailer_only("keep.txt", body),
            with_trailer(&[body], sha(b"other")),
        )
        .await
        .expect_err("trailer digest");
    assert!(matches!(err, FileError::DigestMismatch { .. }), "{err}");
    // A header digest that is right does not excuse a wrong trailer.
    let err = files
        .upload_parts(
            header("keep.txt", body),
            with_trailer(&[body], sha(b"other")),
        )
        .await
        .expect_err("trailer disagrees with the header");
    assert!(matches!(err, FileError::DigestMismatch { .. }), "{err}");
    let err = files
        .upload_parts(
            trailer_only("keep.txt", body),
            with_trailer(&[body], "not hex".into()),
        )
        .await
        .expect_err("bad trailer");
    assert!(matches!(err, FileError::BadRequest(_)), "{err}");
    assert_eq!(
        std::fs::read(files.root().join("keep.txt")).expect("read"),
        b"old"
    );
    assert_eq!(leftovers(files.root()), ["keep.txt"]);
}

#[tokio::test]
async fn an_upload_without_a_trailer_or_header_digest_is_refused() {
    for sink in [UploadSink::Store, UploadSink::Discard] {
        let (_dir, mut files) = files();
        files.settings.upload_sink = sink;
        let body = b"unverifiable";
        let err = files
            .upload(trailer_only("none.bin", body), chunks(&[body]))
            .await
            .expect_err("no digest at all");
        assert!(matches!(err, FileError::MissingDigest), "{sink:?}: {err}");
        assert!(leftovers(files.root()).is_empty(), "{sink:?}");
    }
}

#[tokio::test]
async fn nothing_may_follow_the_trailer() {
    let (_dir, files) = files();
    let body = b"abc";
    let parts = futures::stream::iter(vec![
        Ok(UploadPart::Chunk(body.to_vec())),
        Ok(UploadPart::Trailer { sha256: sha(body) }),
        Ok(UploadPart::Chunk(b"late".to_vec())),
    ]);
    let err = files
        .upload_parts(trailer_only("late.bin", body), parts)
        .await
        .expect_err("bytes after the trailer");
    assert!(matches!(err, FileError::BadRequest(_)), "{err}");
    assert!(leftovers(files.root()).is_empty());
}

#[tokio::test]
async fn a_wrong_digest_or_size_leaves_nothing_behind() {
    let (_dir, files) = files();
    let body = b"some bytes";
    let mut wrong = header("x.bin", body);
    wrong.sha256 = sha(b"other");
    let err = files
        .upload(wrong, chunks(&[body]))
        .await
        .expect_err("digest");
    assert!(matches!(err, FileError::DigestMismatch { .. }), "{err}");
    let short = files
        .upload(header("x.bin", body), chunks(&[&body[..3]]))
        .await;
    assert!(matches!(
        short,
        Err(FileError::SizeMismatch { received: 3, .. })
    ));
    let long = files
        .upload(header("x.bin", &body[..3]), chunks(&[body]))
        .await;
    assert!(matches!(long, Err(FileError::BadRequest(_))));
    assert!(
        leftovers(files.root()).is_empty(),
        "{:?}",
        leftovers(files.root())
    );
}

#[tokio::test]
async fn a_broken_stream_keeps_the_old_file() {
    let (_dir, files) = files();
    files
        .upload(header("keep.txt", b"old"), chunks(&[b"old"]))
        .await
        .expect("first upload");
    let broken = futures::stream::iter(vec![
        Ok(b"new".to_vec()),
        Err(FileError::BadRequest("client went away".into())),
    ]);
    let result = files.upload(header("keep.txt", b"newer"), broken).await;
    assert!(result.is_err());
    assert_eq!(
        std::fs::read(files.root().join("keep.txt")).expect("read"),
        b"old"
    );
    assert_eq!(leftovers(files.root()), ["keep.txt"]);
}

#[tokio::test]
async fn limits_and_bad_requests_are_refused_clearly() {
    let (_dir, mut files) = files();
    files.settings.max_upload_bytes = 4;
    let too_big = files
        .upload(header("big", b"12345"), chunks(&[b"12345"]))
        .await;
    assert!(matches!(
        too_big,
        Err(FileError::TooLarge { size: 5, limit: 4 })
    ));
    let mut bad = header("f", b"x");
    bad.sha256 = "nothex".into();
    assert!(matches!(
        files.upload(bad, chunks(&[b"x"])).await,
        Err(FileError::BadRequest(_))
    ));
    assert!(matches!(
        files
            .upload(header("../escape", b"x"), chunks(&[b"x"]))
            .await,
        Err(FileError::Path(PathError::ParentComponent(_)))
    ));
    assert!(matches!(
        files.download("missing", 0).await,
        Err(FileError::NotFound(_))
    ));
    files.settings.max_upload_bytes = 100;
    files
        .upload(header("small", b"abc"), chunks(&[b"abc"]))
        .await
        .expect("upload");
    assert!(matches!(
        files.download("small", 4).await,
        Err(FileError::OffsetBeyondEnd { size: 3, .. })
    ));
}

#[tokio::test]
async fn a_discarding_sink_verifies_but_stores_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = FileSettings::new(dir.path().to_owned());
    settings.upload_sink = UploadSink::Discard;
    settings.free_space = Arc::new(FakeFreeSpace::new(u64::MAX));
    let files = Files::new(settings).expect("files");
    let body = b"virtual agents hash and drop uploads";
    let info = files
        .upload(header("pkg/a.bin", body), chunks(&[&body[..7], &body[7..]]))
        .await
        .expect("a matching upload is accepted");
    assert_eq!((info.size, info.sha256), (body.len() as u64, sha(body)));
    assert!(leftovers(dir.path()).is_empty(), "nothing is written");
    let mut wrong = header("pkg/b.bin", body);
    wrong.sha256 = sha(b"something else");
    assert!(matches!(
        files.upload(wrong, chunks(&[body])).await,
        Err(FileError::DigestMismatch { .. })
    ));
    assert!(matches!(
        files
            .upload(header("pkg/c.bin", body), chunks(&[&body[..3]]))
            .await,
        Err(FileError::SizeMismatch { .. })
    ));
}

#[tokio::test]
async fn the_free_space_probe_refuses_uploads_in_either_sink() {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = Arc::new(FakeFreeSpace::new(1000));
    let body = b"forty bytes of payload, give or take....";
    for sink in [UploadSink::Store, UploadSink::Discard] {
        let root = dir.path().join(format!("{sink:?}"));
        let mut settings = FileSettings::new(root.clone());
        settings.min_free_bytes = 990;
        settings.upload_sink = sink;
        settings.free_space = disk.clone();
        let files = Files::new(settings).expect("files");
        disk.set(1000);
        let refused = files
            .upload(header("a.bin", body), chunks(&[body]))
            .await
            .expect_err("the reserve would be used up");
        assert!(
            matches!(
                refused,
                FileError::DiskFull {
                    available: 1000,
                    reserve: 990,
                    ..
                }
            ),
            "{sink:?}: {refused}"
        );
        assert!(!root.join("a.bin").exists(), "{sink:?}: nothing was stored");
        disk.set(1_000_000);
        files
            .upload(header("a.bin", body), chunks(&[body]))
            .await
            .expect("room again");
        assert_eq!(
            root.join("a.bin").exists(),
            sink == UploadSink::Store,
            "{sink:?}"
        );
    }
}
