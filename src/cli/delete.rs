//! `previewd delete KIND NAME`.

use http::Request;

use super::{CliError, Connection, resolve_kind, url};

/// Deletes one object; returns kubectl's confirmation line.
pub async fn delete(conn: &Connection, kind_name: &str, name: &str) -> Result<String, CliError> {
    let kind = resolve_kind(kind_name)?;
    let req = Request::delete(url(&kind, Some(conn.namespace()), Some(name)))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(br#"{"propagationPolicy":"Background"}"#.to_vec())
        .map_err(|e| CliError::Input(e.to_string()))?;
    conn.send(req).await?;
    let qualified = if kind.group.is_empty() {
        kind.singular.to_owned()
    } else {
        format!("{}.{}", kind.singular, kind.group)
    };
    Ok(format!("{qualified} \"{name}\" deleted"))
}
