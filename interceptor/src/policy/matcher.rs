//! The value matchers an AuthorizationPolicy compiles to: Istio string patterns, IP blocks and
//! a zero-copy view of a peer's principal.
//!
//! Matching runs once per connection, so nothing here allocates: principals are compared
//! segment by segment instead of being formatted into a string first.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An Istio string pattern: exact, `prefix*`, `*suffix`, or `*` alone.
///
/// Istio allows the wildcard only at one end, so anything else is rejected when parsing rather
/// than silently treated as a literal `*` the user did not mean.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StrMatch {
    /// `*`: any value, but a value must be present (a plaintext peer has no principal).
    Any,
    /// The whole value.
    Exact(Box<str>),
    /// `abc*`: values starting with `abc`.
    Prefix(Box<str>),
    /// `*abc`: values ending with `abc`.
    Suffix(Box<str>),
}

/// Why a pattern is not a valid Istio string match.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is the empty string, which Istio rejects.
    #[error("value is empty")]
    Empty,
    /// A `*` somewhere other than the very start or end.
    #[error(
        "`{0}` has a `*` in the middle or more than one; Istio allows one leading or trailing `*`"
    )]
    Wildcard(String),
}

/// An IPv4 or IPv6 CIDR block, or a single address.
///
/// IPv4-mapped IPv6 addresses (as the kernel reports for dual-stack sockets) match the IPv4
/// block they map to, so a policy written with `10.0.0.0/8` also covers `::ffff:10.1.2.3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpBlock {
    network: IpAddr,
    prefix: u8,
}

/// Why a string is not an IP block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IP address or CIDR block such as 10.0.0.0/16")]
pub struct IpBlockError(pub String);

/// A SPIFFE principal (`<trust domain>/ns/<namespace>/sa/<account>`) viewed as its parts.
///
/// Istio writes principals without the `spiffe://` scheme; comparing the parts in place avoids
/// formatting that string for every connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Principal<'a> {
    parts: [&'a str; 5],
}

// === impl StrMatch ===

impl StrMatch {
    /// Whether `value` matches; `None` (no value, such as a plaintext peer's principal) never
    /// matches, not even `*`.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(value) = value else { return false };
        match self {
            Self::Any => true,
            Self::Exact(s) => value == &**s,
            Self::Prefix(s) => value.starts_with(&**s),
            Self::Suffix(s) => value.ends_with(&**s),
        }
    }

    /// Whether the principal matches this pattern, compared without formatting it.
    pub(crate) fn matches_principal(&self, principal: &Principal<'_>) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(s) => principal.len() == s.len() && principal.bytes().eq(s.bytes()),
            Self::Prefix(s) => {
                principal.len() >= s.len() && principal.bytes().zip(s.bytes()).all(|(a, b)| a == b)
            }
            Self::Suffix(s) => {
                principal.len() >= s.len()
                    && principal
                        .bytes_rev()
                        .zip(s.bytes().rev())
                        .all(|(a, b)| a == b)
            }
        }
    }

    /// Rewrites an exact or prefix pattern written for trust domain `from` to trust domain `to`.
    ///
    /// Trust-domain aliases are folded into the local domain on both sides (patterns here, peer
    /// identities at evaluation), so one comparison covers every alias.
    pub(crate) fn with_trust_domain(&self, from: &str, to: &str) -> Option<Self> {
        let rewrite = |s: &str| {
            let rest = s.strip_prefix(from)?;
            rest.starts_with('/')
                .then(|| format!("{to}{rest}").into_boxed_str())
        };
        match self {
            Self::Exact(s) => rewrite(s).map(Self::Exact),
            Self::Prefix(s) => rewrite(s).map(Self::Prefix),
            Self::Any | Self::Suffix(_) => None,
        }
    }

    /// The pattern text without wildcards, for checks such as "does it start with spiffe://".
    pub(crate) fn literal(&self) -> &str {
        match self {
            Self::Any => "",
            Self::Exact(s) | Self::Prefix(s) | Self::Suffix(s) => s,
        }
    }
}

impl FromStr for StrMatch {
    type Err = PatternError;

    fn from_str(pattern: &str) -> Result<Self, Self::Err> {
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        if pattern == "*" {
            return Ok(Self::Any);
        }
        let stars = pattern.matches('*').count();
        let parsed = if let Some(suffix) = pattern.strip_prefix('*') {
            Self::Suffix(suffix.into())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            Self::Prefix(prefix.into())
        } else {
            Self::Exact(pattern.into())
        };
        let allowed = usize::from(!matches!(parsed, Self::Exact(_)));
        if stars > allowed {
            return Err(PatternError::Wildcard(pattern.to_owned()));
        }
        Ok(parsed)
    }
}

impl fmt::Display for StrMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(s) => f.write_str(s),
            Self::Prefix(s) => write!(f, "{s}*"),
            Self::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

// === impl IpBlock ===

