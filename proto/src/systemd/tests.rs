use std::cell::RefCell;
use std::rc::Rc;

use clap::Parser;

use super::*;

const AGENT_FILE: &str = include_str!("../../../deploy/systemd/tentacle.service");
const HUB_FILE: &str = include_str!("../../../deploy/systemd/tentacle-hub.service");

fn args(action: &str) -> ServiceArgs {
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        service: ServiceArgs,
    }
    Cli::try_parse_from(["service", action])
        .expect("parse")
        .service
}

fn agent_default() -> UnitSpec {
    unit_for(
        &Program::agent(),
        &args("--print"),
        Path::new("/usr/local/bin/tentacle"),
        Path::new("/var/lib/tentacle"),
    )
    .expect("agent unit")
}

fn hub_default() -> UnitSpec {
    unit_for(
        &Program::Hub {
            server_args: vec!["--listen".to_owned(), "0.0.0.0:10943".to_owned()],
        },
        &args("--print"),
        Path::new("/usr/local/bin/tentacle-hub"),
        // The hub's per-user default, hidden by ProtectHome.
        Path::new("/root/.tentacle-hub"),
    )
    .expect("hub unit")
}

/// systemd's reading of an ExecStart value (systemd.service(5), "Command
/// lines"): specifiers first (`%%`), then words split on whitespace with
/// double or single quotes and C escapes, then `$$` for environment
/// substitution.
fn systemd_argv(line: &str) -> Vec<String> {
    let mut resolved = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            assert_eq!(chars.next(), Some('%'), "a specifier in {line:?}");
        }
        resolved.push(c);
    }
    let bytes = resolved.as_bytes();
    let mut words = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == bytes.len() {
            break;
        }
        let start = i;
        let mut word = Vec::new();
        let mut quote = None;
        while i < bytes.len() {
            let b = bytes[i];
            i += 1;
            match (quote, b) {
                (None, b) if b.is_ascii_whitespace() => break,
                (None, b'"' | b'\'') => quote = Some(b),
                (Some(q), b) if b == q => quote = None,
                (_, b'\\') => {
                    let e = bytes[i];
                    i += 1;
                    match e {
                        b'n' => word.push(b'\n'),
                        b't' => word.push(b'\t'),
                        b'r' => word.push(b'\r'),
                        b'x' => {
                            let hex = std::str::from_utf8(&bytes[i..i + 2]).expect("hex");
                            word.push(u8::from_str_radix(hex, 16).expect("hex"));
                            i += 2;
                        }
                        b'\\' | b'"' | b'\'' => word.push(e),
                        other => panic!("unknown escape \\{}", other as char),
                    }
                }
                (_, b) => word.push(b),
            }
        }
        assert!(quote.is_none(), "unbalanced quoting in {line:?}");
        let raw = &resolved[start..i].trim_end();
        assert_ne!(*raw, ";", "a bare `;` separates commands");
        let word = String::from_utf8(word).expect("utf-8");
        words.push(
            word.replace("$$", "\u{0}")
                .replace('$', "<VAR>")
                .replace('\u{0}', "$"),
        );
    }
    words
}

fn exec_line(unit: &str) -> &str {
    unit.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
}

#[test]
fn a_stop_leaves_the_agents_scripts_running_and_ends_the_whole_hub() {
    let agent = render(&agent_default());
    assert!(agent.contains("\nKillMode=process\n"), "{agent}");
    let hub = render(&hub_default());
    assert!(hub.contains("\nKillMode=mixed\n"), "{hub}");
}

