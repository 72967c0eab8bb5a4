//! Cross-origin requests from web pages (a chat front end served from
//! another origin calls the API from the browser): which origins may, as
//! `--allowed-origins` says. Any, by default, as llama-server and vLLM
//! allow: the API token, when one is set, is a bearer header no other page
//! can read, never a cookie.

use std::time::Duration;

use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// A bad `--allowed-origins` entry.
#[derive(Debug, thiserror::Error)]
#[error(
    "--allowed-origins: {0:?} is not an origin (scheme://host[:port], no path; or * for any, empty for none)"
)]
pub struct BadOrigin(String);

/// The layer for a comma-separated list of origins (`*`: any; empty: none,
/// so browsers refuse pages of other origins).
pub fn layer(origins: &str) -> Result<Option<CorsLayer>, BadOrigin> {
    let list: Vec<&str> = origins
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if list.is_empty() {
        return Ok(None);
    }
    let allow = if list.contains(&"*") {
        AllowOrigin::any()
    } else {
        let mut values = Vec::with_capacity(list.len());
        for o in list {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            let host_ok = rest.is_some_and(|r| {
                !r.is_empty() && !r.contains(['/', '?', '#', ' ', '*']) && !r.ends_with(':')
            });
            let value = HeaderValue::from_str(o).ok().filter(|_| host_ok);
            values.push(value.ok_or_else(|| BadOrigin(o.to_string()))?);
        }
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            // The OpenAI SDKs send headers of their own (x-stainless-…).
            .allow_headers(AllowHeaders::mirror_request())
            .max_age(Duration::from_secs(600)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        assert!(layer("").unwrap().is_none());
        assert!(layer(" , ").unwrap().is_none());
        assert!(layer("*").unwrap().is_some());
        assert!(
            layer("http://localhost:3000, https://chat.example.org")
                .unwrap()
                .is_some()
        );
        for bad in [
            "localhost:3000",
            "http://",
            "http://a/path",
            "ftp://a",
            "http://a:",
            "https://*.example.org",
        ] {
            let e = layer(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
