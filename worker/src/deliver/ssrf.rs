//! The SSRF guard (DESIGN §4): which IP addresses a webhook may be sent to. Only globally
//! routable unicast is public; every special-purpose range is refused unless allow-listed
//! (tests, on-premises receivers), and cloud metadata endpoints are refused even then. A
//! refusal names the range ([`NonPublic`]: "loopback (127.0.0.0/8)", "the NAT64
//! (64:ff9b::/96) form of 10.0.0.1, private (RFC 1918, 10.0.0.0/8)", …). Pure decisions on
//! addresses: resolving and dialling belong to the [`client`](super::client), which must
//! [`vet`] every address before connecting to it; the control plane uses the same rules to
//! refuse literal addresses in URLs early.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

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
        IpAddr::V4(v4) => classify_v4(v4).map_or(Ok(()), |r| Err(NonPublic::In(r))),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

const fn range(class: AddressClass, name: &'static str) -> Range {
    Range { class, name }
}

/// Cloud instance metadata and platform endpoints. Checked before the ranges: some are inside
/// link-local, CGNAT or unique-local space, one is in public space.
const V4_METADATA: &[(u32, Range)] = &[
    (
        0xA9FE_A9FE,
        range(
            AddressClass::CloudMetadata,
            "cloud metadata (169.254.169.254)",
        ),
    ),
    (
        0xA9FE_AA02,
        range(
            AddressClass::CloudMetadata,
            "cloud metadata (ECS task metadata 169.254.170.2)",
        ),
    ),
    (
        0xA9FE_AA17,
        range(
            AddressClass::CloudMetadata,
            "cloud metadata (EKS Pod Identity 169.254.170.23)",
        ),
    ),
    (
        0x6464_64C8,
        range(
            AddressClass::CloudMetadata,
            "cloud metadata (Alibaba Cloud 100.100.100.200)",
        ),
    ),
    (
        0xA83F_8110,
        range(
            AddressClass::CloudMetadata,
            "cloud metadata (Azure WireServer 168.63.129.16)",
        ),
    ),
];

/// IPv4 ranges that are not public (IANA special-purpose registry and friends), most specific
/// first.
const V4_BLOCKED: &[(u32, u8, Range)] = &[
    (
        0x0000_0000,
        32,
        range(AddressClass::Unspecified, "unspecified (0.0.0.0)"),
    ),
    (
        0xFFFF_FFFF,
        32,
        range(AddressClass::Broadcast, "broadcast (255.255.255.255)"),
    ),
    (
        0x0000_0000,
        8,
        range(AddressClass::ThisNetwork, "\"this network\" (0.0.0.0/8)"),
    ),
    (
        0x0A00_0000,
        8,
        range(AddressClass::Private, "private (RFC 1918, 10.0.0.0/8)"),
    ),
    (
        0x6440_0000,
        10,
        range(
            AddressClass::CarrierGradeNat,
            "carrier-grade NAT (100.64.0.0/10)",
        ),
    ),
    (
        0x7F00_0000,
        8,
        range(AddressClass::Loopback, "loopback (127.0.0.0/8)"),
    ),
    (
        0xA9FE_0000,
        16,
        range(AddressClass::LinkLocal, "link-local (169.254.0.0/16)"),
    ),
    (
        0xAC10_0000,
        12,
        range(AddressClass::Private, "private (RFC 1918, 172.16.0.0/12)"),
    ),
    (
        0xC000_0000,
        24,
        range(
            AddressClass::ProtocolAssignments,
            "IETF protocol assignments (192.0.0.0/24)",
        ),
    ),
    (
        0xC000_0200,
        24,
        range(
            AddressClass::Documentation,
            "documentation (TEST-NET-1, 192.0.2.0/24)",
        ),
    ),
    (
        0xC058_6300,
        24,
        range(
            AddressClass::Relay6to4Anycast,
            "6to4 relay anycast (192.88.99.0/24, deprecated)",
        ),
    ),
    (
        0xC0A8_0000,
        16,
        range(AddressClass::Private, "private (RFC 1918, 192.168.0.0/16)"),
    ),
    (
        0xC612_0000,
        15,
        range(AddressClass::Benchmarking, "benchmarking (198.18.0.0/15)"),
    ),
    (
        0xC633_6400,
        24,
        range(
            AddressClass::Documentation,
            "documentation (TEST-NET-2, 198.51.100.0/24)",
        ),
    ),
    (
        0xCB00_7100,
        24,
        range(
            AddressClass::Documentation,
            "documentation (TEST-NET-3, 203.0.113.0/24)",
        ),
    ),
    (
        0xE000_0000,
        4,
        range(AddressClass::Multicast, "multicast (224.0.0.0/4)"),
    ),
    (
        0xF000_0000,
        4,
        range(AddressClass::Reserved, "reserved (240.0.0.0/4)"),
    ),
];

