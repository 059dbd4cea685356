//! Stock (non-Rust) gRPC tooling against the real agent: Python's grpcio
//! with the standard health-checking and reflection packages, over mutual
//! TLS with the agent pinning the client's thumbprint.
//!
//! Needs the virtualenv that `tests/python/setup-venv.sh` creates at
//! `<workspace>/.venv` (or at `$TENTACLE_VENV`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tentacle_proto::Identity;
use tentacle_tests::{AgentProcess, client_identity};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_owned()
}

/// The virtualenv's python; fails (never skips) when it is missing.
fn venv_python() -> PathBuf {
    let venv = std::env::var_os("TENTACLE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv"));
    let python = venv.join("bin").join("python");
    assert!(
        python.is_file(),
        "{} is missing: run tests/python/setup-venv.sh to install the stock gRPC tooling \
         (grpcio, grpcio-health-checking, grpcio-reflection) these tests drive",
        python.display()
    );
    python
}

/// Saves `identity` as PEM files in `dir` and returns (certificate, key).
fn save(identity: &Identity, dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("client.crt.pem");
    let key = dir.join("client.key.pem");
    identity
        .save(&cert, &key)
        .expect("save the client identity");
    (cert, key)
}

/// Runs `tests/python/stock_client.py` against `agent` as `identity`.
fn stock_client(agent: &AgentProcess, identity: &Identity) -> Output {
    let python = venv_python();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = save(identity, dir.path());
    Command::new(python)
        .arg(workspace().join("tests/python/stock_client.py"))
        .arg("--target")
        .arg(agent.address.expect("listening").to_string())
        .arg("--server-cert")
        .arg(agent.home().join("tentacle.crt.pem"))
        .arg("--client-cert")
        .arg(&cert)
        .arg("--client-key")
        .arg(&key)
        .output()
        .expect("run stock_client.py")
}

#[test]
fn grpc_health_and_reflection_work_with_stock_python_tooling() {
    let me = client_identity();
    let agent = AgentProcess::start(&[me.thumbprint()], "");

    let output = stock_client(&agent, &me);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stock_client.py failed ({}): {stderr}\nstdout: {stdout}\nagent log:\n{}",
        output.status,
        agent.log_text()
    );

    assert!(
        stdout.contains(r#""health": "SERVING""#),
        "overall health: {stdout}"
    );
    assert!(
        stdout.contains(r#""script_health": "SERVING""#),
        "ScriptService health: {stdout}"
    );
    for service in [
        "tentacle.v1.ScriptService",
        "tentacle.v1.FileService",
        "tentacle.v1.CapabilitiesService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            stdout.contains(&format!(r#""{service}""#)),
            "reflection lists {service}: {stdout}"
        );
    }
    // Reflection serves whole descriptors too, not just names.
    assert!(
        stdout.contains(r#""StartScript""#),
        "ScriptService methods: {stdout}"
    );
}

#[test]
fn stock_python_tooling_with_an_untrusted_certificate_is_refused() {
    let trusted = client_identity();
    let stranger = client_identity();
    let agent = AgentProcess::start(&[trusted.thumbprint()], "");

    let output = stock_client(&agent, &stranger);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "an untrusted client must be refused, but stock_client.py succeeded: {stdout}"
    );
    assert!(stdout.trim().is_empty(), "no result on failure: {stdout}");
    assert!(
        stderr.contains("stock_client:"),
        "a one-line error: {stderr}"
    );

    assert!(
        agent.wait_for_log("refused", Duration::from_secs(5)),
        "the agent logs the refusal; log:\n{}",
        agent.log_text()
    );
    assert!(
        agent
            .log_text()
            .contains(&stranger.thumbprint().to_string()),
        "the agent logs the refused thumbprint; log:\n{}",
        agent.log_text()
    );
}
