//! Address lists of gRPC servers: entries such as the publisher's worker endpoints or the
//! worker's `--control-plane` addresses parsed into targets, each resolved to the addresses it
//! stands for (several for a DNS name such as a Kubernetes headless service).

use std::net::{IpAddr, SocketAddr};

/// The worker's default gRPC port.
pub const WORKER_PORT: u16 = 50052;

/// The control plane's default gRPC port.
pub const CONTROL_PLANE_PORT: u16 = 50051;

/// An entry of an endpoint list that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {endpoint:?}: {reason}")]
pub struct EndpointError {
    /// The entry as given.
    pub endpoint: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One entry of the endpoint list: a host (name or address), a port, plain or TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The host as given (brackets of an IPv6 address removed).
    pub host: String,
    /// The port.
    pub port: u16,
    /// The host when it is an address: nothing to resolve.
    pub ip: Option<IpAddr>,
    /// Whether the server speaks TLS there (`https://`); the certificate is checked against
    /// `host`, whichever of its addresses is connected to.
    pub tls: bool,
}

impl Target {
    /// Parses `http://host:port`, `https://host:port`, `host:port` (plain),
    /// `dns:///host:port` (gRPC's form, as for a headless service; plain) or any of them
    /// without the port (`default_port`: [`WORKER_PORT`], [`CONTROL_PLANE_PORT`]). A name stands
    /// for all its addresses in every form.
    pub fn parse(endpoint: &str, default_port: u16) -> Result<Self, EndpointError> {
        let err = |reason: &str| EndpointError {
            endpoint: endpoint.to_owned(),
            reason: reason.to_owned(),
        };
        let s = endpoint.trim();
        let mut tls = false;
        let rest = if let Some(rest) = s.strip_prefix("dns:") {
            // dns:///host:port, or dns://resolver/host:port: the system resolver is used.
            match rest.strip_prefix("//") {
                Some(r) => r.split_once('/').map_or(r, |(_, host)| host),
                None => rest,
            }
        } else if let Some((scheme, rest)) = s.split_once("://") {
            match scheme.to_ascii_lowercase().as_str() {
                "http" => rest,
                "https" => {
                    tls = true;
                    rest
                }
                _ => return Err(err("scheme must be http://, https:// or dns:///")),
            }
        } else {
            s
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(err("expected host:port"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| err("unclosed '[' in an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| err("expected :port after the IPv6 address"))?,
                ),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') => (host, Some(port)),
                Some(_) => return Err(err("put an IPv6 address in brackets: [::1]:50052")),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(err("no host"));
        }
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err("the port must be a number from 1 to 65535"))?,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            ip: host.parse().ok(),
            tls,
        })
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The `scheme://host:port` origin requests carry (`:authority`).
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme(), self.authority())
    }

    fn authority(&self) -> String {
        match self.ip {
            Some(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }

    /// Whether the host is a name to resolve (again, to discover new workers).
    pub fn is_name(&self) -> bool {
        self.ip.is_none()
    }

    /// Every address the target stands for, deduplicated, in the resolver's order.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        if let Some(ip) = self.ip {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let mut out = Vec::new();
        for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tls {
            f.write_str(&self.origin())
        } else {
            f.write_str(&self.authority())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse() {
        let t = Target::parse("http://127.0.0.1:7000", WORKER_PORT).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 7000));
        assert!(!t.is_name());
        let t = Target::parse("dns:///pushwire-worker.pushwire.svc:50052", WORKER_PORT).unwrap();
        assert_eq!(t.host, "pushwire-worker.pushwire.svc");
        assert!(t.is_name());
        let t = Target::parse("workers.local", WORKER_PORT).unwrap();
        assert_eq!(t.port, WORKER_PORT);
        let t = Target::parse("dns:///pushwire-control-plane", CONTROL_PLANE_PORT).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("pushwire-control-plane", 50051));
        let t = Target::parse("[::1]:9", WORKER_PORT).unwrap();
        assert_eq!(t.ip, Some("::1".parse().unwrap()));
        assert_eq!(t.origin(), "http://[::1]:9");
        assert_eq!(t.to_string(), "[::1]:9");
        let t = Target::parse("HTTP://localhost:1/", WORKER_PORT).unwrap();
        assert_eq!(t.host, "localhost");
        assert!(!t.tls);
        let t = Target::parse("https://workers.example:443", WORKER_PORT).unwrap();
        assert!(t.tls && t.is_name());
        assert_eq!(t.to_string(), "https://workers.example:443");
    }

    #[test]
    fn bad_forms_say_why() {
        for (bad, why) in [
            ("ftp://w:1", "scheme"),
            ("w:0", "port"),
            ("w:http", "port"),
            ("::1:9", "brackets"),
            ("", "host:port"),
            ("http://w:1/path", "host:port"),
        ] {
            let e = Target::parse(bad, WORKER_PORT).unwrap_err();
            assert!(e.reason.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn names_resolve_to_every_address() {
        let t = Target::parse("localhost:9", WORKER_PORT).unwrap();
        let addrs = t.resolve().await.unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9));
    }
}
