//! Which databases the daemon serves: one URL, or a `[[database]]` list.

use super::{check_schema, Database, DatabaseSection, Overrides, Settings};

/// The databases to serve: `--database-url` (or `OUTBOX_DATABASE_URL`) names one and replaces the
/// file's; otherwise the file's `database_url` or its `[[database]]` list (not both). `--database`
/// keeps one entry of the list, and is refused beside a single URL.
pub(super) fn databases(
    o: &Overrides,
    file_url: Option<String>,
    file_schema: Option<String>,
    list: Vec<DatabaseSection>,
) -> anyhow::Result<Vec<Database>> {
    let schema = o.database_schema.clone().or(file_schema);
    let single = |url: String| -> anyhow::Result<Vec<Database>> {
        if let Some(s) = &schema {
            check_schema(s, &url)?;
        }
        Ok(vec![Database {
            name: None,
            url,
            schema: schema.clone(),
        }])
    };
    // A name picks a [[database]] entry: beside one URL it would be ignored, and the command
    // would act on (or verify judge) another database than the one named.
    let unnamed = |url: String, from: &str| -> anyhow::Result<Vec<Database>> {
        if let Some(name) = &o.database {
            anyhow::bail!(
                "--database {name:?} picks a [[database]] entry, but {from} names the one database to serve: \
                 drop one of them"
            );
        }
        single(url)
    };
    if let Some(url) = o.database_url.clone() {
        return unnamed(url, "--database-url (or OUTBOX_DATABASE_URL)");
    }
    match (file_url, list.is_empty()) {
        (Some(_), false) => anyhow::bail!("database_url and [[database]] both set: keep one of them"),
        (Some(url), true) => return unnamed(url, "the file's database_url"),
        (None, true) => {
            anyhow::bail!("no database URL: set --database-url, OUTBOX_DATABASE_URL, database_url or [[database]]")
        }
        (None, false) => {}
    }
    if schema.is_some() {
        anyhow::bail!("database_schema applies to database_url; give each [[database]] its own schema");
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for d in list {
        let plain = !d.name.is_empty()
            && d.name.len() <= 64
            && d.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        anyhow::ensure!(
            plain,
            "invalid [[database]] name {:?}: expected 1-64 of [A-Za-z0-9_-]",
            d.name
        );
        anyhow::ensure!(
            seen.insert(d.name.clone()),
            "[[database]] name {:?} appears twice",
            d.name
        );
        if let Some(s) = &d.schema {
            check_schema(s, &d.url).map_err(|e| anyhow::anyhow!("[[database]] {}: {e}", d.name))?;
        }
        out.push(Database {
            name: Some(d.name),
            url: d.url,
            schema: d.schema,
        });
    }
    if let Some(name) = &o.database {
        let names: Vec<String> = out.iter().map(|d| d.label().to_owned()).collect();
        out.retain(|d| d.name.as_deref() == Some(name.as_str()));
        anyhow::ensure!(
            !out.is_empty(),
            "--database {name:?}: no such [[database]] (configured: {})",
            names.join(", ")
        );
    }
    Ok(out)
}

impl Settings {
    /// The one database a command acts on: the only one configured, or the one `--database` names.
    pub(crate) fn one_database(&self) -> anyhow::Result<&Database> {
        match self.databases.as_slice() {
            [one] => Ok(one),
            many => anyhow::bail!(
                "{} databases configured ({}): choose one with --database NAME",
                many.len(),
                many.iter().map(Database::label).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}
