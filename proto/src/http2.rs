//! The HTTP/2 connection settings every Tentacle server and client applies:
//! keepalive pings, flow-control windows, the largest frame accepted and
//! the largest header list (metadata) accepted.
//!
//! One [`Http2Settings`] describes one side of one kind of connection, and
//! [`Http2Settings::apply_to_server`] / [`Http2Settings::apply_to_endpoint`]
//! are the only places that hand these values to tonic, so every listener,
//! dialler and tunnel applies them the same way. The values are clamped into
//! what HTTP/2 allows on the way in (h2 panics on an out-of-range frame size);
//! a configuration file that asks for such a value is refused when it is
//! parsed, with the allowed range in the message.
//!
//! The presets keep every connection exactly as it was configured before
//! the settings were shared:
//!
//! - the agent's listening server: [`Http2Settings::default`]; a dialling
//!   client (`dial::DialSettings`) the same but with HTTP/2's 16 KiB frames;
//! - both ends of a tunnel's connection: [`Http2Settings::for_tunnels`]
//!   (clients again with 16 KiB frames).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Endpoint, Server};

use crate::tunnel::HeartbeatSettings;

/// The smallest `SETTINGS_MAX_FRAME_SIZE` HTTP/2 allows (RFC 9113 §6.5.2),
/// and the size both ends assume until told otherwise.
pub const MIN_FRAME_BYTES: u32 = 1 << 14;
/// The largest `SETTINGS_MAX_FRAME_SIZE` HTTP/2 allows: 16 MiB - 1.
pub const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;
/// The smallest window accepted: HTTP/2's initial window. Smaller windows
/// are legal but make every transfer crawl, and a zero window stalls it.
pub const MIN_WINDOW_BYTES: u32 = 65_535;
/// The largest flow-control window HTTP/2 allows: 2^31 - 1.
pub const MAX_WINDOW_BYTES: u32 = (1 << 31) - 1;

/// How often an idle connection is pinged by default.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest frame a server accepts by default. Bulk uploads arrive in
/// fewer, larger frames than with HTTP/2's 16 KiB.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 256 * 1024;
/// The largest header list (all of a request's or response's metadata,
/// decoded) accepted by default: what hyper has always allowed, now
/// explicit. A peer that sends more has its stream refused.
pub const DEFAULT_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// The smallest header list limit accepted: gRPC's own headers need room.
pub const MIN_HEADER_LIST_BYTES: u32 = 1024;
/// The largest header list limit accepted: 16 MiB.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024 * 1024;
/// The per-stream window of a tunnel's connections: a tunnel carries every
/// call of its agent over one stream, so that stream needs room.
pub const TUNNEL_STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
/// The connection window of a tunnel's connections.
pub const TUNNEL_CONNECTION_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// HTTP/2 settings for one side of a connection.
///
/// In a configuration file (the agent's `[server.http2]`) every key is
/// optional and falls back to its default:
///
/// ```toml
/// keepalive_interval = "30s"
/// keepalive_timeout = "20s"
/// # stream_window_bytes = 4194304      # absent: the library's default
/// # connection_window_bytes = 8388608  # absent: the library's default
/// max_frame_bytes = 262144
/// max_header_list_bytes = 16384
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Unchecked")]
pub struct Http2Settings {
    /// Ping an idle connection this often; `None` sends no pings (inside a
    /// tunnel, whose session already sends heartbeats and where a ping would
    /// queue behind bulk data).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub keepalive_interval: Option<Duration>,
    /// Close the connection when a ping is not answered within this.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// The initial flow-control window of each stream; `None` leaves the
    /// HTTP/2 library's default (hyper: 1 MiB for a server, 2 MiB for a
    /// client).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_window_bytes: Option<u32>,
    /// The initial flow-control window of the whole connection; `None`
    /// leaves the library's default (hyper: 1 MiB for a server, 5 MiB for a
    /// client).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_window_bytes: Option<u32>,
    /// The largest frame this side accepts; `None` leaves HTTP/2's 16 KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u32>,
    /// The largest header list (metadata) this side accepts, decoded;
    /// `None` leaves the library's 16 KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_list_bytes: Option<u32>,
}

