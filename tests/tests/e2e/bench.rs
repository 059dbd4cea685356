//! `tentacle-sim bench --quick`, as CI runs it so the bench never rots: every
//! row runs (or says why not), the JSON keeps its schema, and Tentacle's own
//! rows measure something. Nothing here is about speed.

use std::process::Command;

use serde_json::Value;
use tentacle_tests::bin;

/// Every row the performance issue names, by its bench name.
const ROWS: [&str; 30] = [
    "disk-fsync",
    "rustls-copy",
    "ssh-exec",
    "ssh-exec-master",
    "scp-upload",
    "exec",
    "unary-p50",
    "unary-p99",
    "unary-tonic",
    "unary-operator",
    "concurrent-64",
    "script-first-line",
    "upload-listening",
    "upload-polling",
    "download-listening",
    "download-polling",
    "scp-download",
    "unary-during-upload",
    "agent-rss-during-upload",
    "forwarded-p50",
    "forwarded-p99",
    "forwarded-download",
    "fleet-connect",
    "fleet-hub-memory",
    "fleet-sim-memory",
    "fleet-wave",
    "fleet-wave-lost",
    "fleet-reconnect",
    "agent-idle-rss",
    "agent-binary",
];

/// Rows that need OpenSSH for their value (others only for their peer).
fn needs_openssh(name: &str) -> bool {
    name.starts_with("ssh") || name.starts_with("scp")
}

/// Rows that need etcd for the hub nodes they call through.
fn needs_etcd(name: &str) -> bool {
    name.starts_with("forwarded-")
}

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
    // Every row but the largest fleet, which grows until the hub runs out
    // of descriptors and runs only in the full bench.
    let all: Vec<&str> = tentacle_sim::bench::all_rows()
        .filter(|name| *name != "fleet-largest")
        .collect();
    assert_eq!(names, all, "the quick bench runs every row, in order");
    for name in ROWS {
        assert!(names.contains(&name), "{name} is missing");
    }
    let in_ci = std::env::var("CI").as_deref() == Ok("true");
    for row in rows {
        let name = row["name"].as_str().unwrap_or_default();
        assert!(stdout.contains(name), "the table shows {name}");
        match (row["value"].as_f64(), row["skipped"].as_str()) {
            // Lost scripts are counted: none is the expected figure.
            (Some(value), None) if name == "fleet-wave-lost" => assert_eq!(value, 0.0, "{row}"),
            (Some(value), None) => assert!(value > 0.0, "{name}: {value}"),
            (None, Some(why)) => {
                // Only the OpenSSH and etcd rows may be skipped, and only
                // for a missing OpenSSH or etcd, which CI installs.
                assert!(
                    needs_openssh(name) || needs_etcd(name),
                    "{name} was skipped: {why}"
                );
                assert!(why.contains("apt-get install"), "{name}: {why}");
                assert!(!in_ci, "{name} skipped while CI=true: {why}");
                eprintln!("SKIPPED bench row {name}: {why}");
            }
            other => panic!("{name}: neither measured nor skipped: {other:?}"),
        }
    }
    // Every compared row carries its peer, its per-round ratios and their
    // spread; with OpenSSH present, so do the rows compared with it.
    let with_ssh = rows[3]["value"].is_number();
    for row in rows.iter().filter(|row| row["value"].is_number()) {
        let name = row["name"].as_str().unwrap_or_default();
        let Some(is) = row["ratio_is"].as_str() else {
            continue;
        };
        if is.contains("scp") && !with_ssh {
            continue;
        }
        assert!(row["peer"]["value"].as_f64().is_some(), "{row}");
        let ratio = &row["ratio"];
        assert_eq!(
            ratio["rounds"].as_array().map(Vec::len),
            Some(2),
            "{name}: {row}"
        );
        assert!(ratio["min"].as_f64() <= ratio["median"].as_f64(), "{row}");
        assert!(ratio["median"].as_f64() <= ratio["max"].as_f64(), "{row}");
    }
    let by_name = |name: &str| {
        rows.iter()
            .find(|row| row["name"] == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    // Polling is compared with listening in the same rounds.
    assert_eq!(by_name("unary-p50")["ratio_is"], "polling / listening");
    // A call through a node that does not hold the tunnel is compared
    // with the same call through the node that does.
    for name in ["forwarded-p50", "forwarded-p99", "forwarded-download"] {
        let row = by_name(name);
        if row["value"].is_number() {
            assert_eq!(
                row["ratio_is"], "through the other node / through the owning node",
                "{row}"
            );
        }
    }
    // An upload is compared with the disk's own rate too.
    assert_eq!(
        by_name("upload-polling")["also"][0]["ratio_is"],
        "Tentacle / dd",
        "{}",
        by_name("upload-polling")
    );
    // With OpenSSH present, Tentacle's exec row carries its peer and ratio.
    let exec = &rows[5];
    if with_ssh {
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
