//! File transfer under the agent's files root.
//!
//! Architecture Invariant: an upload is written to a temporary file beside
//! its destination, checked for size and SHA-256, fsynced and renamed into
//! place. A broken, short, long or corrupt upload, or one whose digest never
//! arrives, never leaves anything at the destination, and memory use does not
//! grow with the file's size.
//!
//! Digests travel after the data in both directions, so each side hashes the
//! bytes in the one pass that moves them: an upload's trailer is checked once
//! its bytes are in the temporary file, and a download's trailer is the
//! digest of the very bytes read for it.

mod disk;
pub mod paths;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

pub use disk::{FakeFreeSpace, FreeSpace, Statvfs, available_bytes};
pub use paths::PathError;

/// Where a verified upload's bytes go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UploadSink {
    /// Into place at the destination: what a real agent does.
    #[default]
    Store,
    /// Nowhere: the size, digest, path and free-space checks all run, then
    /// the bytes are dropped. For the fleet simulator's virtual agents, so
    /// that a load test measures the transport rather than the disk.
    Discard,
}

/// Limits for file transfer.
#[derive(Debug, Clone)]
pub struct FileSettings {
    /// Every path resolves inside this directory.
    pub root: PathBuf,
    /// Larger uploads are refused before anything is written.
    pub max_upload_bytes: u64,
    /// Uploads that would leave less free space than this are refused.
    pub min_free_bytes: u64,
    /// Size of each download chunk.
    pub chunk_bytes: usize,
    /// What happens to an upload once it is verified.
    pub upload_sink: UploadSink,
    /// Answers the free-space check.
    pub free_space: Arc<dyn FreeSpace>,
}

impl FileSettings {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            max_upload_bytes: 64 * 1024 * 1024 * 1024,
            min_free_bytes: 256 * 1024 * 1024,
            chunk_bytes: 256 * 1024,
            upload_sink: UploadSink::Store,
            free_space: Arc::new(Statvfs),
        }
    }
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "upload of {size} bytes exceeds the agent's limit of {limit} bytes (files.max_upload_bytes)"
    )]
    TooLarge { size: u64, limit: u64 },
    #[error(
        "not enough disk space for {size} bytes at {path}: {available} bytes free and {reserve} must stay free"
    )]
    DiskFull {
        path: PathBuf,
        size: u64,
        available: u64,
        reserve: u64,
    },
    #[error("no file at `{0}`")]
    NotFound(String),
    #[error("offset {offset} is beyond the end of `{path}` ({size} bytes)")]
    OffsetBeyondEnd {
        path: String,
        offset: u64,
        size: u64,
    },
    #[error("upload ended after {received} of {expected} bytes; nothing was written")]
    SizeMismatch { received: u64, expected: u64 },
    #[error("the uploaded bytes hash to {actual}, not {expected}; nothing was written")]
    DigestMismatch { expected: String, actual: String },
    #[error(
        "the upload ended without a trailer and its header carried no sha256, so it cannot be verified; nothing was written"
    )]
    MissingDigest,
    #[error(
        "`{}` changed size while it was being sent ({expected} bytes when the download began, {actual} now); download it again",
        path.display()
    )]
    ChangedDuringDownload {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{action} `{}` failed: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What an upload declares before its bytes.
#[derive(Debug, Clone)]
pub struct UploadHeader {
    pub path: String,
    pub size: u64,
    /// The whole file's digest, or empty when the trailer brings it.
    pub sha256: String,
}

/// A message of an upload after its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadPart {
    Chunk(Vec<u8>),
    /// The whole file's digest, sent after the bytes so the sender can hash
    /// them as it streams. Nothing may follow it.
    Trailer {
        sha256: String,
    },
}

/// A message of a download after its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadPart {
    Chunk(Vec<u8>),
    /// The digest of the whole file, bytes before the offset included; the
    /// last part of a download that read the file to its end unchanged.
    Trailer {
        sha256: String,
    },
}

