//! Which addresses an image URL may reach: only globally reachable ones.
//!
//! The IANA IPv4 and IPv6 Special-Purpose Address Registries list every range that is
//! not (or not always) reachable across the internet. `ip_network`'s `is_global`
//! classifies most of them; the ranges it leaves out are listed below, each with its
//! registry entry. An IPv6 address that carries an IPv4 one (IPv4-mapped, the NAT64
//! well-known prefix) is judged by the IPv4 address it leads to, so `::ffff:127.0.0.1`
//! and `64:ff9b::7f00:1` are loopback; forms whose reach IANA gives as "N/A" (6to4,
//! Teredo) are refused whole.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ip_network::{Ipv4Network, Ipv6Network};

/// IPv4 ranges of IANA's registry that `ip_network::Ipv4Network::is_global` passes but
/// whose reach is not global ("N/A"), with their entry's name.
const IPV4_NOT_GLOBAL: &[(Ipv4Addr, u8, &str)] = &[(Ipv4Addr::new(192, 88, 99, 0), 24, "6to4 relay anycast (deprecated, RFC 7526)")];

/// IPv6 ranges of IANA's registry that `ip_network::Ipv6Network::is_global` passes but
/// that are not globally reachable (or whose reach is "N/A"), with their entry's name.
const IPV6_NOT_GLOBAL: &[(Ipv6Addr, u8, &str)] = &[
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96, "IPv4-compatible (deprecated)"),
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48, "IPv4-IPv6 translation, local use (RFC 8215)"),
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, "discard-only (RFC 6666)"),
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23, "IETF protocol assignments (RFC 2928), Teredo among them"),
    (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16, "6to4 (RFC 3056)"),
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20, "documentation (RFC 9637)"),
    (Ipv6Addr::new(0x5f00, 0, 0, 0, 0, 0, 0, 0), 16, "segment routing SIDs (RFC 9602)"),
];

/// The NAT64 well-known prefix (RFC 6052): its last 32 bits are an IPv4 address.
const NAT64: (Ipv6Addr, u8) = (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);

/// True for an address reachable across the internet: none of the special-purpose
/// ranges (loopback, private, shared, link-local, documentation, benchmarking,
/// reserved, unique-local, discard, translation, ...) nor multicast or broadcast, and,
/// for an IPv6 address that embeds an IPv4 one, that IPv4 address too.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    // Multicast is not in the special-purpose registry, and reaches no single server.
    let outside = |(net, len, _): &(Ipv4Addr, u8, &str)| (u32::from(ip) ^ u32::from(*net)) >> (32 - u32::from(*len)) != 0;
    Ipv4Network::from(ip).is_global() && !ip.is_multicast() && IPV4_NOT_GLOBAL.iter().all(outside)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    if in_range(ip, NAT64.0, NAT64.1) {
        let [.., a, b] = ip.segments();
        return is_public_v4(Ipv4Addr::from((u32::from(a) << 16) | u32::from(b)));
    }
    Ipv6Network::from(ip).is_global() && !IPV6_NOT_GLOBAL.iter().any(|(net, len, _)| in_range(ip, *net, *len))
}

fn in_range(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address in every range of IANA's special-purpose registries that is not
    /// globally reachable (as of 2026), and the embedded forms; no traffic is sent.
    #[test]
    fn every_special_purpose_range_is_refused() {
        let refused = [
            // IPv4 registry.
            ("0.1.2.3", "this network"),
            ("10.1.2.3", "private"),
            ("100.64.0.1", "shared address space"),
            ("127.0.0.1", "loopback"),
            ("169.254.169.254", "link local (cloud metadata)"),
            ("172.16.0.1", "private"),
            ("192.0.0.8", "IETF protocol assignments"),
            ("192.0.0.170", "NAT64/DNS64 discovery"),
            ("192.0.2.10", "documentation (TEST-NET-1)"),
            ("192.88.99.1", "6to4 relay anycast (deprecated)"),
            ("192.168.1.1", "private"),
            ("198.18.0.1", "benchmarking"),
            ("198.51.100.7", "documentation (TEST-NET-2)"),
            ("203.0.113.9", "documentation (TEST-NET-3)"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "limited broadcast"),
            ("224.0.0.1", "multicast"),
            // IPv6 registry.
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
            ("::ffff:169.254.169.254", "IPv4-mapped link local"),
            ("::127.0.0.1", "IPv4-compatible"),
            ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1"),
            ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254"),
            ("64:ff9b:1::1", "local-use translation"),
            ("100::1", "discard-only"),
            ("2001::1", "Teredo"),
            ("2001:2::1", "benchmarking"),
            ("2001:db8::1", "documentation"),
            ("2002:7f00:1::1", "6to4 of 127.0.0.1"),
            ("2002:808:808::1", "6to4, any"),
            ("3fff::1", "documentation"),
            ("5f00::1", "segment routing"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fe80::1", "link local"),
            ("fec0::1", "site local (deprecated)"),
            ("ff02::1", "multicast"),
        ];
        for (address, range) in refused {
            let ip: IpAddr = address.parse().unwrap();
            assert!(!is_public(ip), "{address} ({range}) is refused");
        }
        // AS112 (192.31.196/24) and 192.0.0.9 are special-purpose but globally reachable.
        for public in ["192.31.196.1", "93.184.216.34", "8.8.8.8", "100.128.0.1", "172.32.0.1", "192.0.0.9", "2606:2800:220:1::1", "::ffff:8.8.8.8", "64:ff9b::808:808"] {
            assert!(is_public(public.parse().unwrap()), "{public} is public");
        }
    }
}
