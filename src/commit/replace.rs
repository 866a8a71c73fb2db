//! A commit iceberg-rust 0.10 cannot make: a `replace` snapshot (compaction). Its
//! `TableCommit` builder is crate-private and its actions only append or expire, so the
//! catalog's compare-and-swap is done here, the same way the catalog crates do it:
//!
//! - SQL catalog: the new metadata file is written, then the guarded
//!   `UPDATE iceberg_tables SET metadata_location = new WHERE … AND metadata_location = base`
//!   that iceberg-catalog-sql runs; no row changed means another commit won (refused);
//! - REST catalog: the spec's `CommitTableRequest` (requirements + updates) POSTed to the
//!   table's endpoint; 409 (and the other 4xx) is a refusal, 5xx or a lost answer unknown.
//!
//! I4 holds as for appends: the commit is fenced on the metadata (SQL) or the `main` snapshot
//! (REST) the plan was made on. I5 too: an unknown outcome is decided from the table's history
//! by the caller, never by sending again.

use std::str::FromStr;

use iceberg::table::Table;
use iceberg::{MetadataLocation, TableRequirement, TableUpdate};
use tokio::sync::OnceCell;

use crate::config::{CatalogConfig, CatalogKind};
use crate::error::{OffloadError, Result};

/// What the catalog said to a replace commit.
#[derive(Debug)]
pub enum CasOutcome {
    /// The catalog applied it.
    Landed,
    /// The catalog refused it: nothing changed.
    Refused(String),
    /// It may have landed: decide from the table's history.
    Unknown(String),
}

/// Commits prepared metadata updates through the catalog's own compare-and-swap. Connects on
/// first use (maintenance runs daily; the offload never needs it).
pub struct Replacer {
    cfg: CatalogConfig,
    backend: OnceCell<Backend>,
}

enum Backend {
    Sql { pool: sqlx::AnyPool, catalog: String, dollar: bool },
    Rest { client: reqwest::Client, base: String, tables: String, token: tokio::sync::Mutex<Option<String>> },
}

impl std::fmt::Debug for Replacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replacer").field("catalog", &self.cfg.name).finish()
    }
}

impl Replacer {
    pub fn new(cfg: CatalogConfig) -> Self {
        Self { cfg, backend: OnceCell::new() }
    }

    /// Whether commits write their metadata file themselves ([`metadata_file_of`]).
    pub fn is_sql(&self) -> bool {
        self.cfg.kind == CatalogKind::Sql
    }

    /// Applies `updates` to `base` if the table is still exactly `base`. `Err`: nothing was
    /// sent (the plan was invalid, the connection could not be opened, the file not written).
    /// `run_id` (a UUID) names the metadata file the SQL path writes, so a commit that never
    /// lands leaves a file findable on any storage: [`metadata_file_of`].
    pub async fn commit(
        &self,
        base: &Table,
        run_id: &str,
        requirements: Vec<TableRequirement>,
        updates: Vec<TableUpdate>,
    ) -> Result<CasOutcome> {
        for r in &requirements {
            r.check(Some(base.metadata()))?;
        }
        let backend = self.backend.get_or_try_init(|| connect(&self.cfg)).await?;
        match backend {
            Backend::Sql { pool, catalog, dollar } => sql_commit(pool, catalog, *dollar, base, run_id, updates).await,
            Backend::Rest { client, base: uri, tables, token } => {
                let body = CommitBody { base, requirements, updates };
                let first = rest_commit(client, tables, token.lock().await.as_deref(), &body).await?;
                // An expired OAuth token: a 401 changed nothing, so a new token and one resend.
                match first {
                    RestAnswer::Unauthorized(_) => {
                        if let Some(cred) = self.cfg.credential.read("catalog credential").ok().flatten() {
                            let fresh = oauth_token(client, uri, &cred).await?;
                            *token.lock().await = Some(fresh.clone());
                            return Ok(rest_commit(client, tables, Some(&fresh), &body).await?.into());
                        }
                        Ok(first.into())
                    }
                    other => Ok(other.into()),
                }
            }
        }
    }
}

