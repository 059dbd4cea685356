//! The one place agent errors become gRPC statuses.

use tonic::Status;

use crate::files::FileError;
use crate::packages::PackageError;
use crate::scripts::{InvalidTicket, ScriptError};

impl From<ScriptError> for Status {
    fn from(error: ScriptError) -> Self {
        let message = error.to_string();
        match error {
            ScriptError::InvalidRequest(_) => Status::invalid_argument(message),
            ScriptError::NotComplete(..) => Status::failed_precondition(message),
            ScriptError::Workspace { .. } | ScriptError::Log { .. } => Status::internal(message),
        }
    }
}

impl From<InvalidTicket> for Status {
    fn from(error: InvalidTicket) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

impl From<FileError> for Status {
    fn from(error: FileError) -> Self {
        let message = error.to_string();
        match error {
            FileError::Path(_) | FileError::BadRequest(_) => Status::invalid_argument(message),
            FileError::TooLarge { .. } => Status::invalid_argument(message),
            FileError::DiskFull { .. } => Status::resource_exhausted(message),
            FileError::NotFound(_) => Status::not_found(message),
            FileError::OffsetBeyondEnd { .. } => Status::out_of_range(message),
            FileError::DigestMismatch { .. } | FileError::SizeMismatch { .. } => {
                Status::data_loss(message)
            }
            FileError::MissingDigest => Status::invalid_argument(message),
            // The same call made again reads the file as it is now.
            FileError::ChangedDuringDownload { .. } => Status::aborted(message),
            FileError::Io { .. } => Status::internal(message),
        }
    }
}

impl From<PackageError> for Status {
    fn from(error: PackageError) -> Self {
        let message = error.to_string();
        match error {
            PackageError::BadDigest(_) | PackageError::BadApplication(_) => {
                Status::invalid_argument(message)
            }
            PackageError::NotCached(_) => Status::failed_precondition(message),
            PackageError::UnknownFormat { .. } | PackageError::Unsafe { .. } => {
                Status::invalid_argument(message)
            }
            PackageError::Transfer(error) => error.into(),
            PackageError::Io { .. } => Status::internal(message),
        }
    }
}
