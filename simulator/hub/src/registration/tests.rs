use std::time::Duration;

use pb::register_request::Credential;
use tentacle_proto::v1::registration_service_client::RegistrationServiceClient;
use tonic::Code;

use super::*;
use crate::hub::{HubSettings, unix_now};
use crate::testing::{
    CHANNEL_BINDING, connect, hub_routes, identity, memory_hub, request, stored_hub, thumbprint,
};
use tentacle_proto::Identity;
use tentacle_proto::rotation::{ChannelBinding, proof_message, sign};

/// An announcement of `next` by the agent with `current`, proved the way
/// `tentacle rotate-certificate` proves it: signed by `signer` (the new key,
/// unless a test says otherwise) for the connection with `binding`.
fn announcement_by(
    current: Thumbprint,
    next: &Identity,
    signer: &Identity,
    binding: &ChannelBinding,
    overlap_seconds: u64,
) -> pb::RotateCertificateRequest {
    let message = proof_message(
        &current,
        &next.thumbprint(),
        &identity().thumbprint(),
        binding,
    );
    let proof = sign(signer, &message).expect("sign");
    pb::RotateCertificateRequest {
        new_certificate: next.certificate().to_vec(),
        overlap_seconds,
        proof_signature: proof.signature,
        proof_scheme: proof.scheme.into(),
        api_key: String::new(),
    }
}

/// A properly proved announcement of `next`.
fn announcement(current: Thumbprint, next: &Identity) -> pb::RotateCertificateRequest {
    announcement_by(current, next, next, &CHANNEL_BINDING, 0)
}

fn new_identity() -> Identity {
    Identity::generate("rotated").expect("identity")
}

/// How often a rotation ended with `outcome` in this process so far.
fn rotations_counted(outcome: &str) -> u64 {
    tentacle_proto::metrics::METRICS
        .hub_certificate_rotations
        .get_or_create(&tentacle_proto::metrics::OutcomeLabels {
            outcome: outcome.into(),
        })
        .get()
}

/// Log lines written while the guard lives, on this thread.
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn start(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().expect("logs").clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn registration(name: &str, credential: Credential) -> pb::RegisterRequest {
    pb::RegisterRequest {
        credential: Some(credential),
        name: name.into(),
        mode: pb::AgentMode::Polling as i32,
        roles: Vec::new(),
        environments: Vec::new(),
        public_hostname: String::new(),
        port: 0,
    }
}

async fn new_token(hub: &Hub) -> Credential {
    let store = hub.store().expect("store");
    Credential::Token(
        store
            .create_credential(CredentialKind::Token, Some(Duration::from_secs(3600)))
            .await
            .expect("token"),
    )
}

async fn new_api_key(hub: &Hub) -> Credential {
    let store = hub.store().expect("store");
    Credential::ApiKey(
        store
            .create_credential(CredentialKind::ApiKey, None)
            .await
            .expect("api key"),
    )
}

/// Whether `token` would still register an agent; using it to find out
/// uses it up.
async fn still_valid(hub: &Hub, token: &Credential) -> bool {
    let Credential::Token(secret) = token else {
        panic!("not a token")
    };
    let store = hub.store().expect("store");
    store
        .redeem(secret.clone(), CredentialKind::Token)
        .await
        .is_ok()
}

async fn register(
    api: &RegistrationApi,
    as_thumbprint: Thumbprint,
    message: pb::RegisterRequest,
) -> Result<pb::RegisterResponse, Status> {
    api.register(request(message, as_thumbprint))
        .await
        .map(Response::into_inner)
}

fn names(hub: &Hub) -> Vec<(String, Thumbprint)> {
    hub.agents()
        .iter()
        .map(|a| (a.name.clone(), a.thumbprint))
        .collect()
}

#[tokio::test]
async fn a_one_time_token_registers_once() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    let token = new_token(&hub).await;
    let joined = register(&api, thumbprint("a"), registration("web-01", token.clone()))
        .await
        .expect("registered");
    let agent = joined.agent.expect("agent");
    assert_eq!(agent.target, "poll://web-01");
    assert_eq!(agent.thumbprint, thumbprint("a").to_string());

    let refused = register(&api, thumbprint("b"), registration("web-02", token))
        .await
        .expect_err("used up");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("not valid"), "{refused:?}");
    assert_eq!(names(&hub), [("web-01".into(), thumbprint("a"))]);
}

