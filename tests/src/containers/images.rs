//! The images, built once per test process by `deploy/docker/build.sh` from
//! the binaries this test run uses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::docker::{humanize, image_exists, run_bounded};
use super::{IMAGE_TAG, IMAGES, say};

const TARGET: &str = "x86_64-unknown-linux-gnu";
const BINARIES: [&str; 3] = ["tentacle", "tentacle-hub", "tentacle-sim"];
/// A first build of every image downloads four Debian packages.
const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Building the workspace's static binaries from scratch.
const CARGO_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The workspace root (tests/..).
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Builds the images once for this process; `Err` says why they are not
/// there.
pub(crate) fn ensure() -> Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(build).clone()
}

fn build() -> Result<(), String> {
    let script = repo_root().join("deploy/docker/build.sh");
    if !script.is_file() {
        return Err(format!("{} is missing", script.display()));
    }
    let binaries = static_binaries()?;
    say(&format!(
        "building the images (tag {IMAGE_TAG}) from {}",
        binaries.display()
    ));
    let started = Instant::now();
    let output = run_bounded(
        Command::new(&script)
            .arg("--binaries")
            .arg(&binaries)
            .args(["--tag", IMAGE_TAG])
            .current_dir(repo_root()),
        BUILD_TIMEOUT,
    )?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "deploy/docker/build.sh failed ({}):\n{}",
            output.status,
            tail.join("\n")
        ));
    }
    for image in IMAGES {
        let image = format!("{image}:{IMAGE_TAG}");
        if !image_exists(&image) {
            return Err(format!(
                "deploy/docker/build.sh succeeded but {image} is missing"
            ));
        }
    }
    say(&format!(
        "images built in {}: {}",
        humanize(started.elapsed()),
        IMAGES.map(|i| format!("{i}:{IMAGE_TAG}")).join(", ")
    ));
    Ok(())
}

/// The directory of this run's binaries when they are static (tests/run.sh
/// builds them so); otherwise builds static ones from the same sources with
/// the contract's flags and returns where they are.
fn static_binaries() -> Result<PathBuf, String> {
    let dir = crate::bin("tentacle")
        .parent()
        .expect("a binary has a directory")
        .to_path_buf();
    let dynamic: Vec<&str> = BINARIES
        .into_iter()
        .filter(|name| !is_static(&dir.join(name)).unwrap_or(false))
        .collect();
    if dynamic.is_empty() {
        return Ok(dir);
    }
    // target/<profile> (a plain `cargo test`) or target/<triple>/<profile>.
    let profile = dir
        .file_name()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "debug".into());
    let target_dir = match dir.parent() {
        Some(parent) if parent.file_name().is_some_and(|n| n == TARGET) => parent.parent(),
        parent => parent,
    }
    .ok_or_else(|| format!("cannot tell the target directory from {}", dir.display()))?
    .to_path_buf();
    let static_dir = target_dir.join(TARGET).join(&profile);
    say(&format!(
        "{} in {} are dynamically linked (a plain `cargo test` build); the images need static ones, \
         so building them into {} (cargo build --target {TARGET} --bins, crt-static). \
         tests/run.sh builds static binaries to begin with.",
        dynamic.join(", "),
        dir.display(),
        static_dir.display()
    ));
    let started = Instant::now();
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .args(["build", "--workspace", "--bins", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .current_dir(repo_root());
    if profile == "release" {
        cargo.arg("--release");
    }
    let output = run_bounded(&mut cargo, CARGO_TIMEOUT)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "building the static binaries failed ({}):\n{}",
            output.status,
            tail.join("\n")
        ));
    }
    for name in BINARIES {
        if !is_static(&static_dir.join(name))? {
            return Err(format!(
                "{} is still not statically linked",
                static_dir.join(name).display()
            ));
        }
    }
    say(&format!(
        "static binaries built in {}",
        humanize(started.elapsed())
    ));
    Ok(static_dir)
}

/// Whether `path` is an ELF executable without a program interpreter
/// (PT_INTERP): static, or static-pie.
pub(crate) fn is_static(path: &Path) -> Result<bool, String> {
    use std::io::{Read, Seek, SeekFrom};
    let fail = |error: std::io::Error| format!("{}: {error}", path.display());
    let mut file = std::fs::File::open(path).map_err(fail)?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header).map_err(fail)?;
    // 64-bit little-endian ELF only: this suite runs on x86_64.
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(format!(
            "{} is not a 64-bit little-endian ELF",
            path.display()
        ));
    }
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().expect("8 bytes"));
    let phentsize = u64::from(u16::from_le_bytes([header[0x36], header[0x37]]));
    let phnum = u16::from_le_bytes([header[0x38], header[0x39]]);
    for index in 0..u64::from(phnum) {
        file.seek(SeekFrom::Start(phoff + index * phentsize))
            .map_err(fail)?;
        let mut kind = [0u8; 4];
        file.read_exact(&mut kind).map_err(fail)?;
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(kind) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with program headers of these types.
    fn elf(program_headers: &[u32]) -> tempfile::NamedTempFile {
        let mut bytes = vec![0u8; 64];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2; // 64-bit
        bytes[5] = 1; // little endian
        bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        let count = u16::try_from(program_headers.len()).expect("few headers");
        bytes[0x38..0x3a].copy_from_slice(&count.to_le_bytes()); // e_phnum
        for kind in program_headers {
            let mut header = vec![0u8; 56];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            bytes.extend(header);
        }
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), bytes).expect("write");
        file
    }

    #[test]
    fn an_executable_with_an_interpreter_is_dynamically_linked() {
        const PT_LOAD: u32 = 1;
        const PT_INTERP: u32 = 3;
        const PT_DYNAMIC: u32 = 2;
        assert_eq!(
            is_static(elf(&[PT_LOAD, PT_INTERP, PT_DYNAMIC]).path()),
            Ok(false)
        );
        // static-pie has PT_DYNAMIC but no interpreter.
        assert_eq!(is_static(elf(&[PT_LOAD, PT_DYNAMIC]).path()), Ok(true));
        let text = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(
            text.path(),
            "#!/bin/sh\necho not an ELF file at all, just text\n",
        )
        .expect("write");
        assert!(is_static(text.path()).is_err());
    }
}
