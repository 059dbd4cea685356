//! Polling through a real HTTP CONNECT proxy (Debian's tinyproxy), with
//! Basic authentication. TLS runs end to end: the proxy only relays bytes.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tentacle_tests::{HubFixture, client_identity, tentacle};

/// A tinyproxy process that only allows CONNECT to `hub_port`.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    fn start(hub_port: u16, user: &str, password: &str) -> Self {
        let binary = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("tinyproxy is not installed: `apt-get install tinyproxy` (.ci/run does this)");
        let dir = tempfile::tempdir().expect("tempdir");
        // tinyproxy drops to `nobody`, which must be able to write its log.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = dir.path().join("tinyproxy.log");
        let config = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &config,
            format!(
                "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 600\n\
                 Allow 127.0.0.1\nConnectPort {hub_port}\nBasicAuth {user} {password}\n\
                 LogFile \"{}\"\nLogLevel Connect\nMaxClients 20\n",
                log.display()
            ),
        )
        .expect("config");
        let child = Command::new(binary)
            .arg("-d")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_works_through_an_authenticating_proxy() {
    let hub = HubFixture::start(client_identity()).await;
    let proxy = Tinyproxy::start(hub.address.port(), "tentacle", "s3cret");

    // Wrong password first: the agent says so and never opens a tunnel.
    let mut agent = hub.prepare_polling_agent("");
    hub.trust(&agent);
    let port = proxy.port.to_string();
    let home = agent.home().to_owned();
    let proxy_args = |password: &str| {
        let args = [
            "polling-proxy",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--username",
            "tentacle",
            "--password",
            password,
        ];
        tentacle(&home, &args);
    };
    proxy_args("wrong");
    let _events = agent.spawn_no_wait();
    assert!(
        agent.wait_for_log(
            "check the proxy username and password",
            Duration::from_secs(10)
        ),
        "log:\n{}",
        agent.log_text()
    );
    agent.kill();

    proxy_args("s3cret");
    agent.spawn();
    let caps = hub
        .client(&agent)
        .await
        .capabilities()
        .await
        .expect("a call through the proxy");
    assert_eq!(caps.os, std::env::consts::OS);
    let log = proxy.log();
    assert!(
        log.contains("CONNECT") && log.contains(&format!("{}", hub.address.port())),
        "the tunnel went through the proxy; tinyproxy log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_honours_https_proxy_from_the_environment() {
    let hub = HubFixture::start(client_identity()).await;
    let proxy = Tinyproxy::start(hub.address.port(), "envuser", "envpass");
    let mut agent = hub.prepare_polling_agent("");
    hub.trust(&agent);
    agent.env.push((
        "HTTPS_PROXY".into(),
        format!("http://envuser:envpass@127.0.0.1:{}", proxy.port),
    ));
    agent
        .env
        .push(("NO_PROXY".into(), "example.invalid".into()));
    agent.spawn();
    hub.client(&agent)
        .await
        .capabilities()
        .await
        .expect("a call through the proxy");
    assert!(
        proxy.log().contains("CONNECT"),
        "tinyproxy log:\n{}",
        proxy.log()
    );
}
