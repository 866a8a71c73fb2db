//! Database URLs and races that the SQL catalog and the state store share: a password put
//! into a URL and taken out again for logs, a SQLite file's folder, and PostgreSQL's answer
//! to two processes creating the same table at once.

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

/// Whether an error is PostgreSQL's answer to two concurrent `CREATE TABLE IF NOT EXISTS` of
/// the same table (unique violation in its type catalog, or duplicate table), decided by the
/// SQLSTATE anywhere in the error's chain.
pub fn lost_create_race(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(sqlx::Error::Database(db)) = err.downcast_ref::<sqlx::Error>()
            && matches!(db.code().as_deref(), Some("23505") | Some("42P07"))
        {
            return true;
        }
        current = err.source();
    }
    false
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
}