#[tokio::test]
async fn an_api_key_registers_many_agents() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    let key = new_api_key(&hub).await;
    for i in 0..5 {
        let name = format!("web-{i:02}");
        register(&api, thumbprint(&name), registration(&name, key.clone()))
            .await
            .expect("registered");
    }
    assert_eq!(hub.agents().len(), 5);
    // And the same agent again, with new roles.
    let mut again = registration("web-00", key);
    again.roles = vec!["db".into(), " db ".into()];
    register(&api, thumbprint("web-00"), again)
        .await
        .expect("registered again");
    let agents = hub.agents();
    let web_00: Vec<_> = agents.iter().filter(|a| a.name == "web-00").collect();
    assert_eq!(web_00.len(), 1);
    assert_eq!(web_00[0].roles, ["db"], "trimmed and deduplicated");
}

/// A name held by another certificate is refused as `ALREADY_EXISTS`, and
/// the refused registration's token still works.
#[tokio::test]
async fn a_name_owned_by_another_thumbprint_is_refused_without_using_the_token() {
    let (hub, dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    register(
        &api,
        thumbprint("a"),
        registration("web-01", new_token(&hub).await),
    )
    .await
    .expect("first");
    let token = new_token(&hub).await;
    let refused = register(&api, thumbprint("b"), registration("web-01", token.clone()))
        .await
        .expect_err("taken");
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    assert!(
        refused.message().contains("`web-01`")
            && refused.message().contains(&thumbprint("a").to_string())
            && refused.message().contains("pick another name"),
        "{refused:?}"
    );
    assert!(!refused.message().contains('\n'));
    assert_eq!(names(&hub), [("web-01".into(), thumbprint("a"))]);
    let stored = crate::hub::HubStore::in_dir(dir.path())
        .agents
        .load()
        .expect("load");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].thumbprint, thumbprint("a"));

    register(&api, thumbprint("b"), registration("web-02", token))
        .await
        .expect("the token was not used up");
}

#[tokio::test]
async fn a_malformed_registration_is_refused_before_the_token_is_used() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    let token = new_token(&hub).await;
    let mut bad_role = registration("web-01", token.clone());
    bad_role.roles = vec!["web server".into()];
    let mut bad_mode = registration("web-01", token.clone());
    bad_mode.mode = 42;
    let mut bad_port = registration("web-01", token.clone());
    bad_port.mode = pb::AgentMode::Listening as i32;
    bad_port.port = 70_000;
    for bad in [
        registration("web 01", token.clone()),
        registration("", token.clone()),
        bad_role,
        bad_mode,
        bad_port,
    ] {
        let refused = register(&api, thumbprint("a"), bad.clone())
            .await
            .expect_err("malformed");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{bad:?}: {refused:?}"
        );
    }
    assert!(hub.agents().is_empty());
    assert!(still_valid(&hub, &token).await);
}

#[tokio::test]
async fn a_registration_without_a_credential_or_certificate_is_unauthenticated() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    let mut anonymous = registration("web-01", new_api_key(&hub).await);
    anonymous.credential = None;
    let refused = register(&api, thumbprint("a"), anonymous)
        .await
        .expect_err("no credential");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = api
        .register(Request::new(registration(
            "web-01",
            new_api_key(&hub).await,
        )))
        .await
        .expect_err("no peer");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(hub.agents().is_empty());
}

