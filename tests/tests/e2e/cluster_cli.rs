//! `tentacle-hub` on etcd from the command line: a hub that speaks TLS with
//! client certificates to etcd, and `store migrate`, which turns a single
//! hub's file registry into the first node of a cluster without its agents
//! registering again.

use tentacle_tests::etcd::{EtcdCluster, etcd_or_skip};
use tentacle_tests::{AgentProcess, FAST_POLLING, HubHome, stdout_of};

#[test]
fn the_registry_verbs_and_the_hub_speak_tls_to_etcd_with_client_certificates() {
    if !etcd_or_skip(
        "cluster_cli::the_registry_verbs_and_the_hub_speak_tls_to_etcd_with_client_certificates",
    ) {
        return;
    }
    let etcd = EtcdCluster::start_tls(1);
    let files = etcd.tls_files().expect("a TLS cluster has files");
    let mut home = HubHome::new();
    home.1.push(("TENTACLE_HUB_STORE".into(), etcd.store_url()));
    home.1.push((
        "TENTACLE_HUB_ETCD_CA".into(),
        files.ca.display().to_string(),
    ));
    let thumbprint = "cd".repeat(32);
    let add = [
        "server",
        "trust",
        "add",
        "--thumbprint",
        &thumbprint,
        "--name",
        "web-01",
        "--mode",
        "polling",
    ];
    // A client certificate etcd's CA did not sign (the hub's own) is
    // refused by etcd, in one line that names etcd, and nothing is stored.
    let own_cert = home
        .0
        .path()
        .join("tentacle-hub.crt.pem")
        .display()
        .to_string();
    let own_key = home
        .0
        .path()
        .join("tentacle-hub.key.pem")
        .display()
        .to_string();
    let refused = home.run(
        &[
            &add[..],
            &["--etcd-cert", &own_cert, "--etcd-key", &own_key],
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("etcd"), "{stderr}");
    // The CA alone is not enough: the flags say what else is needed.
    let incomplete = home.run(&add);
    let stderr = String::from_utf8_lossy(&incomplete.stderr);
    assert!(!incomplete.status.success(), "{stderr}");
    assert!(stderr.contains("--etcd-cert"), "{stderr}");

    home.1.push((
        "TENTACLE_HUB_ETCD_CERT".into(),
        files.cert.display().to_string(),
    ));
    home.1.push((
        "TENTACLE_HUB_ETCD_KEY".into(),
        files.key.display().to_string(),
    ));
    let saved = home.run(&add);
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    let listed = stdout_of(&home.run(&["server", "trust", "list"]));
    assert!(
        listed.contains("web-01") && listed.contains(&thumbprint),
        "{listed}"
    );
    // What was written is in etcd itself, read by etcdctl with the same
    // client certificate.
    let stored = etcd
        .get(0, "/tentacle/agents/web-01")
        .expect("etcdctl get")
        .expect("the agent's key");
    assert!(stored.contains(&thumbprint), "{stored}");
}

#[test]
fn store_migrate_copies_a_file_registry_into_etcd_once() {
    if !etcd_or_skip("cluster_cli::store_migrate_copies_a_file_registry_into_etcd_once") {
        return;
    }
    let etcd = EtcdCluster::start(1);
    // A single hub on its files, with a registered agent and a token.
    let home = HubHome::new();
    let agent = AgentProcess::prepare(&[], FAST_POLLING);
    home.trust_polling(&agent);
    let token = stdout_of(&home.run(&["server", "token", "create"]));
    let migrate = |home: &HubHome| home.run(&["store", "migrate", "--store", &etcd.store_url()]);
    let first = migrate(&home);
    let said = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        said.contains("Copied 1 agents (0 already there), 1 credentials"),
        "{said}"
    );
    let again = migrate(&home);
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(
        said.contains("Copied 0 agents (1 already there), 0 credentials"),
        "{said}"
    );

    // The cluster knows the agent, and has the token, hashed as it was.
    let mut on_etcd = HubHome::new();
    on_etcd
        .1
        .push(("TENTACLE_HUB_STORE".into(), etcd.store_url()));
    let listed = stdout_of(&on_etcd.run(&["server", "trust", "list"]));
    assert!(listed.contains(&agent.agent_id()), "{listed}");
    assert!(listed.contains(&agent.thumbprint.to_string()), "{listed}");
    use sha2::Digest;
    let hashed = hex::encode(sha2::Sha256::digest(token.trim().as_bytes()));
    let stored = etcd
        .get(0, &format!("/tentacle/credentials/{hashed}"))
        .expect("etcdctl get");
    assert!(
        stored.is_some_and(|s| !s.contains(token.trim())),
        "the hash, never the token"
    );

    // Without an etcd store to copy into, migrate says what to give.
    let nowhere = home.run(&["store", "migrate"]);
    let stderr = String::from_utf8_lossy(&nowhere.stderr);
    assert!(!nowhere.status.success());
    assert!(stderr.contains("--store etcd://"), "{stderr}");
}
