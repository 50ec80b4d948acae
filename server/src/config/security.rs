//! `auth:` and `tls:`: who may call the server and how the transport is
//! protected. Tokens come inline, from a file or from an environment variable,
//! and are read when the config is loaded (a reload reads them again); the
//! config never shows them (Debug and `--dump-config` print `<redacted>`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::position::{PositionIndex, YamlPath};
use super::validate::Issue;

/// What `--dump-config` prints instead of an inline token.
pub const REDACTED: &str = "<redacted>";
/// Tokens shorter than this are refused: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Run tasks: the `AgentGateway` service only.
    Agent,
    /// Read-only `Control` calls (status, tasks, agents, coverage, logs, reconcile dry runs).
    Read,
    /// Every `Control` call, reads included.
    Admin,
}

impl Role {
    /// The role's name in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secret that never shows in Debug output or dumps.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself; only the auth check should call this.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// One entry of `auth.tokens`: exactly one of `token`, `token_file`, `token_env`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for the logs ("which token was used"); defaults to `<role>-<n>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The role the token grants.
    pub role: Role,
    /// The token inline (prefer a file or an environment variable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A file holding the token (surrounding whitespace ignored); relative
    /// paths resolve against the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// An environment variable of the server holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// For an `agent` token: the one agent id it may connect and upload as.
    /// With one such token per host, no agent can pose as another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The token itself, read at load. Not part of the YAML.
    #[serde(skip)]
    pub secret: Secret,
}

/// `auth:` bearer tokens with roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The accepted tokens. Without any, every call is allowed (see
    /// `allow_unauthenticated`).
    pub tokens: Vec<TokenConfig>,
    /// Health checks need no token (load balancers and probes call them).
    pub open_health: bool,
    /// Reflection needs no token (grpcurl lists services with it).
    pub open_reflection: bool,
    /// `/metrics` needs no token. Off by default: with tokens configured,
    /// Prometheus sends a `read` token (`authorization: credentials_file`).
    pub open_metrics: bool,
    /// Serve on a non-loopback address without any token. Off by default:
    /// the server refuses to start exposed without auth.
    pub allow_unauthenticated: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens: Vec::new(),
            open_health: true,
            open_reflection: true,
            open_metrics: false,
            allow_unauthenticated: false,
        }
    }
}

impl AuthConfig {
    /// Whether calls need a token at all.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The tokens with their resolved names, in config order.
    pub fn named_tokens(&self) -> impl Iterator<Item = (String, &TokenConfig)> {
        self.tokens.iter().enumerate().map(|(i, t)| {
            let name = t
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{}", t.role, i + 1));
            (name, t)
        })
    }
}

/// Which clients must present a certificate signed by `tls.client_ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Nobody; a certificate a client presents is still verified.
    None,
    /// Callers of the `AgentGateway` (agents); adcectl may come without one.
    Agents,
    /// Every connection (the TLS handshake fails without one).
    All,
}

/// `tls:` the server's certificate, and client certificates (mTLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificate(s) client certificates must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Who must present a client certificate: `none`, `agents` (the default
    /// when `client_ca` is set) or `all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
}

impl TlsConfig {
    /// The effective `client_auth`.
    pub fn client_auth(&self) -> ClientAuth {
        match (self.client_auth, &self.client_ca) {
            (Some(auth), _) => auth,
            (None, Some(_)) => ClientAuth::Agents,
            (None, None) => ClientAuth::None,
        }
    }
}

