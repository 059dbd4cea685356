//! Hostile and broken input to the agent's files, packages and scripts,
//! over real mutual TLS in both modes: path escapes (traversal, absolute
//! paths, symlinks, zip-slip, tar links), uploads whose digest or size lie,
//! and odd bytes and shell metacharacters. In every case the agent refuses
//! clearly or passes the input through literally, writes nothing outside
//! its roots, and keeps serving.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tentacle_hub::client::AgentClient;
use tentacle_proto::v1 as pb;
use tentacle_tests::{
    AgentProcess, Fixture, Mode, bash, client_identity, in_both_modes, run_to_end,
};
use tonic::Code;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every path under `root`, relative to it, sorted.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, into: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            into.push(
                path.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string(),
            );
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &path, into);
            }
        }
    }
    let mut paths = Vec::new();
    walk(root, root, &mut paths);
    paths.sort();
    paths
}

async fn upload(
    client: &AgentClient,
    path: &str,
    bytes: &[u8],
    claimed_size: u64,
    claimed_sha256: &str,
) -> Result<pb::UploadFileResponse, tonic::Status> {
    use pb::upload_file_request::Part;
    let mut messages = vec![pb::UploadFileRequest {
        part: Some(Part::Header(pb::UploadHeader {
            path: path.to_owned(),
            size: claimed_size,
            sha256: claimed_sha256.to_owned(),
        })),
    }];
    messages.extend(bytes.chunks(8 * 1024).map(|chunk| pb::UploadFileRequest {
        part: Some(Part::Chunk(chunk.to_vec())),
    }));
    client
        .files()
        .upload_file(futures::stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

async fn download(client: &AgentClient, path: &str) -> Result<Vec<u8>, tonic::Status> {
    use pb::download_file_response::Part;
    let mut stream = client
        .files()
        .download_file(pb::DownloadFileRequest {
            path: path.to_owned(),
            offset: 0,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await? {
        if let Some(Part::Chunk(chunk)) = message.part {
            bytes.extend_from_slice(&chunk);
        }
    }
    Ok(bytes)
}

/// The refusal is one clear status, not a broken connection.
fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::PermissionDenied | Code::FailedPrecondition
        ),
        "{what}: {status:?}"
    );
    assert!(!status.message().is_empty(), "{what}: no message");
}

/// Still serving a trusted client after the hostile input.
async fn assert_serving(client: &AgentClient) {
    let (lines, code) = run_to_end(client, bash("echo still serving")).await;
    assert_eq!(code, 0);
    assert!(lines.iter().any(|l| l.text == "still serving"));
}

async fn path_escapes_are_refused_on_upload_and_download(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    let home = fixture.agent.home().to_path_buf();
    let outside = tempfile::tempdir().expect("outside dir");
    std::fs::write(outside.path().join("secret"), "outside the root").expect("secret");
    let files = home.join("files");
    std::fs::create_dir_all(&files).expect("files root");
    std::os::unix::fs::symlink(outside.path(), files.join("link")).expect("symlink");
    let before_home = tree(&home);

    let body = b"planted";
    let sha = sha256_hex(body);
    for path in [
        "../escape.txt",
        "a/../../escape.txt",
        "/tmp/tentacle-absolute-escape.txt",
        "link/planted.txt",
        "",
    ] {
        let result = upload(client, path, body, body.len() as u64, &sha).await;
        assert_refused(result, &format!("upload to {path:?}"));
    }
    for path in [
        "../tentacle.toml",
        "/etc/passwd",
        "link/secret",
        "../files/../../x",
    ] {
        assert_refused(
            download(client, path).await,
            &format!("download of {path:?}"),
        );
    }
    assert_eq!(
        tree(outside.path()),
        ["secret"],
        "something was written through the symlink"
    );
    assert!(!Path::new("/tmp/tentacle-absolute-escape.txt").exists());
    let mut after_home = tree(&home);
    // The agent's own log and state may grow; no new file may appear.
    after_home.retain(|p| !before_home.contains(p) && !p.starts_with("work"));
    assert!(
        after_home.is_empty(),
        "new files in the home: {after_home:?}"
    );

    upload(client, "inside/ok.txt", body, body.len() as u64, &sha)
        .await
        .expect("a proper upload still works");
    assert_eq!(
        download(client, "inside/ok.txt").await.expect("download"),
        body
    );
    assert_serving(client).await;
}

in_both_modes!(
    path_escapes_are_refused_on_upload_and_download,
    super::path_escapes_are_refused_on_upload_and_download
);

async fn uploads_whose_digest_or_size_lie_leave_nothing_behind(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    let files = fixture.agent.home().join("files");
    let body = vec![42u8; 100 * 1024];
    let sha = sha256_hex(&body);
    let wrong_sha = sha256_hex(b"something else");
    let before = tree(&files);
    let cases: [(&str, u64, &str); 4] = [
        ("wrong digest", body.len() as u64, &wrong_sha),
        ("claims more bytes", body.len() as u64 + 1, &sha),
        ("claims fewer bytes", body.len() as u64 - 1, &sha),
        ("malformed digest", body.len() as u64, "not-hex"),
    ];
    for (what, size, digest) in cases {
        let result = upload(client, "lie/target.bin", &body, size, digest).await;
        let status = result.expect_err(what);
        assert!(
            matches!(
                status.code(),
                Code::InvalidArgument | Code::DataLoss | Code::FailedPrecondition
            ),
            "{what}: {status:?}"
        );
        assert!(!status.message().is_empty(), "{what}");
        let left: Vec<String> = tree(&files)
            .into_iter()
            .filter(|p| !before.contains(p) && p != "lie")
            .collect();
        assert!(left.is_empty(), "{what} left {left:?}");
    }
    assert!(!files.join("lie/target.bin").exists());
    upload(client, "lie/target.bin", &body, body.len() as u64, &sha)
        .await
        .expect("the honest upload");
    assert_serving(client).await;
}

in_both_modes!(
    uploads_whose_digest_or_size_lie_leave_nothing_behind,
    super::uploads_whose_digest_or_size_lie_leave_nothing_behind
);

fn tar_gz(build: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<Vec<u8>>>)) -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    build(&mut builder);
    builder.into_inner().expect("tar").finish().expect("gzip")
}

