//! The fleet in containers, failing the way fleets fail: a hub container
//! and agent containers (two polling, one listening) on a private Docker
//! network, registered with an API key, driven from the host with the
//! `tentacle-hub` CLI, while the tests cut hosts off the network, kill
//! them, pause them and restart the hub.
//!
//! Black-box: images, environment variables and the CLI only (see
//! `tentacle_tests::containers`). Without Docker, or while the images cannot
//! be built, each test prints `skipped: <test>: <why>` and passes, unless
//! `CI=true`, where it fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tentacle_tests::containers::{self, AgentSpec, Fleet, RECONNECT_MAX, Scenario, say};

/// `#[test] fn $name` running `$body` as a container scenario.
macro_rules! container_test {
    ($name:ident, |$scenario:ident| $body:block) => {
        #[test]
        fn $name() {
            containers::run_scenario(module_path!(), stringify!($name), |$scenario: &Scenario| {
                $body
            });
        }
    };
}

fn secs(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// A `tentacle-hub` command running in the background, its output
/// collected line by line as it comes.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tentacle-hub");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let readers = vec![collect(out, stdout.clone()), collect(err, stderr.clone())];
        Self {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout").clone()
    }

    fn wait_for_line(&self, line: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.lines().iter().any(|l| l == line) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits for the exit (killing it after `timeout`): its code, stdout
    /// lines and stderr.
    fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<String>, String) {
        let deadline = Instant::now() + timeout;
        let code = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
            }
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let stderr = self.stderr.lock().expect("stderr").join("\n");
        (code, self.lines(), stderr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(
    stream: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            into.lock().expect("lines").push(line);
        }
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

container_test!(
    a_package_deploy_reaches_all_three_agents_and_a_second_deploy_is_served_from_their_caches,
    |scenario| {
        let fleet = Fleet::standard(scenario);
        let work = tempfile::tempdir().expect("tempdir");
        let source = work.path().join("src");
        std::fs::create_dir_all(source.join("site")).expect("mkdir");
        std::fs::write(source.join("site/index.html"), "<h1>release 7</h1>").expect("write");
        let package = work.path().join("webapp.tar.gz");
        let tar = Command::new("tar")
            .arg("-czf")
            .arg(&package)
            .arg("-C")
            .arg(&source)
            .arg("site")
            .status()
            .expect("tar");
        assert!(tar.success());
        let size = std::fs::metadata(&package).expect("package").len();
        let script = work.path().join("deploy.sh");
        std::fs::write(
            &script,
            "cat \"$TENTACLE_PACKAGE_PATH/site/index.html\"; echo; echo \"on $(hostname)\"\n",
        )
        .expect("script");
        let script = script.to_string_lossy().into_owned();
        let package = package.to_string_lossy().into_owned();
        let deploy = || {
            let started = Instant::now();
            let out = fleet.deploy(&["--role", "app", "--script", &script, "--package", &package]);
            (out, started.elapsed())
        };
        let names = ["poll-a", "poll-b", "listen-c"];
        let summary = |stdout: &str, name: &str| -> String {
            stdout
                .lines()
                .find(|l| l.starts_with(name) && l.contains("succeeded"))
                .unwrap_or_else(|| panic!("no success line for {name}:\n{stdout}"))
                .to_owned()
        };

        let (first, took) = deploy();
        let stdout = text(&first.stdout);
        assert!(first.status.success(), "{stdout}\n{}", text(&first.stderr));
        for name in names {
            assert!(
                stdout.contains(&format!("[{name}] <h1>release 7</h1>")),
                "{stdout}"
            );
            // It ran in that agent's own container.
            assert!(
                stdout.contains(&format!("[{name}] on {}", fleet.agent(name).container_name)),
                "{stdout}"
            );
            let line = summary(&stdout, name);
            assert!(
                line.contains(&format!("webapp uploaded {size} bytes")),
                "{line}"
            );
        }
        say(&format!("first deploy (uploads) took {}", secs(took)));

        let (second, took) = deploy();
        let stdout = text(&second.stdout);
        assert!(
            second.status.success(),
            "{stdout}\n{}",
            text(&second.stderr)
        );
        for name in names {
            assert!(
                stdout.contains(&format!("[{name}] <h1>release 7</h1>")),
                "{stdout}"
            );
            let line = summary(&stdout, name);
            assert!(
                line.contains("webapp cached") && !line.contains("uploaded"),
                "{line}"
            );
        }
        say(&format!("second deploy (cached) took {}", secs(took)));
    }
);

container_test!(a_polling_agent_cut_off_the_network_mid_script_still_delivers_every_line_once_and_the_real_exit_code, |scenario| {
    let fleet = Fleet::standard(scenario);
    const LINES: usize = 16;
    let script = format!("for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.5; done; exit 7");
    let exec = Running::spawn(fleet.exec_command("poll-a", &script, &["--pickup-timeout", "30s"]));
    assert!(
        exec.wait_for_line("line 3", Duration::from_secs(30)),
        "the script started: {:?}",
        exec.lines()
    );
    fleet.disconnect("poll-a");
    let seen_at_cut = exec.lines().len();
    // Longer than the heartbeat timeout: both ends give the tunnel up.
    std::thread::sleep(Duration::from_secs(5));
    let seen_while_cut = exec.lines().len();
    fleet.connect("poll-a");
    let reconnected = Instant::now();
    let (code, lines, stderr) = exec.finish(Duration::from_secs(90));
    say(&format!(
        "cut off after {seen_at_cut} line(s) for 5s ({seen_while_cut} by the reconnect); \
         the rest followed {} after it",
        secs(reconnected.elapsed())
    ));
    let expected: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected, "every line exactly once, in order\nstderr:\n{stderr}");
    assert_eq!(code, Some(7), "the script's own exit code\nstderr:\n{stderr}");
    assert!(
        seen_while_cut <= seen_at_cut + 2,
        "output kept coming while the agent was off the network ({seen_at_cut} → {seen_while_cut})"
    );
    assert!(seen_while_cut < LINES, "the script was still running when the agent came back");
});

container_test!(
    an_agent_container_killed_mid_script_reports_the_script_as_agent_restarted_and_serves_new_calls,
    |scenario| {
        let fleet = Fleet::standard(scenario);
        let thumbprint = fleet.thumbprint("poll-b");
        let exec = Running::spawn(fleet.exec_command(
            "poll-b",
            "echo started; for i in $(seq 1 30); do echo \"tick $i\"; sleep 1; done; echo finished",
            &["--pickup-timeout", "60s"],
        ));
        assert!(
            exec.wait_for_line("tick 2", Duration::from_secs(30)),
            "the script started: {:?}",
            exec.lines()
        );
        let killed = Instant::now();
        fleet.kill("poll-b");
        let healthy_in = fleet.start_again("poll-b");
        let (code, lines, stderr) = exec.finish(Duration::from_secs(120));
        say(&format!(
            "killed; healthy again {}; exec ended {} after the kill",
            secs(healthy_in),
            secs(killed.elapsed())
        ));
        assert!(
            stderr.contains("the agent restarted while the script ran (exit code -46)"),
            "{stderr}"
        );
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            !lines.iter().any(|l| l == "finished"),
            "the script died with its container: {lines:?}"
        );

        // The same agent (same certificate and registration, no second entry)
        // serves new calls.
        let listed = text(&fleet.hub_cli(&["server", "trust", "list"]).stdout);
        let entries: Vec<&str> = listed.lines().filter(|l| l.contains(" poll-b ")).collect();
        assert_eq!(entries.len(), 1, "{listed}");
        assert!(entries[0].starts_with(&thumbprint), "{listed}");
        let after = fleet.exec("poll-b", "echo serving again", &[]);
        assert_eq!(
            text(&after.stdout),
            "serving again\n",
            "{}",
            text(&after.stderr)
        );
        assert_eq!(after.status.code(), Some(0));
    }
);