#[test]
fn the_unit_is_hardened() {
    for spec in [agent_default(), hub_default()] {
        let unit = render(&spec);
        for directive in [
            "Type=exec",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "UMask=0077",
            "Restart=on-failure",
            "RestartSec=5s",
            "TimeoutStopSec=45s",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "ProtectHostname=yes",
            "RestrictSUIDSGID=yes",
            "RestrictRealtime=yes",
            "LockPersonality=yes",
            "RemoveIPC=yes",
            "StateDirectoryMode=0700",
            "[Install]\nWantedBy=multi-user.target\n",
        ] {
            assert!(unit.contains(directive), "{directive} missing from\n{unit}");
        }
        assert!(
            !unit.contains("MemoryDenyWriteExecute"),
            "breaks JIT runtimes"
        );
    }
    let agent = render(&agent_default());
    assert!(agent.contains("\nUser=tentacle\n"));
    assert!(agent.contains("\nReadWritePaths=/var/lib/tentacle\n"));
    assert!(agent.contains("\nStateDirectory=tentacle\n"));
    assert!(agent.contains("\nExecStart=/usr/local/bin/tentacle --home /var/lib/tentacle run\n"));
    assert!(!agent.contains("LimitNOFILE"));
    let hub = render(&hub_default());
    assert!(hub.contains("\nUser=tentacle-hub\n"));
    assert!(hub.contains("\nLimitNOFILE=65536\n"));
    assert!(hub.contains("\nStateDirectory=tentacle-hub\n"));
    assert!(hub.contains(
        "\nExecStart=/usr/local/bin/tentacle-hub --home /var/lib/tentacle-hub server --listen 0.0.0.0:10943\n"
    ));
}

/// `BLESS_SYSTEMD_UNITS=1 cargo test -p tentacle-proto systemd` rewrites
/// the files after an intended change to the unit.
#[test]
fn the_deploy_files_are_what_print_renders() {
    if std::env::var_os("BLESS_SYSTEMD_UNITS").is_some() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
        std::fs::write(dir.join("tentacle.service"), render(&agent_default())).expect("write");
        std::fs::write(dir.join("tentacle-hub.service"), render(&hub_default())).expect("write");
        return;
    }
    assert_eq!(
        render(&agent_default()),
        AGENT_FILE,
        "deploy/systemd/tentacle.service drifted from agent_unit"
    );
    assert_eq!(
        render(&hub_default()),
        HUB_FILE,
        "deploy/systemd/tentacle-hub.service drifted from hub_unit"
    );
}

#[test]
fn tricky_arguments_round_trip_through_exec_start_quoting() {
    let tricky = [
        "plain",
        "",
        "two words",
        "  leading and trailing  ",
        "100%",
        "%n%i%%",
        "$HOME",
        "${HOME}/x",
        "$$",
        "a\"b",
        "'single'",
        "back\\slash",
        "\\",
        "trailing\\",
        "\"",
        ";",
        "a;b",
        "tab\there",
        "new\nline",
        "bell\u{7}",
        "c1\u{85}",
        "ünïcödé ✓",
        "--flag=value with space",
        "-",
        "@argv0",
    ];
    let mut line = quote_exec_arg("/usr/local/bin/tentacle hub");
    for arg in tricky {
        line.push(' ');
        line.push_str(&quote_exec_arg(arg));
    }
    let mut expected = vec!["/usr/local/bin/tentacle hub".to_owned()];
    expected.extend(tricky.iter().map(|s| (*s).to_owned()));
    assert_eq!(systemd_argv(&line), expected, "ExecStart={line}");
    // Plain arguments stay readable.
    assert_eq!(quote_exec_arg("--listen"), "--listen");
    assert_eq!(quote_exec_arg("0.0.0.0:10943"), "0.0.0.0:10943");
    assert_eq!(quote_exec_arg("two words"), "\"two words\"");
    assert_eq!(quote_exec_arg("50%"), "50%%");
    assert_eq!(quote_exec_arg("$HOME"), "$$HOME");
    assert_eq!(quote_exec_arg(";"), "\";\"");
    assert_eq!(quote_exec_arg(""), "\"\"");
}

