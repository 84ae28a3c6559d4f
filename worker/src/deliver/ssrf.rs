//! The SSRF guard (DESIGN §4): which IP addresses a webhook may be sent to. Only globally
//! routable unicast is public; every special-purpose range is refused unless allow-listed
//! (tests, on-premises receivers). Pure decisions on addresses: resolving and dialling belong
//! to the [`client`](super::client), which must [`vet`] every address before connecting to it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

/// An address the guard refused: not public and not allow-listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("address {addr} is not public and not allow-listed")]
pub struct BlockedAddress {
    /// The refused address.
    pub addr: IpAddr,
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

/// Accepts `ip` when it is allow-listed or public; the client dials nothing else.
pub fn vet(ip: IpAddr, allow: &AllowList) -> Result<(), BlockedAddress> {
    if allow.allows(ip) || is_public(ip) {
        Ok(())
    } else {
        Err(BlockedAddress { addr: ip })
    }
}

/// Whether `ip` is a globally routable unicast address a webhook may go to.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

/// IPv4 ranges that are not public (IANA special-purpose registry and friends).
const V4_BLOCKED: &[(u32, u8)] = &[
    (0x0000_0000, 8),  // 0.0.0.0/8 "this network", incl. unspecified
    (0x0A00_0000, 8),  // 10.0.0.0/8 private
    (0x6440_0000, 10), // 100.64.0.0/10 CGNAT
    (0x7F00_0000, 8),  // 127.0.0.0/8 loopback
    (0xA9FE_0000, 16), // 169.254.0.0/16 link-local, incl. cloud metadata 169.254.169.254
    (0xAC10_0000, 12), // 172.16.0.0/12 private
    (0xC000_0000, 24), // 192.0.0.0/24 IETF protocol assignments
    (0xC000_0200, 24), // 192.0.2.0/24 TEST-NET-1
    (0xC058_6300, 24), // 192.88.99.0/24 deprecated 6to4 relay anycast
    (0xC0A8_0000, 16), // 192.168.0.0/16 private
    (0xC612_0000, 15), // 198.18.0.0/15 benchmarking
    (0xC633_6400, 24), // 198.51.100.0/24 TEST-NET-2
    (0xCB00_7100, 24), // 203.0.113.0/24 TEST-NET-3
    (0xE000_0000, 4),  // 224.0.0.0/4 multicast
    (0xF000_0000, 4),  // 240.0.0.0/4 reserved, incl. broadcast 255.255.255.255
];

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let bits = u32::from(ip);
    !V4_BLOCKED
        .iter()
        .any(|&(net, len)| bits >> (32 - len) == net >> (32 - len))
}