#[tokio::test]
async fn a_hub_without_a_home_takes_no_registrations() {
    let api = RegistrationApi::new(memory_hub(HubSettings::default()));
    let refused = register(
        &api,
        thumbprint("a"),
        registration("web-01", Credential::ApiKey("tk_x".into())),
    )
    .await
    .expect_err("no home");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
}

#[tokio::test]
async fn a_listening_agent_is_dialled_where_it_registered_from() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    let mut listening = registration("db-01", new_api_key(&hub).await);
    listening.mode = pb::AgentMode::Listening as i32;
    let joined = register(&api, thumbprint("db"), listening)
        .await
        .expect("registered")
        .agent
        .expect("agent");
    assert_eq!(
        joined.target,
        format!(
            "https://10.0.0.7:{}",
            tentacle_proto::dial::DEFAULT_LISTENING_PORT
        )
    );
}

/// Two uses of one token at the same moment: one registers, the other is
/// refused, whichever name each asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uses_of_one_token_register_one_agent() {
    // 50 refused tokens from one address: more than a source's default
    // budget of failures, which is not what this test is about.
    let (hub, _dir) = stored_hub(HubSettings {
        registration_limits: crate::limits::RegistrationLimits {
            failure_burst: 1000,
            ..Default::default()
        },
        ..HubSettings::default()
    });
    let api = RegistrationApi::new(hub.clone());
    for i in 0..50 {
        let token = new_token(&hub).await;
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let attempts: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|side| {
                let (api, start, token) = (api.clone(), start.clone(), token.clone());
                let name = format!("token-{i}-{side}");
                tokio::spawn(async move {
                    start.wait().await;
                    register(&api, thumbprint(&name), registration(&name, token)).await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for attempt in attempts {
            outcomes.push(attempt.await.expect("task"));
        }
        let codes: Vec<_> = outcomes
            .iter()
            .map(|o| o.as_ref().map_err(Status::code).err())
            .collect();
        assert!(
            codes == [None, Some(Code::PermissionDenied)]
                || codes == [Some(Code::PermissionDenied), None],
            "iteration {i}: {outcomes:?}"
        );
    }
    assert_eq!(hub.agents().len(), 50);
}

/// The registration race through the service: two certificates register
/// one name at once, each with its own token. One wins; the other gets
/// `ALREADY_EXISTS` and keeps its token; the winner stays trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_certificates_registering_one_name_at_once_leave_one_owner() {
    let (hub, dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    for i in 0..200 {
        let name = format!("race-{i}");
        let tokens = [new_token(&hub).await, new_token(&hub).await];
        let prints = [
            thumbprint(&format!("{name}-a")),
            thumbprint(&format!("{name}-b")),
        ];
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let attempts: Vec<_> = (0..2)
            .map(|side| {
                let (api, start) = (api.clone(), start.clone());
                let message = registration(&name, tokens[side].clone());
                let print = prints[side];
                tokio::spawn(async move {
                    start.wait().await;
                    register(&api, print, message).await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for attempt in attempts {
            outcomes.push(attempt.await.expect("task"));
        }
        let (winner, loser) = match (&outcomes[0], &outcomes[1]) {
            (Ok(_), Err(refused)) | (Err(refused), Ok(_))
                if refused.code() == Code::AlreadyExists =>
            {
                if outcomes[0].is_ok() {
                    (0, 1)
                } else {
                    (1, 0)
                }
            }
            _ => panic!("exactly one registration of {name} succeeds: {outcomes:?}"),
        };
        assert_eq!(
            names(&hub)
                .into_iter()
                .filter(|(n, _)| *n == name)
                .collect::<Vec<_>>(),
            [(name.clone(), prints[winner])]
        );
        assert!(hub.allows_tunnel(&prints[winner], &name));
        assert!(!hub.allows_tunnel(&prints[loser], &name));
        assert!(!hub.tls_trust().contains(&prints[loser]));
        assert!(
            !still_valid(&hub, &tokens[winner]).await,
            "the winner's token is used"
        );
        assert!(
            still_valid(&hub, &tokens[loser]).await,
            "the loser's is not"
        );
    }
    let stored = crate::hub::HubStore::in_dir(dir.path())
        .agents
        .load()
        .expect("load");
    assert_eq!(stored.len(), 200);
    assert_eq!(*hub.agents(), stored, "memory and disk agree");
}

/// The same race over gRPC, each agent on its own in-memory connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_race_over_grpc_has_one_winner() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let key = new_api_key(&hub).await;
    for i in 0..50 {
        let name = format!("wire-{i}");
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let mut attempts = Vec::new();
        for side in ["a", "b"] {
            let print = thumbprint(&format!("{name}-{side}"));
            let mut client = RegistrationServiceClient::new(connect(hub_routes(&hub), print).await);
            let (start, message) = (start.clone(), registration(&name, key.clone()));
            attempts.push(tokio::spawn(async move {
                start.wait().await;
                client
                    .register(message)
                    .await
                    .map(|r| (print, r.into_inner()))
            }));
        }
        let mut outcomes = Vec::new();
        for attempt in attempts {
            outcomes.push(attempt.await.expect("task"));
        }
        let winner = match (&outcomes[0], &outcomes[1]) {
            (Ok((print, _)), Err(refused)) | (Err(refused), Ok((print, _)))
                if refused.code() == Code::AlreadyExists =>
            {
                *print
            }
            _ => panic!("exactly one registration of {name} succeeds: {outcomes:?}"),
        };
        let owners: Vec<_> = names(&hub)
            .into_iter()
            .filter(|(n, _)| *n == name)
            .collect();
        assert_eq!(owners, [(name.clone(), winner)]);
    }
}

#[tokio::test]
async fn an_agents_rotation_overlap_is_clamped() {
    let (hub, _dir) = stored_hub(HubSettings {
        rotation_overlap: Duration::from_secs(600),
        max_rotation_overlap: Duration::from_secs(3600),
        ..HubSettings::default()
    });
    let api = RegistrationApi::new(hub.clone());
    let key = new_api_key(&hub).await;
    for (i, (asked, granted)) in [(0, 600), (60, 60), (7200, 3600), (u64::MAX, 3600)]
        .into_iter()
        .enumerate()
    {
        let name = format!("web-{i}");
        let current = thumbprint(&name);
        register(&api, current, registration(&name, key.clone()))
            .await
            .expect("registered");
        let before = unix_now();
        let next = new_identity();
        let rotated = api
            .rotate_certificate(request(
                announcement_by(current, &next, &next, &CHANNEL_BINDING, asked),
                current,
            ))
            .await
            .expect("rotated")
            .into_inner();
        let after = unix_now();
        assert!(
            (before + granted..=after + granted).contains(&rotated.retire_old_at_unix),
            "asked {asked}s, granted {}s",
            rotated.retire_old_at_unix.saturating_sub(before)
        );
        let new = next.thumbprint();
        assert_eq!(rotated.new_thumbprint, new.to_string());
        assert!(!rotated.pending_approval);
        assert!(hub.allows_tunnel(&new, &name) && hub.allows_tunnel(&current, &name));
    }
}

#[test]
fn the_default_overlap_bound_is_a_week() {
    let settings = HubSettings::default();
    assert_eq!(
        settings.max_rotation_overlap,
        Duration::from_secs(7 * 24 * 3600)
    );
    assert!(settings.rotation_overlap <= settings.max_rotation_overlap);
    assert_eq!(settings.max_pickup_timeout, Duration::from_secs(3600));
    assert!(settings.pickup_timeout <= settings.max_pickup_timeout);
}

#[tokio::test]
async fn refused_rotations_say_why() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    let key = new_api_key(&hub).await;
    let web_02 = new_identity();
    register(
        &api,
        thumbprint("web-01"),
        registration("web-01", key.clone()),
    )
    .await
    .expect("registered");
    register(
        &api,
        web_02.thumbprint(),
        registration("web-02", key.clone()),
    )
    .await
    .expect("registered");
    let rotate = |from: Thumbprint, message: pb::RotateCertificateRequest| {
        api.rotate_certificate(request(message, from))
    };
    let unknown = rotate(
        thumbprint("stranger"),
        announcement(thumbprint("stranger"), &new_identity()),
    )
    .await
    .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let mut empty = announcement(thumbprint("web-01"), &new_identity());
    empty.new_certificate.clear();
    let empty = rotate(thumbprint("web-01"), empty)
        .await
        .expect_err("empty");
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
    // Only an announcer holding web-02's key gets this far.
    let theirs = rotate(
        thumbprint("web-01"),
        announcement(thumbprint("web-01"), &web_02),
    )
    .await
    .expect_err("theirs");
    assert_eq!(theirs.code(), Code::AlreadyExists, "{theirs:?}");
    rotate(
        thumbprint("web-01"),
        announcement(thumbprint("web-01"), &new_identity()),
    )
    .await
    .expect("rotated");
    let again = rotate(
        thumbprint("web-01"),
        announcement(thumbprint("web-01"), &new_identity()),
    )
    .await
    .expect_err("retiring");
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
}

#[tokio::test]
async fn a_rotation_needs_a_fresh_proof_made_with_the_new_key() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    let current = thumbprint("web-01");
    register(
        &api,
        current,
        registration("web-01", new_api_key(&hub).await),
    )
    .await
    .expect("registered");
    let next = new_identity();
    let (refused_before, announced_before) =
        (rotations_counted("refused"), rotations_counted("announced"));
    let logs = CapturedLogs::default();
    let _logging = logs.start();
    let rotate =
        |message: pb::RotateCertificateRequest| api.rotate_certificate(request(message, current));

    let mut unproved = announcement(current, &next);
    unproved.proof_signature.clear();
    let refused = rotate(unproved).await.expect_err("no proof");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("proof of possession"),
        "{refused:?}"
    );

    // Signed by a key other than the new certificate's: the current one,
    // or an attacker's.
    let other = new_identity();
    let refused = rotate(announcement_by(current, &next, &other, &CHANNEL_BINDING, 0))
        .await
        .expect_err("another key");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("does not verify"), "{refused:?}");

    // A proof recorded on another connection, replayed on this one.
    let replayed = announcement_by(current, &next, &next, &[1; 32], 0);
    let refused = rotate(replayed).await.expect_err("replayed");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A proof for another agent's current certificate.
    let refused = rotate(announcement(thumbprint("web-02"), &next))
        .await
        .expect_err("someone else's");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        !hub.allows_tunnel(&next.thumbprint(), "web-01"),
        "nothing was trusted"
    );

    // A connection without keying material cannot carry a proof.
    let mut unbound = request(announcement(current, &next), current);
    unbound
        .extensions_mut()
        .get_mut::<tentacle_proto::incoming::PeerInfo>()
        .expect("peer")
        .channel_binding = None;
    let refused = api.rotate_certificate(unbound).await.expect_err("unbound");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    let rotated = rotate(announcement(current, &next))
        .await
        .expect("a proper proof")
        .into_inner();
    assert_eq!(rotated.new_thumbprint, next.thumbprint().to_string());
    assert!(hub.allows_tunnel(&next.thumbprint(), "web-01"));

    // Each outcome is an audit event: a counted, structured log line that
    // names the agent and both thumbprints.
    assert!(rotations_counted("refused") >= refused_before + 5);
    assert!(rotations_counted("announced") > announced_before);
    let lines = logs.lines();
    let events: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"event\":\"certificate_rotation\""))
        .collect();
    assert_eq!(events.len(), 6, "{lines:#?}");
    for line in &events {
        assert!(line.contains("\"agent\":\"web-01\""), "{line}");
        assert!(line.contains(&next.thumbprint().to_string()), "{line}");
        assert!(line.contains(&current.to_string()), "{line}");
        assert!(line.contains(crate::rotation::AUDIT_TARGET), "{line}");
    }
    assert_eq!(
        events
            .iter()
            .filter(|l| l.contains("\"level\":\"WARN\""))
            .count(),
        5,
        "refusals warn: {events:#?}"
    );
    assert!(
        events[5].contains("\"outcome\":\"announced\""),
        "{}",
        events[5]
    );
    let text = tentacle_proto::metrics::METRICS.encode();
    assert!(
        text.contains("tentacle_hub_certificate_rotations_total{outcome=\"refused\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn a_hub_that_asks_for_an_api_key_rotates_only_with_a_valid_one() {
    let (hub, _dir) = stored_hub(HubSettings {
        rotation_approval: RotationApproval::ApiKey,
        ..HubSettings::default()
    });
    let api = RegistrationApi::new(hub.clone());
    let current = thumbprint("web-01");
    let Credential::ApiKey(key) = new_api_key(&hub).await else {
        unreachable!()
    };
    register(
        &api,
        current,
        registration("web-01", Credential::ApiKey(key.clone())),
    )
    .await
    .expect("registered");
    let next = new_identity();
    let with_key = |api_key: &str| pb::RotateCertificateRequest {
        api_key: api_key.into(),
        ..announcement(current, &next)
    };
    let refused = api
        .rotate_certificate(request(with_key(""), current))
        .await
        .expect_err("no key");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("--api-key"), "{refused:?}");
    let refused = api
        .rotate_certificate(request(with_key("not-the-key-at-all"), current))
        .await
        .expect_err("wrong key");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("api-key create"), "{refused:?}");
    assert!(!hub.allows_tunnel(&next.thumbprint(), "web-01"));
    api.rotate_certificate(request(with_key(&key), current))
        .await
        .expect("with the key");
    assert!(hub.allows_tunnel(&next.thumbprint(), "web-01"));
}

