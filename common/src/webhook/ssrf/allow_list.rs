//! The SSRF allow-list (`--allow-cidr`): non-public networks an operator lets webhooks reach
//! (tests, on-premises receivers). Cloud metadata stays refused whatever it holds; that rule
//! is [`vet`](super::vet)'s, not this list's.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// An allow-list entry that is neither a CIDR nor an IP address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?} in the SSRF allow-list (expected e.g. 10.1.0.0/16 or ::1/128)")]
pub struct InvalidCidr(pub String);

/// Networks that may be contacted even though they are not public.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<IpNet>);

impl AllowList {
    /// Most entries a list may hold: it is configuration, not a routing table.
    pub const MAX_ENTRIES: usize = 256;

    /// An allow-list of the given networks.
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        Self(nets.into_iter().map(|n| n.trunc()).collect())
    }

    /// Parses CIDRs (`127.0.0.0/8`, `::1/128`); a bare address means just that address.
    pub fn parse<I, S>(cidrs: I) -> Result<Self, InvalidCidr>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut nets = Vec::new();
        for cidr in cidrs {
            let cidr = cidr.as_ref().trim();
            if nets.len() == Self::MAX_ENTRIES {
                return Err(InvalidCidr(format!(
                    "{cidr} (more than {} entries)",
                    Self::MAX_ENTRIES
                )));
            }
            let net = IpNet::from_str(cidr)
                .or_else(|_| IpAddr::from_str(cidr).map(IpNet::from))
                .map_err(|_| InvalidCidr(cidr.chars().take(64).collect()))?;
            nets.push(net.trunc());
        }
        Ok(Self(nets))
    }

    /// Whether `ip` is inside an allow-listed network. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`) is matched as its IPv4 form, since that is where it connects.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let v4 = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.0
            .iter()
            .any(|net| net.contains(&ip) || v4.is_some_and(|v4| net.contains(&v4)))
    }

    /// Whether nothing is allow-listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The allow-listed networks.
    pub fn nets(&self) -> &[IpNet] {
        &self.0
    }
}

impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Prints a network as `10.0.0.0/8` rather than `V4(10.0.0.0/8)`.
        struct Cidr<'a>(&'a IpNet);
        impl fmt::Debug for Cidr<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self.0, f)
            }
        }
        f.debug_list().entries(self.0.iter().map(Cidr)).finish()
    }
}
