//! `tentacle-sim run` as a person runs it: a real process playing a
//! scenario with chaos against its in-process hub, its reports on disk, its
//! exit status, replay from a seed, shards merged into one report, and
//! invariant checks that catch a planted duplicate or lost line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tentacle_tests::bin;

/// The scenario CI plays, as shipped.
fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../simulator/scenarios")
        .join(name)
}

/// A few agents for a few seconds, chaos on: for the checks that need
/// several runs.
const TINY: &str = r#"
name = "tiny"
time_limit = "2m"
[fleet]
agents = 12
listening_fraction = 0.25
source_addresses = 2
[fleet.scripts]
min_duration = "50ms"
max_duration = "300ms"
min_lines = 3
max_lines = 8
[[stage]]
kind = "scripts"
waves = 2
concurrency = 12
[chaos]
rate_per_agent_per_minute = 6.0
restart_after = "300ms"
[chaos.weights]
disconnect = 3
latency = 2
crash = 1
"#;

fn run_sim(args: &[&str]) -> (Output, PathBuf, tempfile::TempDir) {
    run_sim_with_env(args, &[])
}

fn run_sim_with_env(args: &[&str], env: &[(&str, &str)]) -> (Output, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("report");
    let output = Command::new(bin("tentacle-sim"))
        .arg("--home")
        .arg(dir.path().join("home"))
        .args(args)
        .envs(env.iter().copied())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run tentacle-sim");
    (output, out, dir)
}

fn report(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    serde_json::from_str(&text).expect("report.json is JSON")
}

fn tiny_scenario(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.toml");
    std::fs::write(&path, TINY).expect("write scenario");
    path
}

fn invariant<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["invariants"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no invariant {name} in {report}"))
}

#[test]
fn the_smoke_scenario_passes_every_invariant_under_chaos() {
    let scenario = shipped("smoke.toml");
    let (output, out, _dir) = run_sim(&["run", "--scenario", scenario.to_str().expect("path")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the run passes\n{stdout}\n{stderr}"
    );
    let report = report(&out);
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["agents"]["polling"], 270);
    assert_eq!(report["agents"]["listening"], 30);
    assert!(
        report["agents"]["connect_all_ms"].is_u64(),
        "everyone connected"
    );
    // Two waves over all 300 agents, every one accounted for.
    assert_eq!(report["scripts"]["dispatched"], 600);
    assert_eq!(report["scripts"]["abandoned"], 0);
    assert_eq!(report["uploads"]["verified"], 60);
    for kind in ["disconnect", "latency", "crash", "hub_restart"] {
        assert!(
            report["chaos"][kind].as_u64().unwrap_or(0) > 0,
            "chaos {kind} happened: {}",
            report["chaos"]
        );
    }
    for name in [
        "scripts-ran-once",
        "log-lines-once-in-order",
        "uploads-verified",
        "expected-failures-only",
    ] {
        let i = invariant(&report, name);
        assert_eq!(i["passed"], true, "{i}");
        assert!(i["checked"].as_u64().unwrap_or(0) > 0, "{i}");
    }
    let timeline = report["timeline"].as_array().expect("timeline");
    assert!(timeline.len() >= 10, "a sample a second");
    // Chaos keeps a few agents reconnecting at any moment.
    let most = timeline
        .iter()
        .filter_map(|s| s["connected"].as_u64())
        .max()
        .unwrap_or(0);
    assert!((280..=300).contains(&most), "at most {most} connected");
    assert!(
        timeline
            .iter()
            .any(|s| s["hub_rss_bytes"].as_u64() > Some(0))
    );
    for call in ["StartScript", "WatchScript", "UploadFile", "GetHealth"] {
        let stats = &report["calls"][call];
        assert!(stats["count"].as_u64() > Some(0), "{call}: {stats}");
        assert!(stats["p99_us"].as_u64() >= stats["p50_us"].as_u64());
    }
    let html = std::fs::read_to_string(out.join("report.html")).expect("report.html");
    assert!(html.matches("<svg").count() >= 6);
    // Self-contained: nothing a browser would fetch. (Quoted errors may name
    // an agent's https:// address as text.)
    for external in ["src=", "href=", "<script", "<link", "url(", "@import"] {
        assert!(!html.contains(external), "report.html contains {external}");
    }
    assert!(stdout.contains("[pass] scripts-ran-once"), "{stdout}");
}

