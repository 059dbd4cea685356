//! A fleet of virtual tentacles in one process: each registers with the hub
//! under its own certificate, opens a real tunnel, and runs simulated
//! scripts through the real services.

use std::time::{Duration, Instant};

use tentacle_proto::dial::ListeningAddress;
use tentacle_sim::fleet::{Fleet, FleetSettings, ScriptModel};
use tentacle_sim::target::Target;
use tentacle_tests::{HubFixture, bash, client_identity, run_to_end};

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