/// Checks `auth:` and `tls:` for what spans values (before paths resolve).
pub(super) fn check(
    auth: &AuthConfig,
    tls: Option<&TlsConfig>,
    idx: &PositionIndex,
    root: &YamlPath,
) -> Result<(), Issue> {
    let at = |path: &YamlPath, message: String| Issue {
        position: idx.value(path),
        message,
    };
    let tokens = root.key("auth").key("tokens");
    let mut names = std::collections::HashSet::new();
    for (i, (name, token)) in auth.named_tokens().enumerate() {
        let p = tokens.idx(i);
        let sources = [
            token.token.is_some(),
            token.token_file.is_some(),
            token.token_env.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(at(
                &p,
                "a token needs exactly one of `token`, `token_file` or `token_env`".into(),
            ));
        }
        if token.agent_id.is_some() && token.role != Role::Agent {
            return Err(at(
                &p.key("agent_id"),
                format!(
                    "`agent_id` binds an agent token; this token has role {}",
                    token.role
                ),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(at(&p.key("name"), format!("duplicate token name `{name}`")));
        }
        if let Some(var) = &token.token_env {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                return Err(at(
                    &p.key("token_env"),
                    format!("`{var}` is not an environment variable name"),
                ));
            }
        }
    }
    if let Some(tls) = tls {
        let p = root.key("tls");
        if tls.client_ca.is_none() && tls.client_auth() != ClientAuth::None {
            return Err(at(
                &p.key("client_auth"),
                "`client_auth` needs `client_ca`, the CA client certificates must chain to".into(),
            ));
        }
    }
    Ok(())
}

/// Resolves relative paths against `dir` and reads every token, so a missing
/// file or variable fails the load (or the reload) with its position.
pub(super) fn load_secrets(
    auth: &mut AuthConfig,
    tls: Option<&mut TlsConfig>,
    dir: &Path,
    idx: &PositionIndex,
    root: &YamlPath,
    resolve: impl Fn(&Path, &Path) -> PathBuf,
) -> Result<(), Issue> {
    let at = |path: &YamlPath, message: String| Issue {
        position: idx.value(path),
        message,
    };
    let tokens = root.key("auth").key("tokens");
    let mut seen: Vec<(usize, Secret)> = Vec::new();
    for (i, token) in auth.tokens.iter_mut().enumerate() {
        let p = tokens.idx(i);
        let (raw, where_) = if let Some(inline) = &token.token {
            (inline.expose().to_owned(), p.key("token"))
        } else if let Some(file) = &mut token.token_file {
            *file = resolve(dir, file);
            let text = std::fs::read_to_string(&*file).map_err(|e| {
                at(
                    &p.key("token_file"),
                    format!("cannot read token file {}: {e}", file.display()),
                )
            })?;
            (text, p.key("token_file"))
        } else if let Some(var) = &token.token_env {
            let value = std::env::var(var).map_err(|_| {
                at(
                    &p.key("token_env"),
                    format!("environment variable `{var}` is not set (or not UTF-8)"),
                )
            })?;
            (value, p.key("token_env"))
        } else {
            continue;
        };
        let value = raw.trim();
        if value == REDACTED {
            return Err(at(
                &where_,
                "this token was redacted by --dump-config; put the real token back".into(),
            ));
        }
        if value.len() < MIN_TOKEN_LEN {
            return Err(at(
                &where_,
                format!(
                    "the token is too short: use at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(at(
                &where_,
                "the token may only contain printable ASCII characters without spaces".into(),
            ));
        }
        if let Some((other, _)) = seen.iter().find(|(_, s)| s.expose() == value) {
            return Err(at(
                &where_,
                format!("the same token is already listed as entry {}", other + 1),
            ));
        }
        token.secret = Secret(value.to_owned());
        seen.push((i, token.secret.clone()));
    }
    if let Some(tls) = tls {
        let p = root.key("tls");
        for (key, path) in [
            ("cert", Some(&mut tls.cert)),
            ("key", Some(&mut tls.key)),
            ("client_ca", tls.client_ca.as_mut()),
        ] {
            let Some(path) = path else { continue };
            *path = resolve(dir, path);
            if let Err(e) = std::fs::metadata(&*path) {
                return Err(at(
                    &p.key(key),
                    format!("cannot read {key} file {}: {e}", path.display()),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, ConfigError};
    use super::*;

    const BASE: &str = "\
version: 1
lake:
  local:
    root: lake
";

    fn parse_in(src: &str, dir: &Path) -> Result<Config, ConfigError> {
        let path = dir.join("adce.yaml");
        std::fs::write(&path, src).expect("write config");
        Config::load(&path)
    }

    fn err_in(src: &str, dir: &Path) -> String {
        match parse_in(src, dir) {
            Ok(_) => panic!("config unexpectedly valid:\n{src}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tokens_load_inline_and_from_files_and_never_show() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("read.token"), "read-token-from-file-0001\n")?;
        // `token_env` is covered end to end (the e2e auth test sets the
        // variable on the server process): setting one here would need unsafe code.
        let src = format!(
            "{BASE}auth:
  tokens:
    - {{role: admin, token: admin-token-inline-0001, name: ops}}
    - {{role: read, token_file: read.token}}
    - {{role: agent, token_file: agent.token}}
"
        );
        std::fs::write(
            dir.path().join("agent.token"),
            "  agent-token-from-file-0001  ",
        )?;
        let cfg = parse_in(&src, dir.path())?;
        let secrets: Vec<(String, Role, &str)> = cfg
            .auth
            .named_tokens()
            .map(|(name, t)| (name, t.role, t.secret.expose()))
            .collect();
        assert_eq!(
            secrets,
            vec![
                ("ops".to_owned(), Role::Admin, "admin-token-inline-0001"),
                ("read-2".to_owned(), Role::Read, "read-token-from-file-0001"),
                (
                    "agent-3".to_owned(),
                    Role::Agent,
                    "agent-token-from-file-0001"
                ),
            ]
        );
        assert_eq!(
            cfg.auth.tokens[1].token_file.as_deref(),
            Some(dir.path().join("read.token").as_path())
        );
        // Neither Debug nor the dump shows a token.
        let shown = format!("{cfg:?}\n{}", cfg.dump());
        for secret in [
            "admin-token-inline",
            "read-token-from-file",
            "agent-token-from",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
        }
        // A dump fed back is refused at the redacted token, not silently accepted.
        let message = err_in(&cfg.dump(), dir.path());
        assert!(message.contains("redacted by --dump-config"), "{message}");
        Ok(())
    }

    #[test]
    fn every_token_mistake_points_at_its_value() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cases = [
            (
                "    - {role: admin}\n",
                "exactly one of `token`, `token_file` or `token_env`",
                "{role",
            ),
            ("    - {role: admin, token: short}\n", "too short", "short"),
            (
                "    - {role: admin, token_file: absent.token}\n",
                "cannot read token file",
                "absent.token",
            ),
            (
                "    - {role: admin, token_env: ADCE_SECURITY_TEST_UNSET}\n",
                "is not set",
                "ADCE_SECURITY_TEST_UNSET",
            ),
            (
                "    - {role: root, token: root-token-0123456789}\n",
                "unknown variant `root`",
                "root,",
            ),
            (
                "    - {role: admin, token: same-token-0123456789}\n    - {role: read, token: same-token-0123456789}\n",
                "already listed as entry 1",
                "read, token: same",
            ),
            (
                "    - {role: admin, token: \"has space 0123456789\"}\n",
                "printable ASCII",
                "\"has space",
            ),
        ];
        for (entries, expected, at) in cases {
            let src = format!("{BASE}auth:\n  tokens:\n{entries}");
            let message = err_in(&src, dir.path());
            assert!(message.contains(expected), "{entries}: {message}");
            let offset = src.find(at).expect("needle in source");
            let line = src[..offset].matches('\n').count() + 1;
            assert!(
                message.contains(&format!("adce.yaml:{line}:")),
                "{entries}: expected line {line}: {message}"
            );
        }
        Ok(())
    }

    #[test]
    fn tls_client_auth_needs_a_client_ca_and_files_must_exist() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("cert.pem"), "x")?;
        std::fs::write(dir.path().join("key.pem"), "x")?;
        let message = err_in(
            &format!("{BASE}tls:\n  cert: cert.pem\n  key: key.pem\n  client_auth: agents\n"),
            dir.path(),
        );
        assert!(message.contains("needs `client_ca`"), "{message}");
        let message = err_in(
            &format!("{BASE}tls:\n  cert: cert.pem\n  key: missing.pem\n"),
            dir.path(),
        );
        assert!(message.contains("cannot read key file"), "{message}");
        assert!(message.contains("adce.yaml:7:"), "{message}");
        std::fs::write(dir.path().join("ca.pem"), "x")?;
        let cfg = parse_in(
            &format!("{BASE}tls:\n  cert: cert.pem\n  key: key.pem\n  client_ca: ca.pem\n"),
            dir.path(),
        )?;
        let tls = cfg.tls.expect("tls section");
        assert_eq!(tls.client_auth(), ClientAuth::Agents);
        assert_eq!(tls.cert, dir.path().join("cert.pem"));
        Ok(())
    }
}