impl IpBlock {
    /// Whether `ip` lies in this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask_v4(ip, self.prefix) == net,
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask_v6(ip, self.prefix) == net,
            _ => false,
        }
    }
}

impl FromStr for IpBlock {
    type Err = IpBlockError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IpBlockError(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().map_err(|_| err())?)),
            None => (s, None),
        };
        let addr = addr.parse::<IpAddr>().map_err(|_| err())?.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(err());
        }
        // Envoy masks host bits (`10.1.2.3/16` means `10.1.0.0/16`), and so do we.
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4(mask_v4(a, prefix)),
            IpAddr::V6(a) => IpAddr::V6(mask_v6(a, prefix)),
        };
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

// === impl Principal ===

impl<'a> Principal<'a> {
    pub(crate) fn new(trust_domain: &'a str, namespace: &'a str, service_account: &'a str) -> Self {
        Self {
            parts: [trust_domain, "/ns/", namespace, "/sa/", service_account],
        }
    }

    fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.parts.iter().flat_map(|p| p.bytes())
    }

    fn bytes_rev(&self) -> impl Iterator<Item = u8> + '_ {
        self.parts.iter().rev().flat_map(|p| p.bytes().rev())
    }
}

impl fmt::Display for Principal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.parts.iter().try_for_each(|p| f.write_str(p))
    }
}

// === helpers ===

fn mask_v4(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

fn mask_v6(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    Ipv6Addr::from(u128::from(ip) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> StrMatch {
        s.parse().unwrap()
    }

    #[test]
    fn patterns_parse_istio_wildcards() {
        assert_eq!(pattern("*"), StrMatch::Any);
        assert_eq!(
            pattern("a/ns/b/sa/c"),
            StrMatch::Exact("a/ns/b/sa/c".into())
        );
        assert_eq!(pattern("a/ns/b/*"), StrMatch::Prefix("a/ns/b/".into()));
        assert_eq!(pattern("*/sa/c"), StrMatch::Suffix("/sa/c".into()));
        assert_eq!("".parse::<StrMatch>(), Err(PatternError::Empty));
        assert!(matches!(
            "a*b".parse::<StrMatch>(),
            Err(PatternError::Wildcard(_))
        ));
        assert!(matches!(
            "*a*".parse::<StrMatch>(),
            Err(PatternError::Wildcard(_))
        ));
    }

    #[test]
    fn principal_matching_agrees_with_string_matching() {
        let principal = Principal::new("cluster.local", "full", "sleep");
        let text = principal.to_string();
        for p in [
            "*",
            "cluster.local/ns/full/sa/sleep",
            "cluster.local/ns/full/sa/slee",
            "cluster.local/ns/full/sa/sleepy",
            "cluster.local/ns/full/*",
            "cluster.local/ns/fu*",
            "other/ns/full/*",
            "*/ns/full/sa/sleep",
            "*/sa/sleep",
            "*sleep",
            "*/sa/other",
            "*xcluster.local/ns/full/sa/sleep",
        ] {
            let m = pattern(p);
            assert_eq!(
                m.matches_principal(&principal),
                m.matches(Some(&text)),
                "pattern {p}"
            );
        }
        assert!(pattern("cluster.local/ns/full/*").matches_principal(&principal));
        assert!(!pattern("cluster.local/ns/legacy/*").matches_principal(&principal));
    }

    #[test]
    fn absent_values_match_nothing() {
        assert!(!StrMatch::Any.matches(None));
        assert!(!pattern("x").matches(None));
    }

    #[test]
    fn trust_domain_rewrite_touches_only_the_leading_domain() {
        let m = pattern("old.td/ns/a/*");
        assert_eq!(
            m.with_trust_domain("old.td", "new.td"),
            Some(StrMatch::Prefix("new.td/ns/a/".into()))
        );
        assert_eq!(
            pattern("old.tdx/ns/a/sa/b").with_trust_domain("old.td", "new"),
            None
        );
        assert_eq!(pattern("*/sa/b").with_trust_domain("old.td", "new"), None);
    }

    #[test]
    fn ip_blocks_mask_and_match() {
        let block: IpBlock = "10.88.1.3/16".parse().unwrap();
        assert_eq!(block.to_string(), "10.88.0.0/16");
        assert!(block.contains("10.88.200.1".parse().unwrap()));
        assert!(block.contains("::ffff:10.88.0.7".parse().unwrap()));
        assert!(!block.contains("10.89.0.1".parse().unwrap()));
        let single: IpBlock = "10.88.0.1".parse().unwrap();
        assert!(single.contains("10.88.0.1".parse().unwrap()));
        assert!(!single.contains("10.88.0.2".parse().unwrap()));
        let all: IpBlock = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!(!all.contains("2001:db8::1".parse().unwrap()));
        let v6: IpBlock = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<IpBlock>().is_err(), "{bad}");
        }
    }
}
