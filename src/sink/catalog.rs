//! Building the Iceberg catalog from the configuration.

use std::collections::HashMap;
use std::sync::Arc;

use iceberg::table::Table;
use iceberg::{Catalog, CatalogBuilder, Namespace, NamespaceIdent, TableCommit, TableCreation, TableIdent};
use iceberg_catalog_rest::RestCatalogBuilder;
use iceberg_catalog_sql::SqlCatalogBuilder;

use crate::config::{CatalogConfig, CatalogKind, CatalogLimits};
use async_trait::async_trait;

use crate::database::{ensure_sqlite_parent, lost_create_race, redact_url, with_password};
use crate::error::CallTimedOut;

/// Builds the catalog, every call time-limited (I10). Must run inside the tokio runtime.
pub async fn build(cfg: &CatalogConfig) -> anyhow::Result<Arc<dyn Catalog>> {
    let inner = build_unlimited(cfg).await?;
    // Test builds only: faults injected at the catalog boundary for the crash matrix.
    #[cfg(feature = "fault-injection")]
    let inner: Arc<dyn Catalog> = Arc::new(crate::fault::FaultyCatalog::new(inner));
    Ok(Arc::new(TimeLimited { inner, limits: cfg.limits }))
}

/// `catalog.properties` with `catalog.properties_env` and `catalog.properties_file` resolved: what the catalog and its
/// storage are configured with (`s3.endpoint`, `s3.access-key-id`, …).
pub fn storage_properties(cfg: &CatalogConfig) -> anyhow::Result<HashMap<String, String>> {
    let mut props: HashMap<String, String> = cfg.properties.clone().into_iter().collect();
    for (key, env) in &cfg.properties_env {
        let value = std::env::var(env)
            .map_err(|_| anyhow::anyhow!("catalog.properties_env.{key}: environment variable {env} is not set"))?;
        props.insert(key.clone(), value);
    }
    for (key, file) in &cfg.properties_file {
        let value = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("catalog.properties_file.{key}: cannot read {}: {e}", file.display()))?;
        props.insert(key.clone(), value.trim_end_matches(['\n', '\r']).to_string());
    }
    Ok(props)
}

async fn build_unlimited(cfg: &CatalogConfig) -> anyhow::Result<Arc<dyn Catalog>> {
    let mut props = storage_properties(cfg)?;
    if let Some(w) = &cfg.warehouse {
        props.insert("warehouse".into(), w.clone());
    }
    let storage = super::storage::factory();
    match cfg.kind {
        CatalogKind::Sql => {
            let mut uri = cfg.uri.clone();
            if let Some(pw) = cfg.password.read("catalog password")? {
                uri = with_password(&uri, &pw)?;
            }
            if uri.starts_with("sqlite:") {
                ensure_sqlite_parent(&uri)?;
            }
            props.insert("uri".into(), uri.clone());
            let bind = if uri.starts_with("sqlite:") { "QMark" } else { "DollarNumeric" };
            props.entry("sql_bind_style".into()).or_insert_with(|| bind.into());
            if let Some(w) = &cfg.warehouse
                && let Some(path) = w.strip_prefix("file://")
            {
                std::fs::create_dir_all(path)
                    .map_err(|e| anyhow::anyhow!("catalog.warehouse {w}: cannot create: {e}"))?;
            }
            // sqlx's Any driver needs the drivers installed once per process.
            sqlx::any::install_default_drivers();
            // Replicas starting together on a fresh PostgreSQL catalog race on its
            // `CREATE TABLE IF NOT EXISTS`; the loser's table exists by then, so it opens again.
            let mut attempt = 0;
            let catalog = loop {
                attempt += 1;
                match SqlCatalogBuilder::default()
                    .with_storage_factory(storage.clone())
                    .load(cfg.name.clone(), props.clone())
                    .await
                {
                    Ok(catalog) => break catalog,
                    Err(e) if attempt < 5 && lost_create_race(&e) => {
                        tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                    }
                    Err(e) => anyhow::bail!("cannot open the SQL catalog at {}: {e}", redact_url(&uri)),
                }
            };
            Ok(Arc::new(catalog))
        }
        CatalogKind::Rest => {
            props.insert("uri".into(), cfg.uri.clone());
            if let Some(token) = cfg.token.read("catalog token")? {
                props.insert("token".into(), token);
            }
            if let Some(cred) = cfg.credential.read("catalog credential")? {
                props.insert("credential".into(), cred);
            }
            let catalog = RestCatalogBuilder::default()
                .with_storage_factory(storage)
                .load(cfg.name.clone(), props)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the REST catalog at {}: {e}", cfg.uri))?;
            Ok(Arc::new(catalog))
        }
    }
}

/// I10: every catalog call ends within its limit. iceberg-rust's REST client has no timeout
/// and the SQL catalog's pool waits for a connection as long as the database lets it.
#[derive(Debug)]
pub struct TimeLimited {
    inner: Arc<dyn Catalog>,
    limits: CatalogLimits,
}