#[test]
fn a_seed_replays_the_chaos_schedule_and_shards_merge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scenario = tiny_scenario(dir.path());
    let scenario = scenario.to_str().expect("path");
    let digest = |args: &[&str], env: &[(&str, &str)]| {
        let (output, out, _dir) = run_sim_with_env(args, env);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report = report(&out);
        (
            report["chaos_schedule_sha256"]
                .as_str()
                .expect("digest")
                .to_owned(),
            out,
            _dir,
        )
    };
    let (first, _, _a) = digest(&["run", "--scenario", scenario, "--seed", "41"], &[]);
    let (again, _, _b) = digest(&["run", "--scenario", scenario, "--seed", "41"], &[]);
    let (other, _, _c) = digest(&["run", "--scenario", scenario, "--seed", "42"], &[]);
    assert_eq!(first, again, "the same seed replays the same chaos");
    assert_ne!(first, other, "another seed, other chaos");

    // Two shards hold disjoint agents; their reports merge into one. The
    // second is named as a pod of a Kubernetes Indexed Job names it.
    let (_, one, _d) = digest(
        &[
            "run",
            "--scenario",
            scenario,
            "--seed",
            "41",
            "--shard",
            "1/2",
        ],
        &[],
    );
    let (_, two, _e) = digest(
        &[
            "run",
            "--scenario",
            scenario,
            "--seed",
            "41",
            "--shard",
            "job/2",
        ],
        &[("JOB_COMPLETION_INDEX", "1")],
    );
    let (r1, r2) = (report(&one), report(&two));
    assert_eq!(r1["shards"][0]["shard"], "1/2");
    assert_eq!(r2["shards"][0]["shard"], "2/2");
    assert_eq!(r1["shards"][0]["agents"], 6);
    assert_eq!(r2["shards"][0]["agents"], 6);
    let merged_dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(bin("tentacle-sim"))
        .args(["report", "merge"])
        .arg(one.join("report.json"))
        .arg(two.join("report.json"))
        .arg("--out")
        .arg(merged_dir.path())
        .output()
        .expect("merge");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let merged = report(merged_dir.path());
    let agents = merged["agents"]["polling"].as_u64().unwrap_or(0)
        + merged["agents"]["listening"].as_u64().unwrap_or(0);
    assert_eq!(agents, 12);
    assert_eq!(merged["shards"].as_array().map(Vec::len), Some(2));
    let dispatched = |r: &Value| r["scripts"]["dispatched"].as_u64().unwrap_or(0);
    assert_eq!(dispatched(&merged), dispatched(&r1) + dispatched(&r2));
    assert_eq!(dispatched(&merged), 24);
    let starts = |r: &Value| r["calls"]["StartScript"]["count"].as_u64().unwrap_or(0);
    assert_eq!(starts(&merged), starts(&r1) + starts(&r2));
    assert!(merged_dir.path().join("report.html").exists());
}

#[test]
fn planted_duplicate_and_lost_lines_fail_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scenario = tiny_scenario(dir.path());
    let scenario = scenario.to_str().expect("path");
    for (plant, symptom) in [("duplicate-line", "twice"), ("lost-line", "missing")] {
        let (output, out, _dir) = run_sim(&["run", "--scenario", scenario, "--plant", plant]);
        assert_eq!(
            output.status.code(),
            Some(1),
            "a broken invariant fails the run"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("invariants broken: log-lines-once-in-order"),
            "{stderr}"
        );
        let report = report(&out);
        let lines = invariant(&report, "log-lines-once-in-order");
        assert_eq!(lines["passed"], false);
        assert_eq!(lines["violations"], 1);
        let example = lines["examples"][0].as_str().unwrap_or_default();
        assert!(example.contains(symptom), "{plant}: {example}");
        // The rest held: only the planted fault is reported.
        assert_eq!(invariant(&report, "scripts-ran-once")["passed"], true);
    }
}

#[test]
fn a_bad_scenario_is_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "name = \"x\"\n[fleet]\nagents = 10\nramp = \"1s\"\n").expect("write");
    let (output, _, _dir) = run_sim(&["run", "--scenario", path.to_str().expect("path")]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not valid") && stderr.contains("ramp"),
        "{stderr}"
    );
}