/// The range of a non-public IPv4 address; `None` when it is public.
fn classify_v4(ip: Ipv4Addr) -> Option<Range> {
    let bits = u32::from(ip);
    if let Some((_, r)) = V4_METADATA.iter().find(|(a, _)| *a == bits) {
        return Some(*r);
    }
    V4_BLOCKED
        .iter()
        .find(|&&(net, len, _)| bits >> (32 - len) == net >> (32 - len))
        .map(|(_, _, r)| *r)
}

/// IPv6 cloud metadata endpoints (inside unique-local space).
const V6_METADATA: &[(u128, Range)] = &[
    (
        0xfd00_0ec2_0000_0000_0000_0000_0000_0254,
        range(
            AddressClass::CloudMetadata,
            "cloud metadata (AWS fd00:ec2::254)",
        ),
    ),
    (
        0xfd00_0ec2_0000_0000_0000_0000_0000_0023,
        range(
            AddressClass::CloudMetadata,
            "cloud metadata (EKS Pod Identity fd00:ec2::23)",
        ),
    ),
];

/// IPv6 ranges that are not public, most specific first. Forms embedding an IPv4 address
/// (IPv4-mapped, NAT64, 6to4) are handled before these; anything outside global unicast
/// 2000::/3 that is not listed is [`AddressClass::Reserved`].
const V6_BLOCKED: &[(u128, u8, Range)] = &[
    (0, 128, range(AddressClass::Unspecified, "unspecified (::)")),
    (1, 128, range(AddressClass::Loopback, "loopback (::1)")),
    (
        0,
        96,
        range(
            AddressClass::Ipv4Compatible,
            "IPv4-compatible (::/96, deprecated)",
        ),
    ),
    (
        0x0064_ff9b_0001 << 80,
        48,
        range(
            AddressClass::LocalUseNat64,
            "local-use NAT64 (64:ff9b:1::/48)",
        ),
    ),
    (
        0x0100 << 112,
        64,
        range(AddressClass::Discard, "discard-only (100::/64)"),
    ),
    (
        0x2001_0000 << 96,
        32,
        range(AddressClass::Teredo, "Teredo (2001::/32)"),
    ),
    (
        0x2001_0002 << 96,
        48,
        range(AddressClass::Benchmarking, "benchmarking (2001:2::/48)"),
    ),
    (
        0x2001_0010 << 96,
        28,
        range(AddressClass::Orchid, "ORCHID (2001:10::/28, deprecated)"),
    ),
    (
        0x2001_0020 << 96,
        28,
        range(AddressClass::Orchid, "ORCHIDv2 (2001:20::/28)"),
    ),
    (
        0x2001_0db8 << 96,
        32,
        range(AddressClass::Documentation, "documentation (2001:db8::/32)"),
    ),
    // The rest of 2001::/23: no webhook receiver lives there.
    (
        0x2001_0000 << 96,
        23,
        range(
            AddressClass::ProtocolAssignments,
            "IETF protocol assignments (2001::/23)",
        ),
    ),
    (
        0x3fff << 112,
        20,
        range(AddressClass::Documentation, "documentation (3fff::/20)"),
    ),
    (
        0xfc00 << 112,
        7,
        range(AddressClass::UniqueLocal, "unique local (fc00::/7)"),
    ),
    (
        0xfe80 << 112,
        10,
        range(AddressClass::LinkLocal, "link-local (fe80::/10)"),
    ),
    (
        0xfec0 << 112,
        10,
        range(
            AddressClass::SiteLocal,
            "site-local (fec0::/10, deprecated)",
        ),
    ),
    (
        0xff00 << 112,
        8,
        range(AddressClass::Multicast, "multicast (ff00::/8)"),
    ),
];