#[test]
fn paths_are_quoted_for_read_write_paths() {
    assert_eq!(quote_path(Path::new("/srv/app")), "/srv/app");
    assert_eq!(quote_path(Path::new("/srv/my app")), "\"/srv/my app\"");
    assert_eq!(quote_path(Path::new("/srv/100%")), "/srv/100%%");
    assert_eq!(quote_path(Path::new("/srv/a\"b")), "\"/srv/a\\\"b\"");
    let installation = Installation {
        exe: "/usr/local/bin/tentacle".into(),
        home: "/opt/tentacle home".into(),
        user: "tentacle".to_owned(),
        instance: None,
        read_write: vec!["/srv/app".into(), "/srv/50% off".into()],
    };
    let unit =
        render(&agent_unit(&installation, AGENT_SHUTDOWN_GRACE, AGENT_KILL_GRACE).expect("unit"));
    assert!(
        unit.contains("\nReadWritePaths=\"/opt/tentacle home\" /srv/app \"/srv/50%% off\"\n"),
        "{unit}"
    );
    assert_eq!(
        systemd_argv(exec_line(&unit)),
        [
            "/usr/local/bin/tentacle",
            "--home",
            "/opt/tentacle home",
            "run"
        ]
    );
    // Not under /var/lib: systemd does not create it.
    assert!(!unit.contains("StateDirectory"));
    let bad = Installation {
        read_write: vec!["/srv/new\nline".into()],
        ..installation
    };
    assert!(matches!(
        agent_unit(&bad, AGENT_SHUTDOWN_GRACE, AGENT_KILL_GRACE),
        Err(SystemdError::InvalidPath { .. })
    ));
}

