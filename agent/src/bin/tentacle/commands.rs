//! What each `tentacle` verb does.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, bail};
use tentacle_agent::config::{AgentConfig, Home, PollingServer};
use tentacle_agent::polling::ProxySettings;
use tentacle_agent::runtime::Agent;
use tentacle_proto::telemetry::LogFormat;
use tentacle_proto::{Identity, Thumbprint};

pub fn create_instance(home: &Path) -> anyhow::Result<()> {
    let home = Home::new(home);
    if home.exists() {
        bail!(
            "an instance already exists at {}; use `tentacle configure` to change it",
            home.dir().display()
        );
    }
    new_instance(&home)?;
    println!("Created an instance at {}", home.dir().display());
    println!(
        "Next: `tentacle new-certificate`, then either `tentacle configure --trust <server thumbprint>` or `tentacle register-with ...` (which sets up trust both ways)."
    );
    Ok(())
}

/// Writes a default `tentacle.toml` and makes its directories.
pub fn new_instance(home: &Home) -> anyhow::Result<()> {
    let mut config = AgentConfig::default();
    config.polling.agent_id = tentacle_agent::config::new_agent_id();
    home.save(&config)?;
    for dir in [&config.scripts.work_dir, &config.files.root] {
        let path = home.resolve(dir);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    Ok(())
}

pub fn new_certificate(home: &Path, if_blank: bool, force: bool) -> anyhow::Result<()> {
    let home = Home::new(home);
    let config = home.load()?;
    let certificate = home.resolve(&config.certificate.certificate);
    let key = home.resolve(&config.certificate.key);
    if certificate.exists() {
        if if_blank {
            println!(
                "A certificate already exists at {}; left as it is.",
                certificate.display()
            );
            return Ok(());
        }
        if !force {
            bail!(
                "a certificate already exists at {}; pass --force to replace it (servers that trust the old thumbprint will then refuse this agent)",
                certificate.display()
            );
        }
    }
    let identity = Identity::generate("Tentacle")?;
    identity.save(&certificate, &key)?;
    println!("{}", identity.thumbprint());
    Ok(())
}

fn load_identity(home: &Home) -> anyhow::Result<Identity> {
    let config = home.load()?;
    Ok(Identity::load(
        &home.resolve(&config.certificate.certificate),
        &home.resolve(&config.certificate.key),
    )?)
}

pub fn show_thumbprint(home: &Path) -> anyhow::Result<()> {
    println!("{}", load_identity(&Home::new(home))?.thumbprint());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ConfigureArgs {
    /// The port to listen on.
    #[arg(long)]
    port: Option<u16>,
    /// The address to listen on, e.g. 0.0.0.0 or 127.0.0.1.
    #[arg(long)]
    listen_address: Option<IpAddr>,
    /// Do not listen for connections.
    #[arg(long, conflicts_with = "listen")]
    no_listen: bool,
    /// Listen for connections.
    #[arg(long)]
    listen: bool,
    /// Trust a server's certificate thumbprint (repeatable).
    #[arg(long, value_name = "THUMBPRINT")]
    trust: Vec<Thumbprint>,
    /// Stop trusting a thumbprint (repeatable).
    #[arg(long, value_name = "THUMBPRINT")]
    remove_trust: Vec<Thumbprint>,
    /// Remove every trusted thumbprint before adding those given with --trust.
    #[arg(long)]
    reset_trust: bool,
    /// listening: accept connections; polling: dial the hub; both: do both.
    #[arg(long, value_parser = ["listening", "polling", "both"])]
    mode: Option<String>,
    /// A hub to poll, https://HOST:PORT (with --server-thumbprint). Run
    /// once per server; servers given the same thumbprint are nodes of one
    /// hub cluster, and the agent holds its tunnels on one of them at a
    /// time, moving to the next when that one is down or draining.
    #[arg(long, requires = "server_thumbprint")]
    server: Option<String>,
    /// The hub's certificate thumbprint (`tentacle-hub show-thumbprint`).
    #[arg(long, requires = "server")]
    server_thumbprint: Option<Thumbprint>,
    /// Stop polling this hub URL.
    #[arg(long, value_name = "URL")]
    remove_server: Option<String>,
    /// The name hubs address this agent by (poll://NAME).
    #[arg(long)]
    agent_id: Option<String>,
    /// Tunnels to keep open to each hub (to one node of each cluster).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    tunnels: Option<u32>,
}

pub fn configure(home: &Path, args: ConfigureArgs) -> anyhow::Result<()> {
    let home = Home::new(home);
    let mut config = home.load()?;
    if let Some(port) = args.port {
        config.listen.port = port;
    }
    if let Some(address) = args.listen_address {
        config.listen.address = address;
    }
    if args.no_listen {
        config.listen.enabled = false;
    }
    if args.listen {
        config.listen.enabled = true;
    }
    let trusted = &mut config.trust.thumbprints;
    if args.reset_trust {
        trusted.clear();
    }
    trusted.retain(|t| !args.remove_trust.contains(t));
    for thumbprint in args.trust {
        if !trusted.contains(&thumbprint) {
            trusted.push(thumbprint);
        }
    }
    match args.mode.as_deref() {
        Some("listening") => {
            config.listen.enabled = true;
            config.polling.enabled = false;
        }
        Some("polling") => {
            config.polling.enabled = true;
            config.listen.enabled = args.listen;
        }
        Some("both") => {
            config.listen.enabled = true;
            config.polling.enabled = true;
        }
        _ => {}
    }
    if let Some(url) = &args.remove_server {
        config.polling.servers.retain(|s| &s.url != url);
    }
    if let (Some(url), Some(thumbprint)) = (args.server, args.server_thumbprint) {
        url.parse::<tentacle_proto::dial::ListeningAddress>()?;
        config.polling.servers.retain(|s| s.url != url);
        config
            .polling
            .servers
            .push(PollingServer { url, thumbprint });
    }
    if let Some(id) = args.agent_id {
        if !crate::from_env::valid_name(&id) {
            bail!("agent id `{id}` is not valid: use 1-128 letters, digits, `-`, `_` or `.`");
        }
        config.polling.agent_id = id;
    }
    if let Some(tunnels) = args.tunnels {
        config.polling.tunnels = tunnels;
    }
    if config.polling.enabled && config.polling.agent_id.is_empty() {
        config.polling.agent_id = tentacle_agent::config::new_agent_id();
    }
    home.save(&config)?;
    println!("Saved {}", home.config_path().display());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct PollingProxyArgs {
    /// The proxy's host name or address.
    #[arg(long, required_unless_present = "clear")]
    host: Option<String>,
    /// The proxy's port.
    #[arg(long, required_unless_present = "clear")]
    port: Option<u16>,
    /// For Basic authentication.
    #[arg(long, requires = "password")]
    username: Option<String>,
    #[arg(long, requires = "username")]
    password: Option<String>,
    /// Remove the proxy (HTTPS_PROXY is honoured again).
    #[arg(long, conflicts_with_all = ["host", "port", "username", "password"])]
    clear: bool,
}

pub fn polling_proxy(home: &Path, args: PollingProxyArgs) -> anyhow::Result<()> {
    let home = Home::new(home);
    let mut config = home.load()?;
    config.polling.proxy = match (args.clear, args.host, args.port) {
        (true, _, _) => None,
        (false, Some(host), Some(port)) => Some(ProxySettings {
            host,
            port,
            username: args.username,
            password: args.password,
        }),
        _ => bail!("give --host and --port, or --clear"),
    };
    home.save(&config)?;
    println!("Saved {}", home.config_path().display());
    Ok(())
}

pub fn show_configuration(home: &Path) -> anyhow::Result<()> {
    let home = Home::new(home);
    let mut config = home.load()?;
    if let Some(proxy) = config.polling.proxy.as_mut()
        && proxy.password.is_some()
    {
        proxy.password = Some("********".into());
    }
    println!("# {}", home.config_path().display());
    print!("{}", toml::to_string_pretty(&config)?);
    Ok(())
}

/// Runs the agent; with `from_env`, prepares the home from the
/// environment first (after the metrics endpoint is up, so `/livez`
/// answers while a registration waits for the hub).
pub fn run(
    home: &Path,
    log_format: LogFormat,
    otlp_endpoint: Option<&str>,
    metrics_listen: Option<std::net::SocketAddr>,
    from_env: Option<crate::from_env::Environment>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Inside the runtime: the span exporter needs one.
        let _telemetry = tentacle_proto::telemetry::init(
            "tentacle",
            otlp_endpoint,
            log_format,
            "info,h2=warn,hyper=warn,tower=warn",
        )?;
        if let Some(address) = metrics_listen {
            tentacle_proto::metrics::spawn_metrics(address)
                .await
                .with_context(|| format!("could not serve metrics on {address}"))?;
        }
        if let Some(environment) = &from_env {
            crate::from_env::prepare(home, environment).await?;
        }
        let home = Home::new(home);
        // Scripts run detached under this very binary (`/proc/self/exe`
        // still names it after an upgrade replaced the file), so they
        // survive the agent's restart.
        let agent = Agent::builder(home)
            .script_host(std::path::PathBuf::from("/proc/self/exe"))
            .build()?;
        let (listening, polling) = (agent.config().listen.enabled, agent.config().polling.enabled);
        if !listening && !polling {
            bail!("neither listening nor polling is enabled; use `tentacle configure --mode listening` or `--mode polling`");
        }
        if polling {
            agent.config().polling_settings().map_err(anyhow::Error::msg)?;
        }
        if listening && agent.trust().is_empty() {
            tracing::warn!("no server is trusted yet, so every connection will be refused; add one with `tentacle configure --trust <thumbprint>`");
        }
        let listener = match listening {
            true => Some(agent.bind().await?),
            false => None,
        };
        agent.serve(listener, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch for SIGTERM; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT"),
    }
}

/// Runs a one-shot async verb.
pub fn block_on(verb: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(verb)
}

/// `tentacle probe`: GET /readyz on the agent's metrics endpoint.
pub fn probe(args: tentacle_proto::probe::ProbeArgs) -> anyhow::Result<()> {
    block_on(async {
        args.probe().await?;
        println!("ready");
        Ok(())
    })
}

/// `tentacle service`: the unit runs `tentacle --home HOME run`, with the
/// stop timeouts taken from the home's tentacle.toml when there is one.
/// Scripts keep running through a stop of the service (`KillMode=process`)
/// so that a restart re-attaches to them; an uninstalled agent will not
/// come back for them, so they are cancelled (TERM, then KILL after the
/// kill grace) once the service is gone.
fn stop_detached_scripts(home: &Home) {
    let Ok(config) = home.load() else {
        return;
    };
    let work_root = config.script_settings(home).work_root;
    let wait = config.scripts.kill_grace + std::time::Duration::from_secs(5);
    let stopped = tentacle_agent::scripts::detached::cancel_all_in(&work_root, wait);
    if stopped > 0 {
        println!("stopped {stopped} script(s) that were still running");
    }
}

pub fn service(home: &Path, args: &tentacle_proto::systemd::ServiceArgs) -> std::process::ExitCode {
    use tentacle_proto::systemd::{self, Action, Program};
    let config = Home::new(home);
    let program = if !config.exists() {
        Program::agent()
    } else {
        match config.load() {
            Ok(config) => Program::Agent {
                shutdown_grace: config.server.shutdown_grace,
                kill_grace: config.scripts.kill_grace,
            },
            // Printing needs no access to the home; the defaults stand in.
            Err(error) if args.action() == Action::Print => {
                eprintln!("tentacle: note: {error}; the unit uses the default stop timeouts");
                Program::agent()
            }
            Err(error) => {
                eprintln!("tentacle: error: {error}");
                return std::process::ExitCode::FAILURE;
            }
        }
    };
    match systemd::run(&program, args, home) {
        Ok(code)
            if args.action() == Action::Uninstall && code == std::process::ExitCode::SUCCESS =>
        {
            stop_detached_scripts(&config);
            code
        }
        Ok(code) => code,
        Err(error) => {
            eprintln!("tentacle: error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
