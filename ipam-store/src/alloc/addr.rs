//! Address math: families, integer forms and the textual range forms pools accept.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, in canonical order.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// 0 for IPv4, 1 for IPv6: an index into per-family arrays.
    pub fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The integer form of an address within its family.
pub fn to_u128(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(*a) as u128,
        IpAddr::V6(a) => u128::from(*a),
    }
}

/// The address of integer `v` in `family`. IPv4 values are truncated to 32 bits; callers only
/// pass values that came from ranges of that family.
pub fn from_u128(family: Family, v: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// An inclusive address range of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrRange {
    /// The family of both ends.
    pub family: Family,
    /// First address, integer form.
    pub start: u128,
    /// Last address, integer form (inclusive).
    pub end: u128,
}

impl AddrRange {
    /// A single address.
    pub fn single(ip: IpAddr) -> Self {
        let v = to_u128(&ip);
        AddrRange {
            family: Family::of(&ip),
            start: v,
            end: v,
        }
    }

    /// True when the two ranges share an address.
    pub fn overlaps(&self, other: &AddrRange) -> bool {
        self.family == other.family && self.start <= other.end && other.start <= self.end
    }

    /// True when `ip` lies inside.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        Family::of(ip) == self.family && (self.start..=self.end).contains(&to_u128(ip))
    }

    /// Number of addresses.
    pub fn len(&self) -> u128 {
        self.end - self.start + 1
    }

    /// Never empty (start <= end holds by construction); present for clippy's len rule.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", from_u128(self.family, self.start))
        } else {
            write!(
                f,
                "{}-{}",
                from_u128(self.family, self.start),
                from_u128(self.family, self.end)
            )
        }
    }
}