#[tokio::test]
async fn a_rotation_an_operator_approves_waits_for_the_approval() {
    let (hub, _dir) = stored_hub(HubSettings {
        rotation_approval: RotationApproval::Operator,
        ..HubSettings::default()
    });
    let api = RegistrationApi::new(hub.clone());
    let current = thumbprint("web-01");
    register(
        &api,
        current,
        registration("web-01", new_api_key(&hub).await),
    )
    .await
    .expect("registered");
    let next = new_identity();
    let (pending_before, approved_before) =
        (rotations_counted("pending"), rotations_counted("approved"));
    let pending = api
        .rotate_certificate(request(announcement(current, &next), current))
        .await
        .expect("recorded")
        .into_inner();
    assert!(pending.pending_approval);
    assert_eq!(pending.retire_old_at_unix, 0);
    assert!(
        !hub.allows_tunnel(&next.thumbprint(), "web-01"),
        "not trusted yet"
    );
    // Nothing happens until an operator approves.
    assert_eq!(hub.apply_approved_rotations().await, 0);
    let store = hub.store().expect("store");
    let listed = store.pending_rotations().await.expect("pending rotations");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].current, listed[0].new),
        (current, next.thumbprint())
    );
    // Announcing it again while it waits changes nothing.
    let again = api
        .rotate_certificate(request(announcement(current, &next), current))
        .await
        .expect("recorded")
        .into_inner();
    assert!(again.pending_approval);

    store
        .approve_rotation("web-01".into())
        .await
        .expect("approve");
    assert_eq!(hub.apply_approved_rotations().await, 1);
    assert!(hub.allows_tunnel(&next.thumbprint(), "web-01"));
    assert!(hub.allows_tunnel(&current, "web-01"), "the overlap starts");
    assert!(store.pending_rotations().await.expect("pending").is_empty());
    // The agent's next announcement learns that it is done.
    let done = api
        .rotate_certificate(request(announcement(current, &next), current))
        .await
        .expect("trusted")
        .into_inner();
    assert!(!done.pending_approval);
    assert!(done.retire_old_at_unix > unix_now());
    assert!(rotations_counted("pending") >= pending_before + 2);
    assert!(rotations_counted("approved") > approved_before);
}