const V6_OUTSIDE_GLOBAL: Range = range(
    AddressClass::Reserved,
    "reserved (outside global unicast 2000::/3)",
);

fn classify_v6(ip: Ipv6Addr) -> Result<(), NonPublic> {
    let bits = u128::from(ip);
    let in_net =
        |net: u128, len: u8| bits >> (128 - u32::from(len)) == net >> (128 - u32::from(len));

    // Forms that carry an IPv4 address the packets actually go to: judge that address.
    let embedded = if let Some(v4) = ip.to_ipv4_mapped() {
        Some((Embedding::Ipv4Mapped, v4))
    } else if in_net(0x0064_ff9b << 96, 96) {
        Some((Embedding::Nat64, Ipv4Addr::from(bits as u32)))
    } else if in_net(0x2002 << 112, 16) {
        Some((Embedding::SixToFour, Ipv4Addr::from((bits >> 80) as u32)))
    } else {
        None
    };
    if let Some((form, v4)) = embedded {
        return match classify_v4(v4) {
            None => Ok(()),
            Some(range) => Err(NonPublic::Embedded { form, v4, range }),
        };
    }
    if let Some((_, r)) = V6_METADATA.iter().find(|(a, _)| *a == bits) {
        return Err(NonPublic::In(*r));
    }
    if let Some((_, _, r)) = V6_BLOCKED.iter().find(|&&(net, len, _)| in_net(net, len)) {
        return Err(NonPublic::In(*r));
    }
    if !in_net(0x2000 << 112, 3) {
        return Err(NonPublic::In(V6_OUTSIDE_GLOBAL));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn public_addresses() {
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.215.14",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.255",
            "192.0.3.0",
            "192.88.98.255",
            "192.167.255.255",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "168.63.129.15",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "2001:200::1",      // just past 2001::/23
            "2002:808:808::1",  // 6to4 of 8.8.8.8
            "64:ff9b::808:808", // NAT64 of 8.8.8.8
            "::ffff:8.8.8.8",   // IPv4-mapped 8.8.8.8
            "3fff:1000::1",     // just past 3fff::/20
        ] {
            assert_eq!(classify(ip(addr)), Ok(()), "{addr}");
            assert!(is_public(ip(addr)), "{addr}");
            assert_eq!(vet(ip(addr), &AllowList::default()), Ok(()), "{addr}");
        }
    }

    /// One address (or more) per class, IPv4 and IPv6, with embedded-IPv4 forms of non-public
    /// addresses: each is refused with a reason naming its class.
    #[test]
    fn non_public_addresses_are_refused_with_their_class() {
        use AddressClass as C;
        use Embedding::{Ipv4Mapped, Nat64, SixToFour};
        // (address, class, IPv6 form embedding an IPv4 address, text the reason holds)
        let cases: &[(&str, AddressClass, Option<Embedding>, &str)] = &[
            ("0.0.0.0", C::Unspecified, None, "unspecified (0.0.0.0)"),
            ("::", C::Unspecified, None, "unspecified (::)"),
            (
                "0.1.2.3",
                C::ThisNetwork,
                None,
                "\"this network\" (0.0.0.0/8)",
            ),
            ("127.0.0.1", C::Loopback, None, "loopback (127.0.0.0/8)"),
            (
                "127.255.255.254",
                C::Loopback,
                None,
                "loopback (127.0.0.0/8)",
            ),
            ("::1", C::Loopback, None, "loopback (::1)"),
            (
                "10.0.0.1",
                C::Private,
                None,
                "private (RFC 1918, 10.0.0.0/8)",
            ),
            (
                "10.255.255.255",
                C::Private,
                None,
                "private (RFC 1918, 10.0.0.0/8)",
            ),
            (
                "172.16.0.1",
                C::Private,
                None,
                "private (RFC 1918, 172.16.0.0/12)",
            ),
            ("172.31.255.255", C::Private, None, "172.16.0.0/12"),
            (
                "192.168.1.1",
                C::Private,
                None,
                "private (RFC 1918, 192.168.0.0/16)",
            ),
            (
                "100.64.0.1",
                C::CarrierGradeNat,
                None,
                "carrier-grade NAT (100.64.0.0/10)",
            ),
            (
                "100.127.255.255",
                C::CarrierGradeNat,
                None,
                "carrier-grade NAT",
            ),
            (
                "169.254.169.254",
                C::CloudMetadata,
                None,
                "cloud metadata (169.254.169.254)",
            ),
            (
                "169.254.170.2",
                C::CloudMetadata,
                None,
                "cloud metadata (ECS",
            ),
            (
                "169.254.170.23",
                C::CloudMetadata,
                None,
                "cloud metadata (EKS",
            ),
            (
                "100.100.100.200",
                C::CloudMetadata,
                None,
                "cloud metadata (Alibaba",
            ),
            (
                "168.63.129.16",
                C::CloudMetadata,
                None,
                "cloud metadata (Azure",
            ),
            (
                "fd00:ec2::254",
                C::CloudMetadata,
                None,
                "cloud metadata (AWS fd00:ec2::254)",
            ),
            (
                "fd00:ec2::23",
                C::CloudMetadata,
                None,
                "cloud metadata (EKS",
            ),
            (
                "169.254.0.1",
                C::LinkLocal,
                None,
                "link-local (169.254.0.0/16)",
            ),
            ("fe80::1", C::LinkLocal, None, "link-local (fe80::/10)"),
            ("febf::1", C::LinkLocal, None, "link-local (fe80::/10)"),
            (
                "192.0.0.9",
                C::ProtocolAssignments,
                None,
                "IETF protocol assignments (192.0.0.0/24)",
            ),
            (
                "2001:1::1",
                C::ProtocolAssignments,
                None,
                "IETF protocol assignments (2001::/23)",
            ),
            (
                "192.0.2.1",
                C::Documentation,
                None,
                "documentation (TEST-NET-1, 192.0.2.0/24)",
            ),
            (
                "198.51.100.7",
                C::Documentation,
                None,
                "documentation (TEST-NET-2",
            ),
            (
                "203.0.113.9",
                C::Documentation,
                None,
                "documentation (TEST-NET-3",
            ),
            (
                "2001:db8::1",
                C::Documentation,
                None,
                "documentation (2001:db8::/32)",
            ),
            (
                "2001:db8:ffff::1",
                C::Documentation,
                None,
                "documentation (2001:db8::/32)",
            ),
            (
                "3fff::1",
                C::Documentation,
                None,
                "documentation (3fff::/20)",
            ),
            (
                "192.88.99.1",
                C::Relay6to4Anycast,
                None,
                "6to4 relay anycast (192.88.99.0/24",
            ),
            (
                "198.18.0.1",
                C::Benchmarking,
                None,
                "benchmarking (198.18.0.0/15)",
            ),
            (
                "198.19.255.255",
                C::Benchmarking,
                None,
                "benchmarking (198.18.0.0/15)",
            ),
            (
                "2001:2::1",
                C::Benchmarking,
                None,
                "benchmarking (2001:2::/48)",
            ),
            ("224.0.0.1", C::Multicast, None, "multicast (224.0.0.0/4)"),
            (
                "239.255.255.250",
                C::Multicast,
                None,
                "multicast (224.0.0.0/4)",
            ),
            ("ff02::1", C::Multicast, None, "multicast (ff00::/8)"),
            ("ff0e::1", C::Multicast, None, "multicast (ff00::/8)"),
            (
                "255.255.255.255",
                C::Broadcast,
                None,
                "broadcast (255.255.255.255)",
            ),
            ("240.0.0.1", C::Reserved, None, "reserved (240.0.0.0/4)"),
            (
                "255.255.255.254",
                C::Reserved,
                None,
                "reserved (240.0.0.0/4)",
            ),
            (
                "4000::1",
                C::Reserved,
                None,
                "reserved (outside global unicast 2000::/3)",
            ),
            (
                "::ffff:0:0:1",
                C::Reserved,
                None,
                "reserved (outside global unicast",
            ),
            (
                "::127.0.0.1",
                C::Ipv4Compatible,
                None,
                "IPv4-compatible (::/96, deprecated)",
            ),
            (
                "::8.8.8.8",
                C::Ipv4Compatible,
                None,
                "IPv4-compatible (::/96, deprecated)",
            ),
            (
                "64:ff9b:1::808:808",
                C::LocalUseNat64,
                None,
                "local-use NAT64 (64:ff9b:1::/48)",
            ),
            ("100::1", C::Discard, None, "discard-only (100::/64)"),
            ("2001::1", C::Teredo, None, "Teredo (2001::/32)"),
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                C::Teredo,
                None,
                "Teredo (2001::/32)",
            ),
            ("2001:10::1", C::Orchid, None, "ORCHID (2001:10::/28"),
            ("2001:20::1", C::Orchid, None, "ORCHIDv2 (2001:20::/28)"),
            ("fc00::1", C::UniqueLocal, None, "unique local (fc00::/7)"),
            (
                "fd12:3456:789a::1",
                C::UniqueLocal,
                None,
                "unique local (fc00::/7)",
            ),
            (
                "fec0::1",
                C::SiteLocal,
                None,
                "site-local (fec0::/10, deprecated)",
            ),
            // IPv4-mapped forms.
            (
                "::ffff:127.0.0.1",
                C::Loopback,
                Some(Ipv4Mapped),
                "the IPv4-mapped (::ffff:0:0/96) form of 127.0.0.1, loopback (127.0.0.0/8)",
            ),
            (
                "::ffff:10.0.0.1",
                C::Private,
                Some(Ipv4Mapped),
                "of 10.0.0.1, private (RFC 1918",
            ),
            (
                "::ffff:169.254.169.254",
                C::CloudMetadata,
                Some(Ipv4Mapped),
                "of 169.254.169.254, cloud metadata",
            ),
            (
                "::ffff:100.64.0.1",
                C::CarrierGradeNat,
                Some(Ipv4Mapped),
                "carrier-grade NAT",
            ),
            (
                "::ffff:0.0.0.0",
                C::Unspecified,
                Some(Ipv4Mapped),
                "unspecified (0.0.0.0)",
            ),
            (
                "::ffff:255.255.255.255",
                C::Broadcast,
                Some(Ipv4Mapped),
                "broadcast",
            ),
            // NAT64 forms.
            (
                "64:ff9b::7f00:1",
                C::Loopback,
                Some(Nat64),
                "the NAT64 (64:ff9b::/96) form of 127.0.0.1, loopback (127.0.0.0/8)",
            ),
            (
                "64:ff9b::a00:1",
                C::Private,
                Some(Nat64),
                "of 10.0.0.1, private",
            ),
            (
                "64:ff9b::a9fe:a9fe",
                C::CloudMetadata,
                Some(Nat64),
                "of 169.254.169.254, cloud",
            ),
            (
                "64:ff9b::c612:1",
                C::Benchmarking,
                Some(Nat64),
                "of 198.18.0.1, benchmarking",
            ),
            // 6to4 forms.
            (
                "2002:7f00:1::1",
                C::Loopback,
                Some(SixToFour),
                "the 6to4 (2002::/16) form of 127.0.0.1, loopback (127.0.0.0/8)",
            ),
            (
                "2002:a00:1::",
                C::Private,
                Some(SixToFour),
                "of 10.0.0.1, private",
            ),
            (
                "2002:c0a8:101::1",
                C::Private,
                Some(SixToFour),
                "of 192.168.1.1, private",
            ),
            (
                "2002:e000:1::1",
                C::Multicast,
                Some(SixToFour),
                "of 224.0.0.1, multicast",
            ),
            (
                "2002:c000:201::1",
                C::Documentation,
                Some(SixToFour),
                "of 192.0.2.1, documentation",
            ),
        ];
        let mut classes = std::collections::HashSet::new();
        for &(addr, class, embedding, reason) in cases {
            let refused = classify(ip(addr)).expect_err(addr);
            assert_eq!(
                (refused.class(), refused.embedding()),
                (class, embedding),
                "{addr}"
            );
            let text = refused.to_string();
            assert!(text.contains(reason), "{addr}: {text:?} lacks {reason:?}");
            assert!(!is_public(ip(addr)), "{addr}");
            let err = vet(ip(addr), &AllowList::default()).expect_err(addr);
            assert_eq!(err.class, refused, "{addr}");
            let shown = ip(addr);
            assert!(
                err.to_string().starts_with(&format!("address {shown} is ")),
                "{err}"
            );
            assert!(err.to_string().contains(&text), "{err}");
            classes.insert(class);
        }
        // Every class is covered by the table above.
        assert_eq!(classes.len(), 21, "{classes:?}");
    }

    #[test]
    fn allow_list_parsing() {
        let list =
            AllowList::parse(["127.0.0.0/8", " ::1/128 ", "10.1.2.3", "192.168.7.9/16"]).unwrap();
        assert_eq!(
            format!("{list:?}"),
            "[127.0.0.0/8, ::1/128, 10.1.2.3/32, 192.168.0.0/16]"
        );
        assert!(!list.is_empty());
        assert!(AllowList::default().is_empty());
        for bad in ["", "localhost", "10.0.0.0/33", "::1/129", "1.2.3.4/8/8"] {
            assert!(AllowList::parse([bad]).is_err(), "{bad:?}");
        }
        let too_many: Vec<String> = (0..=AllowList::MAX_ENTRIES)
            .map(|i| format!("10.0.{}.{}/32", i / 256, i % 256))
            .collect();
        assert!(AllowList::parse(&too_many).is_err());
    }

    #[test]
    fn allow_list_matching() {
        let list = AllowList::parse(["127.0.0.0/8", "::1/128", "10.1.0.0/16"]).unwrap();
        let cases: &[(&str, bool)] = &[
            ("127.0.0.1", true),
            ("127.1.2.3", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true), // mapped form matches the v4 entry
            ("10.1.200.3", true),
            ("::ffff:10.1.0.1", true),
            ("10.2.0.1", false),
            ("::2", false),
            ("169.254.169.254", false),
            ("64:ff9b::7f00:1", false), // only the mapped form is matched as IPv4
        ];
        for &(addr, allowed) in cases {
            assert_eq!(list.allows(ip(addr)), allowed, "{addr}");
        }
        assert!(!AllowList::default().allows(ip("127.0.0.1")));
    }

    #[test]
    fn vet_combines_public_and_allow_list() {
        let none = AllowList::default();
        let local = AllowList::parse(["127.0.0.0/8"]).unwrap();
        assert_eq!(vet(ip("8.8.8.8"), &none), Ok(()));
        assert_eq!(
            vet(ip("127.0.0.1"), &none),
            Err(BlockedAddress {
                addr: ip("127.0.0.1"),
                class: NonPublic::In(Range {
                    class: AddressClass::Loopback,
                    name: "loopback (127.0.0.0/8)"
                })
            })
        );
        assert_eq!(vet(ip("127.0.0.1"), &local), Ok(()));
        assert_eq!(vet(ip("::ffff:127.0.0.1"), &local), Ok(()));
        assert!(vet(ip("10.0.0.1"), &local).is_err());
        assert!(vet(ip("169.254.169.254"), &local).is_err());
        let err = vet(ip("10.0.0.1"), &none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "address 10.0.0.1 is private (RFC 1918, 10.0.0.0/8), not public and not allow-listed"
        );
    }

    #[test]
    fn cloud_metadata_is_refused_even_when_allow_listed() {
        let wide =
            AllowList::parse(["169.254.0.0/16", "100.64.0.0/10", "fd00::/8", "0.0.0.0/0"]).unwrap();
        assert_eq!(vet(ip("169.254.1.1"), &wide), Ok(()));
        assert_eq!(vet(ip("100.64.0.1"), &wide), Ok(()));
        assert_eq!(vet(ip("fd00::1"), &wide), Ok(()));
        for addr in [
            "169.254.169.254",
            "169.254.170.2",
            "100.100.100.200",
            "168.63.129.16",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            let err = vet(ip(addr), &wide).expect_err(addr);
            assert_eq!(err.class.class(), AddressClass::CloudMetadata, "{addr}");
            assert!(
                err.to_string()
                    .ends_with("never contacted, even when allow-listed"),
                "{err}"
            );
        }
    }
}
