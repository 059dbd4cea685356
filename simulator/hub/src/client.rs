//! Typed calls to one agent. Works over any tonic [`Channel`], so the same
//! code reaches a listening agent directly or a polling one through a hub.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::channel::AgentChannel;
use sha2::{Digest, Sha256};
use tentacle_proto::backoff::Backoff;
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::capabilities_service_client::CapabilitiesServiceClient;
use tentacle_proto::v1::file_service_client::FileServiceClient;
use tentacle_proto::v1::package_service_client::PackageServiceClient;
use tentacle_proto::v1::script_service_client::ScriptServiceClient;
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Dial(#[from] dial::DialError),
    #[error(transparent)]
    Tls(#[from] tentacle_proto::tls::TlsConfigError),
    /// Not a `source`: the message already describes the status's chain.
    #[error("the call failed: {}", dial::describe_status(.0))]
    Rpc(Status),
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the downloaded bytes hash to {actual}, but the agent's file hashes to {expected}; the partial file was removed, try again"
    )]
    Integrity { expected: String, actual: String },
    #[error("the agent stored bytes hashing to {stored}, but the bytes sent hash to {sent}")]
    UploadIntegrity { sent: String, stored: String },
    #[error("the agent's reply was incomplete: {0}")]
    Protocol(&'static str),
    #[error(
        "lost the connection to the agent {attempts} times while following the script; last error: {last}"
    )]
    Disconnected { attempts: u32, last: Status },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ClientError + 'a {
    move |source| ClientError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        Self::Rpc(status)
    }
}

/// How hard to try to follow a script across dropped streams.
#[derive(Debug, Clone)]
pub struct FollowSettings {
    pub max_reconnects: u32,
    /// The first reopen waits a random time up to this; each further one
    /// doubles the window, up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for FollowSettings {
    fn default() -> Self {
        Self {
            max_reconnects: 20,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Statuses after which the same call may simply be made again.
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::DeadlineExceeded
    )
}

/// A client for one agent, over any [`AgentChannel`].
#[derive(Debug, Clone)]
pub struct AgentClient {
    channel: AgentChannel,
    unary_timeout: Duration,
}

/// How long a unary call may take before the client gives up on it: a
/// safety net against a connection that died without telling anyone. It is
/// longer than the hub's default pickup timeout, so waiting for a polling
/// agent to connect is governed by that, not by this.
pub const DEFAULT_UNARY_TIMEOUT: Duration = Duration::from_secs(300);

/// The end of a script as the caller saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptEnd {
    pub exit_code: i32,
    pub last_sequence: u64,
    /// How many times the watch stream had to be reopened.
    pub reconnects: u32,
}

impl AgentClient {
    /// Connects to a listening agent, pinning its thumbprint.
    pub async fn connect_listening(
        address: &ListeningAddress,
        agent: Thumbprint,
        identity: &Identity,
        settings: &DialSettings,
    ) -> Result<Self, ClientError> {
        let tls = tentacle_proto::tls::client_config(identity, TrustStore::new([agent]))?;
        let channel = dial::channel(address, tls, settings).await?;
        Ok(Self::new(channel))
    }

    pub fn new(channel: impl Into<AgentChannel>) -> Self {
        Self {
            channel: channel.into(),
            unary_timeout: DEFAULT_UNARY_TIMEOUT,
        }
    }

    /// Replaces [`DEFAULT_UNARY_TIMEOUT`] for this client's unary calls.
    #[must_use]
    pub fn with_unary_timeout(mut self, timeout: Duration) -> Self {
        self.unary_timeout = timeout;
        self
    }

