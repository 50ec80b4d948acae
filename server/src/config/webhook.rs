//! `alerts.webhook`: the URL an alert webhook posts to, parsed once at load
//! into a [`WebhookTarget`]. The health checker's webhook client posts to
//! exactly what this parse accepted.
//!
//! Invariant: nothing here prints the URL's path or query (the secret of
//! Slack-style webhooks): errors name what is wrong without echoing the URL,
//! and `Debug` shows the redacted form.

/// Where a webhook posts: `alerts.webhook` parsed once. Config validation
/// uses the same parse as the health checker's webhook client, so a config
/// that loads names a target that posts.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    /// https:// (TLS) rather than http://.
    tls: bool,
    /// The host name or IP address to connect to and verify, without brackets.
    host: String,
    /// The port, explicit or the scheme's default.
    port: u16,
    /// The `Host` header: host and port as written.
    authority: String,
    /// Path and query, with whatever secret they carry.
    path: String,
}

impl WebhookTarget {
    /// Parses an http:// or https:// URL. Errors never repeat the URL, whose
    /// path is a secret for Slack-style webhooks.
    pub fn parse(url: &str) -> Result<WebhookTarget, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("not a URL ({e}): expected an http:// or https:// URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(format!(
                    "scheme `{other}` is not supported: expected an http:// or https:// URL"
                ));
            }
            None => return Err("expected an http:// or https:// URL".into()),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| "the URL has no host".to_string())?;
        if authority.as_str().contains('@') {
            return Err(
                "the URL must not carry `user:password@` (put the token in the path)".into(),
            );
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/")
            .to_owned();
        Ok(WebhookTarget {
            tls,
            host,
            port,
            authority: authority.as_str().to_owned(),
            path,
        })
    }

    /// Whether the target is https://.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host name or IP address to connect to and verify, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `Host` header: host and port as written.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Path and query, with whatever secret they carry: never log it.
    pub fn path_and_query(&self) -> &str {
        &self.path
    }

    /// `scheme://host[:port]`, safe to log: no path, no query.
    pub fn redacted(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

/// Prints the target as it may be logged: the path, which carries the
/// secret of Slack-style webhooks, is left out.
impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WebhookTarget")
            .field(&self.redacted())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_parse_with_default_ports_and_redact_their_path() {
        let slack = WebhookTarget::parse("https://hooks.slack.com/services/T0/B0/SECRET?x=1")
            .expect("a Slack URL parses");
        assert!(slack.is_tls());
        assert_eq!((slack.host(), slack.port()), ("hooks.slack.com", 443));
        assert_eq!(slack.path_and_query(), "/services/T0/B0/SECRET?x=1");
        assert_eq!(slack.redacted(), "https://hooks.slack.com");
        assert!(!format!("{slack:?}").contains("SECRET"), "{slack:?}");

        let local = WebhookTarget::parse("http://127.0.0.1:8080").expect("no path is fine");
        assert!(!local.is_tls());
        assert_eq!((local.port(), local.path_and_query()), (8080, "/"));
        assert_eq!(local.redacted(), "http://127.0.0.1:8080");
        let v6 = WebhookTarget::parse("https://[::1]:8443/hook").expect("IPv6 literal");
        assert_eq!((v6.host(), v6.port()), ("::1", 8443));
        assert_eq!(v6.authority(), "[::1]:8443");
        assert_eq!(
            WebhookTarget::parse("http://example.com/").map(|t| t.port()),
            Ok(80)
        );
    }

    #[test]
    fn webhook_urls_other_than_http_and_https_are_refused_without_echoing_them() {
        for (url, words) in [
            ("ftp://hooks.example/SECRET", "scheme `ftp`"),
            ("hooks.example/SECRET", "http:// or https://"),
            ("/SECRET", "http:// or https://"),
            ("https://user:SECRET@hooks.example/x", "user:password@"),
            ("https:///SECRET", "not a URL"),
            ("", "not a URL"),
        ] {
            let err = WebhookTarget::parse(url).expect_err(url);
            assert!(err.contains(words), "{url}: {err}");
            assert!(
                !err.contains("SECRET"),
                "{url}: the error repeats the URL: {err}"
            );
        }
    }
}
