//! `previewd token NAME` and `previewd url NAME`: a link's token lives only in a Secret, so
//! these read it (with the caller's API access) and never from the PreviewLink.

use http::Request;
use serde_json::Value;

use super::{CliError, Connection, resolve_kind, url as object_url};
use crate::controller::link::TOKEN_KEY;

/// The link's token.
pub async fn token(conn: &Connection, name: &str) -> Result<String, CliError> {
    credential(conn, name, TOKEN_KEY).await
}

/// The value under `key` in the link's Secret (its token, its capability).
async fn credential(conn: &Connection, name: &str, key: &str) -> Result<String, CliError> {
    let link = get(conn, "previewlinks", name).await?;
    let secret_name = link
        .pointer("/status/tokenSecretRef/name")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            CliError::Input(format!(
                "preview link {name:?} has no token yet (not reconciled)"
            ))
        })?;
    let secret = get(conn, "secrets", secret_name).await?;
    let encoded = secret
        .pointer(&format!("/data/{key}"))
        .and_then(Value::as_str)
        .unwrap_or("");
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| {
            CliError::Input(format!(
                "the Secret {secret_name:?} holds no valid {key}: {e}"
            ))
        })?;
    String::from_utf8(bytes)
        .map_err(|_| CliError::Input(format!("the Secret {secret_name:?} holds no valid {key}")))
}

/// The link's capability URL (`{name}--{capability}.{namespace}.{domain}`), which opens it
/// with no token and no cookie: the URL to embed. Built from its own-origin URL.
pub async fn embed_url(conn: &Connection, name: &str) -> Result<String, CliError> {
    let link = get(conn, "previewlinks", name).await?;
    let own = link
        .pointer("/status/embedUrl")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            CliError::Input(format!(
                "preview link {name:?} has no URL yet (not reconciled)"
            ))
        })?
        .to_owned();
    let capability = credential(conn, name, crate::resources::capability::KEY).await?;
    let host = crate::resources::capability::host_name(name, &capability).ok_or_else(|| {
        CliError::Input(format!(
            "the name {name:?} is too long for a capability host (its last part and the capability must fit in 63 characters)"
        ))
    })?;
    // The own-origin URL is `scheme://{name}.{namespace}.{domain}…`: the first label changes.
    let (scheme, rest) = own.split_once("://").unwrap_or(("http", own.as_str()));
    let rest = rest
        .strip_prefix(name)
        .ok_or_else(|| CliError::Input(format!("unexpected embed URL {own:?} of {name:?}")))?;
    Ok(format!("{scheme}://{host}{rest}"))
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
            CliError::Input(if path_style {
                format!(
                    "preview link {name:?} has no path URL: the server serves none (previewd serve --path-urls), or the link is not reconciled yet"
                )
            } else {
                format!("preview link {name:?} has no URL yet (not reconciled)")
            })
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
