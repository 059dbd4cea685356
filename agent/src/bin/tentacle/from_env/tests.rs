use std::collections::HashMap;

use super::*;

const HUB: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const OTHER: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const SECRET: &str = "tk_very-secret-api-key-value";

fn parse_with(vars: &[(&str, &str)], host_file: Option<&str>) -> anyhow::Result<Environment> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Environment::parse(&|name| vars.get(name).cloned(), host_file)
}

fn parse(vars: &[(&str, &str)]) -> anyhow::Result<Environment> {
    parse_with(vars, None)
}

fn error_of(vars: &[(&str, &str)]) -> String {
    let error = parse(vars).expect_err("refused");
    let message = format!("{error:#}");
    assert!(!message.contains('\n'), "one line: {message}");
    message
}

#[test]
fn every_variable_is_read_and_applied() {
    let env = parse(&[
        ("TENTACLE_MODE", "both"),
        ("TENTACLE_LISTEN_ADDRESS", "127.0.0.1"),
        ("TENTACLE_PORT", "12345"),
        ("TENTACLE_TRUST", &format!("{OTHER}, ")),
        ("TENTACLE_SERVER", "https://hub.example"),
        ("TENTACLE_SERVER_THUMBPRINT", HUB),
        ("TENTACLE_API_KEY", SECRET),
        ("TENTACLE_NAME", "web-01"),
        ("TENTACLE_ROLES", "web, api,,"),
        ("TENTACLE_ENVIRONMENTS", "prod"),
        ("TENTACLE_PUBLIC_HOSTNAME", "web-01.example"),
        ("TENTACLE_TUNNELS", "3"),
        ("TENTACLE_HEARTBEAT_INTERVAL", "2s"),
        ("TENTACLE_HEARTBEAT_TIMEOUT", "6s"),
        ("TENTACLE_RECONNECT_INITIAL", "100ms"),
        ("TENTACLE_RECONNECT_MAX", "1s"),
        ("TENTACLE_REGISTER_TIMEOUT", "30s"),
        ("HOSTNAME", "ignored-host"),
    ])
    .expect("valid");
    assert_eq!(env.register_timeout, Duration::from_secs(30));
    let mut config = AgentConfig::default();
    env.apply(&mut config).expect("apply");
    assert!(config.listen.enabled && config.polling.enabled);
    assert_eq!(config.listen.address.to_string(), "127.0.0.1");
    assert_eq!(config.listen.port, 12345);
    let hub: Thumbprint = HUB.parse().expect("thumbprint");
    let other: Thumbprint = OTHER.parse().expect("thumbprint");
    // Listening too, so the hub is trusted as well as polled.
    assert_eq!(config.trust.thumbprints, [other, hub]);
    assert_eq!(
        config.polling.servers,
        [PollingServer {
            url: "https://hub.example:10943".into(),
            thumbprint: hub,
        }]
    );
    assert_eq!(config.polling.agent_id, "web-01");
    assert_eq!(config.polling.tunnels, 3);
    assert_eq!(config.polling.heartbeat_interval, Duration::from_secs(2));
    assert_eq!(config.polling.heartbeat_timeout, Duration::from_secs(6));
    assert_eq!(config.polling.reconnect_initial, Duration::from_millis(100));
    assert_eq!(config.polling.reconnect_max, Duration::from_secs(1));

    // Applying again changes nothing.
    let once = config.clone();
    env.apply(&mut config).expect("apply again");
    assert_eq!(config, once);

    let registration = env
        .pending_registration(&config)
        .expect("name")
        .expect("not registered yet");
    assert_eq!(registration.name, "web-01");
    assert_eq!(registration.roles, ["web", "api"]);
    assert_eq!(registration.environments, ["prod"]);
    assert!(registration.polling, "both registers as polling");
    assert!(matches!(registration.credential, Credential::ApiKey(ref k) if k == SECRET));
    // Once `hubs` records the hub, there is nothing to do.
    config.hubs.push(PollingServer {
        url: "https://hub.example:10943".into(),
        thumbprint: hub,
    });
    assert!(env.pending_registration(&config).expect("name").is_none());
    // A new hub thumbprint (a rotated hub identity) registers again.
    config.hubs[0].thumbprint = other;
    assert!(env.pending_registration(&config).expect("name").is_some());
}

