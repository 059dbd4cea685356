use std::io::Write;

use sha2::{Digest, Sha256};

use super::*;

fn packages(dir: &Path) -> Packages {
    let mut settings = PackageSettings::new(dir.join("cache"), dir.join("apps"));
    settings.min_free_bytes = 0;
    Packages::new(settings).expect("packages")
}

fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_path(path).expect("path");
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .expect("finish")
}

/// A tar.gz with one raw entry name, bypassing the builder's own checks.
fn hostile_tar_gz(name: &[u8], kind: tar::EntryType, link: Option<&[u8]>) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_entry_type(kind);
    if let Some(link) = link {
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    }
    header.set_size(if link.is_some() { 0 } else { 4 });
    header.set_mode(0o644);
    header.set_cksum();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let data: &[u8] = if link.is_some() { b"" } else { b"evil" };
    builder.append(&header, data).expect("append");
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .expect("finish")
}

fn zip_file(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (path, data) in entries {
        writer
            .start_file(*path, zip::write::SimpleFileOptions::default())
            .expect("start");
        writer.write_all(data).expect("write");
    }
    writer.finish().expect("finish").into_inner()
}

async fn cache(packages: &Packages, bytes: &[u8]) -> Result<String, PackageError> {
    let sha = hex::encode(Sha256::digest(bytes));
    let chunks = futures::stream::iter(vec![Ok(bytes.to_vec())]);
    packages.upload(&sha, bytes.len() as u64, chunks).await?;
    Ok(sha)
}

#[tokio::test]
async fn a_cached_package_is_extracted_once_per_application() {
    let dir = tempfile::tempdir().expect("tempdir");
    let packages = packages(dir.path());
    let bytes = tar_gz(&[
        ("app/run.sh", b"echo hi\n"),
        ("app/conf/a.toml", b"x = 1\n"),
    ]);
    let sha = hex::encode(Sha256::digest(&bytes));
    assert!(!packages.status(&sha).await.expect("status").present);
    cache(&packages, &bytes).await.expect("upload");
    let status = packages.status(&sha).await.expect("status");
    assert!(status.present);
    assert_eq!(status.size, bytes.len() as u64);

    let first = packages.extract(&sha, "web").await.expect("extract");
    assert_eq!((first.files, first.already), (2, false));
    assert_eq!(
        std::fs::read(first.path.join("app/run.sh")).expect("read"),
        b"echo hi\n"
    );
    let again = packages.extract(&sha, "web").await.expect("extract");
    assert!(again.already);
    assert_eq!(again.path, first.path);

    let zipped = zip_file(&[("bin/tool", b"tool"), ("README", b"read me")]);
    let zip_sha = cache(&packages, &zipped).await.expect("upload zip");
    let extracted = packages
        .extract(&zip_sha, "tools")
        .await
        .expect("extract zip");
    assert_eq!(extracted.files, 2);
    assert_eq!(
        std::fs::read(extracted.path.join("bin/tool")).expect("read"),
        b"tool"
    );
}

#[tokio::test]
async fn hostile_archives_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let packages = packages(dir.path());
    let cases = [
        hostile_tar_gz(b"../escape", tar::EntryType::Regular, None),
        hostile_tar_gz(b"/abs/escape", tar::EntryType::Regular, None),
        hostile_tar_gz(b"link", tar::EntryType::Symlink, Some(b"../../outside")),
        hostile_tar_gz(b"abs-link", tar::EntryType::Symlink, Some(b"/etc")),
    ];
    for (index, bytes) in cases.iter().enumerate() {
        let sha = cache(&packages, bytes).await.expect("upload");
        let err = packages.extract(&sha, "app").await.expect_err("refused");
        assert!(
            matches!(err, PackageError::Unsafe { .. }),
            "case {index}: {err}"
        );
    }
    assert!(!dir.path().join("escape").exists());
    let apps: Vec<_> = std::fs::read_dir(dir.path().join("apps/app"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(apps.is_empty(), "{apps:?}");
    let not_archive = cache(&packages, b"plain text").await.expect("upload");
    assert!(matches!(
        packages.extract(&not_archive, "app").await,
        Err(PackageError::UnknownFormat { .. })
    ));
}

#[tokio::test]
async fn bad_input_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let packages = packages(dir.path());
    assert!(matches!(
        packages.status("abc").await,
        Err(PackageError::BadDigest(_))
    ));
    let sha = "a".repeat(64);
    assert!(matches!(
        packages.extract(&sha, "app").await,
        Err(PackageError::NotCached(_))
    ));
    assert!(matches!(
        packages.extract(&sha, "../x").await,
        Err(PackageError::BadApplication(_))
    ));
    let wrong = futures::stream::iter(vec![Ok(b"data".to_vec())]);
    assert!(packages.upload(&sha, 4, wrong).await.is_err());
    assert!(!packages.status(&sha).await.expect("status").present);
}

#[tokio::test]
async fn the_cache_is_trimmed_least_recently_used_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = PackageSettings::new(dir.path().join("cache"), dir.path().join("apps"));
    settings.min_free_bytes = 0;
    settings.max_cache_bytes = 2500;
    let packages = Packages::new(settings).expect("packages");
    let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
    let mut shas = Vec::new();
    for blob in &blobs {
        shas.push(cache(&packages, blob).await.expect("upload"));
        // Distinct modification times.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let present: Vec<bool> = futures::future::join_all(shas.iter().map(|s| packages.status(s)))
        .await
        .into_iter()
        .map(|s| s.expect("status").present)
        .collect();
    assert_eq!(
        present,
        [false, true, true],
        "the oldest was evicted to fit 2500 bytes"
    );
}

#[tokio::test]
async fn package_uploads_ask_the_configured_free_space_probe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(crate::files::FakeFreeSpace::new(0));
    let mut settings = PackageSettings::new(dir.path().join("cache"), dir.path().join("apps"));
    settings.min_free_bytes = 0;
    settings.free_space = disk.clone();
    let packages = Packages::new(settings).expect("packages");
    let blob = vec![7u8; 100];
    let refused = cache(&packages, &blob)
        .await
        .expect_err("the fake disk is full");
    assert!(
        matches!(
            refused,
            PackageError::Transfer(FileError::DiskFull { available: 0, .. })
        ),
        "{refused}"
    );
    disk.set(1_000_000);
    let sha = cache(&packages, &blob)
        .await
        .expect("room on the fake disk");
    assert!(packages.status(&sha).await.expect("status").present);
}