#[tokio::test]
async fn deregistering_an_unknown_agent_is_not_found() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    let refused = api
        .deregister(request(pb::DeregisterRequest {}, thumbprint("stranger")))
        .await
        .expect_err("unknown");
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
}

#[tokio::test]
async fn only_operators_list_the_fleet() {
    let (hub, _dir) = stored_hub(HubSettings::default());
    let api = RegistrationApi::new(hub.clone());
    register(
        &api,
        thumbprint("a"),
        registration("web-01", new_api_key(&hub).await),
    )
    .await
    .expect("registered");
    let refused = api
        .list_agents(request(pb::ListAgentsRequest::default(), thumbprint("a")))
        .await
        .expect_err("an agent is no operator");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let listed = api
        .list_agents(request(
            pb::ListAgentsRequest::default(),
            hub.identity().thumbprint(),
        ))
        .await
        .expect("listed")
        .into_inner();
    assert_eq!(listed.agents.len(), 1);
    assert_eq!(listed.agents[0].name, "web-01");
}

/// `message` from `thumbprint` at `address`, as the accept loop tags it.
fn request_from<T>(message: T, thumbprint: Thumbprint, address: [u8; 4]) -> Request<T> {
    let mut request = Request::new(message);
    request
        .extensions_mut()
        .insert(tentacle_proto::incoming::PeerInfo {
            thumbprint,
            remote_addr: Some((address, 40000).into()),
            channel_binding: None,
        });
    request
}

