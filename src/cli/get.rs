//! `previewd get KIND [NAME] [-o yaml|json|wide]`: the server renders a Table from the
//! printer columns (as for kubectl); this module lays it out.

use http::Request;
use serde_json::Value;

use super::{CliError, Connection, resolve_kind, url};

/// Output formats of `get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Columns, as `kubectl get`.
    Table,
    /// Columns including the low-priority ones.
    Wide,
    /// The object(s) as YAML.
    Yaml,
    /// The object(s) as JSON.
    Json,
}

const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";

/// Fetches one object or the list, and formats it.
pub async fn get(
    conn: &Connection,
    kind_name: &str,
    name: Option<&str>,
    all_namespaces: bool,
    output: Output,
) -> Result<String, CliError> {
    let kind = resolve_kind(kind_name)?;
    let ns = if all_namespaces && name.is_none() {
        None
    } else {
        Some(conn.namespace())
    };
    let accept = match output {
        Output::Table | Output::Wide => TABLE_ACCEPT,
        Output::Yaml | Output::Json => "application/json",
    };
    let req = Request::get(url(&kind, ns, name))
        .header(http::header::ACCEPT, accept)
        .body(Vec::new())
        .map_err(|e| CliError::Input(e.to_string()))?;
    let doc = conn.send(req).await?;
    match output {
        Output::Json => {
            serde_json::to_string_pretty(&doc).map_err(|e| CliError::Input(e.to_string()))
        }
        Output::Yaml => serde_yaml::to_string(&doc)
            .map(|s| s.trim_end().to_owned())
            .map_err(|e| CliError::Input(e.to_string())),
        Output::Table | Output::Wide => {
            let rendered = render_table(&doc, output == Output::Wide, ns.is_none());
            if rendered.is_empty() {
                Ok(match ns {
                    Some(ns) => format!("No resources found in {ns} namespace."),
                    None => "No resources found".to_owned(),
                })
            } else {
                Ok(rendered)
            }
        }
    }
}

/// Lays out a `meta.k8s.io/v1` Table as kubectl does: upper-case headers, columns padded and
/// separated by three spaces, `<none>` for missing cells, priority > 0 columns only when
/// `wide`, a NAMESPACE column first when listing all namespaces. Empty for no rows.
pub fn render_table(table: &Value, wide: bool, with_namespace: bool) -> String {
    let cols = table["columnDefinitions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let rows = table["rows"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return String::new();
    }
    let shown: Vec<usize> = cols
        .iter()
        .enumerate()
        .filter(|(_, c)| wide || c["priority"].as_i64().unwrap_or(0) == 0)
        .map(|(i, _)| i)
        .collect();
    let mut lines: Vec<Vec<String>> = Vec::new();
    let mut header: Vec<String> = shown
        .iter()
        .map(|i| cols[*i]["name"].as_str().unwrap_or("").to_uppercase())
        .collect();
    if with_namespace {
        header.insert(0, "NAMESPACE".into());
    }
    lines.push(header);
    for row in &rows {
        let mut cells: Vec<String> = shown
            .iter()
            .map(|i| match &row["cells"][*i] {
                Value::Null => "<none>".to_owned(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        if with_namespace {
            cells.insert(
                0,
                row.pointer("/object/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            );
        }
        lines.push(cells);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    lines
        .iter()
        .map(|l| {
            let last = l.len().saturating_sub(1);
            l.iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i == last {
                        cell.clone()
                    } else {
                        format!("{cell:<w$}   ", w = widths[i])
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_like_kubectl() {
        let t = json!({
            "columnDefinitions": [
                {"name": "Name", "priority": 0}, {"name": "Port", "priority": 0}, {"name": "Extra", "priority": 1}, {"name": "Age", "priority": 0}
            ],
            "rows": [
                {"cells": ["web", 8080, "x", "5m"], "object": {"metadata": {"namespace": "dev"}}},
                {"cells": ["a-longer-name", null, "y", "1h"], "object": {"metadata": {"namespace": "default"}}}
            ]
        });
        let narrow = render_table(&t, false, false);
        assert_eq!(
            narrow,
            "NAME            PORT     AGE\nweb             8080     5m\na-longer-name   <none>   1h"
        );
        assert!(render_table(&t, true, false).contains("EXTRA"));
        assert!(render_table(&t, false, true).starts_with("NAMESPACE   NAME"));
        assert_eq!(render_table(&json!({"rows": []}), false, false), "");
    }
}