container_test!(
    after_the_hub_container_restarts_every_agent_reconnects_within_the_jittered_window,
    |scenario| {
        let fleet = Fleet::standard(scenario);
        let stopping = Instant::now();
        // Down long enough for the agents' backoff to reach RECONNECT_MAX.
        let started_again = fleet.restart_hub(Duration::from_secs(4));
        let down = started_again.duration_since(stopping);
        let healthy = started_again.elapsed();
        let names = ["poll-a", "poll-b", "listen-c"];
        fleet
            .wait_reachable(&names, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\nhub log:\n{}", fleet.hub_logs()));
        let back = started_again.elapsed();
        // The hub's own start, then one retry at most RECONNECT_MAX after
        // the last (jittered), then a health round, whose wait for a
        // polling agent is up to 2s.
        let window = Duration::from_secs(2)
            + RECONNECT_MAX
            + Duration::from_secs(2)
            + Duration::from_secs(3);
        say(&format!(
            "hub down for {} (SIGTERM, drain, exit, 4s stopped), healthy {} after its start, \
             every agent reachable through it {} after its start (allowed: {})",
            secs(down),
            secs(healthy),
            secs(back),
            secs(window)
        ));
        assert!(back <= window, "agents took {} to come back", secs(back));
        for name in ["poll-a", "poll-b"] {
            let out = fleet.exec(name, "echo still here", &[]);
            assert_eq!(text(&out.stdout), "still here\n", "{}", text(&out.stderr));
        }
    }
);

container_test!(
    a_paused_listening_agent_fails_calls_with_a_deadline_error_and_they_recover_after_unpause,
    |scenario| {
        let fleet = Fleet::standard(scenario);
        fleet.pause("listen-c");
        let deadline = Duration::from_secs(3);
        let started = Instant::now();
        let reports = fleet.health("listen-c", deadline).expect("health answers");
        let took = started.elapsed();
        let report = reports
            .iter()
            .find(|r| r.name == "listen-c")
            .unwrap_or_else(|| panic!("{reports:?}"));
        assert!(!report.reachable, "{report:?}");
        let error = report.error.clone().unwrap_or_default();
        assert!(
            error.contains("no answer within 3s"),
            "a deadline error, not a hang: {error}"
        );
        assert!(
            took < deadline + Duration::from_secs(10),
            "it took {}",
            secs(took)
        );
        say(&format!(
            "paused: the call failed after {}: {error}",
            secs(took)
        ));

        fleet.unpause("listen-c");
        let back = fleet
            .wait_reachable(&["listen-c"], Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
        let work = tempfile::tempdir().expect("tempdir");
        let script = work.path().join("back.sh");
        std::fs::write(&script, "echo back\n").expect("script");
        let out = fleet.deploy(&["--role", "listen-c", "--script", &script.to_string_lossy()]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
        assert!(stdout.contains("[listen-c] back"), "{stdout}");
        say(&format!("unpaused: reachable again after {}", secs(back)));
    }
);

container_test!(
    a_polling_agent_behind_a_proxy_container_reaches_the_hub_only_through_it,
    |scenario| {
        let fleet = Fleet::start(scenario, &[AgentSpec::behind_proxy("poll-p")]);
        // A TCP connect from inside the agent's container, 3 s at most.
        let connects = |host: &str, port: u16| -> (bool, String) {
            let probe = format!("exec 3<>/dev/tcp/{host}/{port}");
            let (code, output) = fleet.exec_in("poll-p", &["timeout", "3", "bash", "-c", &probe]);
            (code == 0, output)
        };
        // Its network is internal and the hub is not on it: neither the hub's
        // address nor its name gets through.
        let hub_ip = fleet.hub_ip();
        let (direct, output) = connects(&hub_ip, containers::HUB_PORT);
        assert!(!direct, "reached the hub at {hub_ip} directly: {output}");
        let (by_name, output) = connects(&fleet.hub_name, containers::HUB_PORT);
        assert!(!by_name, "reached {} directly: {output}", fleet.hub_name);
        // The same probe does reach the proxy.
        let (proxy, output) = connects(&fleet.proxy_name, containers::PROXY_PORT);
        assert!(proxy, "cannot reach the proxy: {output}");

        let out = fleet.exec("poll-p", "echo through the proxy", &[]);
        assert_eq!(
            text(&out.stdout),
            "through the proxy\n",
            "{}",
            text(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0));
        let proxy_log = fleet.proxy_logs();
        assert!(
            proxy_log.contains(&format!("{}:{}", fleet.hub_name, containers::HUB_PORT)),
            "the tunnel went through the proxy:\n{proxy_log}"
        );
    }
);

/// A container partition for the fault matrix's container cells.
#[derive(Debug, Clone, Copy)]
enum Partition {
    /// `docker network disconnect`: the host vanishes from the network.
    Disconnect,
    /// `docker pause`: every process of the agent freezes.
    Freeze,
}

impl Partition {
    fn apply(self, fleet: &Fleet, agent: &str) {
        match self {
            Self::Disconnect => fleet.disconnect(agent),
            Self::Freeze => fleet.pause(agent),
        }
    }

    fn heal(self, fleet: &Fleet, agent: &str) {
        match self {
            Self::Disconnect => fleet.connect(agent),
            Self::Freeze => fleet.unpause(agent),
        }
    }
}

/// Runs `script` on `agent` through the hub: `exec` for a polling agent,
/// `deploy --role` for a listening one (only the hub can resolve its name).
struct HubRun {
    running: Running,
    /// The prefix deploy puts on the agent's lines; empty for exec.
    prefix: String,
}

impl HubRun {
    fn spawn(fleet: &Fleet, agent: &str, script: &str, script_file: &std::path::Path) -> Self {
        if agent.starts_with("poll-") {
            return Self {
                running: Running::spawn(fleet.exec_command(
                    agent,
                    script,
                    &["--pickup-timeout", "30s"],
                )),
                prefix: String::new(),
            };
        }
        std::fs::write(script_file, script).expect("script file");
        let file = script_file.to_string_lossy();
        Self {
            running: Running::spawn(fleet.deploy_command(&["--role", agent, "--script", &file])),
            prefix: format!("[{agent}] "),
        }
    }

    fn wait_for_line(&self, line: &str, timeout: Duration) -> bool {
        self.running
            .wait_for_line(&format!("{}{line}", self.prefix), timeout)
    }

    /// The script's exit code (None when the call failed or hung), its
    /// lines, and the command's stderr plus, for deploy, its summary.
    fn finish(self, timeout: Duration) -> (Option<i32>, Vec<String>, String) {
        let (code, stdout, stderr) = self.running.finish(timeout);
        if self.prefix.is_empty() {
            return (code, stdout, stderr);
        }
        let lines = stdout
            .iter()
            .filter_map(|l| l.strip_prefix(&self.prefix))
            .map(str::to_owned)
            .collect();
        let script_code = stdout.iter().find_map(|l| {
            let (_, code) = l.split_once("  exit code ")?;
            code.trim().parse().ok()
        });
        let summary = stdout
            .iter()
            .filter(|l| !l.starts_with(&self.prefix))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        let code = code.and(script_code);
        (code, lines, format!("{stderr}\n{summary}"))
    }
}

// The fault matrix's container cells: each partition, for a polling and a
// listening agent, before the call (connecting) and mid-script (in flight).
// Each cell asserts what the process matrix (fault_matrix.rs) does: the
// call succeeds with every line once and the real exit code, or fails with
// a message within its deadline and the flow then succeeds; nothing is
// restarted.
container_test!(
    the_fault_matrix_holds_under_container_partitions,
    |scenario| {
        const LINES: usize = 10;
        const HELD: Duration = Duration::from_secs(5);
        let fleet = Fleet::standard(scenario);
        let work = tempfile::tempdir().expect("tempdir");
        let script_file = work.path().join("cell.sh");
        let script =
            format!("for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.3; done; exit 7");
        let expected: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
        let mut summary = Vec::new();
        for agent in ["poll-a", "listen-c"] {
            for partition in [Partition::Disconnect, Partition::Freeze] {
                for in_flight in [false, true] {
                    let cell = format!(
                        "{agent} {partition:?} {}",
                        if in_flight { "in flight" } else { "connecting" }
                    );
                    let started = Instant::now();
                    if !in_flight {
                        partition.apply(&fleet, agent);
                    }
                    let run = HubRun::spawn(&fleet, agent, &script, &script_file);
                    if in_flight {
                        assert!(
                            run.wait_for_line("line 2", Duration::from_secs(30)),
                            "{cell}: the script started"
                        );
                        partition.apply(&fleet, agent);
                    }
                    std::thread::sleep(HELD);
                    partition.heal(&fleet, agent);
                    // The call's deadline: its pickup timeout, the script, and
                    // a reconnect window.
                    let (code, lines, stderr) = run.finish(Duration::from_secs(120));
                    let outcome = if code == Some(7) {
                        assert_eq!(
                            lines, expected,
                            "{cell}: every line once, in order\n{stderr}"
                        );
                        "succeeded".to_owned()
                    } else {
                        assert!(
                            !stderr.trim().is_empty(),
                            "{cell}: the call failed ({code:?}) without saying why"
                        );
                        // Retried as an operator would, once the host is back.
                        let recovering = Instant::now();
                        let (lines, again_stderr) = loop {
                            let (again, lines, again_stderr) =
                                HubRun::spawn(&fleet, agent, &script, &script_file)
                                    .finish(Duration::from_secs(120));
                            if again == Some(7) || recovering.elapsed() > Duration::from_secs(60) {
                                assert_eq!(
                                    again,
                                    Some(7),
                                    "{cell}: the flow recovers\n{again_stderr}"
                                );
                                break (lines, again_stderr);
                            }
                            std::thread::sleep(Duration::from_secs(1));
                        };
                        assert_eq!(
                            lines, expected,
                            "{cell}: every line once, in order\n{again_stderr}"
                        );
                        format!(
                            "failed cleanly ({}), then succeeded",
                            stderr.trim().lines().last().unwrap_or_default()
                        )
                    };
                    summary.push(format!("{cell}: {outcome} in {}", secs(started.elapsed())));
                }
            }
        }
        say(&format!(
            "container cells: {} cells (2 partitions x 2 modes x 2 stages), all passed:\n  {}",
            summary.len(),
            summary.join("\n  ")
        ));
    }
);
