//! How clients (adce-agent, adcectl) dial the server: the endpoint with its TLS
//! settings, and the bearer token every call carries. One place, so the agent
//! and adcectl accept the same flags and fail with the same messages.

use std::fmt;
use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A channel whose every request carries the bearer token, if any.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Why a client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The server address is not a usable URL.
    #[error("invalid server address {url:?}: {reason}")]
    Address {
        /// The address as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file named by a flag cannot be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    File {
        /// Which file this is ("token file", "CA file", ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The token is empty or not a valid header value.
    #[error("{0}")]
    Token(String),
    /// The TLS settings are incomplete or rejected.
    #[error("tls: {0}")]
    Tls(String),
}

/// The client side of the server's security settings: the token and TLS
/// files. Debug output never shows the token.
#[derive(Clone, Default)]
pub struct ClientSecurity {
    /// The bearer token sent with every call.
    pub token: Option<String>,
    /// PEM CA certificate(s) the server's certificate must chain to. Setting
    /// it turns TLS on (as does an `https://` address).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that require one (mTLS).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when it differs from
    /// the host in the address.
    pub tls_name: Option<String>,
}

impl fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSecurity")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("tls_name", &self.tls_name)
            .finish()
    }
}

/// Picks the token: `--token` (or its env var) first, then a token file.
/// Surrounding whitespace (a trailing newline in a file) is not part of it.
pub fn resolve_token(
    token: Option<String>,
    token_file: Option<&Path>,
) -> Result<Option<String>, DialError> {
    let token = match (token, token_file) {
        (Some(token), _) => token,
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|source| DialError::File {
            what: "token file",
            path: path.to_path_buf(),
            source,
        })?,
        (None, None) => return Ok(None),
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(DialError::Token("the token is empty".into()));
    }
    Ok(Some(token.to_owned()))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, DialError> {
    std::fs::read(path).map_err(|source| DialError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl ClientSecurity {
    /// Whether calls go over TLS to `url`.
    pub fn uses_tls(&self, url: &str) -> bool {
        url.starts_with("https://")
            || self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.tls_name.is_some()
    }

    /// The endpoint for `url` (`http://host:port` or `https://host:port`)
    /// with TLS configured when [`uses_tls`](Self::uses_tls). Without a CA
    /// file, an `https://` server is verified against the system's roots.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, DialError> {
        let address_error = |reason: String| DialError::Address {
            url: url.to_owned(),
            reason,
        };
        let tls = self.uses_tls(url);
        // TLS is asked for by flags; the address may still say http://.
        let url = match url.strip_prefix("http://") {
            Some(rest) if tls => format!("https://{rest}"),
            _ => url.to_owned(),
        };
        // Each client sets its own connect timeout and keepalive.
        let endpoint =
            Endpoint::from_shared(url.clone()).map_err(|e| address_error(e.to_string()))?;
        if !tls {
            return Ok(endpoint);
        }
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_file {
            Some(path) => config.ca_certificate(Certificate::from_pem(read("CA file", path)?)),
            None => config.with_native_roots(),
        };
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("client certificate", cert)?,
                    read("client key", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(DialError::Tls(
                    "a client certificate needs both a certificate file and a key file".into(),
                ));
            }
        }
        if let Some(name) = &self.tls_name {
            config = config.domain_name(name.clone());
        }
        endpoint
            .tls_config(config)
            .map_err(|e| DialError::Tls(e.to_string()))
    }

    /// The interceptor that adds `authorization: Bearer <token>`.
    pub fn bearer(&self) -> Result<Bearer, DialError> {
        let value = match &self.token {
            Some(token) => {
                let mut value: MetadataValue<Ascii> =
                    format!("Bearer {token}").parse().map_err(|_| {
                        DialError::Token(
                            "the token contains characters a header cannot carry".into(),
                        )
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Bearer(value))
    }
}

/// The client flags every adce client takes (`--token`, `--token-file`,
/// `--ca-file`, `--cert-file`, `--key-file`, `--tls-name`, each with its
/// `ADCE_*` variable); flatten into a clap parser. Debug never shows the token.
#[cfg(feature = "cli")]
#[derive(Clone, Default, clap::Args)]
pub struct DialArgs {
    /// Bearer token sent with every call. Prefer ADCE_TOKEN or --token-file:
    /// a flag shows in the process list.
    #[arg(
        long,
        global = true,
        env = "ADCE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// File holding the bearer token (surrounding whitespace ignored);
    /// --token wins when both are given.
    #[arg(long, global = true, env = "ADCE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) the server's certificate must chain to; turns
    /// TLS on (an https:// server address without it is verified against
    /// the system's roots).
    #[arg(long, global = true, env = "ADCE_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that require one (mTLS); needs
    /// --key-file.
    #[arg(
        long,
        global = true,
        env = "ADCE_CERT_FILE",
        value_name = "FILE",
        requires = "key_file"
    )]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(
        long,
        global = true,
        env = "ADCE_KEY_FILE",
        value_name = "FILE",
        requires = "cert_file"
    )]
    pub key_file: Option<PathBuf>,
    /// Name the server's certificate must carry, when it differs from the
    /// host in --server; turns TLS on.
    #[arg(long, global = true, env = "ADCE_TLS_NAME", value_name = "NAME")]
    pub tls_name: Option<String>,
}