/// A file that is in place, or about to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// A download that has been opened: what its header says, then its parts.
#[derive(Debug)]
pub struct Download {
    pub path: PathBuf,
    pub size: u64,
    pub offset: u64,
    /// Chunks from `offset` to `size`, then the trailer; or an error instead
    /// of the rest.
    pub parts: mpsc::Receiver<Result<DownloadPart, FileError>>,
}

/// The files root and the transfers in and out of it.
#[derive(Debug, Clone)]
pub struct Files {
    settings: FileSettings,
    root: PathBuf,
}

impl Files {
    /// Creates the root if needed.
    pub fn new(settings: FileSettings) -> io::Result<Self> {
        std::fs::create_dir_all(&settings.root)?;
        let root = settings.root.canonicalize()?;
        Ok(Self { settings, root })
    }

    /// The probe that says how much may still be written.
    pub fn free_space(&self) -> &Arc<dyn FreeSpace> {
        &self.settings.free_space
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores the chunks at the header's path once they match its size and
    /// digest. With no trailer to come, the header must carry the digest.
    pub async fn upload<S>(&self, header: UploadHeader, chunks: S) -> Result<FileInfo, FileError>
    where
        S: Stream<Item = Result<Vec<u8>, FileError>> + Unpin,
    {
        self.upload_parts(header, chunks.map(|chunk| chunk.map(UploadPart::Chunk)))
            .await
    }

    /// Stores the parts' chunks at the header's path once they match its
    /// size and the digest of the header, the trailer, or both.
    pub async fn upload_parts<S>(
        &self,
        header: UploadHeader,
        parts: S,
    ) -> Result<FileInfo, FileError>
    where
        S: Stream<Item = Result<UploadPart, FileError>> + Unpin,
    {
        let header_digest = if header.sha256.is_empty() {
            None
        } else {
            Some(parse_digest(&header.sha256)?)
        };
        if header.size > self.settings.max_upload_bytes {
            return Err(FileError::TooLarge {
                size: header.size,
                limit: self.settings.max_upload_bytes,
            });
        }
        let destination = paths::resolve(&self.root, &header.path)?;
        paths::check_no_escape(&self.root, &destination, &header.path)?;
        let parent = destination
            .parent()
            .ok_or_else(|| PathError::IsRoot(header.path.clone()))?
            .to_owned();
        if self.settings.upload_sink == UploadSink::Discard {
            // Nothing is created, so the root is the nearest directory that
            // is sure to exist; the check still refuses what a full disk
            // would.
            self.check_free_space(&self.root, header.size)?;
            let actual = verify(&header, header_digest, parts, None).await?;
            return Ok(FileInfo {
                path: destination,
                size: header.size,
                sha256: actual,
            });
        }
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(io_error("creating directory", &parent))?;
        // Check again now that the directories exist: one of them may be a
        // link created in between.
        paths::check_no_escape(&self.root, &parent, &header.path)?;
        if destination.is_dir() {
            return Err(FileError::BadRequest(format!(
                "`{}` is a directory; give a file path",
                header.path
            )));
        }
        self.check_free_space(&parent, header.size)?;

        let temp = TempFile::new(&parent);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(temp.path())
            .await
            .map_err(io_error("creating", temp.path()))?;
        let actual = verify(
            &header,
            header_digest,
            parts,
            Some((&mut file, temp.path())),
        )
        .await?;
        file.sync_all()
            .await
            .map_err(io_error("syncing", temp.path()))?;
        drop(file);
        temp.persist(&destination).await?;
        tracing::info!(path = %destination.display(), bytes = header.size, "file stored");
        Ok(FileInfo {
            path: destination,
            size: header.size,
            sha256: actual,
        })
    }

    /// Refuses an upload of `size` bytes into `dir` that would leave less
    /// than the reserve free.
    fn check_free_space(&self, dir: &Path, size: u64) -> Result<(), FileError> {
        let available = self
            .settings
            .free_space
            .available_bytes(dir)
            .map_err(io_error("checking free space on", dir))?;
        if available < size.saturating_add(self.settings.min_free_bytes) {
            return Err(FileError::DiskFull {
                path: dir.to_owned(),
                size,
                available,
                reserve: self.settings.min_free_bytes,
            });
        }
        Ok(())
    }

    /// Opens `path` for download from `offset`. The file is read once from
    /// its start: every byte is hashed, those from `offset` on are sent, and
    /// the trailer carries the whole file's digest so a resumed download can
    /// be verified end to end.
    pub async fn download(&self, path: &str, offset: u64) -> Result<Download, FileError> {
        let resolved = paths::resolve(&self.root, path)?;
        // Refuse an escape before saying whether anything exists there.
        paths::check_no_escape(&self.root, &resolved, path)?;
        let real = match resolved.canonicalize() {
            Ok(real) => real,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FileError::NotFound(path.to_owned()));
            }
            Err(e) => return Err(io_error("opening", &resolved)(e)),
        };
        if !real.starts_with(&self.root) {
            return Err(PathError::SymlinkEscape(path.to_owned()).into());
        }
        if !real.is_file() {
            return Err(FileError::BadRequest(format!(
                "`{path}` is not a regular file"
            )));
        }
        let file = tokio::fs::File::open(&real)
            .await
            .map_err(io_error("opening", &real))?;
        let size = file
            .metadata()
            .await
            .map_err(io_error("reading", &real))?
            .len();
        if offset > size {
            return Err(FileError::OffsetBeyondEnd {
                path: path.to_owned(),
                offset,
                size,
            });
        }
        // Two parts in flight at most, so memory stays flat.
        let (tx, rx) = mpsc::channel(2);
        let sender = DownloadSender {
            file,
            path: real.clone(),
            size,
            offset,
            chunk_bytes: self.settings.chunk_bytes.max(1),
        };
        tokio::spawn(async move {
            if let Err(error) = sender.send(&tx).await {
                let _ = tx.send(Err(error)).await;
            }
        });
        Ok(Download {
            path: real,
            size,
            offset,
            parts: rx,
        })
    }
}

