//! Starting the way a container does, without Docker: `tentacle-hub server
//! --from-env` and `tentacle run --from-env` configured only by environment
//! variables, on loopback.
//!
//! Agents register themselves (one before its hub is up, so it retries),
//! restart with the same environment without registering again (a one-time
//! token would be refused the second time), and stay reachable; `probe`
//! follows readiness; a bad variable or a refused credential stops the
//! start with one line that never shows the secret.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tentacle_tests::{bin, free_port, stdout_of};

const HUB_API_KEY: &str = "container-test-api-key-0123456789";

/// A command with none of this shell's TENTACLE_* or proxy variables, so
/// only what a test sets reaches the program.
fn clean(program: &str) -> Command {
    let mut command = Command::new(bin(program));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("TENTACLE_") || name.to_ascii_uppercase().ends_with("_PROXY") {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "info");
    command
}

/// A running program whose stderr is collected line by line.
#[derive(Debug)]
struct Process {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("log").push(line);
            }
        });
        Self {
            child: Some(child),
            log,
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(line) = self
                .log
                .lock()
                .expect("log")
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no `{needle}` in the log:\n{}", self.log_text());
    }

    /// Waits for the exit (up to `timeout`) and returns its code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("still running after {timeout:?}:\n{}", self.log_text());
    }

    /// SIGTERM, as `docker stop` sends, and the exit code.
    fn stop(&mut self) -> Option<i32> {
        let pid = self.child.as_ref().map(Child::id)?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in `{line}`"))
}

/// `tentacle run --from-env` in `home` with `vars`.
fn agent(home: &Path, vars: &[(&str, String)]) -> Process {
    let mut command = clean("tentacle");
    command.arg("--home").arg(home).args(["run", "--from-env"]);
    command.envs(vars.iter().map(|(k, v)| (k, v)));
    Process::spawn(command)
}

/// `probe` of one binary against `address`: (exit code, stderr).
fn probe(program: &str, address: SocketAddr) -> (Option<i32>, String) {
    let output = clean(program)
        .args([
            "probe",
            "--address",
            &address.to_string(),
            "--timeout",
            "2s",
        ])
        .output()
        .expect("run probe");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    )
}

