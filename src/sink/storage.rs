//! Where the table's files live: iceberg-storage-opendal's resolving storage (local disk, S3),
//! extended to the bare absolute paths (`/home/iceberg/warehouse/…`) that Iceberg Java's
//! Hadoop catalog writes everywhere (table location, manifest lists, manifests, data files)
//! when its warehouse is a local directory, as the original pipeline's was. The resolving
//! storage parses every path as a URL and refuses those; they are local files.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use iceberg::Result;
use iceberg::io::{
    FileIO, FileIOBuilder, FileMetadata, FileRead, FileWrite, InputFile, OutputFile, Storage, StorageConfig,
    StorageFactory,
};
use iceberg_storage_opendal::OpenDalResolvingStorageFactory;
use serde::{Deserialize, Serialize};

/// The storage factory every catalog and `FileIO` of this service uses.
pub fn factory() -> Arc<dyn StorageFactory> {
    Arc::new(LocalPathsFactory { inner: OpenDalResolvingStorageFactory::new() })
}

/// A `FileIO` reaching what the catalog's storage settings reach, for files outside any
/// catalog table (`adopt` reading the original's Hadoop directory).
pub fn file_io(props: &std::collections::HashMap<String, String>) -> FileIO {
    FileIOBuilder::new(factory()).with_props(props.clone()).build()
}

/// `/a/b` → `file:/a/b` (what the resolving storage and its local backend understand, the
/// same file); any other path unchanged.
fn resolvable(path: &str) -> std::borrow::Cow<'_, str> {
    if path.starts_with('/') { format!("file:{path}").into() } else { path.into() }
}

#[derive(Debug, Serialize, Deserialize)]
struct LocalPathsFactory {
    inner: OpenDalResolvingStorageFactory,
}

#[typetag::serde]
impl StorageFactory for LocalPathsFactory {
    fn build(&self, config: &StorageConfig) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(LocalPaths { inner: self.inner.build(config)? }))
    }
}

/// Delegates with bare paths made resolvable; the files it hands out keep the path they were
/// asked for, so what is written into manifests follows the table's own convention.
#[derive(Debug, Serialize, Deserialize)]
struct LocalPaths {
    inner: Arc<dyn Storage>,
}

#[async_trait]
#[typetag::serde]
impl Storage for LocalPaths {
    async fn exists(&self, path: &str) -> Result<bool> {
        self.inner.exists(&resolvable(path)).await
    }
    async fn metadata(&self, path: &str) -> Result<FileMetadata> {
        self.inner.metadata(&resolvable(path)).await
    }
    async fn read(&self, path: &str) -> Result<Bytes> {
        self.inner.read(&resolvable(path)).await
    }
    async fn reader(&self, path: &str) -> Result<Box<dyn FileRead>> {
        self.inner.reader(&resolvable(path)).await
    }
    async fn write(&self, path: &str, bs: Bytes) -> Result<()> {
        self.inner.write(&resolvable(path), bs).await
    }
    async fn writer(&self, path: &str) -> Result<Box<dyn FileWrite>> {
        self.inner.writer(&resolvable(path)).await
    }
    async fn delete(&self, path: &str) -> Result<()> {
        self.inner.delete(&resolvable(path)).await
    }
    async fn delete_prefix(&self, path: &str) -> Result<()> {
        self.inner.delete_prefix(&resolvable(path)).await
    }
    async fn delete_stream(&self, paths: BoxStream<'static, String>) -> Result<()> {
        self.inner.delete_stream(paths.map(|p| resolvable(&p).into_owned()).boxed()).await
    }
    fn new_input(&self, path: &str) -> Result<InputFile> {
        Ok(InputFile::new(Arc::new(LocalPaths { inner: self.inner.clone() }), path.to_string()))
    }
    fn new_output(&self, path: &str) -> Result<OutputFile> {
        Ok(OutputFile::new(Arc::new(LocalPaths { inner: self.inner.clone() }), path.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bare_absolute_paths_are_local_files() {
        let dir = std::env::temp_dir().join(format!("iceberg-offload-storage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let io = file_io(&Default::default());
        let bare = format!("{}/a.txt", dir.display());
        io.new_output(&bare).unwrap().write(Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(std::fs::read(&bare).unwrap(), b"x");
        let input = io.new_input(&bare).unwrap();
        assert_eq!(input.location(), bare, "the path handed out is the one asked for");
        assert_eq!(&input.read().await.unwrap()[..], b"x");
        assert!(io.exists(format!("file://{bare}")).await.unwrap());
        io.delete(&bare).await.unwrap();
        assert!(!std::path::Path::new(&bare).exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
