//! The flags that say how webhooks are sent (timeouts, SSRF allow-list, trusted CAs), each with
//! a `PUSHWIRE_*` environment variable. The worker flattens them beside its retry flags; the
//! control plane takes them for `TestIntegration`, URL checks and `--with-worker`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};

use super::client::{ClientBuildError, ClientOptions, WebhookClient};
use super::ssrf::AllowList;

/// How webhooks are sent: timeouts, SSRF allow-list, trusted CAs.
#[derive(Clone, Debug, Args)]
pub struct WebhookArgs {
    /// Time to resolve, connect and finish the TLS handshake of one attempt.
    #[arg(long, env = "PUSHWIRE_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Time for one whole attempt, reading the response included.
    #[arg(long, env = "PUSHWIRE_REQUEST_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Non-public network that receivers may be on anyway (repeatable, e.g. 127.0.0.0/8 for
    /// tests or 10.20.0.0/16 for on-premises receivers). Everything non-global is refused
    /// otherwise.
    #[arg(
        long = "allow-cidr",
        env = "PUSHWIRE_ALLOW_CIDR",
        value_delimiter = ','
    )]
    pub allow_cidr: Vec<String>,

    /// PEM file of CA certificates trusted for HTTPS receivers, beside the built-in roots.
    #[arg(long, env = "PUSHWIRE_EXTRA_CA_FILE")]
    pub extra_ca_file: Option<PathBuf>,
}

/// Why the webhook settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryConfigError {
    /// An `--allow-cidr` value is not a network.
    #[error("--allow-cidr: {0}")]
    AllowCidr(String),
    /// The `--extra-ca-file` cannot be read.
    #[error("--extra-ca-file {path}: {source}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The client could not be built (e.g. no certificate in the CA file).
    #[error(transparent)]
    Client(#[from] ClientBuildError),
}

impl WebhookArgs {
    /// The defaults, as if given no flags.
    pub fn defaults() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            webhook: WebhookArgs,
        }
        Only::parse_from(["webhook"]).webhook
    }

    /// The HTTP client these settings describe (reads the CA file).
    pub fn client(&self) -> Result<WebhookClient, DeliveryConfigError> {
        let allow = AllowList::parse(&self.allow_cidr)
            .map_err(|e| DeliveryConfigError::AllowCidr(e.to_string()))?;
        let extra_ca_pem = match &self.extra_ca_file {
            Some(path) => {
                Some(
                    std::fs::read(path).map_err(|source| DeliveryConfigError::CaFile {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Ok(WebhookClient::new(ClientOptions {
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            allow,
            extra_ca_pem,
            ..ClientOptions::default()
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> WebhookArgs {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            webhook: WebhookArgs,
        }
        Only::parse_from(std::iter::once("webhook").chain(args.iter().copied())).webhook
    }

    #[test]
    fn defaults_follow_the_design() {
        let d = WebhookArgs::defaults();
        assert_eq!(d.connect_timeout, Duration::from_secs(5));
        assert_eq!(d.request_timeout, Duration::from_secs(15));
        assert!(d.allow_cidr.is_empty());
        let client = d.client().unwrap();
        assert!(client.options().allow.is_empty());
    }

    #[test]
    fn allow_list_and_timeouts_reach_the_client() {
        let a = parse(&[
            "--allow-cidr",
            "127.0.0.0/8,::1/128",
            "--request-timeout",
            "2s",
        ]);
        let opts = a.client().unwrap().options().clone();
        assert_eq!(format!("{:?}", opts.allow), "[127.0.0.0/8, ::1/128]");
        assert_eq!(opts.request_timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let err = parse(&["--allow-cidr", "10.0.0.0/33"])
            .client()
            .unwrap_err();
        assert!(err.to_string().starts_with("--allow-cidr"), "{err}");
        let err = parse(&["--extra-ca-file", "/nonexistent/ca.pem"])
            .client()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
