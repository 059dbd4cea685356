//! `tentacle-hub deploy` runs a script on every agent of a role, polling and
//! listening mixed, prefixes their output, summarises, and fails if any
//! target failed.

use tentacle_tests::{HubHome, start_fleet};

#[test]
fn a_deploy_reaches_every_agent_of_a_role_in_both_modes() {
    let sim = HubHome::new();
    let (mut hub, hub_url, agents) = start_fleet(
        &sim,
        &[
            ("web-a", "web", false),
            ("web-b", "web", false),
            ("web-c", "web", true),
            ("db-a", "db", false),
        ],
    );
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

#[test]
fn a_package_is_sent_once_per_agent_and_then_served_from_its_cache() {
    let sim = HubHome::new();
    let (mut hub, hub_url, agents) =
        start_fleet(&sim, &[("app-a", "app", false), ("app-b", "app", true)]);
    let work = tempfile::tempdir().expect("tempdir");
    // A real .tar.gz with a file the script reads.
    let source = work.path().join("src");
    std::fs::create_dir_all(source.join("site")).expect("mkdir");
    std::fs::write(source.join("site/index.html"), "<h1>release 7</h1>").expect("write");
    let package = work.path().join("webapp.tar.gz");
    let tar = std::process::Command::new("tar")
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
        "cat \"$TENTACLE_PACKAGE_PATH/site/index.html\"; echo\n",
    )
    .expect("script");
    let deploy = || {
        sim.run(&[
            "deploy",
            "--role",
            "app",
            "--script",
            &script.to_string_lossy(),
            "--package",
            &package.to_string_lossy(),
            "--hub",
            &hub_url,
        ])
    };

    let first = deploy();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for name in ["app-a", "app-b"] {
        assert!(
            stdout.contains(&format!("[{name}] <h1>release 7</h1>")),
            "{stdout}"
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name) && l.contains("succeeded"))
            .expect("summary");
        assert!(
            line.contains(&format!("webapp uploaded {size} bytes")),
            "{line}"
        );
    }

    let second = deploy();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{stdout}");
    for name in ["app-a", "app-b"] {
        assert!(
            stdout.contains(&format!("[{name}] <h1>release 7</h1>")),
            "{stdout}"
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name) && l.contains("succeeded"))
            .expect("summary");
        assert!(
            line.contains("webapp cached") && !line.contains("uploaded"),
            "{line}"
        );
    }
    for agent in &agents {
        let cached: Vec<_> = std::fs::read_dir(agent.home().join("packages"))
            .expect("cache dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pkg"))
            .collect();
        assert_eq!(cached.len(), 1, "one cached copy per agent");
    }
    let _ = hub.kill();
    let _ = hub.wait();
}

#[test]
fn ctrl_c_cancels_the_scripts_on_every_target() {
    let sim = HubHome::new();
    let (mut hub, hub_url, _agents) =
        start_fleet(&sim, &[("cc-a", "slow", false), ("cc-b", "slow", true)]);
    let script = tempfile::NamedTempFile::new().expect("script file");
    std::fs::write(script.path(), "echo started; sleep 60; echo finished\n").expect("write script");
    let deploy = std::process::Command::new(tentacle_tests::bin("tentacle-hub"))
        .arg("--home")
        .arg(sim.0.path())
        .args([
            "deploy",
            "--role",
            "slow",
            "--script",
            &script.path().to_string_lossy(),
            "--hub",
            &hub_url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start deploy");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(deploy.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let started = std::time::Instant::now();
    let output = deploy.wait_with_output().expect("deploy ends");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "cancelled promptly"
    );
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("[cc-a] started") && stdout.contains("[cc-b] started"),
        "{stdout}"
    );
    assert!(!stdout.contains("finished"), "{stdout}");
    let summary: Vec<&str> = stdout.lines().filter(|l| l.starts_with("cc-")).collect();
    assert_eq!(summary.len(), 2, "{stdout}");
    assert!(
        summary.iter().all(|l| l.contains("exit code -43")),
        "both cancelled: {stdout}"
    );
    let _ = hub.kill();
    let _ = hub.wait();
}
