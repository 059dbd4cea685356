//! The etcd harness (`tentacle_tests::etcd`) against real etcd: a
//! three-member cluster replicates, keeps quorum with one member down,
//! loses it with two, and gets it back when they restart over their data
//! directories; a TLS cluster refuses a client without a certificate.
//!
//! The tests of the hub on etcd rely on exactly these behaviours, so they
//! are proved here, with etcdctl, apart from the hub's own client.

use std::time::Duration;

use tentacle_tests::etcd::{Credentials, EtcdCluster, etcd_or_skip};

/// Time for the survivors to elect a new leader after one is killed: a few
/// election timeouts (2 s each) on a busy machine.
const ELECTION: Duration = Duration::from_secs(20);

/// Time for restarted members to rejoin and the cluster to be healthy.
const REJOIN: Duration = Duration::from_secs(30);

#[test]
fn three_members_replicate_lose_quorum_and_recover() {
    if !etcd_or_skip("etcd_harness::three_members_replicate_lose_quorum_and_recover") {
        return;
    }
    let mut cluster = EtcdCluster::start(3);
    let logs = |c: &EtcdCluster| c.all_logs();

    // Three distinct members, all in one cluster, named in the store URL.
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    let mut distinct = endpoints.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{endpoints:?}");
    assert_eq!(
        cluster.store_url(),
        format!("etcd://{}", endpoints.join(","))
    );
    assert!(cluster.tls_files().is_none());
    for member in 0..3 {
        assert!(cluster.is_running(member));
        assert_eq!(
            cluster.member_count(member).expect("member list"),
            3,
            "member {member} sees the whole cluster"
        );
        assert!(
            cluster
                .log_text(member)
                .contains(&format!("Name:member-{member} ")),
            "member {member}'s log is kept: {}",
            cluster.log_text(member)
        );
    }

    // Written through member 0, read through member 2.
    cluster.put(0, "/tentacle/a", "one").expect("put");
    assert_eq!(
        cluster.get(2, "/tentacle/a").expect("get").as_deref(),
        Some("one")
    );
    assert_eq!(cluster.get(2, "/tentacle/absent").expect("get"), None);

    // One member down (SIGKILL): two of three keep quorum.
    cluster.kill(0);
    assert!(!cluster.is_running(0));
    cluster
        .put_within(1, "/tentacle/b", "two", ELECTION)
        .unwrap_or_else(|e| panic!("a put with two of three members: {e}\n{}", logs(&cluster)));
    assert_eq!(
        cluster.get(2, "/tentacle/b").expect("get").as_deref(),
        Some("two")
    );

    // A second member down (SIGTERM this time): no quorum, the put fails
    // within etcdctl's --command-timeout instead of hanging.
    let status = cluster.stop(1).expect("member 1 was running");
    assert!(!cluster.is_running(1), "stopped: {status}");
    assert!(cluster.is_running(2));
    let refused = cluster.put(2, "/tentacle/c", "three");
    let why = refused
        .expect_err("a put with one of three members succeeded")
        .to_string();
    assert!(
        why.contains("deadline exceeded") || why.contains("timed out"),
        "the put timed out (member 2 still answers): {why}"
    );

    // Both back over their data directories and ports: quorum again, and
    // what was written before is still there.
    cluster.restart(0);
    cluster.restart(1);
    cluster
        .wait_healthy(&[0, 1, 2], REJOIN)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    assert_eq!(cluster.endpoints(), endpoints, "the same ports");
    cluster
        .put_within(0, "/tentacle/d", "four", ELECTION)
        .unwrap_or_else(|e| panic!("a put after the restarts: {e}\n{}", logs(&cluster)));
    assert_eq!(
        cluster.get(2, "/tentacle/d").expect("get").as_deref(),
        Some("four")
    );
    assert_eq!(
        cluster.get(0, "/tentacle/b").expect("get").as_deref(),
        Some("two"),
        "member 0 caught up with what it missed"
    );
    assert_eq!(cluster.member_count(1).expect("member list"), 3);
}

#[test]
fn tls_cluster_wants_a_client_certificate() {
    if !etcd_or_skip("etcd_harness::tls_cluster_wants_a_client_certificate") {
        return;
    }
    let cluster = EtcdCluster::start_tls(3);
    let files = cluster.tls_files().expect("a TLS cluster has files");
    for path in [&files.ca, &files.cert, &files.key] {
        let text = std::fs::read_to_string(path).expect("read PEM");
        assert!(text.starts_with("-----BEGIN "), "{}", path.display());
    }
    assert!(cluster.store_url().starts_with("etcd://127.0.0.1:"));

    // Without a client certificate: refused, and nothing is written.
    let refused = cluster.put_as(0, Credentials::None, "/tentacle/anonymous", "x");
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
    // Refused in the handshake, for the missing certificate.
    assert!(
        cluster
            .log_text(0)
            .contains("client didn't provide a certificate"),
        "member 0 logs why: {}",
        cluster.log_text(0)
    );

    // With the client certificate: served, through another member too.
    cluster
        .put_as(0, Credentials::ClientCertificate, "/tentacle/signed", "yes")
        .unwrap_or_else(|e| panic!("a put with the client certificate: {e}"));
    assert_eq!(
        cluster.get(2, "/tentacle/signed").expect("get").as_deref(),
        Some("yes")
    );
    assert_eq!(
        cluster.get(1, "/tentacle/anonymous").expect("get"),
        None,
        "the refused put wrote nothing"
    );
    assert_eq!(cluster.member_count(2).expect("member list"), 3);

    // Plain http on the client port is not served either.
    let port: u16 = cluster.endpoints()[0]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    assert_eq!(tentacle_tests::http_get(port, "/health"), None);
}