/// Failed registrations are counted per source address; past the budget
/// a source is refused with `RESOURCE_EXHAUSTED` before its credential is
/// checked (a good token sent then is not used up), other sources are not
/// affected, and successes never count.
#[tokio::test]
async fn a_source_that_spent_its_failures_is_refused_unchecked_and_successes_never_count() {
    let (hub, _dir) = stored_hub(HubSettings {
        registration_limits: crate::limits::RegistrationLimits {
            failures_per_minute: 1,
            failure_burst: 3,
            max_sources: 100,
        },
        ..HubSettings::default()
    });
    let api = RegistrationApi::new(hub.clone());
    let key = new_api_key(&hub).await;
    let attacker = [10, 0, 0, 66];
    // Many successes from one address spend nothing.
    for i in 0..30 {
        let name = format!("ok-{i}");
        api.register(request_from(
            registration(&name, key.clone()),
            thumbprint(&name),
            attacker,
        ))
        .await
        .expect("a good key always registers");
    }
    let throttled_before = tentacle_proto::metrics::METRICS
        .hub_registrations_throttled
        .get();
    let mut no_credential = registration("bad", key.clone());
    no_credential.credential = None;
    let failures = [
        registration("bad", Credential::Token("tt_guess-1".into())),
        registration("bad", Credential::ApiKey("tk_guess-2".into())),
        no_credential,
    ];
    for failure in failures {
        let refused = api
            .register(request_from(failure, thumbprint("bad"), attacker))
            .await
            .expect_err("bad credential");
        assert_ne!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    let token = new_token(&hub).await;
    let refused = api
        .register(request_from(
            registration("late", token.clone()),
            thumbprint("late"),
            attacker,
        ))
        .await
        .expect_err("budget spent");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("10.0.0.66") && refused.message().contains("try again in 60s"),
        "{refused:?}"
    );
    assert!(
        tentacle_proto::metrics::METRICS
            .hub_registrations_throttled
            .get()
            > throttled_before
    );
    // Another address is not affected, and the refused token was not used.
    api.register(request_from(
        registration("late", token),
        thumbprint("late"),
        [10, 0, 0, 67],
    ))
    .await
    .expect("another source, the same token");
    assert_eq!(hub.agents().len(), 31);
}