    /// A unary request carrying this client's deadline.
    fn unary<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.unary_timeout);
        request
    }

    pub fn channel(&self) -> &AgentChannel {
        &self.channel
    }

    pub fn scripts(&self) -> ScriptServiceClient<AgentChannel> {
        ScriptServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    pub fn files(&self) -> FileServiceClient<AgentChannel> {
        FileServiceClient::new(self.channel.clone())
    }

    pub async fn capabilities(&self) -> Result<pb::Capabilities, ClientError> {
        let mut client = CapabilitiesServiceClient::new(self.channel.clone());
        Ok(client
            .get_capabilities(self.unary(pb::GetCapabilitiesRequest {}))
            .await?
            .into_inner())
    }

    /// Follows a started script from `after` until it completes, calling
    /// `on_line` exactly once per line in sequence order. Dropped streams are
    /// reopened from the last sequence seen. When `cancel` fires the script
    /// is cancelled on the agent and followed to its end.
    pub async fn follow(
        &self,
        ticket: &str,
        mut after: u64,
        mut on_line: impl FnMut(&pb::LogLine),
        cancel: &CancellationToken,
        settings: &FollowSettings,
    ) -> Result<ScriptEnd, ClientError> {
        use pb::watch_script_event::Event;
        let mut client = self.scripts();
        let mut reconnects = 0u32;
        let mut cancel_sent = false;
        // Jittered, so the followers of a fleet-wide deploy that lost the
        // same hub do not all come back at the same moment.
        let mut backoff = Backoff::new(settings.first_backoff, settings.max_backoff);
        loop {
            let outcome: Result<Option<pb::ScriptResult>, Status> = async {
                let mut stream = client
                    .watch_script(pb::WatchScriptRequest {
                        ticket: ticket.to_owned(),
                        after_sequence: after,
                    })
                    .await?
                    .into_inner();
                loop {
                    let message = tokio::select! {
                        message = stream.message() => message?,
                        () = cancel.cancelled(), if !cancel_sent => {
                            cancel_sent = true;
                            client.cancel_script(self.unary(pb::CancelScriptRequest {
                                ticket: ticket.to_owned(),
                                after_sequence: after,
                            })).await?;
                            continue;
                        }
                    };
                    match message.and_then(|m| m.event) {
                        None => return Ok(None),
                        Some(Event::Logs(batch)) => {
                            for line in &batch.lines {
                                // A resumed stream never repeats a line, but
                                // guard anyway: each line is shown once.
                                if line.sequence > after {
                                    on_line(line);
                                    after = line.sequence;
                                }
                            }
                        }
                        Some(Event::State(_)) => {}
                        Some(Event::Result(result)) => return Ok(Some(result)),
                    }
                }
            }
            .await;
            match outcome {
                Ok(Some(result)) => {
                    return Ok(ScriptEnd {
                        exit_code: result.exit_code,
                        last_sequence: after.max(result.last_sequence),
                        reconnects,
                    });
                }
                Ok(None) if reconnects < settings.max_reconnects => {}
                Err(status) if is_transient(&status) && reconnects < settings.max_reconnects => {
                    tracing::debug!(%status, after, "watch stream dropped; resuming");
                }
                Ok(None) => {
                    return Err(ClientError::Disconnected {
                        attempts: reconnects,
                        last: Status::unavailable("the watch stream ended before the script did"),
                    });
                }
                Err(status) if is_transient(&status) => {
                    return Err(ClientError::Disconnected {
                        attempts: reconnects,
                        last: status,
                    });
                }
                Err(status) => return Err(status.into()),
            }
            reconnects += 1;
            backoff.wait().await;
        }
    }

    /// Starts a script and follows it to the end.
    pub async fn run_script(
        &self,
        request: pb::StartScriptRequest,
        on_line: impl FnMut(&pb::LogLine),
        cancel: &CancellationToken,
        settings: &FollowSettings,
    ) -> Result<ScriptEnd, ClientError> {
        let ticket = request.ticket.clone();
        self.scripts().start_script(self.unary(request)).await?;
        self.follow(&ticket, 0, on_line, cancel, settings).await
    }

    /// Deletes a complete script's workspace on the agent.
    pub async fn complete_script(&self, ticket: &str) -> Result<(), ClientError> {
        self.scripts()
            .complete_script(self.unary(pb::CompleteScriptRequest {
                ticket: ticket.to_owned(),
                after_sequence: u64::MAX,
            }))
            .await?;
        Ok(())
    }

    /// Uploads `local` to `remote` on the agent, streaming it in chunks.
    /// The file is read once: its bytes are hashed as they are sent, and the
    /// digest follows them in the trailer. The agent's reply must name the
    /// same digest.
    pub async fn upload(
        &self,
        local: &Path,
        remote: &str,
        chunk_bytes: usize,
    ) -> Result<pb::UploadFileResponse, ClientError> {
        use pb::upload_file_request::Part;
        let size = tokio::fs::metadata(local)
            .await
            .map_err(io_error("reading", local))?
            .len();
        let header = pb::UploadFileRequest {
            part: Some(Part::Header(pb::UploadHeader {
                path: remote.to_owned(),
                size,
                sha256: String::new(),
            })),
        };
        let (messages, reader) = stream_file(
            local,
            header,
            chunk_bytes,
            |chunk| pb::UploadFileRequest {
                part: Some(Part::Chunk(chunk)),
            },
            Some(|sha256| pb::UploadFileRequest {
                part: Some(Part::Trailer(pb::UploadTrailer { sha256 })),
            }),
        )
        .await?;
        let response = self.files().upload_file(messages).await;
        let sent = finish_reading(reader, local).await?;
        let response = response?.into_inner();
        // The agent checked the trailer, so a different digest here means
        // the reply does not describe the bytes that were sent.
        let sent_sha256 = sent.sha256.unwrap_or_default();
        if response.sha256 != sent_sha256 || response.size != sent.bytes {
            return Err(ClientError::UploadIntegrity {
                sent: sent_sha256,
                stored: response.sha256,
            });
        }
        Ok(response)
    }

    /// Whether the agent's package cache holds `sha256`.
    pub async fn package_status(&self, sha256: &str) -> Result<pb::PackageStatus, ClientError> {
        Ok(self
            .packages()
            .get_package(self.unary(pb::GetPackageRequest {
                sha256: sha256.to_owned(),
            }))
            .await?
            .into_inner())
    }

    /// Makes sure the agent has the package at `local` (digest `sha256`)
    /// extracted for `application`, uploading it only if its cache lacks
    /// it. Returns where it is and how many bytes were sent.
    pub async fn ensure_package(
        &self,
        local: &Path,
        sha256: &str,
        application: &str,
    ) -> Result<PackageDelivery, ClientError> {
        use pb::upload_package_request::Part;
        let status = self.package_status(sha256).await?;
        let mut uploaded_bytes = 0;
        if !status.present {
            let size = tokio::fs::metadata(local)
                .await
                .map_err(io_error("reading", local))?
                .len();
            let header = pb::UploadPackageRequest {
                part: Some(Part::Header(pb::PackageHeader {
                    sha256: sha256.to_owned(),
                    size,
                })),
            };
            let (messages, reader) = stream_file(
                local,
                header,
                256 * 1024,
                |chunk| pb::UploadPackageRequest {
                    part: Some(Part::Chunk(chunk)),
                },
                None,
            )
            .await?;
            let response = self.packages().upload_package(messages).await;
            uploaded_bytes = finish_reading(reader, local).await?.bytes;
            response?;
        }
        let extracted = self
            .packages()
            .extract_package(self.unary(pb::ExtractPackageRequest {
                sha256: sha256.to_owned(),
                application: application.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(PackageDelivery {
            path: extracted.path,
            uploaded_bytes,
            was_cached: status.present,
        })
    }

    pub fn packages(&self) -> PackageServiceClient<AgentChannel> {
        PackageServiceClient::new(self.channel.clone())
    }

    /// The agent's health readings.
    pub async fn health(&self) -> Result<pb::AgentHealth, ClientError> {
        let mut client = CapabilitiesServiceClient::new(self.channel.clone());
        Ok(client
            .get_health(self.unary(pb::GetHealthRequest {}))
            .await?
            .into_inner())
    }

    /// Downloads `remote` to `local`. Bytes go to `local.partial` first; with
    /// `resume`, an existing partial file is continued from its length. The
    /// bytes are hashed as they are written (a resumed partial file's prefix
    /// first), and the whole file is checked against the digest in the
    /// agent's trailer before it is fsynced and renamed into place. Returns
    /// the agent's header with `sha256` set to that verified digest.
    pub async fn download(
        &self,
        remote: &str,
        local: &Path,
        resume: bool,
    ) -> Result<pb::DownloadHeader, ClientError> {
        use pb::download_file_response::Part;
        let partial = partial_path(local);
        let offset = if resume {
            tokio::fs::metadata(&partial)
                .await
                .map(|m| m.len())
                .unwrap_or(0)
        } else {
            0
        };
        let mut stream = self
            .files()
            .download_file(pb::DownloadFileRequest {
                path: remote.to_owned(),
                offset,
            })
            .await?
            .into_inner();
        let mut header = match stream.message().await? {
            Some(pb::DownloadFileResponse {
                part: Some(Part::Header(header)),
            }) => header,
            _ => return Err(ClientError::Protocol("a download must start with a header")),
        };
        if header.offset != offset || header.size < offset {
            return Err(ClientError::Protocol(
                "the download's header does not continue from the offset asked for",
            ));
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&partial)
            .await
            .map_err(io_error("opening", &partial))?;
        let mut hasher = Sha256::new();
        if offset == 0 {
            file.set_len(0)
                .await
                .map_err(io_error("truncating", &partial))?;
        } else {
            // The trailer covers the whole file, so the bytes already here
            // are hashed before the new ones are appended.
            hash_prefix(&mut file, offset, &mut hasher)
                .await
                .map_err(io_error("reading", &partial))?;
        }
        let mut received = offset;
        let trailer = loop {
            let Some(message) = stream.message().await? else {
                return Err(ClientError::Protocol(
                    "the download ended without its trailer, so it could not be verified; download again to resume",
                ));
            };
            match message.part {
                Some(Part::Chunk(bytes)) => {
                    received += bytes.len() as u64;
                    if received > header.size {
                        let _ = tokio::fs::remove_file(&partial).await;
                        return Err(ClientError::Protocol(
                            "the agent sent more bytes than its header's size; the partial file was removed",
                        ));
                    }
                    hasher.update(&bytes);
                    file.write_all(&bytes)
                        .await
                        .map_err(io_error("writing", &partial))?;
                }
                Some(Part::Trailer(trailer)) => break trailer,
                Some(Part::Header(_)) | None => {
                    return Err(ClientError::Protocol(
                        "only the first download message may be a header, and every one must have a part",
                    ));
                }
            }
        };
        if stream.message().await?.is_some() {
            return Err(ClientError::Protocol(
                "the download's trailer must be its last message",
            ));
        }
        if received != header.size {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ClientError::Protocol(
                "the download's trailer came before all of its bytes; the partial file was removed",
            ));
        }
        let actual = hex::encode(hasher.finalize());
        if !actual.eq_ignore_ascii_case(&trailer.sha256) {
            drop(file);
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ClientError::Integrity {
                expected: trailer.sha256,
                actual,
            });
        }
        file.sync_all()
            .await
            .map_err(io_error("syncing", &partial))?;
        drop(file);
        tokio::fs::rename(&partial, local)
            .await
            .map_err(io_error("renaming into", local))?;
        header.sha256 = actual;
        Ok(header)
    }
}

/// A package made ready on an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageDelivery {
    /// Where the agent extracted it.
    pub path: String,
    /// Bytes sent; 0 when the agent's cache already had it.
    pub uploaded_bytes: u64,
    pub was_cached: bool,
}

