//! `tentacle-sim deploy` runs a script on every agent of a role, polling and
//! listening mixed, prefixes their output, summarises, and fails if any
//! target failed.

use tentacle_tests::{AgentProcess, FAST_POLLING, SimHome, free_port, stdout_of, tentacle_output};

#[test]
fn a_deploy_reaches_every_agent_of_a_role_in_both_modes() {
    let sim = SimHome::new();
    let (mut hub, address) = sim.serve();
    let hub_url = format!("https://{address}");
    let hub_thumbprint = sim.thumbprint();
    let key = stdout_of(&sim.run(&["server", "api-key", "create"]));

    let register = |agent: &AgentProcess, name: &str, role: &str, mode: &str, port: Option<u16>| {
        let port = port.map(|p| p.to_string()).unwrap_or_default();
        let mut args = vec![
            "register-with",
            "--server",
            &hub_url,
            "--server-thumbprint",
            &hub_thumbprint,
            "--name",
            name,
            "--role",
            role,
            "--environment",
            "prod",
            "--mode",
            mode,
            "--api-key",
            &key,
        ];
        if !port.is_empty() {
            args.extend(["--public-hostname", "127.0.0.1", "--port", &port]);
        }
        let out = tentacle_output(agent.home(), &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut agents = Vec::new();
    for (name, role, listening) in [
        ("web-a", "web", false),
        ("web-b", "web", false),
        ("web-c", "web", true),
        ("db-a", "db", false),
    ] {
        let port = listening.then(free_port);
        let extra = port
            .map(|p| format!("[listen]\nport = {p}\n"))
            .unwrap_or_else(|| FAST_POLLING.to_owned());
        let mut agent = AgentProcess::prepare(&[], &extra);
        register(
            &agent,
            name,
            role,
            if listening { "listening" } else { "polling" },
            port,
        );
        agent.spawn();
        agents.push(agent);
    }
    // web-b fails its deployment: the script finds this marker in its home.
    std::fs::write(agents[1].home().join("fail-deploy"), "").expect("marker");

    let script = tempfile::NamedTempFile::new().expect("script file");
    std::fs::write(
        script.path(),
        "echo \"deploying on $(basename $(dirname $(dirname $PWD)))\"\n\
         if [ -f ../../fail-deploy ]; then echo 'disk is full' >&2; exit 4; fi\necho done\n",
    )
    .expect("write script");
    let script_path = script.path().to_string_lossy().into_owned();
    let out = sim.run(&[
        "deploy",
        "--role",
        "web",
        "--environment",
        "prod",
        "--script",
        &script_path,
        "--hub",
        &hub_url,
        "--parallelism",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "one target failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for name in ["web-a", "web-b", "web-c"] {
        assert!(
            stdout.contains(&format!("[{name}] deploying on")),
            "{name} ran\n{stdout}"
        );
    }
    assert!(
        stdout.contains("[web-a] done") && stdout.contains("[web-c] done"),
        "{stdout}"
    );
    assert!(!stdout.contains("[web-b] done"), "{stdout}");
    assert!(stderr.contains("[web-b] disk is full"), "{stderr}");
    assert!(
        !stdout.contains("db-a") && !stderr.contains("[db-a]"),
        "db is not in the web role"
    );
    let summary: Vec<&str> = stdout.lines().filter(|l| l.starts_with("web-")).collect();
    assert_eq!(summary.len(), 3, "{stdout}");
    assert!(
        summary
            .iter()
            .any(|l| l.starts_with("web-b") && l.contains("failed") && l.contains("exit code 4")),
        "{stdout}"
    );
    assert!(
        summary.iter().filter(|l| l.contains("succeeded")).count() == 2,
        "{stdout}"
    );
    assert!(stdout.contains("2 succeeded, 1 failed"), "{stdout}");
    let _ = hub.kill();
    let _ = hub.wait();
}