/// Polls `probe` until it exits 0.
fn wait_until_ready(program: &str, address: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, stderr) = probe(program, address);
        if code == Some(0) {
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `tentacle-hub` with the hub's identity from files outside its home.
fn hub_cli(home: &Path, identity: &Path, args: &[&str]) -> Output {
    clean("tentacle-hub")
        .arg("--home")
        .arg(home)
        .env("TENTACLE_HUB_CERTIFICATE", identity.join("tls.crt"))
        .env("TENTACLE_HUB_KEY", identity.join("tls.key"))
        .args(args)
        .output()
        .expect("run tentacle-hub")
}

#[test]
fn agents_register_themselves_from_the_environment_once_and_restart_without_registering_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub_home = dir.path().join("hub");
    // The hub's identity lives apart from its home, as a mounted Secret does.
    let identity = dir.path().join("secret");
    let made = hub_cli(&hub_home, &identity, &["new-certificate", "--if-blank"]);
    let hub_thumbprint = stdout_of(&made);
    assert!(identity.join("tls.key").is_file());
    let token = stdout_of(&hub_cli(
        &hub_home,
        &identity,
        &["server", "token", "create"],
    ));
    let hub_port = free_port();
    let hub_url = format!("https://127.0.0.1:{hub_port}");

    // A polling agent starts before its hub, with a one-time token.
    let poller_home = dir.path().join("poller");
    let poller_metrics: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let poller_env = vec![
        ("TENTACLE_SERVER", hub_url.clone()),
        ("TENTACLE_SERVER_THUMBPRINT", hub_thumbprint.clone()),
        ("TENTACLE_TOKEN", token.clone()),
        ("TENTACLE_NAME", "web-01".to_owned()),
        ("TENTACLE_ROLES", "web,api".to_owned()),
        ("TENTACLE_ENVIRONMENTS", "test".to_owned()),
        ("TENTACLE_RECONNECT_INITIAL", "100ms".to_owned()),
        ("TENTACLE_RECONNECT_MAX", "1s".to_owned()),
        ("TENTACLE_HEARTBEAT_INTERVAL", "2s".to_owned()),
        ("TENTACLE_REGISTER_TIMEOUT", "60s".to_owned()),
        ("TENTACLE_METRICS_LISTEN", poller_metrics.to_string()),
    ];
    let mut poller = agent(&poller_home, &poller_env);
    poller.wait_for("could not register yet", Duration::from_secs(20));
    // Alive, but not ready while it waits for the hub.
    let (code, stderr) = probe("tentacle", poller_metrics);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("503"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // The hub comes up from the environment; its API key is the operator's.
    let hub_metrics: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let mut hub_command = clean("tentacle-hub");
    hub_command
        .arg("--home")
        .arg(&hub_home)
        .args(["server", "--from-env", "--listen"])
        .arg(format!("127.0.0.1:{hub_port}"))
        .env("TENTACLE_HUB_CERTIFICATE", identity.join("tls.crt"))
        .env("TENTACLE_HUB_KEY", identity.join("tls.key"))
        .env("TENTACLE_HUB_API_KEY", HUB_API_KEY)
        .env("TENTACLE_HUB_PICKUP_TIMEOUT", "10s")
        .env("TENTACLE_METRICS_LISTEN", hub_metrics.to_string());
    let hub = Process::spawn(hub_command);
    let listening = hub.wait_for("hub listening", Duration::from_secs(20));
    assert_eq!(field(&listening, "thumbprint="), hub_thumbprint);
    wait_until_ready("tentacle-hub", hub_metrics);
    assert!(
        !hub_home.join("tentacle-hub.crt.pem").exists(),
        "no certificate of its own when one is named"
    );

    poller.wait_for("registered", Duration::from_secs(30));
    poller.wait_for("tunnel open", Duration::from_secs(20));
    wait_until_ready("tentacle", poller_metrics);

    // A listening agent registers with the operator's API key.
    let listener_home = dir.path().join("listener");
    let listener_port = free_port();
    let listener_env = vec![
        ("TENTACLE_MODE", "listening".to_owned()),
        ("TENTACLE_LISTEN_ADDRESS", "127.0.0.1".to_owned()),
        ("TENTACLE_PORT", listener_port.to_string()),
        ("TENTACLE_PUBLIC_HOSTNAME", "127.0.0.1".to_owned()),
        ("TENTACLE_SERVER", hub_url.clone()),
        ("TENTACLE_SERVER_THUMBPRINT", hub_thumbprint.clone()),
        ("TENTACLE_API_KEY", HUB_API_KEY.to_owned()),
        ("TENTACLE_NAME", "web-02".to_owned()),
        ("TENTACLE_ROLES", "web".to_owned()),
    ];
    let mut listener = agent(&listener_home, &listener_env);
    listener.wait_for("registered", Duration::from_secs(30));
    listener.wait_for("listening address=", Duration::from_secs(20));

    let listed = stdout_of(&hub_cli(&hub_home, &identity, &["server", "trust", "list"]));
    assert!(
        listed.contains("polling    web-01") && listed.contains("roles=web,api environments=test"),
        "{listed}"
    );
    assert!(
        listed.contains("listening  web-02")
            && listed.contains(&format!("https://127.0.0.1:{listener_port}")),
        "{listed}"
    );

    let thumbprint_of = |home: &Path| {
        let output = clean("tentacle")
            .arg("--home")
            .arg(home)
            .arg("show-thumbprint")
            .output()
            .expect("show-thumbprint");
        stdout_of(&output)
    };
    let (poller_thumbprint, listener_thumbprint) =
        (thumbprint_of(&poller_home), thumbprint_of(&listener_home));
    let listener_target = format!("https://127.0.0.1:{listener_port}");
    let exec = |target: &str, thumbprint: &str| {
        hub_cli(
            &hub_home,
            &identity,
            &[
                "exec",
                "--target",
                target,
                "--thumbprint",
                thumbprint,
                "--hub",
                &hub_url,
                "--script",
                "echo hi from $(hostname 2>/dev/null || echo agent)",
            ],
        )
    };
    let reached = |target: &str, thumbprint: &str| {
        let output = exec(target, thumbprint);
        assert!(
            output.status.success() && stdout_of(&output).starts_with("hi from"),
            "{target}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    reached("poll://web-01", &poller_thumbprint);
    reached(&listener_target, &listener_thumbprint);

    // Restart both with the same environment: nothing changes, nothing is
    // registered again (the poller's token is used up, so a second
    // registration would be refused and the start would fail).
    let config_of =
        |home: &Path| std::fs::read_to_string(home.join("tentacle.toml")).expect("config");
    let (poller_config, listener_config) = (config_of(&poller_home), config_of(&listener_home));
    assert!(poller_config.contains("[[hubs]]"), "{poller_config}");
    assert_eq!(poller.stop(), Some(0), "{}", poller.log_text());
    assert_eq!(listener.stop(), Some(0), "{}", listener.log_text());
    // Stopped: nothing answers the probe.
    let (code, stderr) = probe("tentacle", poller_metrics);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("nothing answers"), "{stderr}");

    let poller = agent(&poller_home, &poller_env);
    poller.wait_for("tunnel open", Duration::from_secs(20));
    let listener = agent(&listener_home, &listener_env);
    listener.wait_for("listening address=", Duration::from_secs(20));
    wait_until_ready("tentacle", poller_metrics);
    for restarted in [&poller, &listener] {
        let log = restarted.log_text();
        assert!(!log.contains("registered"), "registered again:\n{log}");
        assert!(!log.contains("applied the environment"), "{log}");
        assert!(!log.contains("made this agent's certificate"), "{log}");
    }
    assert_eq!(config_of(&poller_home), poller_config);
    assert_eq!(config_of(&listener_home), listener_config);
    assert_eq!(thumbprint_of(&poller_home), poller_thumbprint);
    reached("poll://web-01", &poller_thumbprint);
    reached(&listener_target, &listener_thumbprint);

    // The hub saw one registration of each, across both starts.
    let hub_log = hub.log_text();
    for name in ["web-01", "web-02"] {
        let registrations = hub_log
            .matches(&format!("agent registered name={name} "))
            .count();
        assert_eq!(registrations, 1, "{name}:\n{hub_log}");
    }
    // No secret reached any log.
    for log in [poller.log_text(), listener.log_text(), hub.log_text()] {
        assert!(!log.contains(&token) && !log.contains(HUB_API_KEY), "{log}");
    }

    // A wrong key is refused for good: the start fails at once with the
    // hub's reason, without retrying and without showing the key.
    let wrong_key = "not-the-operators-key-0123456789";
    let mut refused = agent(
        &dir.path().join("refused"),
        &[
            ("TENTACLE_SERVER", hub_url.clone()),
            ("TENTACLE_SERVER_THUMBPRINT", hub_thumbprint.clone()),
            ("TENTACLE_API_KEY", wrong_key.to_owned()),
            ("TENTACLE_NAME", "web-03".to_owned()),
        ],
    );
    assert_eq!(refused.wait_exit(Duration::from_secs(15)), Some(1));
    let log = refused.log_text();
    let error = log
        .lines()
        .find(|l| l.starts_with("tentacle: error:"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        error.contains("refused the registration") && error.contains("not valid"),
        "{error}"
    );
    assert!(!log.contains("could not register yet"), "{log}");
    assert!(!log.contains(wrong_key), "{log}");
}

#[test]
fn the_hub_makes_its_certificate_and_stores_the_operators_api_key_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("hub");
    let start = |key: &str| {
        let mut command = clean("tentacle-hub");
        command
            .arg("--home")
            .arg(&home)
            .args(["server", "--from-env", "--listen", "127.0.0.1:0"])
            .env("TENTACLE_HUB_API_KEY", key);
        Process::spawn(command)
    };
    let mut first = start(HUB_API_KEY);
    let line = first.wait_for("hub listening", Duration::from_secs(20));
    let thumbprint = field(&line, "thumbprint=").to_owned();
    first.wait_for("stored the API key", Duration::from_secs(5));
    assert_eq!(first.stop(), Some(0));
    assert!(home.join("tentacle-hub.crt.pem").is_file());

    // Again: the same identity, and the key is not stored twice.
    let mut second = start(HUB_API_KEY);
    let line = second.wait_for("hub listening", Duration::from_secs(20));
    assert_eq!(field(&line, "thumbprint="), thumbprint);
    assert!(!second.log_text().contains("made the hub's certificate"));
    assert!(!second.log_text().contains("stored the API key"));
    assert_eq!(second.stop(), Some(0));
    let credentials = std::fs::read_to_string(home.join("credentials.toml")).expect("stored");
    assert_eq!(
        credentials.matches("kind = \"api-key\"").count(),
        1,
        "{credentials}"
    );
    assert!(!credentials.contains(HUB_API_KEY), "hashed: {credentials}");
    assert!(!first.log_text().contains(HUB_API_KEY) && !second.log_text().contains(HUB_API_KEY));

    // A key too short to be safe stops the start in one line, unshown.
    let mut short = start("short-key-42");
    assert_eq!(short.wait_exit(Duration::from_secs(10)), Some(1));
    let log = short.log_text();
    let error = log
        .lines()
        .find(|l| l.starts_with("tentacle-hub: error:"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        error.contains("TENTACLE_HUB_API_KEY") && error.contains("at least 16"),
        "{error}"
    );
    assert!(!log.contains("short-key-42"), "{log}");
}

#[test]
fn a_bad_variable_stops_the_agent_in_one_line_before_anything_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("agent");
    let output = clean("tentacle")
        .arg("--home")
        .arg(&home)
        .args(["run", "--from-env"])
        .env("TENTACLE_PORT", "abc")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim(),
        "tentacle: error: TENTACLE_PORT=`abc` is not a port number (1-65535)"
    );
    assert!(!home.exists(), "nothing was created");

    // Nothing listens on a fresh port: the probe says so and exits 1.
    let nothing: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    for program in ["tentacle", "tentacle-hub"] {
        let (code, stderr) = probe(program, nothing);
        assert_eq!(code, Some(1), "{program}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("nothing answers"), "{stderr}");
    }
}
