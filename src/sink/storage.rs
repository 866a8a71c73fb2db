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

/// The file a local path names (`/a`, `file:/a`, `file:///a`); `None` for other storage.
fn local_file(path: &str) -> Option<&std::path::Path> {
    let bare = path.strip_prefix("file://").or_else(|| path.strip_prefix("file:")).unwrap_or(path);
    bare.starts_with('/').then(|| std::path::Path::new(bare))
}

/// A whole file written under a temporary name and renamed into place, so that a directory
/// reader (ClickHouse's `icebergLocal`, DuckDB) that lists `metadata/` while a metadata file is
/// being written never reads it half-written (I8). Object stores publish whole objects already.
async fn write_whole(file: &std::path::Path, bs: Bytes) -> Result<()> {
    let io_err = |e: std::io::Error, what: &str| {
        iceberg::Error::new(iceberg::ErrorKind::Unexpected, format!("{what} {}", file.display())).with_source(e)
    };
    let dir = file.parent().ok_or_else(|| io_err(std::io::ErrorKind::InvalidInput.into(), "no directory for"))?;
    tokio::fs::create_dir_all(dir).await.map_err(|e| io_err(e, "cannot create the directory of"))?;
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::now_v7()));
    if let Err(e) = tokio::fs::write(&temp, &bs).await {
        tokio::fs::remove_file(&temp).await.ok();
        return Err(io_err(e, "cannot write"));
    }
    if let Err(e) = tokio::fs::rename(&temp, file).await {
        tokio::fs::remove_file(&temp).await.ok();
        return Err(io_err(e, "cannot rename into place"));
    }
    Ok(())
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
        match local_file(path) {
            Some(file) => write_whole(file, bs).await,
            None => self.inner.write(&resolvable(path), bs).await,
        }
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
        io.new_output(format!("file://{bare}")).unwrap().write(Bytes::from_static(b"yz")).await.unwrap();
        assert_eq!(std::fs::read(&bare).unwrap(), b"yz", "replaced whole");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")], "no temporary file left");
        io.delete(&bare).await.unwrap();
        assert!(!std::path::Path::new(&bare).exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