/// What [`stream_file`]'s reader sent.
#[derive(Debug)]
struct Sent {
    bytes: u64,
    /// The bytes' digest, when a trailer carried it.
    sha256: Option<String>,
}

/// Streams `first`, then the file's bytes in chunks wrapped by `wrap`, then,
/// with `trailer`, their digest wrapped by it. The trailer goes only after
/// the file was read to its end, so a failed read never looks complete. The
/// returned task reports what it sent.
async fn stream_file<M: Send + 'static>(
    local: &Path,
    first: M,
    chunk_bytes: usize,
    wrap: fn(Vec<u8>) -> M,
    trailer: Option<fn(String) -> M>,
) -> Result<
    (
        tokio_stream::wrappers::ReceiverStream<M>,
        tokio::task::JoinHandle<std::io::Result<Sent>>,
    ),
    ClientError,
> {
    let mut file = tokio::fs::File::open(local)
        .await
        .map_err(io_error("opening", local))?;
    // Two messages in flight at most, so memory stays flat.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let reader = tokio::spawn(async move {
        let mut hasher = trailer.map(|_| Sha256::new());
        let mut sent = Sent {
            bytes: 0,
            sha256: None,
        };
        if tx.send(first).await.is_err() {
            return Ok(sent);
        }
        loop {
            let mut chunk = vec![0u8; chunk_bytes.max(1)];
            let n = file.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            sent.bytes += n as u64;
            if let Some(hasher) = hasher.as_mut() {
                hasher.update(&chunk);
            }
            if tx.send(wrap(chunk)).await.is_err() {
                return Ok(sent);
            }
        }
        if let (Some(trailer), Some(hasher)) = (trailer, hasher) {
            let sha256 = hex::encode(hasher.finalize());
            sent.sha256 = Some(sha256.clone());
            let _ = tx.send(trailer(sha256)).await;
        }
        Ok(sent)
    });
    Ok((tokio_stream::wrappers::ReceiverStream::new(rx), reader))
}

