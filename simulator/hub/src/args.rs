//! Command-line arguments that every program reaching a hub shares, so each
//! flag is declared and documented once: `tentacle-hub`'s operator verbs
//! and `tentacle-sim fleet` flatten these into their own arguments. Also the
//! hub server's own limits that a library user may want on a command line
//! too ([`RegistrationLimitArgs`]).

use std::time::Duration;

use tentacle_proto::dial::ListeningAddress;
use tentacle_proto::{Identity, Thumbprint};

use crate::hub::DEFAULT_HUB_PORT;
use crate::limits::RegistrationLimits;

/// Where the hub is and which certificate it must present.
#[derive(Debug, Clone, clap::Args)]
pub struct HubEndpointArgs {
    /// The hub's address (its polling port).
    #[arg(long, default_value_t = default_hub())]
    pub hub: ListeningAddress,
    /// The hub's certificate thumbprint; by default the thumbprint of this
    /// home's certificate, as when the hub runs from this home.
    #[arg(long)]
    pub hub_thumbprint: Option<Thumbprint>,
}

impl HubEndpointArgs {
    /// The thumbprint to pin: the one given, or `home`'s own.
    pub fn thumbprint_or(&self, home: &Identity) -> Thumbprint {
        self.hub_thumbprint.unwrap_or_else(|| home.thumbprint())
    }
}

/// [`HubEndpointArgs`] plus how long a call routed through the hub waits
/// for a polling agent to connect.
#[derive(Debug, Clone, clap::Args)]
pub struct HubArgs {
    #[command(flatten)]
    pub endpoint: HubEndpointArgs,
    /// How long a call waits for a polling agent to connect [default: the
    /// hub's own, 2m unless `tentacle-hub server --pickup-timeout` says
    /// otherwise].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub pickup_timeout: Option<Duration>,
}

/// How many failed registrations (bad or missing token or API key) one
/// source address may make; successful registrations never count.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistrationLimitArgs {
    /// How fast an address's budget of failed registrations refills.
    #[arg(long, env = "TENTACLE_HUB_REGISTRATION_FAILURES_PER_MINUTE", default_value_t = RegistrationLimits::default().failures_per_minute, value_parser = clap::value_parser!(u32).range(1..))]
    pub registration_failures_per_minute: u32,
    /// How many failed registrations an address may make at once before it
    /// is refused (RESOURCE_EXHAUSTED) until its budget refills.
    #[arg(long, env = "TENTACLE_HUB_REGISTRATION_FAILURE_BURST", default_value_t = RegistrationLimits::default().failure_burst, value_parser = clap::value_parser!(u32).range(1..))]
    pub registration_failure_burst: u32,
    /// How many addresses with failures outstanding are tracked at most.
    #[arg(long, env = "TENTACLE_HUB_REGISTRATION_FAILURE_SOURCES", default_value_t = RegistrationLimits::default().max_sources)]
    pub registration_failure_sources: usize,
}

impl RegistrationLimitArgs {
    pub fn limits(&self) -> RegistrationLimits {
        RegistrationLimits {
            failures_per_minute: self.registration_failures_per_minute,
            failure_burst: self.registration_failure_burst,
            max_sources: self.registration_failure_sources,
        }
    }
}

/// `https://127.0.0.1:10943`: a hub on this machine.
pub fn default_hub() -> ListeningAddress {
    ListeningAddress::new("127.0.0.1", DEFAULT_HUB_PORT)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Verb {
        #[command(flatten)]
        hub: HubArgs,
    }

    #[derive(Debug, Parser)]
    struct Server {
        #[command(flatten)]
        limits: RegistrationLimitArgs,
    }

    #[test]
    fn registration_limits_default_to_the_hubs_and_refuse_zero() {
        let server = Server::try_parse_from(["server"]).expect("parse");
        assert_eq!(server.limits.limits(), RegistrationLimits::default());
        let server = Server::try_parse_from([
            "server",
            "--registration-failures-per-minute",
            "30",
            "--registration-failure-burst",
            "5",
            "--registration-failure-sources",
            "100",
        ])
        .expect("parse");
        assert_eq!(
            server.limits.limits(),
            RegistrationLimits {
                failures_per_minute: 30,
                failure_burst: 5,
                max_sources: 100,
            }
        );
        let zero = Server::try_parse_from(["server", "--registration-failure-burst", "0"])
            .expect_err("zero");
        assert!(
            zero.to_string().contains("--registration-failure-burst"),
            "{zero}"
        );
    }

    #[test]
    fn defaults_name_a_local_hub_and_leave_the_rest_to_the_hub() {
        let verb = Verb::try_parse_from(["verb"]).expect("parse");
        assert_eq!(verb.hub.endpoint.hub, default_hub());
        assert_eq!(verb.hub.endpoint.hub.to_string(), "https://127.0.0.1:10943");
        assert_eq!(verb.hub.endpoint.hub_thumbprint, None);
        assert_eq!(verb.hub.pickup_timeout, None);
    }

    #[test]
    fn every_flag_parses_once_flattened() {
        let thumbprint = Thumbprint::of_der(b"hub");
        let verb = Verb::try_parse_from([
            "verb",
            "--hub",
            "https://hub.example:443",
            "--hub-thumbprint",
            &thumbprint.to_string(),
            "--pickup-timeout",
            "30s",
        ])
        .expect("parse");
        assert_eq!(verb.hub.endpoint.hub.to_string(), "https://hub.example:443");
        assert_eq!(verb.hub.endpoint.hub_thumbprint, Some(thumbprint));
        assert_eq!(verb.hub.pickup_timeout, Some(Duration::from_secs(30)));
        let bad = Verb::try_parse_from(["verb", "--pickup-timeout", "soon"]).expect_err("bad");
        assert!(bad.to_string().contains("--pickup-timeout"), "{bad}");
    }
}
