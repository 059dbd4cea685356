//! `tentacle-sim bench --quick`, as CI runs it so the bench never rots: every
//! row runs (or says why not), the JSON keeps its schema, and Tentacle's own
//! rows measure something. Nothing here is about speed.

use std::process::Command;

use serde_json::Value;
use tentacle_tests::bin;

const ROWS: [&str; 6] = [
    "disk-fsync",
    "rustls-copy",
    "ssh-exec",
    "ssh-exec-master",
    "scp-upload",
    "exec",
];

#[test]
fn the_quick_bench_runs_every_row_and_writes_its_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let output = Command::new(bin("tentacle-sim"))
        .args(["bench", "--quick", "--json"])
        .arg(&json)
        .current_dir(dir.path())
        .output()
        .expect("run tentacle-sim bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON file"))
            .expect("JSON");
    assert_eq!(report["schema"], "tentacle-bench/1");
    assert_eq!(report["quick"], true);
    assert!(report["machine"]["cpus"].as_u64().unwrap_or(0) >= 1);
    let rows = report["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ROWS);
    let in_ci = std::env::var("CI").as_deref() == Ok("true");
    for row in rows {
        let name = row["name"].as_str().unwrap_or_default();
        assert!(stdout.contains(name), "the table shows {name}");
        match (row["value"].as_f64(), row["skipped"].as_str()) {
            (Some(value), None) => assert!(value > 0.0, "{name}: {value}"),
            (None, Some(why)) => {
                // Only the OpenSSH rows may be skipped, and only for a
                // missing OpenSSH, which CI installs.
                assert!(
                    name.starts_with("ssh") || name.starts_with("scp"),
                    "{name} was skipped: {why}"
                );
                assert!(why.contains("apt-get install"), "{name}: {why}");
                assert!(!in_ci, "{name} skipped while CI=true: {why}");
                eprintln!("SKIPPED bench row {name}: {why}");
            }
            other => panic!("{name}: neither measured nor skipped: {other:?}"),
        }
    }
    // With OpenSSH present, Tentacle's exec row carries its peer and ratio.
    let exec = &rows[5];
    if rows[3]["value"].is_number() {
        assert!(
            exec["peer"]["value"].as_f64().unwrap_or(0.0) > 0.0,
            "{exec}"
        );
        let ratio = &exec["ratio"];
        assert_eq!(ratio["rounds"].as_array().map(Vec::len), Some(2), "{exec}");
        assert!(ratio["min"].as_f64() <= ratio["median"].as_f64());
        assert!(ratio["median"].as_f64() <= ratio["max"].as_f64());
        assert_eq!(exec["ratio_is"], "ssh-exec-master / exec (times faster)");
    }
    // The scratch directory went away with the run.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tentacle-bench-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn an_unknown_row_is_one_line_naming_the_rows() {
    let output = Command::new(bin("tentacle-sim"))
        .args(["bench", "--only", "nope"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no row is named `nope`"), "{stderr}");
    assert!(stderr.contains("disk-fsync, rustls-copy"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing printed before the error");
}