impl Default for Http2Settings {
    /// What the agent's listening server has always used: pings every 30 s
    /// answered within 20 s, the library's windows, 256 KiB frames.
    fn default() -> Self {
        Self {
            keepalive_interval: Some(DEFAULT_KEEPALIVE_INTERVAL),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            stream_window_bytes: None,
            connection_window_bytes: None,
            max_frame_bytes: Some(DEFAULT_MAX_FRAME_BYTES),
            max_header_list_bytes: Some(DEFAULT_MAX_HEADER_LIST_BYTES),
        }
    }
}

/// A setting outside what HTTP/2 (or common sense) allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Http2SettingsError {
    #[error(
        "max_frame_bytes = {0} is outside what HTTP/2 allows: use {MIN_FRAME_BYTES} (16 KiB) to {MAX_FRAME_BYTES} (16 MiB - 1)"
    )]
    FrameSize(u32),
    #[error(
        "{field} = {value} is outside what HTTP/2 allows: use {MIN_WINDOW_BYTES} (64 KiB - 1) to {MAX_WINDOW_BYTES} (2 GiB - 1)"
    )]
    Window { field: &'static str, value: u32 },
    #[error(
        "max_header_list_bytes = {0} is outside what Tentacle allows: use {MIN_HEADER_LIST_BYTES} (1 KiB) to {MAX_HEADER_LIST_BYTES} (16 MiB)"
    )]
    HeaderListSize(u32),
    #[error("{0} must be longer than zero")]
    ZeroDuration(&'static str),
}

impl Http2Settings {
    /// Both ends of the outer connection a tunnel runs over: pings follow
    /// the tunnel's heartbeat, and the windows fit a tunnel's bulk traffic.
    pub fn for_tunnels(heartbeat: &HeartbeatSettings) -> Self {
        Self {
            keepalive_interval: Some(heartbeat.interval),
            keepalive_timeout: heartbeat.timeout,
            stream_window_bytes: Some(TUNNEL_STREAM_WINDOW_BYTES),
            connection_window_bytes: Some(TUNNEL_CONNECTION_WINDOW_BYTES),
            max_frame_bytes: Some(DEFAULT_MAX_FRAME_BYTES),
            max_header_list_bytes: Some(DEFAULT_MAX_HEADER_LIST_BYTES),
        }
    }

