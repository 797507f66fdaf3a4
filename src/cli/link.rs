//! `previewd token NAME` and `previewd url NAME`: a link's token lives only in a Secret, so
//! these read it (with the caller's API access) and never from the PreviewLink.

use http::Request;
use serde_json::Value;

use super::{CliError, Connection, resolve_kind, url as object_url};
use crate::controller::link::TOKEN_KEY;

/// The link's token.
pub async fn token(conn: &Connection, name: &str) -> Result<String, CliError> {
    let link = get(conn, "previewlinks", name).await?;
    let secret_name = link
        .pointer("/status/tokenSecretRef/name")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            CliError::Input(format!(
                "preview link {name:?} has no token yet (public, or not reconciled)"
            ))
        })?;
    let secret = get(conn, "secrets", secret_name).await?;
    let encoded = secret
        .pointer(&format!("/data/{TOKEN_KEY}"))
        .and_then(Value::as_str)
        .unwrap_or("");
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| {
            CliError::Input(format!(
                "the Secret {secret_name:?} holds no valid token: {e}"
            ))
        })?;
    String::from_utf8(bytes)
        .map_err(|_| CliError::Input(format!("the Secret {secret_name:?} holds no valid token")))
}

/// The link's URL with its token as `?previewd_token=`, which works pasted into a browser.
pub async fn url(conn: &Connection, name: &str, path_style: bool) -> Result<String, CliError> {
    let link = get(conn, "previewlinks", name).await?;
    let field = if path_style {
        "/status/pathUrl"
    } else {
        "/status/url"
    };
    let base = link
        .pointer(field)
        .and_then(Value::as_str)
        .ok_or_else(|| {
            CliError::Input(format!(
                "preview link {name:?} has no URL yet (not reconciled)"
            ))
        })?
        .to_owned();
    if link.pointer("/spec/access").and_then(Value::as_str) == Some("public") {
        return Ok(base);
    }
    Ok(format!(
        "{base}?previewd_token={}",
        token(conn, name).await?
    ))
}

async fn get(conn: &Connection, kind: &str, name: &str) -> Result<Value, CliError> {
    let kind = resolve_kind(kind)?;
    let req = Request::get(object_url(&kind, Some(conn.namespace()), Some(name)))
        .body(Vec::new())
        .map_err(|e| CliError::Input(e.to_string()))?;
    conn.send(req).await
}
