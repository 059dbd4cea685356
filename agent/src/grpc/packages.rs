//! `tentacle.v1.PackageService` over [`Packages`].

use tentacle_proto::v1 as pb;
use tentacle_proto::v1::package_service_server::PackageService;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::files::FileError;
use crate::packages::{CachedPackage, Packages};

/// The package service; cheap to clone.
#[derive(Debug, Clone)]
pub struct PackageApi {
    packages: Packages,
}

impl PackageApi {
    pub fn new(packages: Packages) -> Self {
        Self { packages }
    }
}

fn status(package: CachedPackage) -> pb::PackageStatus {
    pb::PackageStatus {
        sha256: package.sha256,
        present: package.present,
        size: package.size,
    }
}

#[tonic::async_trait]
impl PackageService for PackageApi {
    async fn get_package(
        &self,
        request: Request<pb::GetPackageRequest>,
    ) -> Result<Response<pb::PackageStatus>, Status> {
        let package = self.packages.status(&request.into_inner().sha256).await?;
        Ok(Response::new(status(package)))
    }

    async fn upload_package(
        &self,
        request: Request<Streaming<pb::UploadPackageRequest>>,
    ) -> Result<Response<pb::PackageStatus>, Status> {
        use pb::upload_package_request::Part;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::UploadPackageRequest {
                part: Some(Part::Header(header)),
            }) => header,
            _ => {
                return Err(Status::invalid_argument(
                    "a package upload must start with a header (sha256, size)",
                ));
            }
        };
        let chunks = stream.map(|message| match message {
            Ok(pb::UploadPackageRequest {
                part: Some(Part::Chunk(bytes)),
            }) => Ok(bytes),
            Ok(_) => Err(FileError::BadRequest(
                "only the first package message may be a header; the rest must be chunks".into(),
            )),
            Err(status) => Err(FileError::BadRequest(format!(
                "the upload stream broke: {}",
                status.message()
            ))),
        });
        let package = self
            .packages
            .upload(&header.sha256, header.size, chunks)
            .await?;
        Ok(Response::new(status(package)))
    }

    async fn extract_package(
        &self,
        request: Request<pb::ExtractPackageRequest>,
    ) -> Result<Response<pb::ExtractPackageResponse>, Status> {
        let request = request.into_inner();
        let extracted = self
            .packages
            .extract(&request.sha256, &request.application)
            .await?;
        Ok(Response::new(pb::ExtractPackageResponse {
            path: extracted.path.display().to_string(),
            files: extracted.files,
            already_extracted: extracted.already,
        }))
    }
}