#[test]
fn instance_names_are_validated() {
    for good in ["blue", "Blue-2", "a_b", "0", &"x".repeat(64)] {
        validate_instance(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        "",
        "a b",
        "a.b",
        "a/b",
        "../x",
        "ü",
        "a@b",
        "a\n",
        &"x".repeat(65),
    ] {
        let error = validate_instance(bad).expect_err(bad);
        assert!(error.to_string().contains("letters, digits"), "{error}");
    }
    assert_eq!(
        unit_name("tentacle", None).expect("name"),
        "tentacle.service"
    );
    assert_eq!(
        unit_name("tentacle", Some("blue")).expect("name"),
        "tentacle-blue.service"
    );
    assert_eq!(
        unit_name("tentacle-hub", Some("eu_1")).expect("name"),
        "tentacle-hub-eu_1.service"
    );
    let mut service = args("--print");
    service.instance = Some("no way".to_owned());
    assert!(matches!(
        unit_for(
            &Program::agent(),
            &service,
            Path::new("/bin/true"),
            Path::new("/var/lib/tentacle")
        ),
        Err(SystemdError::InvalidInstance(_))
    ));
}

#[test]
fn user_names_are_validated() {
    for good in ["tentacle", "root", "_svc", "deploy.bot", "a-b1"] {
        validate_user(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        "",
        "1abc",
        "-x",
        "a b",
        "a:b",
        "a\nUser=root",
        &"u".repeat(33),
    ] {
        assert!(validate_user(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_named_instance_gets_its_own_unit_and_home() {
    let mut service = args("--print");
    service.instance = Some("blue".to_owned());
    service.user = Some("deploy".to_owned());
    let spec = unit_for(
        &Program::agent(),
        &service,
        Path::new("/usr/local/bin/tentacle"),
        Path::new("/var/lib/tentacle"),
    )
    .expect("unit");
    assert_eq!(spec.unit_name, "tentacle-blue.service");
    assert_eq!(spec.home, Path::new("/var/lib/tentacle-blue"));
    let unit = render(&spec);
    assert!(unit.contains("\nDescription=Tentacle deployment agent (blue)\n"));
    assert!(unit.contains("\nUser=deploy\n"));
    assert!(unit.contains("\nStateDirectory=tentacle-blue\n"));
    assert!(unit.contains("`tentacle service --instance blue --install --read-write PATH`"));
    // An explicit home elsewhere is kept.
    let spec = unit_for(
        &Program::agent(),
        &service,
        Path::new("/usr/local/bin/tentacle"),
        Path::new("/srv/blue"),
    )
    .expect("unit");
    assert_eq!(spec.home, Path::new("/srv/blue"));
}

#[test]
fn graces_set_the_stop_timeout() {
    let spec = unit_for(
        &Program::Agent {
            shutdown_grace: Duration::from_secs(120),
            kill_grace: Duration::from_millis(2500),
        },
        &args("--print"),
        Path::new("/usr/local/bin/tentacle"),
        Path::new("/var/lib/tentacle"),
    )
    .expect("unit");
    assert!(render(&spec).contains("\nTimeoutStopSec=133s\n"));
    for flags in [&["--drain-grace", "2m"][..], &["--drain-grace=2m"]] {
        let spec = unit_for(
            &Program::Hub {
                server_args: flags.iter().map(|s| (*s).to_owned()).collect(),
            },
            &args("--print"),
            Path::new("/usr/local/bin/tentacle-hub"),
            Path::new("/var/lib/tentacle-hub"),
        )
        .expect("unit");
        assert!(render(&spec).contains("\nTimeoutStopSec=135s\n"));
    }
    for flags in [
        &["--drain-grace", "soon"][..],
        &["--drain-grace"],
        &["--home", "/x"],
    ] {
        let error = unit_for(
            &Program::Hub {
                server_args: flags.iter().map(|s| (*s).to_owned()).collect(),
            },
            &args("--print"),
            Path::new("/usr/local/bin/tentacle-hub"),
            Path::new("/var/lib/tentacle-hub"),
        )
        .expect_err("bad flags");
        assert!(
            matches!(error, SystemdError::InvalidServerArgs(_)),
            "{error}"
        );
    }
}

#[test]
fn exactly_one_action_is_accepted() {
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        service: ServiceArgs,
    }
    for (flag, action) in [
        ("--install", Action::Install),
        ("--start", Action::Start),
        ("--stop", Action::Stop),
        ("--restart", Action::Restart),
        ("--uninstall", Action::Uninstall),
        ("--status", Action::Status),
        ("--print", Action::Print),
    ] {
        assert_eq!(args(flag).action(), action);
    }
    assert!(Cli::try_parse_from(["service"]).is_err());
    assert!(Cli::try_parse_from(["service", "--start", "--stop"]).is_err());
    let cli = Cli::try_parse_from([
        "service",
        "--install",
        "--user",
        "u",
        "--instance",
        "i",
        "--read-write",
        "/a",
        "--read-write",
        "/b",
    ])
    .expect("parse");
    assert_eq!(cli.service.user.as_deref(), Some("u"));
    assert_eq!(cli.service.instance.as_deref(), Some("i"));
    assert_eq!(
        cli.service.read_write,
        [PathBuf::from("/a"), PathBuf::from("/b")]
    );
}

/// A temporary host: a unit directory, a runtime directory whose presence
/// means systemd runs, and a systemctl that records its calls.
struct FakeHost {
    dir: tempfile::TempDir,
    calls: Rc<RefCell<Vec<String>>>,
}

impl FakeHost {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("units")).expect("units");
        std::fs::create_dir_all(dir.path().join("run/systemd/system")).expect("run");
        Self {
            dir,
            calls: Rc::default(),
        }
    }

    fn manager_with(&self, exit_code: impl Fn(&[String]) -> i32 + 'static) -> ServiceManager {
        let calls = self.calls.clone();
        ServiceManager::system()
            .with_unit_dir(self.dir.path().join("units"))
            .with_runtime_dir(self.dir.path().join("run/systemd/system"))
            .with_root(true)
            .with_user_check(|user| user == "tentacle")
            .with_systemctl(move |args: &[String]| {
                calls.borrow_mut().push(args.join(" "));
                Ok(exit_code(args))
            })
    }

    fn manager(&self) -> ServiceManager {
        self.manager_with(|_| 0)
    }

    fn unit_file(&self) -> PathBuf {
        self.dir.path().join("units/tentacle.service")
    }

    fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }
}

fn perform(
    manager: &ServiceManager,
    action: Action,
    spec: &UnitSpec,
) -> Result<(u8, String), SystemdError> {
    let mut out = Vec::new();
    let code = manager.perform(action, spec, &mut out)?;
    Ok((code, String::from_utf8(out).expect("utf-8")))
}

#[test]
fn install_writes_the_unit_then_reloads_and_enables() {
    use std::os::unix::fs::PermissionsExt;
    let host = FakeHost::new();
    let manager = host.manager();
    let spec = agent_default();
    let (code, out) = perform(&manager, Action::Install, &spec).expect("install");
    assert_eq!(code, 0);
    assert!(out.contains("installed"), "{out}");
    assert!(out.contains("`tentacle service --start`"), "{out}");
    assert_eq!(
        std::fs::read_to_string(host.unit_file()).expect("unit"),
        render(&spec)
    );
    let mode = std::fs::metadata(host.unit_file())
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    assert_eq!(host.calls(), ["daemon-reload", "enable tentacle.service"]);
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(host.dir.path().join("units"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["tentacle.service"]);

    // Again with other flags: updated in place.
    let mut changed = spec.clone();
    changed.read_write_paths.push(host.dir.path().to_owned());
    let (_, out) = perform(&manager, Action::Install, &changed).expect("reinstall");
    assert!(out.contains("updated"), "{out}");
    assert!(
        std::fs::read_to_string(host.unit_file())
            .expect("unit")
            .contains(&host.dir.path().display().to_string())
    );
}

#[test]
fn start_stop_restart_and_status_call_systemctl() {
    let host = FakeHost::new();
    let manager = host.manager_with(|args| if args[0] == "status" { 3 } else { 0 });
    let spec = agent_default();
    let error = perform(&manager, Action::Start, &spec).expect_err("not installed");
    assert!(
        error
            .to_string()
            .contains("run `tentacle service --install` first"),
        "{error}"
    );
    assert!(host.calls().is_empty());
    perform(&manager, Action::Install, &spec).expect("install");
    for action in [Action::Start, Action::Stop, Action::Restart] {
        let (code, out) = perform(&manager, action, &spec).expect("action");
        assert_eq!(code, 0);
        assert!(out.ends_with("tentacle.service\n"), "{out}");
    }
    let (code, _) = perform(&manager, Action::Status, &spec).expect("status");
    assert_eq!(code, 3, "status passes systemctl's exit code on");
    assert_eq!(
        host.calls()[2..],
        [
            "start tentacle.service",
            "stop tentacle.service",
            "restart tentacle.service",
            "status --no-pager --full tentacle.service"
        ]
    );
}

#[test]
fn uninstall_stops_disables_removes_and_reloads() {
    let host = FakeHost::new();
    let manager = host.manager();
    let spec = agent_default();
    perform(&manager, Action::Install, &spec).expect("install");
    host.calls.borrow_mut().clear();
    let (_, out) = perform(&manager, Action::Uninstall, &spec).expect("uninstall");
    assert!(out.contains("uninstalled tentacle.service"), "{out}");
    assert!(out.contains("/var/lib/tentacle is kept"), "{out}");
    assert!(!host.unit_file().exists());
    assert_eq!(
        host.calls(),
        [
            "stop tentacle.service",
            "disable tentacle.service",
            "daemon-reload"
        ]
    );
    // Idempotent.
    host.calls.borrow_mut().clear();
    let (_, out) = perform(&manager, Action::Uninstall, &spec).expect("again");
    assert!(out.contains("not installed; nothing to do"), "{out}");
    assert!(host.calls().is_empty());
}

#[test]
fn a_failing_systemctl_is_an_error() {
    let host = FakeHost::new();
    let manager = host.manager_with(|args| if args[0] == "enable" { 1 } else { 0 });
    let error = perform(&manager, Action::Install, &agent_default()).expect_err("enable fails");
    assert_eq!(
        error.to_string(),
        "`systemctl enable tentacle.service` failed with exit code 1"
    );
}

#[test]
fn without_systemd_every_action_but_print_says_so_in_one_line() {
    let host = FakeHost::new();
    let manager = host
        .manager()
        .with_runtime_dir(host.dir.path().join("no/such/dir"));
    let spec = agent_default();
    for action in [
        Action::Install,
        Action::Start,
        Action::Stop,
        Action::Restart,
        Action::Uninstall,
        Action::Status,
    ] {
        let error = perform(&manager, action, &spec).expect_err("no systemd");
        let message = error.to_string();
        assert!(matches!(error, SystemdError::NoSystemd { .. }), "{message}");
        assert!(
            message.starts_with("this host does not run systemd (no "),
            "{message}"
        );
        assert!(message.ends_with("; use `--print` to see the unit and install it by hand"));
        assert!(!message.contains('\n'));
    }
    assert!(host.calls().is_empty());
    let (code, out) = perform(&manager, Action::Print, &spec).expect("print");
    assert_eq!((code, out), (0, render(&spec)));
    // The real marker's path is what users read.
    let real = SystemdError::NoSystemd {
        reason: format!("no {RUNTIME_DIR}"),
    };
    assert_eq!(
        real.to_string(),
        "this host does not run systemd (no /run/systemd/system); use `--print` to see the unit and install it by hand"
    );
}

#[test]
fn a_missing_systemctl_means_no_systemd() {
    let host = FakeHost::new();
    let manager = host.manager().with_systemctl(CommandSystemctl {
        program: host.dir.path().join("no-systemctl"),
    });
    let error = perform(&manager, Action::Install, &agent_default()).expect_err("no systemctl");
    assert!(
        error
            .to_string()
            .starts_with("this host does not run systemd (no systemctl); use `--print`"),
        "{error}"
    );
}

#[test]
fn install_and_uninstall_need_root() {
    let host = FakeHost::new();
    let manager = host.manager().with_root(false);
    for action in [Action::Install, Action::Uninstall] {
        let error = perform(&manager, action, &agent_default()).expect_err("not root");
        let message = error.to_string();
        assert!(message.contains("needs root"), "{message}");
        assert!(message.contains("use `--print`"), "{message}");
    }
    assert!(!host.unit_file().exists());
    assert!(host.calls().is_empty());
}

#[test]
fn install_checks_the_user_the_paths_and_the_executable() {
    let host = FakeHost::new();
    let manager = host.manager();
    let mut spec = agent_default();
    spec.user = "nobody-here".to_owned();
    let error = perform(&manager, Action::Install, &spec).expect_err("unknown user");
    assert!(
        error.to_string().contains(
            "useradd --system --home-dir /var/lib/tentacle --shell /usr/sbin/nologin nobody-here"
        ),
        "{error}"
    );
    let mut spec = agent_default();
    spec.read_write_paths.push(host.dir.path().join("missing"));
    assert!(matches!(
        perform(&manager, Action::Install, &spec),
        Err(SystemdError::MissingPath { .. })
    ));
    let mut spec = agent_default();
    spec.home = host.dir.path().join("not-yet");
    assert!(matches!(
        perform(&manager, Action::Install, &spec),
        Err(SystemdError::MissingPath { what: "home", .. })
    ));
    let mut spec = agent_default();
    spec.exec_start[0] = "/root/.cargo/bin/tentacle".to_owned();
    assert!(matches!(
        perform(&manager, Action::Install, &spec),
        Err(SystemdError::HiddenExecutable(_))
    ));
    assert!(!host.unit_file().exists());
    assert!(host.calls().is_empty());
}

#[test]
fn a_script_can_stand_in_for_systemctl() {
    use std::os::unix::fs::PermissionsExt;
    let host = FakeHost::new();
    let log = host.dir.path().join("calls.log");
    let script = host.dir.path().join("systemctl");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", log.display()),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let manager = host
        .manager()
        .with_systemctl(CommandSystemctl { program: script });
    let spec = agent_default();
    perform(&manager, Action::Install, &spec).expect("install");
    perform(&manager, Action::Uninstall, &spec).expect("uninstall");
    assert_eq!(
        std::fs::read_to_string(&log).expect("log"),
        "daemon-reload\nenable tentacle.service\nstop tentacle.service\ndisable tentacle.service\ndaemon-reload\n"
    );
}

#[test]
fn a_home_hidden_by_protect_home_falls_back_to_var_lib() {
    for (given, expected) in [
        ("/root/.tentacle-hub", "/var/lib/tentacle-hub"),
        ("/home/ops/.tentacle-hub", "/var/lib/tentacle-hub"),
        ("/run/user/1000/hub", "/var/lib/tentacle-hub"),
        ("/srv/hub", "/srv/hub"),
        ("/var/lib/tentacle-hub", "/var/lib/tentacle-hub"),
    ] {
        let installation = Installation::new(
            &Program::Hub {
                server_args: Vec::new(),
            },
            &args("--print"),
            Path::new("/usr/local/bin/tentacle-hub"),
            Path::new(given),
        )
        .expect("installation");
        assert_eq!(installation.home, Path::new(expected), "{given}");
        assert_eq!(installation.user, "tentacle-hub");
    }
    assert!(!hidden_by_protect_home(Path::new("/homestead")));
}