/// IPv6 ranges inside global unicast 2000::/3 that are not public anyway.
const V6_BLOCKED_IN_GLOBAL: &[(u128, u8)] = &[
    // 2001::/23 IETF protocol assignments: Teredo 2001::/32, benchmarking 2001:2::/48,
    // ORCHID 2001:10::/28, ORCHIDv2 2001:20::/28, … No webhook receiver lives there, and
    // Teredo tunnels to an IPv4 address we could not vet.
    (0x2001_0000 << 96, 23),
    (0x2001_0db8 << 96, 32), // 2001:db8::/32 documentation
    (0x3fff << 112, 20),     // 3fff::/20 documentation (RFC 9637)
];

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let bits = u128::from(ip);
    let in_net =
        |net: u128, len: u8| bits >> (128 - u32::from(len)) == net >> (128 - u32::from(len));

    // Forms that carry an IPv4 address the packets actually go to: judge that address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        // ::ffff:0:0/96 — a dual-stack socket dials the embedded IPv4 address.
        return is_public_v4(v4);
    }
    if in_net(0x0064_ff9b << 96, 96) {
        // 64:ff9b::/96 well-known NAT64 prefix (DNS64 on IPv6-only networks).
        return is_public_v4(Ipv4Addr::from(bits as u32));
    }
    if in_net(0x2002 << 112, 16) {
        // 2002::/16 6to4: the relay forwards to the IPv4 address in bits 16..48.
        return is_public_v4(Ipv4Addr::from((bits >> 80) as u32));
    }
    // Everything else outside 2000::/3 is not global unicast: unspecified ::, loopback ::1,
    // IPv4-compatible ::/96, discard 100::/64, local-use NAT64 64:ff9b:1::/48 (its embedded
    // address depends on a local prefix length), unique-local fc00::/7, link-local fe80::/10,
    // site-local fec0::/10, multicast ff00::/8 and unallocated space.
    if !in_net(0x2000 << 112, 3) {
        return false;
    }
    !V6_BLOCKED_IN_GLOBAL
        .iter()
        .any(|&(net, len)| in_net(net, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn public_and_non_public_addresses() {
        let cases: &[(&str, bool)] = &[
            // IPv4 public
            ("8.8.8.8", true),
            ("1.1.1.1", true),
            ("93.184.215.14", true),
            ("100.63.255.255", true),
            ("100.128.0.0", true),
            ("172.15.255.255", true),
            ("172.32.0.0", true),
            ("192.0.1.255", true),
            ("192.0.3.0", true),
            ("198.17.255.255", true),
            ("198.20.0.0", true),
            ("223.255.255.255", true),
            // IPv4 non-public
            ("0.0.0.0", false),
            ("0.1.2.3", false),
            ("10.0.0.1", false),
            ("10.255.255.255", false),
            ("100.64.0.1", false),
            ("100.127.255.255", false),
            ("127.0.0.1", false),
            ("127.255.255.254", false),
            ("169.254.169.254", false),
            ("169.254.0.1", false),
            ("172.16.0.1", false),
            ("172.31.255.255", false),
            ("192.0.0.9", false),
            ("192.0.2.1", false),
            ("192.88.99.1", false),
            ("192.168.1.1", false),
            ("198.18.0.1", false),
            ("198.19.255.255", false),
            ("198.51.100.7", false),
            ("203.0.113.9", false),
            ("224.0.0.1", false),
            ("239.255.255.250", false),
            ("240.0.0.1", false),
            ("255.255.255.255", false),
            // IPv6 public
            ("2606:4700:4700::1111", true),
            ("2a00:1450:4001:80b::200e", true),
            ("2001:200::1", true),      // just past 2001::/23
            ("2002:808:808::1", true),  // 6to4 of 8.8.8.8
            ("64:ff9b::808:808", true), // NAT64 of 8.8.8.8
            ("::ffff:8.8.8.8", true),   // IPv4-mapped 8.8.8.8
            // IPv6 non-public
            ("::", false),
            ("::1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:10.0.0.1", false),
            ("::ffff:169.254.169.254", false),
            ("::127.0.0.1", false),        // IPv4-compatible
            ("::8.8.8.8", false),          // IPv4-compatible, deprecated and unroutable
            ("64:ff9b::7f00:1", false),    // NAT64 of 127.0.0.1
            ("64:ff9b::a9fe:a9fe", false), // NAT64 of 169.254.169.254
            ("64:ff9b:1::808:808", false), // local-use NAT64
            ("2002:7f00:1::1", false),     // 6to4 of 127.0.0.1
            ("2002:a00:1::", false),       // 6to4 of 10.0.0.1
            ("2002:c0a8:101::1", false),   // 6to4 of 192.168.1.1
            ("2001::1", false),            // Teredo
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", false),
            ("2001:2::1", false),  // benchmarking
            ("2001:10::1", false), // ORCHID
            ("2001:20::1", false), // ORCHIDv2
            ("2001:db8::1", false),
            ("2001:db8:ffff::1", false),
            ("3fff::1", false),
            ("100::1", false), // discard
            ("fc00::1", false),
            ("fd12:3456:789a::1", false),
            ("fe80::1", false),
            ("febf::1", false),
            ("fec0::1", false),
            ("ff02::1", false),
            ("ff0e::1", false),
            ("4000::1", false), // unallocated
            ("::ffff:0:0:1", false),
        ];
        for &(addr, public) in cases {
            assert_eq!(is_public(ip(addr)), public, "{addr}");
        }
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
                addr: ip("127.0.0.1")
            })
        );
        assert_eq!(vet(ip("127.0.0.1"), &local), Ok(()));
        assert_eq!(vet(ip("::ffff:127.0.0.1"), &local), Ok(()));
        assert!(vet(ip("10.0.0.1"), &local).is_err());
        assert!(vet(ip("169.254.169.254"), &local).is_err());
        let err = vet(ip("10.0.0.1"), &none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "address 10.0.0.1 is not public and not allow-listed"
        );
    }
}