/// Reads one open file for a download and sends its parts.
struct DownloadSender {
    file: tokio::fs::File,
    path: PathBuf,
    size: u64,
    offset: u64,
    chunk_bytes: usize,
}

impl DownloadSender {
    /// Hashes the same bytes it sends, read through the one open file, so a
    /// file replaced on disk meanwhile cannot make the digest disagree with
    /// the bytes. Returns early, without error, once the receiver is gone.
    async fn send(
        mut self,
        tx: &mpsc::Sender<Result<DownloadPart, FileError>>,
    ) -> Result<(), FileError> {
        let mut hasher = Sha256::new();
        let mut position = 0u64;
        while position < self.size {
            // A read never straddles `offset`, so each chunk sent is only
            // bytes the client lacks.
            let end = if position < self.offset {
                self.offset
            } else {
                self.size
            };
            let want = usize::try_from(end - position)
                .unwrap_or(usize::MAX)
                .min(self.chunk_bytes);
            let mut chunk = vec![0u8; want];
            if let Err(error) = self.file.read_exact(&mut chunk).await {
                return Err(if error.kind() == io::ErrorKind::UnexpectedEof {
                    self.changed().await
                } else {
                    io_error("reading", &self.path)(error)
                });
            }
            hasher.update(&chunk);
            let sent = position >= self.offset;
            position += want as u64;
            if sent && tx.send(Ok(DownloadPart::Chunk(chunk))).await.is_err() {
                return Ok(());
            }
        }
        // A file that grew is caught here; one that shrank failed the read.
        let now = self
            .file
            .metadata()
            .await
            .map_err(io_error("reading", &self.path))?
            .len();
        if now != self.size {
            return Err(self.changed_to(now));
        }
        let sha256 = hex::encode(hasher.finalize());
        let _ = tx.send(Ok(DownloadPart::Trailer { sha256 })).await;
        Ok(())
    }

