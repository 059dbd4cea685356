//! `tentacle service --print` and `tentacle-hub service --print` render
//! hardened units that `systemd-analyze verify` (Debian's `systemd`
//! package) accepts without a word.
//!
//! `verify` checks that ExecStart's binary exists, so the printed units run
//! the binaries under test (the verb's ExecStart is the running executable).
//! It does not look up `User=`, so the default accounts need not exist here.
//! Without `systemd-analyze` the tests fail when `CI=true`, and otherwise
//! print what they skipped and pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use tentacle_proto::systemd::{self, Installation};
use tentacle_tests::bin;

const AGENT_FILE: &str = include_str!("../../../deploy/systemd/tentacle.service");
const HUB_FILE: &str = include_str!("../../../deploy/systemd/tentacle-hub.service");

/// Whether `systemd-analyze` can run; panics under `CI=true` when it cannot.
fn have_systemd_analyze(test: &str) -> bool {
    let why = match Command::new("systemd-analyze").arg("--version").output() {
        Ok(output) if output.status.success() => return true,
        Ok(output) => format!("`systemd-analyze --version` exited with {}", output.status),
        Err(error) => format!("systemd-analyze: {error}"),
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "systemd-analyze is missing while CI=true ({why}): install Debian's `systemd` package \
         (apt-get install -y systemd)"
    );
    eprintln!(
        "SKIPPED systemd::{test}: systemd-analyze is missing ({why}); \
         `apt-get install -y systemd` runs it"
    );
    false
}

/// `PROGRAM service --print ARGS` with a predictable environment: no home
/// variables, HOME=/root (as under sudo).
fn print(program: &str, args: &[&str]) -> String {
    let output = Command::new(bin(program))
        .args(["service", "--print"])
        .args(args)
        .env_remove("TENTACLE_HOME")
        .env_remove("TENTACLE_HUB_HOME")
        .env_remove("TENTACLE_SIM_HOME")
        .env("HOME", "/root")
        .output()
        .expect("run service --print");
    assert!(
        output.status.success(),
        "{program} service --print {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the unit is UTF-8")
}

/// Writes `units` into `dir` and runs `systemd-analyze verify` on them;
/// fails on a non-zero exit or any line about them.
fn verify(dir: &Path, units: &[(&str, &str)]) {
    let paths: Vec<PathBuf> = units
        .iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write unit");
            path
        })
        .collect();
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("run systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "systemd-analyze verify {units:?}:\n{said}",
        units = units.iter().map(|u| u.0).collect::<Vec<_>>()
    );
    let about_ours: Vec<&str> = said
        .lines()
        .filter(|line| {
            units.iter().any(|(name, _)| line.contains(name))
                || line.contains(&*dir.to_string_lossy())
        })
        .collect();
    assert!(
        output.status.success() && about_ours.is_empty(),
        "systemd-analyze verify rejected the units ({}):\n{said}\n{}",
        output.status,
        units
            .iter()
            .map(|(name, text)| format!("--- {name}\n{text}"))
            .collect::<String>()
    );
}

#[test]
fn printed_units_pass_systemd_analyze_verify() {
    // The verb's output matches deploy/systemd/ but for the binaries' paths.
    let agent = print("tentacle", &[]);
    let hub = print("tentacle-hub", &["--", "--listen", "0.0.0.0:10943"]);
    let agent_bin = bin("tentacle").display().to_string();
    let hub_bin = bin("tentacle-hub").display().to_string();
    assert_eq!(
        agent.replace(&agent_bin, "/usr/local/bin/tentacle"),
        AGENT_FILE,
        "`tentacle service --print` differs from deploy/systemd/tentacle.service"
    );
    assert_eq!(
        hub.replace(&hub_bin, "/usr/local/bin/tentacle-hub"),
        HUB_FILE,
        "`tentacle-hub service --print -- --listen 0.0.0.0:10943` differs from deploy/systemd/tentacle-hub.service"
    );
    let named = print(
        "tentacle",
        &[
            "--instance",
            "blue",
            "--user",
            "root",
            "--read-write",
            "/tmp",
        ],
    );
    assert!(
        named.contains("\nReadWritePaths=/var/lib/tentacle-blue /tmp\n"),
        "{named}"
    );
    if !have_systemd_analyze("printed_units_pass_systemd_analyze_verify") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    verify(
        dir.path(),
        &[
            ("tentacle.service", &agent),
            ("tentacle-hub.service", &hub),
            ("tentacle-blue.service", &named),
        ],
    );
}

/// systemd parses the quoting: a binary path with a space is found (verify
/// checks it), and tricky arguments raise no quoting or escape warnings.
#[test]
fn tricky_arguments_pass_systemd_analyze_verify() {
    if !have_systemd_analyze("tricky_arguments_pass_systemd_analyze_verify") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = dir.path().join("hub with space %n");
    std::fs::copy(bin("tentacle-hub"), &exe).expect("copy the binary");
    let installation = Installation {
        exe: exe.clone(),
        home: dir.path().join("home 100% \"quoted\" \\"),
        user: "root".to_owned(),
        instance: Some("tricky".to_owned()),
        read_write: vec![dir.path().join("a b"), dir.path().join("50%")],
    };
    let server_args: Vec<String> = [
        "--listen",
        "0.0.0.0:10943",
        "--pickup-timeout=1m",
        "two words",
        "$HOME ${HOME}",
        "%n%i",
        ";",
        "a\"b'c\\d",
        "",
        "line\nbreak\ttab",
    ]
    .map(str::to_owned)
    .to_vec();
    let spec = systemd::hub_unit(&installation, &server_args).expect("unit");
    let unit = systemd::render(&spec);
    verify(dir.path(), &[("tentacle-hub-tricky.service", &unit)]);
    // And a missing binary is noticed, so the check above means something.
    std::fs::remove_file(&exe).expect("remove");
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("tentacle-hub-tricky.service"))
        .output()
        .expect("verify");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not executable"),
        "verify should miss the binary: {stderr}"
    );
}