async fn connect(cfg: &CatalogConfig) -> Result<Backend> {
    let unreachable = |e: &dyn std::fmt::Display| OffloadError::CatalogUnreachable(e.to_string());
    match cfg.kind {
        CatalogKind::Sql => {
            let mut uri = cfg.uri.clone();
            if let Some(pw) = cfg.password.read("catalog password").map_err(|e| unreachable(&e))? {
                uri = crate::database::with_password(&uri, &pw).map_err(|e| unreachable(&e))?;
            }
            sqlx::any::install_default_drivers();
            let pool =
                sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&uri).await.map_err(|e| {
                    OffloadError::CatalogUnreachable(format!("{}: {e}", crate::database::redact_url(&uri)))
                })?;
            // iceberg-catalog-sql's own setting when given, else what build() chose.
            let dollar = match cfg.properties.get("sql_bind_style").map(String::as_str) {
                Some("QMark") => false,
                Some(_) => true,
                None => !uri.starts_with("sqlite:"),
            };
            Ok(Backend::Sql { pool, catalog: cfg.name.clone(), dollar })
        }
        CatalogKind::Rest => {
            let client = reqwest::Client::builder().timeout(cfg.limits.commit).build().map_err(|e| unreachable(&e))?;
            let base = cfg.uri.trim_end_matches('/').to_string();
            let token = match cfg.token.read("catalog token").map_err(|e| unreachable(&e))? {
                Some(t) => Some(t),
                None => match cfg.credential.read("catalog credential").map_err(|e| unreachable(&e))? {
                    Some(c) => Some(oauth_token(&client, &base, &c).await?),
                    None => None,
                },
            };
            let mut config = client.get(format!("{base}/v1/config"));
            if let Some(w) = &cfg.warehouse {
                config = config.query(&[("warehouse", w)]);
            }
            if let Some(t) = &token {
                config = config.bearer_auth(t);
            }
            let answer: serde_json::Value = config
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| unreachable(&e))?
                .json()
                .await
                .map_err(|e| unreachable(&e))?;
            let prefix = ["overrides", "defaults"]
                .iter()
                .find_map(|k| answer.get(k)?.get("prefix")?.as_str().map(str::to_string));
            let tables = match prefix {
                Some(p) => format!("{base}/v1/{}", p.trim_matches('/')),
                None => format!("{base}/v1"),
            };
            Ok(Backend::Rest { client, base, tables, token: tokio::sync::Mutex::new(token) })
        }
    }
}

/// OAuth2 client credentials (`id:secret`), as iceberg-catalog-rest exchanges them.
async fn oauth_token(client: &reqwest::Client, base: &str, credential: &str) -> Result<String> {
    let (id, secret) = credential.split_once(':').unwrap_or(("", credential));
    let answer: serde_json::Value = client
        .post(format!("{base}/v1/oauth/tokens"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
            ("scope", "catalog"),
        ])
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| OffloadError::CatalogAuth(e.to_string()))?
        .json()
        .await
        .map_err(|e| OffloadError::CatalogAuth(e.to_string()))?;
    answer
        .get("access_token")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| OffloadError::CatalogAuth("the token endpoint answered without an access_token".into()))
}

/// The metadata file a SQL-catalog replace commit of `run_id` writes on `base`: the next
/// version, named after the run id instead of a random UUID.
pub fn metadata_file_of(base: &Table, run_id: &str) -> Result<String> {
    let next = MetadataLocation::from_str(base.metadata_location_result()?)?
        .with_next_version()
        .with_new_metadata(base.metadata())
        .to_string();
    let (dir, name) = next.rsplit_once('/').unwrap_or(("", &next));
    // `{version:05}-{uuid}{.gz}.metadata.json`: the UUID is the 36 characters after the dash.
    let (version, rest) =
        name.split_once('-').ok_or_else(|| OffloadError::Crash(format!("metadata file name {name}")))?;
    let suffix = rest.get(36..).ok_or_else(|| OffloadError::Crash(format!("metadata file name {name}")))?;
    let path = format!("{dir}/{version}-{run_id}{suffix}");
    MetadataLocation::from_str(&path)?;
    Ok(path)
}