    /// Whether every value is one HTTP/2 accepts; the first that is not.
    pub fn validate(&self) -> Result<(), Http2SettingsError> {
        if self.keepalive_interval == Some(Duration::ZERO) {
            return Err(Http2SettingsError::ZeroDuration("keepalive_interval"));
        }
        if self.keepalive_timeout.is_zero() {
            return Err(Http2SettingsError::ZeroDuration("keepalive_timeout"));
        }
        let windows = [
            ("stream_window_bytes", self.stream_window_bytes),
            ("connection_window_bytes", self.connection_window_bytes),
        ];
        for (field, value) in windows {
            if let Some(value) = value
                && !(MIN_WINDOW_BYTES..=MAX_WINDOW_BYTES).contains(&value)
            {
                return Err(Http2SettingsError::Window { field, value });
            }
        }
        if let Some(frame) = self.max_frame_bytes
            && !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&frame)
        {
            return Err(Http2SettingsError::FrameSize(frame));
        }
        if let Some(list) = self.max_header_list_bytes
            && !(MIN_HEADER_LIST_BYTES..=MAX_HEADER_LIST_BYTES).contains(&list)
        {
            return Err(Http2SettingsError::HeaderListSize(list));
        }
        Ok(())
    }

    /// The nearest settings HTTP/2 accepts: sizes clamped into their ranges
    /// and zero durations raised to a millisecond. Settings that pass
    /// [`validate`](Self::validate) come back unchanged.
    #[must_use]
    pub fn clamped(self) -> Self {
        let window = |w: Option<u32>| w.map(|w| w.clamp(MIN_WINDOW_BYTES, MAX_WINDOW_BYTES));
        let at_least_a_millisecond = |d: Duration| d.max(Duration::from_millis(1));
        Self {
            keepalive_interval: self.keepalive_interval.map(at_least_a_millisecond),
            keepalive_timeout: at_least_a_millisecond(self.keepalive_timeout),
            stream_window_bytes: window(self.stream_window_bytes),
            connection_window_bytes: window(self.connection_window_bytes),
            max_frame_bytes: self
                .max_frame_bytes
                .map(|f| f.clamp(MIN_FRAME_BYTES, MAX_FRAME_BYTES)),
            max_header_list_bytes: self
                .max_header_list_bytes
                .map(|l| l.clamp(MIN_HEADER_LIST_BYTES, MAX_HEADER_LIST_BYTES)),
        }
    }

    /// Applies these settings (clamped) to a tonic server builder.
    pub fn apply_to_server<L>(&self, server: Server<L>) -> Server<L> {
        let s = self.clamped();
        server
            .http2_keepalive_interval(s.keepalive_interval)
            .http2_keepalive_timeout(Some(s.keepalive_timeout))
            .initial_stream_window_size(s.stream_window_bytes)
            .initial_connection_window_size(s.connection_window_bytes)
            .max_frame_size(s.max_frame_bytes)
            .http2_max_header_list_size(s.max_header_list_bytes)
    }

    /// Applies these settings (clamped) to a tonic client endpoint. Pings,
    /// when on, are sent on idle connections too: an idle connection is the
    /// one whose death nobody would otherwise notice.
    pub fn apply_to_endpoint(&self, endpoint: Endpoint) -> Endpoint {
        let s = self.clamped();
        let endpoint = match s.keepalive_interval {
            Some(interval) => endpoint
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(s.keepalive_timeout)
                .keep_alive_while_idle(true),
            None => endpoint,
        };
        let endpoint = match s.max_header_list_bytes {
            Some(list) => endpoint.http2_max_header_list_size(list),
            None => endpoint,
        };
        endpoint
            .initial_stream_window_size(s.stream_window_bytes)
            .initial_connection_window_size(s.connection_window_bytes)
            .max_frame_size(s.max_frame_bytes)
    }
}

/// What a configuration file says, before it is checked.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Unchecked {
    #[serde(with = "humantime_serde")]
    keepalive_interval: Option<Duration>,
    #[serde(with = "humantime_serde")]
    keepalive_timeout: Duration,
    stream_window_bytes: Option<u32>,
    connection_window_bytes: Option<u32>,
    max_frame_bytes: Option<u32>,
    max_header_list_bytes: Option<u32>,
}

impl Default for Unchecked {
    fn default() -> Self {
        let d = Http2Settings::default();
        Self {
            keepalive_interval: d.keepalive_interval,
            keepalive_timeout: d.keepalive_timeout,
            stream_window_bytes: d.stream_window_bytes,
            connection_window_bytes: d.connection_window_bytes,
            max_frame_bytes: d.max_frame_bytes,
            max_header_list_bytes: d.max_header_list_bytes,
        }
    }
}

impl TryFrom<Unchecked> for Http2Settings {
    type Error = Http2SettingsError;

    fn try_from(u: Unchecked) -> Result<Self, Self::Error> {
        let settings = Self {
            keepalive_interval: u.keepalive_interval,
            keepalive_timeout: u.keepalive_timeout,
            stream_window_bytes: u.stream_window_bytes,
            connection_window_bytes: u.connection_window_bytes,
            max_frame_bytes: u.max_frame_bytes,
            max_header_list_bytes: u.max_header_list_bytes,
        };
        settings.validate()?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests;
