//! The guard's verdicts, one table row per special-purpose range, and the allow-list.

use std::net::IpAddr;

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