/// Why a range string was refused. The caller prefixes the field name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not an address, CIDR or `a-b` range.
    #[error("{0:?} is not an address, a CIDR (10.0.0.0/24) or a range (10.0.0.10-10.0.0.20)")]
    Syntax(String),
    /// CIDR with bits set past the prefix length.
    #[error("{given:?} has host bits set; did you mean {suggest}?")]
    HostBits {
        /// What was given.
        given: String,
        /// The network it probably meant.
        suggest: IpNet,
    },
    /// `a-b` where the two ends are of different families.
    #[error("{0:?} mixes IPv4 and IPv6")]
    MixedFamilies(String),
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`): another spelling of an IPv4 address,
    /// which would let one address have two keys.
    #[error("{0:?} is or contains an IPv4-mapped IPv6 address (::ffff:0:0/96); use the IPv4 form")]
    V4Mapped(String),
    /// `a-b` where a > b.
    #[error("{given:?}: start {start} is greater than end {end}")]
    StartAfterEnd {
        /// What was given.
        given: String,
        /// First address.
        start: IpAddr,
        /// Last address.
        end: IpAddr,
    },
}

/// IPv4-mapped IPv6 space, `::ffff:0:0/96`.
const V4_MAPPED: AddrRange = AddrRange {
    family: Family::V6,
    start: 0xffff_0000_0000,
    end: 0xffff_ffff_ffff,
};

/// Refuses ranges that touch IPv4-mapped IPv6 space.
fn check_not_mapped(r: AddrRange, given: &str) -> Result<AddrRange, RangeError> {
    if r.overlaps(&V4_MAPPED) {
        return Err(RangeError::V4Mapped(given.to_string()));
    }
    Ok(r)
}

/// Parses one address; IPv4-mapped IPv6 addresses are refused.
pub fn parse_ip(s: &str) -> Result<IpAddr, RangeError> {
    let ip: IpAddr = s.trim().parse().map_err(|_| RangeError::Syntax(s.to_string()))?;
    check_not_mapped(AddrRange::single(ip), s)?;
    Ok(ip)
}

/// Parses a CIDR and refuses host bits and IPv4-mapped IPv6 space.
pub fn parse_cidr(s: &str) -> Result<IpNet, RangeError> {
    let net: IpNet = s.trim().parse().map_err(|_| RangeError::Syntax(s.to_string()))?;
    if net.trunc() != net {
        return Err(RangeError::HostBits {
            given: s.to_string(),
            suggest: net.trunc(),
        });
    }
    check_not_mapped(net_range(&net), s)?;
    Ok(net)
}

/// What special address a range contains that no pool may hand out: the unspecified
/// address, multicast space, or the IPv4 limited broadcast.
pub fn special(r: &AddrRange) -> Option<&'static str> {
    let of = |family, start, end| AddrRange { family, start, end };
    [
        (of(Family::V4, 0, 0), "the unspecified address 0.0.0.0"),
        (
            of(Family::V4, 0xe000_0000, 0xefff_ffff),
            "multicast space 224.0.0.0/4",
        ),
        (
            of(Family::V4, 0xffff_ffff, 0xffff_ffff),
            "the limited broadcast 255.255.255.255",
        ),
        (of(Family::V6, 0, 0), "the unspecified address ::"),
        (of(Family::V6, 0xff << 120, u128::MAX), "multicast space ff00::/8"),
    ]
    .into_iter()
    .find(|(s, _)| s.overlaps(r))
    .map(|(_, what)| what)
}

/// Parses `addr`, `cidr` or `start-end`. For IPv4 CIDRs of /30 or shorter, the network and
/// broadcast addresses are left out when `skip_net_bcast` is set (pool ranges), since
/// handing them out breaks clients.
pub fn parse_range(s: &str, skip_net_bcast: bool) -> Result<AddrRange, RangeError> {
    let t = s.trim();
    if let Some((a, b)) = t.split_once('-') {
        let a: IpAddr = a.trim().parse().map_err(|_| RangeError::Syntax(s.to_string()))?;
        let b: IpAddr = b.trim().parse().map_err(|_| RangeError::Syntax(s.to_string()))?;
        if Family::of(&a) != Family::of(&b) {
            return Err(RangeError::MixedFamilies(s.to_string()));
        }
        if to_u128(&a) > to_u128(&b) {
            return Err(RangeError::StartAfterEnd {
                given: s.to_string(),
                start: a,
                end: b,
            });
        }
        return check_not_mapped(
            AddrRange {
                family: Family::of(&a),
                start: to_u128(&a),
                end: to_u128(&b),
            },
            s,
        );
    }
    if t.contains('/') {
        let net = parse_cidr(t)?;
        let family = Family::of(&net.addr());
        let mut start = to_u128(&net.network());
        let mut end = to_u128(&net.broadcast());
        if skip_net_bcast && family == Family::V4 && net.prefix_len() <= 30 {
            start += 1;
            end -= 1;
        }
        // The Subnet-Router anycast address (RFC 4291 §2.6.1) is not a host address either.
        if skip_net_bcast && family == Family::V6 && net.prefix_len() <= 126 {
            start += 1;
        }
        return Ok(AddrRange { family, start, end });
    }
    Ok(AddrRange::single(parse_ip(t)?))
}

/// The CIDR's span as a range (all addresses).
pub fn net_range(net: &IpNet) -> AddrRange {
    AddrRange {
        family: Family::of(&net.addr()),
        start: to_u128(&net.network()),
        end: to_u128(&net.broadcast()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let r = parse_range("10.0.0.0/30", true).unwrap();
        assert_eq!(r.to_string(), "10.0.0.1-10.0.0.2");
        let r = parse_range("10.0.0.0/31", true).unwrap();
        assert_eq!(r.len(), 2);
        let r = parse_range("10.0.0.5 - 10.0.0.9", true).unwrap();
        assert_eq!(r.len(), 5);
        let r = parse_range("fd00::/64", true).unwrap();
        assert_eq!(
            r.len(),
            (1u128 << 64) - 1,
            "the subnet-router anycast address is left out"
        );
        assert_eq!(r.to_string(), "fd00::1-fd00::ffff:ffff:ffff:ffff");
        assert_eq!(parse_range("10.0.0.7", true).unwrap().len(), 1);
    }

    #[test]
    fn refuses_bad_forms() {
        assert!(matches!(
            parse_range("10.0.0.9-10.0.0.1", true),
            Err(RangeError::StartAfterEnd { .. })
        ));
        assert!(matches!(
            parse_range("10.0.0.1-fd00::1", true),
            Err(RangeError::MixedFamilies(_))
        ));
        assert!(matches!(
            parse_range("10.0.0.1/24", true),
            Err(RangeError::HostBits { .. })
        ));
        assert!(matches!(
            parse_range("10.0.0.300", true),
            Err(RangeError::Syntax(_))
        ));
        assert!(matches!(parse_range("", true), Err(RangeError::Syntax(_))));
        let e = parse_range("10.0.0.1/24", true).unwrap_err().to_string();
        assert!(e.contains("10.0.0.0/24"), "{e}");
    }
}
