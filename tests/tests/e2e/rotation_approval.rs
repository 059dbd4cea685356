//! A hub's rotation approval policy, with the real binaries: under
//! `operator` a `tentacle rotate-certificate` waits until `tentacle-hub
//! server rotations approve`, and the agent's next run finishes the switch;
//! under `api-key` the announcement needs a hub API key (TENTACLE_API_KEY).

use std::process::Command;
use std::time::{Duration, Instant};

use tentacle_hub::rotation::RotationApproval;
use tentacle_hub::target::Target;
use tentacle_hub::{HubSettings, TrustedAgent};
use tentacle_proto::Thumbprint;
use tentacle_tests::{
    AgentProcess, FAST_POLLING, HubFixture, bin, client_identity, tentacle_output,
};

/// A hub with `policy` and a polling agent registered with it as `name`.
async fn hub_and_agent(
    policy: RotationApproval,
    name: &str,
) -> (tempfile::TempDir, HubFixture, String, AgentProcess) {
    let home = tempfile::tempdir().expect("tempdir");
    let settings = HubSettings {
        rotation_approval: policy,
        ..HubSettings::default()
    };
    let (hub, key) =
        HubFixture::start_registering_with(client_identity(), home.path(), settings).await;
    let agent = AgentProcess::prepare(&[], FAST_POLLING);
    let out = tentacle_output(
        agent.home(),
        &[
            "register-with",
            "--server",
            &hub.url(),
            "--server-thumbprint",
            &hub.thumbprint().to_string(),
            "--name",
            name,
            "--api-key",
            &key,
            "--mode",
            "polling",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (home, hub, key, agent)
}

fn entry(hub: &HubFixture, name: &str) -> TrustedAgent {
    hub.hub
        .agents()
        .iter()
        .find(|a| a.name == name)
        .cloned()
        .expect("registered")
}

fn hub_cli(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("tentacle-hub"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("run tentacle-hub")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_approves_a_rotation_before_the_agent_switches() {
    let (home, hub, _key, mut agent) = hub_and_agent(RotationApproval::Operator, "appr-poll").await;
    agent.spawn();
    let old = agent.thumbprint;

    let pending = tentacle_output(agent.home(), &["rotate-certificate", "--overlap", "60s"]);
    assert!(!pending.status.success(), "a pending rotation is not done");
    let (stdout, stderr) = (text(&pending.stdout), text(&pending.stderr));
    assert!(stderr.contains("pending approval"), "{stderr}");
    assert!(
        stdout.contains("tentacle-hub server rotations approve"),
        "{stdout}"
    );
    assert_eq!(
        entry(&hub, "appr-poll").thumbprint,
        old,
        "nothing trusted yet"
    );
    assert_eq!(entry(&hub, "appr-poll").previous_thumbprint, None);

    let listed = hub_cli(home.path(), &["server", "rotations", "list"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let listed = text(&listed.stdout);
    assert!(
        listed.contains("appr-poll") && listed.contains(&old.to_string()),
        "{listed}"
    );
    let refused = hub_cli(home.path(), &["server", "rotations", "approve", "nobody"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("no pending rotation matches"),
        "{}",
        text(&refused.stderr)
    );
    let approved = hub_cli(
        home.path(),
        &["server", "rotations", "approve", "appr-poll"],
    );
    assert!(approved.status.success(), "{}", text(&approved.stderr));

    // The running hub applies the approval by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    while entry(&hub, "appr-poll").previous_thumbprint != Some(old) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let approved_entry = entry(&hub, "appr-poll");
    assert_eq!(approved_entry.previous_thumbprint, Some(old));
    let new = approved_entry.thumbprint;

    // The agent's next run announces the same certificate and switches.
    let finished = tentacle_output(agent.home(), &["rotate-certificate", "--overlap", "60s"]);
    assert!(finished.status.success(), "{}", text(&finished.stderr));
    let printed: Thumbprint = text(&finished.stdout)
        .lines()
        .last()
        .expect("the new thumbprint")
        .trim()
        .parse()
        .expect("thumbprint");
    assert_eq!(printed, new, "the approved certificate is the one in use");
    assert!(
        agent.wait_for_log("switched to a new certificate", Duration::from_secs(10)),
        "{}",
        agent.log_text()
    );
    let target: Target = "poll://appr-poll".parse().expect("target");
    hub.hub
        .client(&target, new)
        .await
        .expect("client")
        .capabilities()
        .await
        .expect("a call to the agent with its new certificate");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_that_asks_for_an_api_key_rotates_only_with_one() {
    let (_home, hub, key, agent) = hub_and_agent(RotationApproval::ApiKey, "appr-key").await;
    let old = agent.thumbprint;
    let refused = tentacle_output(agent.home(), &["rotate-certificate"]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("asks for an API key"), "{stderr}");
    assert_eq!(entry(&hub, "appr-key").thumbprint, old);

    let rotated = Command::new(bin("tentacle"))
        .arg("--home")
        .arg(agent.home())
        .args(["rotate-certificate", "--overlap", "60s"])
        .env("TENTACLE_API_KEY", &key)
        .output()
        .expect("run tentacle");
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));
    let (stdout, stderr) = (text(&rotated.stdout), text(&rotated.stderr));
    assert!(
        !stdout.contains(&key) && !stderr.contains(&key),
        "the API key is never printed"
    );
    let rotated_entry = entry(&hub, "appr-key");
    assert_eq!(rotated_entry.previous_thumbprint, Some(old));
    assert_ne!(rotated_entry.thumbprint, old);
}
