//! The SSRF guard (DESIGN §4): which IP addresses a webhook may be sent to. Only globally
//! routable unicast is public; every special-purpose range is refused unless allow-listed
//! (tests, on-premises receivers), and cloud metadata endpoints are refused even then. A
//! refusal names the range ([`NonPublic`]: "loopback (127.0.0.0/8)", "the NAT64
//! (64:ff9b::/96) form of 10.0.0.1, private (RFC 1918, 10.0.0.0/8)", …). Pure decisions on
//! addresses: resolving and dialling belong to the [`client`](super::client), which must
//! [`vet`] every address before connecting to it; the control plane uses the same rules to
//! refuse literal addresses in URLs early.
//!
//! This module holds the verdicts and their vocabulary; `ranges` the special-purpose
//! registry the verdicts are read from; `allow_list` the networks an operator lets through.

mod allow_list;
mod ranges;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

pub use allow_list::{AllowList, InvalidCidr};

/// An address the guard refused: not public and not allow-listed, or a cloud metadata
/// address (refused even when allow-listed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("address {addr} is {class}, {}", class.verdict())]
pub struct BlockedAddress {
    /// The refused address.
    pub addr: IpAddr,
    /// Why it is not public: the special-purpose range it (or the IPv4 address it embeds) is in.
    pub class: NonPublic,
}

/// The kind of special-purpose range a non-public address is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// `0.0.0.0`, `::`.
    Unspecified,
    /// `0.0.0.0/8` ("this network").
    ThisNetwork,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918: `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`.
    Private,
    /// `100.64.0.0/10` (RFC 6598, carrier-grade NAT).
    CarrierGradeNat,
    /// A cloud provider's instance metadata or platform endpoint (`169.254.169.254` and
    /// friends): refused even when an allow-listed network contains it.
    CloudMetadata,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `192.0.0.0/24`, `2001::/23` (IETF protocol assignments).
    ProtocolAssignments,
    /// `192.0.2.0/24`, `198.51.100.0/24`, `203.0.113.0/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// `192.88.99.0/24` (deprecated 6to4 relay anycast).
    Relay6to4Anycast,
    /// `198.18.0.0/15`, `2001:2::/48`.
    Benchmarking,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `240.0.0.0/4`; IPv6 outside global unicast `2000::/3` (unallocated and special space).
    Reserved,
    /// `::/96` other than `::` and `::1` (IPv4-compatible, deprecated).
    Ipv4Compatible,
    /// `64:ff9b:1::/48` (local-use NAT64: its IPv4 address depends on a local prefix length).
    LocalUseNat64,
    /// `100::/64` (discard-only).
    Discard,
    /// `2001::/32` (Teredo: tunnels to an IPv4 address that cannot be vetted).
    Teredo,
    /// `2001:10::/28`, `2001:20::/28` (ORCHID).
    Orchid,
    /// `fc00::/7` (unique local).
    UniqueLocal,
    /// `fec0::/10` (site-local, deprecated).
    SiteLocal,
}

/// A special-purpose range: its class and how it is named in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// The kind of range.
    pub class: AddressClass,
    /// E.g. `loopback (127.0.0.0/8)`.
    pub name: &'static str,
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// An IPv6 form whose packets go to the IPv4 address it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Embedding {
    /// `::ffff:0:0/96`: a dual-stack socket dials the IPv4 address.
    Ipv4Mapped,
    /// `64:ff9b::/96`: the well-known NAT64 prefix (DNS64 on IPv6-only networks).
    Nat64,
    /// `2002::/16`: a 6to4 relay forwards to the IPv4 address in bits 16..48.
    SixToFour,
}

impl fmt::Display for Embedding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipv4Mapped => "IPv4-mapped (::ffff:0:0/96)",
            Self::Nat64 => "NAT64 (64:ff9b::/96)",
            Self::SixToFour => "6to4 (2002::/16)",
        })
    }
}

/// Why an address is not public.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonPublic {
    /// The address is in this range.
    In(Range),
    /// The address is an IPv6 form (IPv4-mapped, NAT64, 6to4) of an IPv4 address in `range`.
    Embedded {
        /// The IPv6 form.
        form: Embedding,
        /// The IPv4 address it leads to.
        v4: Ipv4Addr,
        /// The range of that IPv4 address.
        range: Range,
    },
}

impl NonPublic {
    /// The class of the address packets would go to (the embedded IPv4 address's for
    /// IPv4-mapped, NAT64 and 6to4 forms).
    pub fn class(&self) -> AddressClass {
        match self {
            Self::In(r) | Self::Embedded { range: r, .. } => r.class,
        }
    }

    /// The IPv6 form the address is, when it embeds an IPv4 address.
    pub fn embedding(&self) -> Option<Embedding> {
        match self {
            Self::In(_) => None,
            Self::Embedded { form, .. } => Some(*form),
        }
    }

    /// Whether an allow-list may let the address through: everything but cloud metadata.
    pub fn may_be_allow_listed(&self) -> bool {
        self.class() != AddressClass::CloudMetadata
    }

    /// The end of a refusal message: why the address is refused.
    pub fn verdict(&self) -> &'static str {
        if self.may_be_allow_listed() {
            "not public and not allow-listed"
        } else {
            "never contacted, even when allow-listed"
        }
    }
}

impl fmt::Display for NonPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::In(range) => write!(f, "{range}"),
            Self::Embedded { form, v4, range } => write!(f, "the {form} form of {v4}, {range}"),
        }
    }
}

/// Accepts `ip` when it is public, or allow-listed and not a cloud metadata address; the
/// client dials nothing else.
pub fn vet(ip: IpAddr, allow: &AllowList) -> Result<(), BlockedAddress> {
    match classify(ip) {
        Ok(()) => Ok(()),
        Err(class) if class.may_be_allow_listed() && allow.allows(ip) => Ok(()),
        Err(class) => Err(BlockedAddress { addr: ip, class }),
    }
}

/// Whether `ip` is a globally routable unicast address a webhook may go to.
pub fn is_public(ip: IpAddr) -> bool {
    classify(ip).is_ok()
}

/// `Ok` when `ip` is a globally routable unicast address a webhook may go to; otherwise the
/// special-purpose range that makes it not public. IPv4-mapped, NAT64 and 6to4 addresses are
/// judged by the IPv4 address they lead to.
pub fn classify(ip: IpAddr) -> Result<(), NonPublic> {
    match ip {
        IpAddr::V4(v4) => ranges::classify_v4(v4).map_or(Ok(()), |r| Err(NonPublic::In(r))),
        IpAddr::V6(v6) => ranges::classify_v6(v6),
    }
}