async fn finish_reading(
    reader: tokio::task::JoinHandle<std::io::Result<Sent>>,
    local: &Path,
) -> Result<Sent, ClientError> {
    match reader.await {
        Ok(Ok(sent)) => Ok(sent),
        Ok(Err(source)) => Err(io_error("reading", local)(source)),
        Err(join) => Err(io_error("reading", local)(std::io::Error::other(join))),
    }
}

/// Feeds the first `len` bytes of `reader` to `hasher`; fewer is an error,
/// since the offset asked for promised that many.
async fn hash_prefix(
    reader: &mut (impl AsyncRead + Unpin),
    len: u64,
    hasher: &mut Sha256,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let n = reader.read(&mut buffer[..want]).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the partial file shrank while it was being resumed",
            ));
        }
        hasher.update(&buffer[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// Where a download in progress is kept.
pub fn partial_path(local: &Path) -> PathBuf {
    let mut name = local.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Size and SHA-256 (hex) of a local file.
pub async fn hash_file(path: &Path) -> Result<(u64, String), ClientError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&owned)?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher)?;
        Ok::<_, std::io::Error>((size, hex::encode(hasher.finalize())))
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r)
    .map_err(io_error("hashing", path))
}

/// Prints a line where a person expects it: stdout to stdout, the rest to
/// stderr.
pub fn print_line(line: &pb::LogLine) {
    match pb::LogStream::try_from(line.stream) {
        Ok(pb::LogStream::Stdout) => println!("{}", line.text),
        Ok(pb::LogStream::Stderr) => eprintln!("{}", line.text),
        _ => eprintln!("[agent] {}", line.text),
    }
}

#[cfg(test)]
mod tests;
