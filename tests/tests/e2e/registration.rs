//! Agents join a hub's fleet with `tentacle register-with`, authorised by a
//! one-time token or an API key, in either mode; the registry survives a hub
//! restart, and `deregister-from` removes an agent.

use std::time::Duration;

use tentacle_tests::{AgentProcess, FAST_POLLING, HubHome, free_port, stdout_of, tentacle_output};

#[test]
fn agents_register_with_tokens_and_api_keys_and_the_registry_survives_a_restart() {
    let sim = HubHome::new();
    let hub_port = free_port();
    let (mut hub, address) = sim.serve_on(&format!("127.0.0.1:{hub_port}"));
    let hub_url = format!("https://{address}");
    let hub_thumbprint = sim.thumbprint();

    // A polling agent joins with a one-time token.
    let token = stdout_of(&sim.run(&["server", "token", "create"]));
    let mut poller = AgentProcess::prepare(&[], FAST_POLLING);
    let register = |agent: &AgentProcess, extra: &[&str]| {
        let mut args = vec![
            "register-with",
            "--server",
            &hub_url,
            "--server-thumbprint",
            &hub_thumbprint,
        ];
        args.extend_from_slice(extra);
        tentacle_output(agent.home(), &args)
    };
    let joined = register(
        &poller,
        &[
            "--name",
            "web-01",
            "--role",
            "web",
            "--environment",
            "prod",
            "--mode",
            "polling",
            "--token",
            &token,
        ],
    );
    assert!(
        joined.status.success(),
        "{}",
        String::from_utf8_lossy(&joined.stderr)
    );
    assert!(String::from_utf8_lossy(&joined.stdout).contains("poll://web-01"));
    poller.spawn();

    // The same token cannot be used twice, and a made-up one never works.
    let other = AgentProcess::prepare(&[], "");
    for bad in [token.as_str(), "tt_0000"] {
        let refused = register(
            &other,
            &["--name", "web-02", "--mode", "polling", "--token", bad],
        );
        assert_eq!(refused.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("not valid"), "{stderr}");
    }

    // A listening agent joins with an API key, which also works again.
    let key = stdout_of(&sim.run(&["server", "api-key", "create"]));
    let port = free_port();
    let mut listener = AgentProcess::prepare(&[], &format!("[listen]\nport = {port}\n"));
    let joined = register(
        &listener,
        &[
            "--name",
            "web-03",
            "--role",
            "web",
            "--environment",
            "prod",
            "--mode",
            "listening",
            "--public-hostname",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--api-key",
            &key,
        ],
    );
    assert!(
        joined.status.success(),
        "{}",
        String::from_utf8_lossy(&joined.stderr)
    );
    listener.spawn();

    let listed = stdout_of(&sim.run(&["server", "trust", "list"]));
    assert!(
        listed.contains("web-01") && listed.contains("web-03"),
        "{listed}"
    );
    assert!(listed.contains(&poller.thumbprint.to_string()), "{listed}");
    assert!(!listed.contains("web-02"), "{listed}");

    let exec = |target: &str, thumbprint: &str| {
        sim.run(&[
            "exec",
            "--target",
            target,
            "--thumbprint",
            thumbprint,
            "--hub",
            &hub_url,
            "--script",
            "echo hi",
        ])
    };
    let poller_thumbprint = poller.thumbprint.to_string();
    assert_eq!(stdout_of(&exec("poll://web-01", &poller_thumbprint)), "hi");
    let listener_target = format!("https://127.0.0.1:{port}");
    assert_eq!(
        stdout_of(&exec(&listener_target, &listener.thumbprint.to_string())),
        "hi"
    );

    // The hub restarts from its home and still knows both agents.
    let _ = hub.kill();
    let _ = hub.wait();
    let (mut hub, _) = sim.serve_on(&format!("127.0.0.1:{hub_port}"));
    let mut answered = false;
    for _ in 0..50 {
        if exec("poll://web-01", &poller_thumbprint).status.success() {
            answered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        answered,
        "the polling agent is back after the hub restart; log:\n{}",
        poller.log_text()
    );

    // Deregistering removes the agent from the registry.
    let left = tentacle_output(poller.home(), &["deregister-from", "--server", &hub_url]);
    assert!(
        left.status.success(),
        "{}",
        String::from_utf8_lossy(&left.stderr)
    );
    std::thread::sleep(Duration::from_millis(500));
    let listed = stdout_of(&sim.run(&["server", "trust", "list"]));
    assert!(
        !listed.contains("web-01") && listed.contains("web-03"),
        "{listed}"
    );
    let _ = hub.kill();
    let _ = hub.wait();
    listener.kill();
}
