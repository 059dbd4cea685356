//! `tentacle.v1.FileService` over [`Files`].

use tentacle_proto::v1 as pb;
use tentacle_proto::v1::file_service_server::FileService;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::files::{DownloadPart, FileError, Files, UploadHeader, UploadPart};

/// The file service; cheap to clone.
#[derive(Debug, Clone)]
pub struct FileApi {
    files: Files,
}

impl FileApi {
    pub fn new(files: Files) -> Self {
        Self { files }
    }
}

type DownloadStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::DownloadFileResponse, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl FileService for FileApi {
    async fn upload_file(
        &self,
        request: Request<Streaming<pb::UploadFileRequest>>,
    ) -> Result<Response<pb::UploadFileResponse>, Status> {
        use pb::upload_file_request::Part;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::UploadFileRequest {
                part: Some(Part::Header(header)),
            }) => header,
            _ => {
                return Err(Status::invalid_argument(
                    "an upload must start with a header (path, size, and sha256 unless a trailer carries it)",
                ));
            }
        };
        let parts = stream.map(|message| match message {
            Ok(pb::UploadFileRequest {
                part: Some(Part::Chunk(bytes)),
            }) => Ok(UploadPart::Chunk(bytes)),
            Ok(pb::UploadFileRequest {
                part: Some(Part::Trailer(trailer)),
            }) => Ok(UploadPart::Trailer {
                sha256: trailer.sha256,
            }),
            Ok(pb::UploadFileRequest {
                part: Some(Part::Header(_)),
            }) => Err(FileError::BadRequest(
                "only the first upload message may be a header; the rest must be chunks and a trailer"
                    .into(),
            )),
            Ok(pb::UploadFileRequest { part: None }) => Err(FileError::BadRequest(
                "an upload message carried neither a chunk nor a trailer".into(),
            )),
            Err(status) => Err(FileError::BadRequest(format!(
                "the upload stream broke: {}",
                status.message()
            ))),
        });
        let stored = self
            .files
            .upload_parts(
                UploadHeader {
                    path: header.path,
                    size: header.size,
                    sha256: header.sha256,
                },
                parts,
            )
            .await?;
        tracing::Span::current().record("bytes", stored.size);
        tentacle_proto::metrics::METRICS.add_bytes("in", stored.size);
        Ok(Response::new(pb::UploadFileResponse {
            path: stored.path.display().to_string(),
            size: stored.size,
            sha256: stored.sha256,
        }))
    }

    type DownloadFileStream = DownloadStream;

    async fn download_file(
        &self,
        request: Request<pb::DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        use pb::download_file_response::Part;
        let request = request.into_inner();
        let download = self.files.download(&request.path, request.offset).await?;
        tracing::Span::current().record("bytes", download.size.saturating_sub(download.offset));
        // The digest is not known yet: it follows the chunks, in the trailer.
        let header = pb::DownloadFileResponse {
            part: Some(Part::Header(pb::DownloadHeader {
                path: download.path.display().to_string(),
                size: download.size,
                sha256: String::new(),
                offset: download.offset,
            })),
        };
        let parts = ReceiverStream::new(download.parts).map(|part| {
            let part = match part? {
                DownloadPart::Chunk(bytes) => {
                    tentacle_proto::metrics::METRICS.add_bytes("out", bytes.len() as u64);
                    Part::Chunk(bytes)
                }
                DownloadPart::Trailer { sha256 } => Part::Trailer(pb::DownloadTrailer { sha256 }),
            };
            Ok(pb::DownloadFileResponse { part: Some(part) })
        });
        let stream = tokio_stream::once(Ok(header)).chain(parts);
        Ok(Response::new(Box::pin(stream)))
    }
}
