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
            let origin = normalise(o).ok_or_else(|| BadOrigin(o.to_string()))?;
            values.push(HeaderValue::from_str(&origin).map_err(|_| BadOrigin(o.to_string()))?);
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

/// An origin as browsers send it (`Origin:`): scheme and host in lower
/// case, no default port; `None` when it is not one.
fn normalise(o: &str) -> Option<String> {
    let o = o.to_ascii_lowercase();
    let (scheme, rest) = o.split_once("://")?;
    let default_port = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    let ok =
        !rest.is_empty() && !rest.contains(['/', '?', '#', ' ', '*', '@']) && !rest.ends_with(':');
    ok.then(|| {
        format!(
            "{scheme}://{}",
            rest.strip_suffix(default_port).unwrap_or(rest)
        )
    })
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
        assert_eq!(
            normalise("HTTPS://Chat.Example.org:443").as_deref(),
            Some("https://chat.example.org")
        );
        assert_eq!(
            normalise("http://localhost:3000").as_deref(),
            Some("http://localhost:3000")
        );
        assert_eq!(normalise("http://a:443").as_deref(), Some("http://a:443"));
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
