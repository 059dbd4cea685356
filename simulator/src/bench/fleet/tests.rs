use super::parse::*;
use super::*;

#[test]
fn vm_rss_is_read_from_proc_status() {
    let status =
        "Name:\ttentacle-hub\nVmPeak:\t  900000 kB\nVmRSS:\t  916848 kB\nRssAnon:\t  900000 kB\n";
    assert_eq!(vm_rss_kib(status), Some(916_848));
    assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    assert_eq!(vm_rss_kib("VmRSS:\tlots kB\n"), None);
}

#[test]
fn kib_fields_match_the_whole_name() {
    let meminfo =
        "MemTotal:       24000000 kB\nMemFree:        20000000 kB\nMemAvailable:   22000000 kB\n";
    assert_eq!(kib_field(meminfo, "MemAvailable"), Some(22_000_000));
    assert_eq!(kib_field(meminfo, "MemTotal"), Some(24_000_000));
    assert_eq!(kib_field(meminfo, "Mem"), None);
}

#[test]
fn metrics_are_read_by_exact_name() {
    let text = "# HELP tentacle_hub_connected_agents Polling agents with a tunnel.\n\
                # TYPE tentacle_hub_connected_agents gauge\n\
                tentacle_hub_connected_agents_total 3\n\
                tentacle_hub_connected_agents 9999\n";
    assert_eq!(metric(text, "tentacle_hub_connected_agents"), Some(9999.0));
    assert_eq!(metric(text, "tentacle_hub_other"), None);
}

#[test]
fn the_soft_open_file_limit_is_read_from_proc_limits() {
    let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                  Max processes             95000                95000                processes \n\
                  Max open files            20000                20000                files     \n";
    assert_eq!(max_open_files(limits), Some(20_000));
    assert_eq!(max_open_files("Limit  Soft Limit\n"), None);
}

#[test]
fn the_deploy_summary_is_its_last_line() {
    let stderr = "Deploying to 10000 target(s), 10000 at a time\n[virtual-1] started\n";
    let stdout = "[virtual-1] wave\n\nname  result  time  target\nvirtual-1  succeeded  0.2s  poll://virtual-1\n9998 succeeded, 2 failed\n";
    assert_eq!(
        deploy_summary(stdout, stderr),
        Some(DeploySummary {
            targets: Some(10_000),
            succeeded: 9998,
            failed: 2,
        })
    );
    assert_eq!(deploy_summary("[virtual-1] wave\n", stderr), None);
    assert_eq!(
        deploy_summary("3 succeeded, 0 failed\n", ""),
        Some(DeploySummary {
            targets: None,
            succeeded: 3,
            failed: 0,
        })
    );
}

#[test]
fn failure_reasons_are_counted_from_the_summary_table() {
    let stdout = "[virtual-1] wave\n\n\
                  name       result     time  target\n\
                  virtual-1  succeeded  0.2s  poll://virtual-1\n\
                  virtual-2  failed     9.1s  poll://virtual-2  unavailable: no tunnel\n\
                  virtual-3  failed     1.0s  poll://virtual-3  exit code 4\n\
                  virtual-5  failed     1.0s  poll://virtual-5  could not read `t-5`: EMFILE\n\
                  virtual-6  failed     1.0s  poll://virtual-6  could not read `t-6`: EMFILE\n\
                  virtual-4  failed    10.0s  poll://virtual-4  unavailable: no tunnel\n\
                  1 succeeded, 5 failed\n";
    assert_eq!(
        failure_reasons(stdout),
        [
            ("unavailable: no tunnel".to_owned(), 2),
            ("could not read `…`: EMFILE".to_owned(), 2),
            ("exit code 4".to_owned(), 1)
        ]
    );
    assert!(failure_reasons("3 succeeded, 0 failed\n").is_empty());
}

#[test]
fn the_histogram_counts_per_whole_second() {
    let samples = [
        (0.0, 0),
        (0.4, 10),
        (1.0, 30),
        (1.2, 35),
        (2.9, 90),
        (3.1, 100),
    ];
    assert_eq!(connected_each_second(&samples), [30, 35, 90, 100]);
    assert_eq!(per_second(&samples), [30, 5, 55, 10]);
}

#[test]
fn fleets_are_split_evenly_within_the_limit() {
    assert_eq!(shards(1), [1]);
    assert_eq!(shards(5_000), [5_000]);
    assert_eq!(shards(10_000), [5_000, 5_000]);
    assert_eq!(shards(10_001), [3_334, 3_334, 3_333]);
}

#[test]
fn the_histogram_never_goes_negative_and_handles_no_samples() {
    assert!(per_second(&[]).is_empty());
    assert_eq!(per_second(&[(0.5, 5), (1.5, 2), (2.5, 7)]), [5, 0, 5]);
    assert_eq!(per_second(&[(0.0, 4)]), [4]);
}

#[test]
fn every_wanted_row_comes_back_once_in_order() {
    let mut rows = Rows::new(
        &["agent-binary", "fleet-connect", "exec"],
        10,
        PathBuf::from("/nowhere"),
    );
    rows.measured("fleet-connect", "m".to_owned(), 1.5);
    rows.measured("fleet-connect", "again".to_owned(), 9.0);
    rows.measured("fleet-wave", "not asked".to_owned(), 1.0);
    let done = rows.finish();
    let names: Vec<&str> = done.iter().map(|row| row.name).collect();
    assert_eq!(names, ["fleet-connect", "agent-binary"]);
    assert_eq!(done[0].value, Some(1.5));
    assert_eq!(done[0].unit, "s");
    assert_eq!(done[1].skipped.as_deref(), Some("not reached"));
}

#[test]
fn missing_binaries_skip_the_rows_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = tempfile::tempdir().expect("tempdir");
    let rows = rows_with(
        empty.path(),
        dir.path(),
        10,
        &["fleet-connect", "fleet-wave", "agent-binary"],
    );
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let why = row.skipped.as_deref().expect("skipped");
        assert!(why.contains("is missing"), "{why}");
        assert_eq!(row.value, None);
    }
}

/// By hand, with release binaries (`cargo build --release --bins`):
/// `TENTACLE_BENCH_BIN_DIR=target/release FLEET_AGENTS=1000 cargo test -p
/// tentacle-sim --release --lib bench::fleet::tests::by_hand -- --ignored
/// --nocapture`; `FLEET_ROWS=fleet-largest` (comma-separated) picks rows.
#[test]
#[ignore = "starts thousands of agents; run by hand"]
fn by_hand() {
    let agents = std::env::var("FLEET_AGENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let names: Vec<&'static str> = match std::env::var("FLEET_ROWS") {
        Ok(list) => ROWS
            .into_iter()
            .filter(|name| list.split(',').any(|wanted| wanted == *name))
            .collect(),
        Err(_) => ROWS.into_iter().filter(|name| *name != LARGEST).collect(),
    };
    let dir = std::env::var_os("FLEET_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let started = Instant::now();
    for row in fleet_rows(&dir, agents, &names) {
        crate::bench::print_row(&row);
    }
    eprintln!("{:.1} s", started.elapsed().as_secs_f64());
}