    async fn changed(&self) -> FileError {
        match self.file.metadata().await {
            Ok(metadata) => self.changed_to(metadata.len()),
            Err(error) => io_error("reading", &self.path)(error),
        }
    }

    fn changed_to(&self, actual: u64) -> FileError {
        FileError::ChangedDuringDownload {
            path: self.path.clone(),
            expected: self.size,
            actual,
        }
    }
}

fn parse_digest(text: &str) -> Result<String, FileError> {
    let lower = text.to_ascii_lowercase();
    if lower.len() == 64 && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(lower)
    } else {
        Err(FileError::BadRequest(format!(
            "sha256 `{text}` is not valid: give the file's SHA-256 as 64 hex characters"
        )))
    }
}

/// A partial upload; removed unless it is persisted.
#[derive(Debug)]
struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    /// A fixed-length name, so a destination name near the file system's
    /// limit still fits.
    fn new(dir: &Path) -> Self {
        Self {
            path: Some(dir.join(format!(
                ".tentacle-upload-{}.partial",
                uuid::Uuid::new_v4().simple()
            ))),
        }
    }

    fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    async fn persist(mut self, destination: &Path) -> Result<(), FileError> {
        let Some(temp) = self.path.take() else {
            return Ok(());
        };
        if let Err(source) = tokio::fs::rename(&temp, destination).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(FileError::Io {
                action: "renaming into",
                path: destination.to_owned(),
                source,
            });
        }
        // The rename is durable only once the directory is synced.
        if let Some(parent) = destination.parent()
            && let Ok(dir) = tokio::fs::File::open(parent).await
        {
            let _ = dir.sync_all().await;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Hashes and counts the parts' chunks, writing each to `sink` if there is
/// one, and checks them against the header's size and against every digest
/// given, in the header or the trailer. Returns the digest.
async fn verify<S>(
    header: &UploadHeader,
    header_digest: Option<String>,
    mut parts: S,
    mut sink: Option<(&mut tokio::fs::File, &Path)>,
) -> Result<String, FileError>
where
    S: Stream<Item = Result<UploadPart, FileError>> + Unpin,
{
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut trailer_digest = None;
    while let Some(part) = parts.next().await {
        let chunk = match part? {
            UploadPart::Chunk(chunk) => chunk,
            UploadPart::Trailer { sha256 } => {
                trailer_digest = Some(parse_digest(&sha256)?);
                break;
            }
        };
        received += chunk.len() as u64;
        if received > header.size {
            return Err(FileError::BadRequest(format!(
                "upload sent more than the {} bytes its header declared; nothing was written",
                header.size
            )));
        }
        hasher.update(&chunk);
        if let Some((file, path)) = sink.as_mut() {
            file.write_all(&chunk)
                .await
                .map_err(io_error("writing", path))?;
        }
    }
    // Bytes after the trailer would be covered by no digest: refuse them
    // rather than ignore them.
    if trailer_digest.is_some()
        && let Some(after) = parts.next().await
    {
        after?;
        return Err(FileError::BadRequest(
            "the trailer must be the last upload message; nothing was written".into(),
        ));
    }
    if received != header.size {
        return Err(FileError::SizeMismatch {
            received,
            expected: header.size,
        });
    }
    if header_digest.is_none() && trailer_digest.is_none() {
        return Err(FileError::MissingDigest);
    }
    let actual = hex::encode(hasher.finalize());
    for expected in [header_digest, trailer_digest].into_iter().flatten() {
        if actual != expected {
            return Err(FileError::DigestMismatch { expected, actual });
        }
    }
    Ok(actual)
}

#[cfg(test)]
mod tests;