#[test]
fn a_listening_agent_registers_with_its_public_host_name() {
    let env = parse(&[
        ("TENTACLE_MODE", "listening"),
        ("TENTACLE_SERVER", "https://hub:10943"),
        ("TENTACLE_SERVER_THUMBPRINT", HUB),
        ("TENTACLE_TOKEN", "tt_one-time-token"),
        ("HOSTNAME", "pod-0"),
    ])
    .expect("valid");
    let mut config = AgentConfig::default();
    env.apply(&mut config).expect("apply");
    assert!(config.listen.enabled && !config.polling.enabled);
    assert!(config.polling.servers.is_empty());
    assert_eq!(config.trust.thumbprints, [HUB.parse().expect("thumbprint")]);
    let registration = env
        .pending_registration(&config)
        .expect("name")
        .expect("pending");
    assert!(!registration.polling);
    assert_eq!(registration.name, "pod-0");
    assert_eq!(registration.public_hostname.as_deref(), Some("pod-0"));
    assert!(matches!(registration.credential, Credential::Token(_)));
}

#[test]
fn defaults_listen_without_a_server_and_poll_with_one() {
    let env = parse(&[]).expect("nothing set is valid");
    assert_eq!(env.mode, Mode::Listening);
    assert!(env.server.is_none() && env.credential.is_none());
    assert_eq!(env.register_timeout, DEFAULT_REGISTER_TIMEOUT);
    let mut config = AgentConfig::default();
    // A listening agent needs no name.
    env.apply(&mut config).expect("apply");
    assert!(config.listen.enabled && !config.polling.enabled);
    assert_eq!(config, {
        let mut expected = AgentConfig::default();
        expected.listen.enabled = true;
        expected
    });
    let no_name = env.name().expect_err("no host name").to_string();
    assert!(no_name.contains("TENTACLE_NAME"), "{no_name}");

    let polling = parse_with(
        &[
            ("TENTACLE_SERVER", "https://hub:10943"),
            ("TENTACLE_SERVER_THUMBPRINT", HUB),
        ],
        Some("host-from-file\n"),
    )
    .expect("valid");
    assert_eq!(polling.mode, Mode::Polling);
    assert_eq!(
        polling.name().expect("from /etc/hostname"),
        "host-from-file"
    );
    // No credential: configured, but nothing to register.
    assert!(
        polling
            .pending_registration(&AgentConfig::default())
            .expect("name")
            .is_none()
    );
    // HOSTNAME wins over /etc/hostname, TENTACLE_NAME over both.
    let named = parse_with(&[("HOSTNAME", "from-env")], Some("from-file")).expect("valid");
    assert_eq!(named.name().expect("name"), "from-env");
    let named = parse_with(
        &[("HOSTNAME", "from-env"), ("TENTACLE_NAME", "chosen")],
        Some("from-file"),
    )
    .expect("valid");
    assert_eq!(named.name().expect("name"), "chosen");
}

#[test]
fn a_polling_agent_without_any_name_says_to_set_one() {
    let env = parse(&[
        ("TENTACLE_SERVER", "https://hub:10943"),
        ("TENTACLE_SERVER_THUMBPRINT", HUB),
    ])
    .expect("valid");
    let error = env
        .apply(&mut AgentConfig::default())
        .expect_err("polling needs a name")
        .to_string();
    assert!(error.contains("set TENTACLE_NAME"), "{error}");
    let bad_host = parse(&[("HOSTNAME", "bad host!")]).expect("valid until needed");
    let error = bad_host.name().expect_err("invalid").to_string();
    assert!(
        error.contains("`bad host!`") && error.contains("TENTACLE_NAME"),
        "{error}"
    );
}

#[test]
fn empty_values_count_as_unset() {
    let env = parse(&[
        ("TENTACLE_PORT", ""),
        ("TENTACLE_SERVER", "  "),
        ("TENTACLE_API_KEY", ""),
        ("TENTACLE_MODE", ""),
    ])
    .expect("valid");
    assert_eq!(env.port, None);
    assert!(env.server.is_none() && env.credential.is_none());
    assert_eq!(env.mode, Mode::Listening);
}