#[cfg(feature = "cli")]
impl fmt::Debug for DialArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DialArgs")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("tls_name", &self.tls_name)
            .finish()
    }
}

#[cfg(feature = "cli")]
impl DialArgs {
    /// The security settings the flags name, with the token file read.
    pub fn security(self) -> Result<ClientSecurity, DialError> {
        Ok(ClientSecurity {
            token: resolve_token(self.token, self.token_file.as_deref())?,
            ca_file: self.ca_file,
            cert_file: self.cert_file,
            key_file: self.key_file,
            tls_name: self.tls_name,
        })
    }
}

/// Adds the bearer token to every request. Its Debug never shows the token.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_flag_wins_over_file_and_whitespace_is_trimmed()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("adce-dial-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n")?;
        assert_eq!(
            resolve_token(None, Some(&file))?.as_deref(),
            Some("from-file")
        );
        assert_eq!(
            resolve_token(Some(" flag ".into()), Some(&file))?.as_deref(),
            Some("flag")
        );
        assert_eq!(resolve_token(None, None)?, None);
        std::fs::write(&file, "  \n")?;
        assert!(matches!(
            resolve_token(None, Some(&file)),
            Err(DialError::Token(_))
        ));
        let missing = resolve_token(None, Some(&dir.join("absent")));
        assert!(matches!(
            missing,
            Err(DialError::File {
                what: "token file",
                ..
            })
        ));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn debug_never_shows_the_token() -> Result<(), DialError> {
        let security = ClientSecurity {
            token: Some("s3cret-token".into()),
            ..ClientSecurity::default()
        };
        assert!(!format!("{security:?}").contains("s3cret"));
        assert!(!format!("{:?}", security.bearer()?).contains("s3cret"));
        Ok(())
    }

    #[test]
    fn bearer_adds_the_header_and_refuses_unprintable_tokens()
    -> Result<(), Box<dyn std::error::Error>> {
        let security = ClientSecurity {
            token: Some("abc".into()),
            ..ClientSecurity::default()
        };
        let request = security.bearer()?.call(tonic::Request::new(()))?;
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .map(|v| v.to_str())
                .transpose()?,
            Some("Bearer abc")
        );
        let bad = ClientSecurity {
            token: Some("a\nb".into()),
            ..ClientSecurity::default()
        };
        assert!(matches!(bad.bearer(), Err(DialError::Token(_))));
        Ok(())
    }

    #[test]
    fn tls_follows_flags_or_scheme_and_half_an_identity_is_refused() {
        let plain = ClientSecurity::default();
        assert!(!plain.uses_tls("http://127.0.0.1:1"));
        assert!(plain.uses_tls("https://127.0.0.1:1"));
        let half = ClientSecurity {
            cert_file: Some("cert.pem".into()),
            ..ClientSecurity::default()
        };
        assert!(half.uses_tls("http://127.0.0.1:1"));
        assert!(matches!(
            half.endpoint("http://127.0.0.1:1"),
            Err(DialError::Tls(_))
        ));
    }
}