/// The new metadata file, then iceberg-catalog-sql's guarded update.
async fn sql_commit(
    pool: &sqlx::AnyPool,
    catalog: &str,
    dollar: bool,
    base: &Table,
    run_id: &str,
    updates: Vec<TableUpdate>,
) -> Result<CasOutcome> {
    let base_location = base.metadata_location_result()?.to_string();
    let mut builder = base.metadata().clone().into_builder(Some(base_location.clone()));
    for u in updates {
        builder = u.apply(builder)?;
    }
    let metadata = builder.build()?.metadata;
    let location = MetadataLocation::from_str(&metadata_file_of(base, run_id)?)?;
    metadata.write_to(base.file_io(), &location).await?;
    let p = |n: usize| if dollar { format!("${n}") } else { "?".to_string() };
    let sql = format!(
        "UPDATE iceberg_tables SET metadata_location = {}, previous_metadata_location = {} \
         WHERE catalog_name = {} AND table_name = {} AND table_namespace = {} \
         AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) AND metadata_location = {}",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6)
    );
    let ident = base.identifier();
    let result = sqlx::query(&sql)
        .bind(location.to_string())
        .bind(&base_location)
        .bind(catalog)
        .bind(ident.name())
        .bind(ident.namespace().join("."))
        .bind(&base_location)
        .execute(pool)
        .await;
    Ok(match result {
        Ok(r) if r.rows_affected() == 0 => CasOutcome::Refused("another commit changed the table first".into()),
        Ok(_) => CasOutcome::Landed,
        // The database rejected the statement: its transaction did not commit.
        Err(sqlx::Error::Database(e)) => CasOutcome::Refused(e.to_string()),
        Err(e) => CasOutcome::Unknown(e.to_string()),
    })
}

struct CommitBody<'a> {
    base: &'a Table,
    requirements: Vec<TableRequirement>,
    updates: Vec<TableUpdate>,
}

/// A REST commit's answer, classified where it arrives.
enum RestAnswer {
    Landed,
    /// 401: the token was refused; nothing was applied.
    Unauthorized(String),
    /// 409 (a requirement failed) and 400/403/404 (the spec: nothing applied).
    Refused(String),
    /// 5xx, other 4xx a gateway may send for a request it forwarded (408, 429), a lost answer.
    Unknown(String),
}

impl From<RestAnswer> for CasOutcome {
    fn from(a: RestAnswer) -> Self {
        match a {
            RestAnswer::Landed => CasOutcome::Landed,
            RestAnswer::Unauthorized(why) | RestAnswer::Refused(why) => CasOutcome::Refused(why),
            RestAnswer::Unknown(why) => CasOutcome::Unknown(why),
        }
    }
}

/// The REST spec's table commit.
async fn rest_commit(
    client: &reqwest::Client,
    tables: &str,
    token: Option<&str>,
    body: &CommitBody<'_>,
) -> Result<RestAnswer> {
    let ident = body.base.identifier();
    let namespace = ident.namespace().join("\u{1f}");
    let mut url = url::Url::parse(tables).map_err(|e| OffloadError::CatalogUnreachable(e.to_string()))?;
    url.path_segments_mut()
        .map_err(|_| OffloadError::CatalogUnreachable(format!("{tables} cannot be a base URL")))?
        .extend(["namespaces", &namespace, "tables", ident.name()]);
    let request_body = iceberg_catalog_rest::CommitTableRequest {
        identifier: Some(ident.clone()),
        requirements: body.requirements.clone(),
        updates: body.updates.clone(),
    };
    let mut request = client.post(url).json(&request_body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() || e.is_builder() => return Err(OffloadError::CatalogUnreachable(e.to_string())),
        Err(e) => return Ok(RestAnswer::Unknown(e.to_string())),
    };
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let why = format!("{status}: {}", text.chars().take(300).collect::<String>());
    Ok(match status.as_u16() {
        200..=299 => RestAnswer::Landed,
        401 => RestAnswer::Unauthorized(why),
        400 | 403 | 404 | 409 => RestAnswer::Refused(why),
        _ => RestAnswer::Unknown(why),
    })
}