/// A tar entry whose name or link is written raw, as an attacker would,
/// bypassing the tar crate's own path checks.
fn raw_entry(
    builder: &mut tar::Builder<flate2::write::GzEncoder<Vec<u8>>>,
    name: &[u8],
    kind: tar::EntryType,
    link: Option<&[u8]>,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    {
        let gnu = header.as_gnu_mut().expect("gnu header");
        gnu.name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link);
        }
    }
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, data).expect("append");
}

fn zip_slip() -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    writer.start_file("ok.txt", options).expect("start ok");
    writer.write_all(b"fine").expect("write");
    writer
        .start_file("../../../../tmp/tentacle-zip-slip.txt", options)
        .expect("start slip");
    writer.write_all(b"slipped").expect("write");
    writer.finish().expect("finish").into_inner()
}

async fn upload_package(client: &AgentClient, bytes: &[u8]) -> String {
    use pb::upload_package_request::Part;
    let sha = sha256_hex(bytes);
    let messages = vec![
        pb::UploadPackageRequest {
            part: Some(Part::Header(pb::PackageHeader {
                sha256: sha.clone(),
                size: bytes.len() as u64,
            })),
        },
        pb::UploadPackageRequest {
            part: Some(Part::Chunk(bytes.to_vec())),
        },
    ];
    client
        .packages()
        .upload_package(futures::stream::iter(messages))
        .await
        .expect("the archive itself is cached");
    sha
}

async fn hostile_packages_are_refused_at_extraction_and_leave_nothing(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    let outside = tempfile::tempdir().expect("outside");
    let outside_text = outside.path().display().to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zip-slip", zip_slip()),
        (
            "tar traversal",
            tar_gz(|b| raw_entry(b, b"../../escape.txt", tar::EntryType::Regular, None, b"x")),
        ),
        (
            "tar symlink out, then a file through it",
            tar_gz(|b| {
                raw_entry(
                    b,
                    b"link",
                    tar::EntryType::Symlink,
                    Some(outside_text.as_bytes()),
                    b"",
                );
                raw_entry(b, b"link/planted.txt", tar::EntryType::Regular, None, b"x");
            }),
        ),
        (
            "tar hard link to a file outside",
            tar_gz(|b| {
                raw_entry(
                    b,
                    b"passwd",
                    tar::EntryType::Link,
                    Some(b"/etc/passwd"),
                    b"",
                )
            }),
        ),
    ];
    for (index, (what, bytes)) in cases.iter().enumerate() {
        let sha = upload_package(client, bytes).await;
        let application = format!("hostile{index}");
        let result = client
            .packages()
            .extract_package(pb::ExtractPackageRequest {
                sha256: sha,
                application: application.clone(),
            })
            .await;
        assert_refused(result, what);
        let extracted = fixture
            .agent
            .home()
            .join("packages/apps")
            .join(&application);
        let left = tree(&extracted);
        assert!(
            left.is_empty(),
            "{what} left {left:?} in {}",
            extracted.display()
        );
    }
    assert!(tree(outside.path()).is_empty(), "written outside");
    assert!(!Path::new("/tmp/tentacle-zip-slip.txt").exists());
    assert!(!fixture.agent.home().join("escape.txt").exists());
    assert_serving(client).await;
}

