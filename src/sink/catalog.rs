//! Building the Iceberg catalog from the configuration.

use std::collections::HashMap;
use std::sync::Arc;

use iceberg::{Catalog, CatalogBuilder};
use iceberg_catalog_rest::RestCatalogBuilder;
use iceberg_catalog_sql::SqlCatalogBuilder;
use iceberg_storage_opendal::OpenDalResolvingStorageFactory;

use crate::config::{CatalogConfig, CatalogKind};

/// Builds the catalog. Must run inside the tokio runtime.
pub async fn build(cfg: &CatalogConfig) -> anyhow::Result<Arc<dyn Catalog>> {
    let mut props: HashMap<String, String> = cfg.properties.clone().into_iter().collect();
    for (key, env) in &cfg.properties_env {
        let value = std::env::var(env)
            .map_err(|_| anyhow::anyhow!("catalog.properties_env.{key}: environment variable {env} is not set"))?;
        props.insert(key.clone(), value);
    }
    if let Some(w) = &cfg.warehouse {
        props.insert("warehouse".into(), w.clone());
    }
    let storage = Arc::new(OpenDalResolvingStorageFactory::new());
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
            let catalog = SqlCatalogBuilder::default()
                .with_storage_factory(storage)
                .load(cfg.name.clone(), props)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the SQL catalog at {}: {e}", redact_url(&uri)))?;
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

/// Inserts a password into a database URL (`postgres://user@host/db`).
pub fn with_password(uri: &str, password: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(uri).map_err(|e| anyhow::anyhow!("invalid database URL: {e}"))?;
    url.set_password(Some(password)).map_err(|_| anyhow::anyhow!("cannot set a password on this URL"))?;
    Ok(url.to_string())
}

/// A URL fit for logs: the password, if any, replaced.
pub fn redact_url(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("[redacted]"));
            u.to_string()
        }
        _ => uri.to_string(),
    }
}

pub fn ensure_sqlite_parent(uri: &str) -> anyhow::Result<()> {
    let path = uri.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or(path);
    if let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_inserted_and_redacted() {
        let u = with_password("postgres://offload@db:5432/iceberg", "p@ss").unwrap();
        assert_eq!(u, "postgres://offload:p%40ss@db:5432/iceberg");
        assert_eq!(redact_url(&u), "postgres://offload:%5Bredacted%5D@db:5432/iceberg");
    }

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