impl TimeLimited {
    pub fn new(inner: Arc<dyn Catalog>, limits: CatalogLimits) -> Self {
        Self { inner, limits }
    }

    async fn limit<T>(
        &self,
        call: &'static str,
        after: std::time::Duration,
        f: impl std::future::Future<Output = iceberg::Result<T>>,
    ) -> iceberg::Result<T> {
        match tokio::time::timeout(after, f).await {
            Ok(r) => r,
            Err(_) => {
                Err(iceberg::Error::new(iceberg::ErrorKind::Unexpected, format!("catalog call {call} timed out"))
                    .with_source(CallTimedOut { call, after }))
            }
        }
    }
}

#[async_trait]
impl Catalog for TimeLimited {
    async fn list_namespaces(&self, parent: Option<&NamespaceIdent>) -> iceberg::Result<Vec<NamespaceIdent>> {
        self.limit("list_namespaces", self.limits.call, self.inner.list_namespaces(parent)).await
    }
    async fn create_namespace(
        &self,
        ns: &NamespaceIdent,
        props: HashMap<String, String>,
    ) -> iceberg::Result<Namespace> {
        self.limit("create_namespace", self.limits.call, self.inner.create_namespace(ns, props)).await
    }
    async fn get_namespace(&self, ns: &NamespaceIdent) -> iceberg::Result<Namespace> {
        self.limit("get_namespace", self.limits.call, self.inner.get_namespace(ns)).await
    }
    async fn namespace_exists(&self, ns: &NamespaceIdent) -> iceberg::Result<bool> {
        self.limit("namespace_exists", self.limits.call, self.inner.namespace_exists(ns)).await
    }
    async fn update_namespace(&self, ns: &NamespaceIdent, props: HashMap<String, String>) -> iceberg::Result<()> {
        self.limit("update_namespace", self.limits.call, self.inner.update_namespace(ns, props)).await
    }
    async fn drop_namespace(&self, ns: &NamespaceIdent) -> iceberg::Result<()> {
        self.limit("drop_namespace", self.limits.call, self.inner.drop_namespace(ns)).await
    }
    async fn list_tables(&self, ns: &NamespaceIdent) -> iceberg::Result<Vec<TableIdent>> {
        self.limit("list_tables", self.limits.call, self.inner.list_tables(ns)).await
    }
    async fn create_table(&self, ns: &NamespaceIdent, creation: TableCreation) -> iceberg::Result<Table> {
        self.limit("create_table", self.limits.call, self.inner.create_table(ns, creation)).await
    }
    async fn load_table(&self, table: &TableIdent) -> iceberg::Result<Table> {
        self.limit("load_table", self.limits.call, self.inner.load_table(table)).await
    }
    async fn drop_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.limit("drop_table", self.limits.call, self.inner.drop_table(table)).await
    }
    async fn purge_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.limit("purge_table", self.limits.call, self.inner.purge_table(table)).await
    }
    async fn table_exists(&self, table: &TableIdent) -> iceberg::Result<bool> {
        self.limit("table_exists", self.limits.call, self.inner.table_exists(table)).await
    }
    async fn rename_table(&self, src: &TableIdent, dest: &TableIdent) -> iceberg::Result<()> {
        self.limit("rename_table", self.limits.call, self.inner.rename_table(src, dest)).await
    }
    async fn register_table(&self, table: &TableIdent, location: String) -> iceberg::Result<Table> {
        self.limit("register_table", self.limits.call, self.inner.register_table(table, location)).await
    }
    async fn update_table(&self, commit: TableCommit) -> iceberg::Result<Table> {
        self.limit("update_table", self.limits.commit, self.inner.update_table(commit)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rest_catalog_is_wired_from_config() {
        // No server on this port (the REST end-to-end tests run dev/rest_catalog.py): building
        // the client must succeed without contacting it only when the catalog is lazy;
        // iceberg-rust fetches /v1/config at load, so we expect a connection error that names
        // the configured URI.
        let cfg = CatalogConfig {
            kind: CatalogKind::Rest,
            name: "prod".into(),
            uri: "http://127.0.0.1:9".into(),
            warehouse: Some("s3://bucket/wh".into()),
            password: Default::default(),
            token: Default::default(),
            credential: Default::default(),
            properties: [("s3.endpoint".to_string(), "http://127.0.0.1:9".to_string())].into(),
            properties_env: Default::default(),
            properties_file: Default::default(),
            limits: Default::default(),
        };
        match build(&cfg).await {
            Ok(c) => {
                // Lazy client: the first call reaches the (absent) server.
                let err = c.list_namespaces(None).await.unwrap_err().to_string();
                assert!(!err.is_empty());
            }
            Err(e) => assert!(e.to_string().contains("http://127.0.0.1:9"), "{e}"),
        }
    }
}
