//! The hub as a person runs it: `tentacle-hub server` in its own process,
//! agents trusted with `server trust add`, and `tentacle-hub exec --target
//! poll://ID` reaching a polling agent through it.

use std::time::Duration;

use tentacle_tests::{AgentProcess, HubHome};

#[test]
fn exec_reaches_a_polling_agent_through_a_running_hub() {
    let sim = HubHome::new();
    let (mut hub, address) = sim.serve();
    let hub_url = format!("https://{address}");

    let mut agent = AgentProcess::prepare_polling(&hub_url, &sim.thumbprint());
    let agent_id = agent.agent_id();
    let agent_thumbprint = agent.thumbprint.to_string();
    let added = sim.run(&[
        "server",
        "trust",
        "add",
        "--thumbprint",
        &agent_thumbprint,
        "--name",
        &agent_id,
        "--mode",
        "polling",
    ]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let listed =
        String::from_utf8_lossy(&sim.run(&["server", "trust", "list"]).stdout).into_owned();
    assert!(
        listed.contains(&agent_id) && listed.contains(&agent_thumbprint),
        "{listed}"
    );
    // The running hub picks the new entry up by itself.
    agent.spawn();

    let target = format!("poll://{agent_id}");
    let out = sim.run(&[
        "exec",
        "--target",
        &target,
        "--thumbprint",
        &agent_thumbprint,
        "--hub",
        &hub_url,
        "--script",
        "echo hello; exit 3",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3));

    // Someone else's certificate may not send calls through this hub.
    let stranger = HubHome::new();
    let refused = stranger.run(&[
        "exec",
        "--target",
        &target,
        "--thumbprint",
        &agent_thumbprint,
        "--hub",
        &hub_url,
        "--hub-thumbprint",
        &sim.thumbprint(),
        "--script",
        "true",
    ]);
    assert_eq!(refused.status.code(), Some(1));

    // Removing the agent's trust closes its tunnel; calls then wait and time out.
    assert!(
        sim.run(&[
            "server",
            "trust",
            "remove",
            "--thumbprint",
            &agent_thumbprint
        ])
        .status
        .success()
    );
    assert!(
        agent.wait_for_log("tunnel closed", Duration::from_secs(10)),
        "{}",
        agent.log_text()
    );
    let timed_out = sim.run(&[
        "exec",
        "--target",
        &target,
        "--thumbprint",
        &agent_thumbprint,
        "--hub",
        &hub_url,
        "--pickup-timeout",
        "500ms",
        "--script",
        "true",
    ]);
    assert_eq!(timed_out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&timed_out.stderr);
    assert!(
        stderr.contains(&agent_id) && stderr.contains("did not connect"),
        "{stderr}"
    );

    let _ = hub.kill();
    let _ = hub.wait();
}
