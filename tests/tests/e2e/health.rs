//! `tentacle-hub health` over a mixed fleet: what it reports for agents that
//! answer, for one that is stopped, and for the tooling bundle before and
//! after a deployment pushes it.

use serde_json::Value;
use tentacle_tests::{HubHome, start_fleet};

fn health_json(sim: &HubHome, hub_url: &str) -> (Option<i32>, Vec<Value>) {
    let out = sim.run(&["health", "--json", "--timeout", "3s", "--hub", hub_url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let value: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (
        out.status.code(),
        value.as_array().cloned().expect("an array"),
    )
}

fn field<'a>(report: &'a Value, name: &str) -> Option<&'a Value> {
    report.get(name)
}

#[test]
fn health_reports_each_agent_and_flags_a_stopped_one() {
    let sim = HubHome::new();
    let (mut hub, hub_url, mut agents) = start_fleet(
        &sim,
        &[
            ("h-poll-a", "web", false),
            ("h-poll-b", "web", false),
            ("h-listen", "web", true),
        ],
    );
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(work.path().join("tools")).expect("mkdir");
    std::fs::write(work.path().join("tools/helper.sh"), "echo helping\n").expect("write");
    let bundle = work.path().join("tooling.tar.gz");
    let made = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&bundle)
        .arg("-C")
        .arg(work.path())
        .arg("tools")
        .status()
        .expect("tar");
    assert!(made.success());
    assert!(
        sim.run(&["tooling", "set", &bundle.to_string_lossy()])
            .status
            .success()
    );

    let (code, reports) = health_json(&sim, &hub_url);
    assert_eq!(code, Some(0));
    assert_eq!(reports.len(), 3);
    for report in &reports {
        assert_eq!(
            field(report, "reachable").and_then(|v| v.as_bool()),
            Some(true),
            "{report:?}"
        );
        assert_eq!(
            field(report, "tooling_current").and_then(|v| v.as_bool()),
            Some(false),
            "{report:?}"
        );
        assert_eq!(
            field(report, "os").and_then(|v| v.as_str()),
            Some(std::env::consts::OS)
        );
        assert!(
            field(report, "free_disk_bytes")
                .and_then(|v| v.as_u64())
                .is_some_and(|b| b > 0)
        );
        assert!(field(report, "rtt_ms").and_then(|v| v.as_f64()).is_some());
        assert!(
            field(report, "agent_version")
                .and_then(|v| v.as_str())
                .is_some_and(|v| !v.is_empty())
        );
    }

    // A deployment pushes the tooling bundle to every agent.
    let script = work.path().join("noop.sh");
    std::fs::write(
        &script,
        "test -d \"$TENTACLE_TOOLING_PATH\" && echo tooling-ok\n",
    )
    .expect("script");
    let deployed = sim.run(&[
        "deploy",
        "--role",
        "web",
        "--script",
        &script.to_string_lossy(),
        "--hub",
        &hub_url,
    ]);
    let stdout = String::from_utf8_lossy(&deployed.stdout);
    assert!(deployed.status.success(), "{stdout}");
    assert_eq!(stdout.matches("tooling-ok").count(), 3, "{stdout}");

    // Stop one polling agent: it is reported unreachable, the rest healthy.
    agents[1].kill();
    let (code, reports) = health_json(&sim, &hub_url);
    assert_eq!(code, Some(1), "an unreachable agent makes the check fail");
    for report in &reports {
        let name = field(report, "name")
            .and_then(|v| v.as_str())
            .expect("name");
        let reachable = field(report, "reachable").and_then(|v| v.as_bool());
        if name == "h-poll-b" {
            assert_eq!(reachable, Some(false), "{report:?}");
            let error = field(report, "error")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            assert!(
                error.contains("h-poll-b") || error.contains("no answer"),
                "{error}"
            );
        } else {
            assert_eq!(reachable, Some(true), "{report:?}");
            assert_eq!(
                field(report, "tooling_current").and_then(|v| v.as_bool()),
                Some(true),
                "{report:?}"
            );
        }
    }
    let table = sim.run(&["health", "--timeout", "3s", "--hub", &hub_url]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("2 reachable, 1 unreachable"), "{table}");
    let _ = hub.kill();
    let _ = hub.wait();
}
