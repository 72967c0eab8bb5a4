//! Bearer tokens of the control plane: an admin token for the calls that
//! change the cluster (LoadShard, SyncTorrents with `fetch_missing`,
//! Relay) and an optional API token for inference (gRPC `Inference`, the
//! OpenAI API). Either is sent as `authorization: Bearer <token>`; the admin
//! token also passes where the API token is asked for. A token that is not
//! configured leaves its class of calls open. Health and reflection stay
//! open for probes.

use subtle::ConstantTimeEq;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Calls that change the cluster.
    Admin,
    /// Inference.
    Inference,
}

impl Class {
    fn what(self) -> &'static str {
        match self {
            Class::Admin => "the admin token",
            Class::Inference => "the API token",
        }
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this call needs {0}: send the header `authorization: Bearer <token>`")]
    Missing(&'static str),
    #[error("wrong token: this call needs {0}")]
    Wrong(&'static str),
}

/// The configured tokens.
#[derive(Clone, Default)]
pub struct Tokens {
    admin: Option<String>,
    api: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("admin", &self.admin.as_ref().map(|_| "set"))
            .field("api", &self.api.as_ref().map(|_| "set"))
            .finish()
    }
}

/// A token given inline, else read from `file` (trailing whitespace cut);
/// none when both are empty.
fn token(
    inline: &str,
    file: &str,
    field: &'static str,
) -> Result<Option<String>, crate::config::ConfigError> {
    let t = if !inline.is_empty() {
        inline.to_string()
    } else if !file.is_empty() {
        std::fs::read_to_string(file)
            .map_err(|e| {
                crate::config::ConfigError::invalid(field, format!("cannot read {file}: {e}"))
            })?
            .trim_end()
            .to_string()
    } else {
        return Ok(None);
    };
    if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(crate::config::ConfigError::invalid(
            field,
            "a token must be non-empty, without spaces or control characters",
        ));
    }
    Ok(Some(t))
}

fn eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Tokens {
    /// Tokens given inline (environment) or in files.
    pub fn load(
        admin: &str,
        admin_file: &str,
        api: &str,
        api_file: &str,
    ) -> Result<Tokens, crate::config::ConfigError> {
        Ok(Tokens {
            admin: token(admin, admin_file, "admin_token")?,
            api: token(api, api_file, "api_token")?,
        })
    }

    pub fn has_admin(&self) -> bool {
        self.admin.is_some()
    }

    pub fn has_api(&self) -> bool {
        self.api.is_some()
    }

    /// Checks an `authorization` header value for `class`.
    pub fn check(&self, class: Class, header: Option<&str>) -> Result<(), AuthError> {
        let needed: Vec<&str> = match class {
            Class::Admin => self.admin.iter().map(String::as_str).collect(),
            Class::Inference if self.api.is_none() => vec![],
            Class::Inference => self
                .api
                .iter()
                .chain(&self.admin)
                .map(String::as_str)
                .collect(),
        };
        if needed.is_empty() {
            return Ok(());
        }
        let given = header
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing(class.what()))?;
        if needed.iter().any(|t| eq(t, given)) {
            Ok(())
        } else {
            Err(AuthError::Wrong(class.what()))
        }
    }

    /// [`Tokens::check`] on a gRPC request: UNAUTHENTICATED when refused.
    pub fn check_grpc<T>(
        &self,
        class: Class,
        req: &tonic::Request<T>,
    ) -> Result<(), tonic::Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.check(class, header)
            .map_err(|e| tonic::Status::unauthenticated(e.to_string()))
    }

    /// The header value to send for `class` (outgoing calls).
    pub fn bearer(&self, class: Class) -> Option<String> {
        let t = match class {
            Class::Admin => self.admin.as_ref(),
            Class::Inference => self.api.as_ref().or(self.admin.as_ref()),
        }?;
        Some(format!("Bearer {t}"))
    }

    /// Adds the `authorization` header for `class` to an outgoing request.
    pub fn attach<T>(&self, class: Class, req: &mut tonic::Request<T>) {
        if let Some(v) = self.bearer(class).and_then(|b| b.parse().ok()) {
            req.metadata_mut().insert("authorization", v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_gate_their_class_only() {
        let open = Tokens::default();
        assert!(open.check(Class::Admin, None).is_ok());
        let t = Tokens::load("adm", "", "api", "").unwrap();
        assert_eq!(
            t.check(Class::Admin, None),
            Err(AuthError::Missing("the admin token"))
        );
        assert_eq!(
            t.check(Class::Admin, Some("Bearer api")),
            Err(AuthError::Wrong("the admin token"))
        );
        assert!(t.check(Class::Admin, Some("Bearer adm")).is_ok());
        assert!(t.check(Class::Inference, Some("Bearer api")).is_ok());
        assert!(
            t.check(Class::Inference, Some("Bearer adm")).is_ok(),
            "admin passes everywhere"
        );
        assert!(t.check(Class::Inference, Some("Basic api")).is_err());
        let admin_only = Tokens::load("adm", "", "", "").unwrap();
        assert!(
            admin_only.check(Class::Inference, None).is_ok(),
            "no API token: inference open"
        );
        assert!(Tokens::load("a b", "", "", "").is_err());
        assert_eq!(t.bearer(Class::Inference).as_deref(), Some("Bearer api"));
    }
}
