//! A fleet of virtual tentacles in one process: each registers with the hub
//! under its own certificate, opens a real tunnel, and runs simulated
//! scripts through the real services.

use std::time::{Duration, Instant};

use tentacle_hub::target::Target;
use tentacle_proto::dial::ListeningAddress;
use tentacle_sim::fleet::{Fleet, FleetSettings, ScriptModel};
use tentacle_tests::{
    HubFixture, HubHome, bash, bin, client_identity, established_sources_to, run_to_end, stdout_of,
};

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_virtual_agents_connect_and_run_scripts() {
    let home = tempfile::tempdir().expect("tempdir");
    let (hub, key) = HubFixture::start_registering(client_identity(), home.path()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let model = ScriptModel {
        failure_probability: 0.3,
        failure_exit_code: 9,
        ..ScriptModel::default()
    };
    let seed = 20261124;
    let started = Instant::now();
    let mut settings = FleetSettings::new(
        100,
        ListeningAddress::new("127.0.0.1", hub.address.port()),
        hub.thumbprint(),
        key,
        work.path().to_owned(),
    );
    settings.environments = vec!["test".into()];
    settings.model = model.clone();
    settings.seed = seed;
    settings.registration_parallelism = 16;
    settings.reconnect_initial = Duration::from_millis(200);
    settings.reconnect_max = Duration::from_secs(2);
    let fleet = Fleet::start(settings).await.expect("the fleet starts");
    while hub.hub.registry().connected_agents() < 100 && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        hub.hub.registry().connected_agents(),
        100,
        "every virtual agent connected"
    );
    eprintln!(
        "100 virtual agents registered and connected in {:?}",
        started.elapsed()
    );
    assert_eq!(
        hub.hub.agents().len(),
        100,
        "each registered under its own certificate"
    );

    // Scripts on a tenth of the fleet, at once.
    let mut runs = Vec::new();
    for agent in fleet.agents.iter().step_by(10) {
        let target: Target = format!("poll://{}", agent.name).parse().expect("target");
        let client = hub
            .hub
            .client(&target, agent.thumbprint)
            .await
            .expect("client");
        runs.push(tokio::spawn(async move {
            let request = bash("simulated");
            let ticket = request.ticket.clone();
            let (lines, code) = run_to_end(&client, request).await;
            (ticket, lines, code)
        }));
    }
    for run in runs {
        let (ticket, lines, code) = run.await.expect("run");
        let plan = model.plan(seed, &ticket);
        assert_eq!(code, plan.exit_code, "{ticket}");
        let sequences: Vec<u64> = lines.iter().map(|l| l.sequence).collect();
        assert_eq!(
            sequences,
            (1..=u64::from(plan.lines)).collect::<Vec<_>>(),
            "{ticket}: every line once, in order"
        );
    }
}

/// `tentacle-sim fleet` against a running `tentacle-hub server`: polling
/// agents dial from several loopback source addresses, listening ones serve
/// on ports of their own, and the hub trusts every one of them.
#[test]
fn the_fleet_verb_runs_both_modes_and_spreads_source_addresses() {
    let sim = HubHome::new();
    let (mut hub, address) = sim.serve();
    let key = stdout_of(&sim.run(&["server", "api-key", "create"]));
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut fleet = std::process::Command::new(bin("tentacle-sim"))
        .arg("--home")
        .arg(sim.0.path())
        .args(["fleet", "--agents", "24", "--listening", "4"])
        .args(["--source-addresses", "4", "--duration", "60s"])
        .args(["--hub", &format!("https://{address}"), "--api-key", &key])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().expect("log"))
        .spawn()
        .expect("start the fleet");

    let deadline = Instant::now() + Duration::from_secs(60);
    let registered = || {
        std::fs::read_to_string(log.path())
            .unwrap_or_default()
            .contains("virtual tentacles registered")
    };
    let mut sources = Vec::new();
    while Instant::now() < deadline {
        // Connections *to* the hub's port: the agents' ends, by source.
        // Registrations use short-lived connections of their own, so count
        // only once every agent has registered.
        sources = established_sources_to(address.port());
        if registered() && sources.len() == 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed = stdout_of(&sim.run(&["server", "trust", "list"]));
    let _ = fleet.kill();
    let _ = fleet.wait();
    let _ = hub.kill();
    let _ = hub.wait();
    let stderr = std::fs::read_to_string(log.path()).unwrap_or_default();

    assert_eq!(
        sources.len(),
        20,
        "one tunnel per polling agent; log:\n{stderr}"
    );
    let mut distinct: Vec<String> = sources.iter().map(ToString::to_string).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct,
        ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"],
        "polling agents spread over four source addresses"
    );
    assert!(
        stderr.contains("24 virtual tentacles registered")
            && stderr.contains("20 polling from 4 source address(es), 4 listening"),
        "{stderr}"
    );
    assert_eq!(listed.matches("  polling  ").count(), 20, "{listed}");
    assert_eq!(listed.matches("  listening").count(), 4, "{listed}");
}
