//! The hub's registry (`agents.toml`) and credentials (`credentials.toml`)
//! have many writers in many processes: the running `tentacle-hub server`
//! (registrations, token use) and `tentacle-hub server trust`, `token
//! create` and `api-key create` from other shells. Run all at once, no
//! writer loses another's change; a writer that cannot get the lock says
//! so in one line naming the lock file.

use std::collections::BTreeSet;
use std::process::Output;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tentacle_proto::Thumbprint;
use tentacle_proto::v1::register_request::Credential;
use tentacle_tests::registering::{loopback, register_new_agent};
use tentacle_tests::{HubHome, stdout_of};

/// The registry's names, read from the file.
fn registered_names(home: &HubHome) -> BTreeSet<String> {
    let text = std::fs::read_to_string(home.0.path().join("agents.toml")).expect("agents.toml");
    let table: toml::Table = text.parse().expect("agents.toml is TOML");
    table
        .get("agent")
        .and_then(|a| a.as_array())
        .map(|agents| {
            agents
                .iter()
                .filter_map(|a| a.get("name")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The SHA-256 of every stored credential, read from the file.
fn stored_hashes(home: &HubHome) -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(home.0.path().join("credentials.toml")).expect("credentials.toml");
    let table: toml::Table = text.parse().expect("credentials.toml is TOML");
    table
        .get("credential")
        .and_then(|c| c.as_array())
        .map(|credentials| {
            credentials
                .iter()
                .filter_map(|c| c.get("sha256")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.trim().as_bytes()))
}

fn succeeded(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// 20 `server trust add`, 5 `server trust remove`, 20 `token create` and
/// 20 `api-key create`, each its own process, all at once, while 30
/// agents register through the running hub (20 by API key, 10 spending
/// one-time tokens, which rewrites `credentials.toml` too). At the end
/// every entry each writer reported is in the files, every removed or
/// used one is gone, and the running hub serves what the files say.
#[test]
fn concurrent_writers_in_many_processes_lose_no_change() {
    let home = HubHome::new();
    let (mut hub, address) = home.serve();
    let hub_thumbprint: Thumbprint = home.thumbprint().parse().expect("thumbprint");

    // What exists before the race: entries to remove, tokens to spend, a key.
    let trust_add = |name: &str, thumbprint: &Thumbprint| {
        home.run(&[
            "server",
            "trust",
            "add",
            "--thumbprint",
            &thumbprint.to_string(),
            "--name",
            name,
            "--mode",
            "polling",
        ])
    };
    let doomed: Vec<(String, Thumbprint)> = (0..5)
        .map(|i| {
            let name = format!("doomed-{i}");
            let thumbprint = Thumbprint::of_der(name.as_bytes());
            succeeded(&trust_add(&name, &thumbprint), "trust add before the race");
            (name, thumbprint)
        })
        .collect();
    let tokens: Vec<String> = (0..10)
        .map(|_| stdout_of(&home.run(&["server", "token", "create"])))
        .collect();
    let key = stdout_of(&home.run(&["server", "api-key", "create"]));

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let started = Instant::now();
    let (cli, registered) = std::thread::scope(|scope| {
        let mut cli = Vec::new();
        for i in 0..20 {
            let name = format!("cli-{i}");
            let home = &home;
            let trust_add = &trust_add;
            cli.push(scope.spawn(move || {
                let thumbprint = Thumbprint::of_der(name.as_bytes());
                succeeded(&trust_add(&name, &thumbprint), "trust add");
                ("agent", name)
            }));
            cli.push(scope.spawn(move || {
                (
                    "token",
                    stdout_of(&home.run(&["server", "token", "create"])),
                )
            }));
            cli.push(scope.spawn(move || {
                (
                    "key",
                    stdout_of(&home.run(&["server", "api-key", "create"])),
                )
            }));
        }
        for (name, thumbprint) in &doomed {
            let home = &home;
            cli.push(scope.spawn(move || {
                let removed = home.run(&[
                    "server",
                    "trust",
                    "remove",
                    "--thumbprint",
                    &thumbprint.to_string(),
                ]);
                succeeded(&removed, "trust remove");
                ("removed", name.clone())
            }));
        }
        let registered = runtime.block_on(async {
            let credentials = (0..20)
                .map(|_| Credential::ApiKey(key.clone()))
                .chain(tokens.iter().map(|t| Credential::Token(t.clone())));
            let attempts: Vec<_> = credentials
                .enumerate()
                .map(|(i, credential)| {
                    tokio::spawn(async move {
                        let name = format!("registered-{i}");
                        register_new_agent(loopback(1), address, hub_thumbprint, &name, credential)
                            .await
                            .map(|_| name)
                    })
                })
                .collect();
            let mut names = Vec::new();
            for attempt in attempts {
                names.push(attempt.await.expect("task").expect("registered"));
            }
            names
        });
        let cli: Vec<_> = cli
            .into_iter()
            .map(|c| c.join().expect("cli writer"))
            .collect();
        (cli, registered)
    });
    let raced_for = started.elapsed();

    let names = registered_names(&home);
    let hashes = stored_hashes(&home);
    let mut expected_names = 0;
    for (what, value) in &cli {
        match *what {
            "agent" => {
                expected_names += 1;
                assert!(
                    names.contains(value),
                    "{value} was added; the registry has {names:?}"
                );
            }
            "removed" => assert!(!names.contains(value), "{value} was removed: {names:?}"),
            _ => assert!(
                hashes.contains(&hash(value)),
                "a created {what} is stored (raced for {raced_for:?})"
            ),
        }
    }
    for name in &registered {
        assert!(
            names.contains(name),
            "{name} registered; the registry has {names:?}"
        );
    }
    assert_eq!(names.len(), expected_names + registered.len(), "{names:?}");
    for token in &tokens {
        assert!(
            !hashes.contains(&hash(token)),
            "a used token is never brought back"
        );
    }
    assert!(hashes.contains(&hash(&key)));
    assert_eq!(
        hashes.len(),
        1 + 40,
        "the key and the 40 made during the race"
    );

    // The running hub picks the CLI's edits up: it lists what the file has.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = stdout_of(&home.run(&["server", "trust", "list"]));
        let from_hub = runtime.block_on(async {
            let identity = tentacle_hub::home::HubHome::new(home.0.path())
                .identity()
                .expect("the hub's identity");
            let channel = tentacle_tests::registering::channel_from(
                loopback(1),
                address,
                hub_thumbprint,
                &identity,
            )
            .await
            .expect("connect as an operator");
            tentacle_proto::v1::fleet_service_client::FleetServiceClient::new(channel)
                .list_agents(tentacle_proto::v1::ListAgentsRequest::default())
                .await
                .expect("list")
                .into_inner()
                .agents
                .into_iter()
                .map(|a| a.name)
                .collect::<BTreeSet<_>>()
        });
        if from_hub == names {
            assert_eq!(listed.lines().count(), names.len(), "{listed}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hub lists {from_hub:?}, the file has {names:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = hub.kill();
    let _ = hub.wait();
}

/// A CLI writer that cannot take the lock within `--lock-timeout` fails
/// in one line that names the lock file, and writes nothing.
#[test]
fn a_writer_that_cannot_take_the_lock_says_which_file_in_one_line() {
    use nix::fcntl::{Flock, FlockArg};
    let home = HubHome::new();
    let lock_path = home.0.path().join("agents.toml.lock");
    let lock_file = std::fs::File::create(&lock_path).expect("lock file");
    let held = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).expect("hold the lock");
    let thumbprint = Thumbprint::of_der(b"web-01").to_string();
    let started = Instant::now();
    let refused = home.run(&[
        "--lock-timeout",
        "300ms",
        "server",
        "trust",
        "add",
        "--thumbprint",
        &thumbprint,
        "--name",
        "web-01",
        "--mode",
        "polling",
    ]);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&lock_path.display().to_string()) && stderr.contains("--lock-timeout"),
        "{stderr}"
    );
    assert!(!home.0.path().join("agents.toml").exists());
    drop(held);
    let added = home.run(&[
        "server",
        "trust",
        "add",
        "--thumbprint",
        &thumbprint,
        "--name",
        "web-01",
        "--mode",
        "polling",
    ]);
    succeeded(&added, "trust add once the lock is free");
    assert_eq!(
        registered_names(&home),
        BTreeSet::from(["web-01".to_owned()])
    );
}