#[test]
fn each_bad_value_is_one_line_naming_the_variable_and_the_value() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("TENTACLE_PORT", "abc")],
            "TENTACLE_PORT=`abc` is not a port number (1-65535)",
        ),
        (&[("TENTACLE_PORT", "0")], "TENTACLE_PORT=`0` is not a port"),
        (&[("TENTACLE_PORT", "70000")], "TENTACLE_PORT=`70000`"),
        (
            &[("TENTACLE_MODE", "push")],
            "TENTACLE_MODE=`push` is not listening, polling or both",
        ),
        (
            &[("TENTACLE_LISTEN_ADDRESS", "localhost")],
            "TENTACLE_LISTEN_ADDRESS=`localhost` is not an IP address",
        ),
        (
            &[("TENTACLE_TRUST", &format!("{HUB},nothex"))],
            "TENTACLE_TRUST: `nothex` is not a thumbprint",
        ),
        (
            &[
                ("TENTACLE_SERVER", "http://hub:10943"),
                ("TENTACLE_SERVER_THUMBPRINT", HUB),
            ],
            "TENTACLE_SERVER=`http://hub:10943` is not a hub address",
        ),
        (
            &[
                ("TENTACLE_SERVER", "https://hub"),
                ("TENTACLE_SERVER_THUMBPRINT", "abc"),
            ],
            "TENTACLE_SERVER_THUMBPRINT: `abc` is not a thumbprint",
        ),
        (
            &[("TENTACLE_SERVER", "https://hub")],
            "TENTACLE_SERVER_THUMBPRINT is not",
        ),
        (
            &[("TENTACLE_SERVER_THUMBPRINT", HUB)],
            "TENTACLE_SERVER is not",
        ),
        (
            &[("TENTACLE_NAME", "web 01")],
            "TENTACLE_NAME=`web 01` is not a valid name",
        ),
        (
            &[("TENTACLE_TUNNELS", "65")],
            "TENTACLE_TUNNELS=`65` is not a number of tunnels (1-64)",
        ),
        (
            &[("TENTACLE_HEARTBEAT_INTERVAL", "soon")],
            "TENTACLE_HEARTBEAT_INTERVAL=`soon` is not a duration",
        ),
        (
            &[("TENTACLE_HEARTBEAT_TIMEOUT", "0s")],
            "TENTACLE_HEARTBEAT_TIMEOUT=`0s` is not a duration",
        ),
        (
            &[("TENTACLE_RECONNECT_INITIAL", "5")],
            "TENTACLE_RECONNECT_INITIAL=`5`",
        ),
        (
            &[("TENTACLE_RECONNECT_MAX", "-1s")],
            "TENTACLE_RECONNECT_MAX=`-1s`",
        ),
        (
            &[("TENTACLE_REGISTER_TIMEOUT", "forever")],
            "TENTACLE_REGISTER_TIMEOUT=`forever`",
        ),
    ];
    for (vars, expected) in cases {
        let message = error_of(vars);
        assert!(message.contains(expected), "{vars:?}: {message}");
    }
    // Zero is a valid register timeout: try once.
    let once = parse(&[("TENTACLE_REGISTER_TIMEOUT", "0s")]).expect("valid");
    assert_eq!(once.register_timeout, Duration::ZERO);
}

#[test]
fn a_kubernetes_service_link_in_tentacle_port_is_explained() {
    let message = error_of(&[("TENTACLE_PORT", "tcp://10.0.0.7:10933")]);
    assert!(message.contains("enableServiceLinks"), "{message}");
}

#[test]
fn secrets_appear_in_no_error_and_no_debug_output() {
    let both = error_of(&[
        ("TENTACLE_SERVER", "https://hub"),
        ("TENTACLE_SERVER_THUMBPRINT", HUB),
        ("TENTACLE_API_KEY", SECRET),
        ("TENTACLE_TOKEN", "tt_secret-token-value"),
    ]);
    assert!(both.contains("not both"), "{both}");
    assert!(
        !both.contains(SECRET) && !both.contains("tt_secret"),
        "{both}"
    );
    let no_server = error_of(&[("TENTACLE_API_KEY", SECRET)]);
    assert!(no_server.contains("TENTACLE_SERVER"), "{no_server}");
    assert!(!no_server.contains(SECRET), "{no_server}");
    let no_server = error_of(&[("TENTACLE_TOKEN", SECRET)]);
    assert!(!no_server.contains(SECRET), "{no_server}");

    let env = parse(&[
        ("TENTACLE_SERVER", "https://hub"),
        ("TENTACLE_SERVER_THUMBPRINT", HUB),
        ("TENTACLE_API_KEY", SECRET),
        ("TENTACLE_NAME", "web-01"),
    ])
    .expect("valid");
    let debug = format!("{env:?}");
    assert!(debug.contains("ApiKey(********)"), "{debug}");
    assert!(!debug.contains(SECRET), "{debug}");
    let registration = env
        .pending_registration(&AgentConfig::default())
        .expect("name")
        .expect("pending");
    assert!(!format!("{registration:?}").contains(SECRET));
}

/// A first start keeps trying while the hub is away or has this address
/// refused for a while, and stops at once when the credential or name is
/// refused.
#[test]
fn a_throttled_address_is_retried_and_a_bad_credential_is_not() {
    let refused = |code| RegisterError::Refused {
        code,
        reason: "refused".into(),
    };
    assert!(refused(tonic::Code::ResourceExhausted).is_worth_retrying());
    assert!(refused(tonic::Code::Unavailable).is_worth_retrying());
    assert!(!refused(tonic::Code::PermissionDenied).is_worth_retrying());
    assert!(!refused(tonic::Code::AlreadyExists).is_worth_retrying());
}
