//! The special-purpose address registry the guard reads its verdicts from: cloud metadata
//! endpoints, then the IPv4 and IPv6 ranges that are not public (IANA special-purpose
//! registries and friends), most specific first. Tables and lookups only; what a verdict
//! means is [`classify`](super::classify)'s.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::{AddressClass, Embedding, NonPublic, Range};

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
pub(super) fn classify_v4(ip: Ipv4Addr) -> Option<Range> {
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

/// `Ok` when `ip` is public; IPv4-mapped, NAT64 and 6to4 forms are judged by the IPv4 address
/// they carry.
pub(super) fn classify_v6(ip: Ipv6Addr) -> Result<(), NonPublic> {
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