in_both_modes!(
    hostile_packages_are_refused_at_extraction_and_leave_nothing,
    super::hostile_packages_are_refused_at_extraction_and_leave_nothing
);

async fn odd_bytes_and_shell_metacharacters_pass_through_literally(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    let marker = tempfile::tempdir().expect("marker dir");
    let pwned = marker.path().join("pwned");
    let arguments: Vec<String> = vec![
        format!("$(touch {})", pwned.display()),
        format!("`touch {}`", pwned.display()),
        format!("; touch {} #", pwned.display()),
        "a  b".into(),
        "'single'".into(),
        "\"double\"".into(),
        "*".into(),
        "$HOME".into(),
        "back\\slash".into(),
        "ünïcödé ✓ 😀".into(),
        "tab\there".into(),
        String::new(),
    ];
    // The bytes after `exit` are never run, but they are in the script
    // file, whose digest the script prints.
    let body = "printf 'sha %s\\n' \"$(sha256sum \"$0\" | cut -d' ' -f1)\"\n\
                for a in \"$@\"; do printf '[%s]\\n' \"$a\"; done\n\
                exit 0\n\
                \u{0}\u{1}\u{7f}\r\n\u{feff}é\u{1F600}\t\\ $(rm -rf /) `id` '\"\n";
    let request = pb::StartScriptRequest {
        arguments: arguments.clone(),
        ..bash(body)
    };
    let (lines, code) = run_to_end(client, request).await;
    assert_eq!(code, 0, "{lines:?}");
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(
        texts[0],
        format!("sha {}", sha256_hex(body.as_bytes())),
        "the script body reached the disk changed"
    );
    let expected: Vec<String> = arguments.iter().map(|a| format!("[{a}]")).collect();
    assert_eq!(
        texts[1..],
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(!pwned.exists(), "an argument was run by a shell");
    assert_serving(client).await;
}

in_both_modes!(
    odd_bytes_and_shell_metacharacters_pass_through_literally,
    super::odd_bytes_and_shell_metacharacters_pass_through_literally
);
/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (e.g. "16m"), or says why it cannot.
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (root is needed): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_whose_log_fills_the_disk_ends_cleanly_and_the_agent_keeps_serving() {
    let disk = match SmallDisk::mount("16m") {
        Ok(disk) => disk,
        Err(why) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipped: a_script_whose_log_fills_the_disk: {why}");
            return;
        }
        Err(why) => panic!("{why}"),
    };
    let me = client_identity();
    let work = disk.path().join("work");
    let agent = AgentProcess::start(
        &[me.thumbprint()],
        &format!("[scripts]\nwork_dir = {:?}\n", work.display().to_string()),
    );
    let client = agent.client(&me).await;

    // About 64 MB of output into a 16 MB disk.
    let flood = bash("echo first; yes 'a line that fills the disk' | head -n 2500000; echo last");
    let ticket = flood.ticket.clone();
    let run = tokio::time::timeout(Duration::from_secs(120), run_to_end(&client, flood))
        .await
        .expect("the flooding script ends within two minutes");
    let (lines, code) = run;
    assert_eq!(lines.first().map(|l| l.text.as_str()), Some("first"));
    let sequences: Vec<u64> = lines.iter().map(|l| l.sequence).collect();
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "the lines that were kept have no gaps or repeats"
    );
    let agent_lines: Vec<&str> = lines
        .iter()
        .filter(|l| l.stream == pb::LogStream::Agent as i32)
        .map(|l| l.text.as_str())
        .collect();
    assert!(
        agent_lines
            .iter()
            .any(|t| t.contains("disk") || t.contains("space")),
        "the caller is told the log filled the disk: {agent_lines:?} (exit code {code})"
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l.stream == pb::LogStream::Agent as i32
                && l.text
                    .contains("line(s) of the script's output were not kept")),
        "the log ends saying how much was lost: {:?}",
        lines.last()
    );
    assert_eq!(code, 0, "the script's own exit code is kept");

    // The agent serves a status for it, and serves other calls.
    let status = client
        .scripts()
        .get_status(pb::GetStatusRequest {
            ticket: ticket.clone(),
            ..Default::default()
        })
        .await
        .expect("status of the flooding script")
        .into_inner();
    assert_eq!(status.state, pb::ScriptState::Complete as i32);
    assert_eq!(status.exit_code, code);
    client
        .capabilities()
        .await
        .expect("capabilities while full");

    // Completing it frees the disk, and scripts run again.
    client.complete_script(&ticket).await.expect("complete");
    assert_serving(&client).await;
    assert!(tentacle_tests::process_alive(agent.pid() as i32));
}
