//! The one guarded HTTP client for every request the vault makes (deliveries, OAuth token
//! exchange and revocation, provider metadata, keys and userinfo): forbidden addresses refused, no redirects, no proxy, timeouts.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ipnet::IpNet;

/// Why an outbound request was not made or failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The URL resolves to an address the operator did not allow.
    #[error(
        "target address {0} is not allowed (loopback, private, link-local or special-purpose)"
    )]
    Forbidden(String),
    /// The URL cannot be used.
    #[error("bad URL: {0}")]
    BadUrl(String),
    /// The client could not be built (the node refuses to start without its guard).
    #[error("outbound HTTP client: {0}")]
    Build(String),
}

/// Address blocks no outbound request may reach unless private targets are allowed: the
/// IANA IPv4 and IPv6 special-purpose address registries, plus multicast, and the IPv6 blocks
/// that embed or tunnel to IPv4 (NAT64, 6to4, Teredo, IPv4-compatible) or are deprecated
/// (site-local).
const FORBIDDEN: &[&str] = &[
    "0.0.0.0/8",       // "this network"
    "10.0.0.0/8",      // private
    "100.64.0.0/10",   // carrier-grade NAT
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local (cloud metadata)
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation
    "192.88.99.0/24",  // 6to4 relay anycast
    "192.168.0.0/16",  // private
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation
    "203.0.113.0/24",  // documentation
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, broadcast
    "::/96",           // unspecified, loopback, IPv4-compatible
    "::ffff:0:0/96",   // IPv4-mapped (checked as IPv4 too)
    "64:ff9b::/96",    // NAT64
    "64:ff9b:1::/48",  // local-use NAT64
    "100::/64",        // discard-only
    "2001::/23",       // IETF protocol assignments (Teredo, benchmarking, ORCHID)
    "2001:db8::/32",   // documentation
    "2002::/16",       // 6to4
    "3fff::/20",       // documentation
    "5f00::/16",       // segment routing SIDs
    "fc00::/7",        // unique local
    "fe80::/10",       // link-local
    "fec0::/10",       // site-local (deprecated)
    "ff00::/8",        // multicast
];

fn forbidden_nets() -> &'static [IpNet] {
    static NETS: OnceLock<Vec<IpNet>> = OnceLock::new();
    NETS.get_or_init(|| FORBIDDEN.iter().filter_map(|n| n.parse().ok()).collect())
}

/// True for addresses an outbound request must not reach unless the operator allows private
/// targets.
pub fn is_forbidden(ip: IpAddr) -> bool {
    if let IpAddr::V6(a) = ip {
        if let Some(v4) = a.to_ipv4_mapped() {
            return is_forbidden(IpAddr::V4(v4));
        }
    }
    forbidden_nets().iter().any(|n| n.contains(&ip))
}

/// A DNS resolver that drops forbidden addresses, so a hostname cannot smuggle a request into
/// the operator's network (checked at connect time, not only when a URL is registered).
#[derive(Debug, Clone)]
struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_forbidden(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(OutboundError::Forbidden(host))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The guarded client and whether private targets are allowed. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbound {
    client: reqwest::Client,
    allow_private: bool,
}

impl Outbound {
    /// Builds the client: pooled connections (up to `idle_per_host` kept open per target
    /// between requests), no redirects, no proxy from the environment (`HTTP(S)_PROXY`
    /// would carry requests past the guard), the guarded resolver. Fails closed: there is no
    /// fallback client without the guard.
    pub fn new(
        timeout: Duration,
        allow_private: bool,
        idle_per_host: usize,
    ) -> Result<Self, OutboundError> {
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(idle_per_host)
            .user_agent(concat!("custos/", env!("CARGO_PKG_VERSION")));
        if !allow_private {
            b = b.dns_resolver(Arc::new(GuardedResolver));
        }
        Ok(Outbound {
            client: b.build().map_err(|e| OutboundError::Build(e.to_string()))?,
            allow_private,
        })
    }

    /// Parses `url` and refuses it if it cannot be requested: not http(s), or an IP literal
    /// in a forbidden block (literals skip the resolver, so they are checked here).
    pub fn check(&self, url: &str) -> Result<url::Url, OutboundError> {
        let parsed = url::Url::parse(url).map_err(|e| OutboundError::BadUrl(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(OutboundError::BadUrl("not http(s)".into()));
        }
        if !self.allow_private {
            let literal = match parsed.host() {
                Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
                Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
                Some(url::Host::Domain(_)) => None,
                None => return Err(OutboundError::BadUrl("no host".into())),
            };
            if let Some(ip) = literal.filter(|ip| is_forbidden(*ip)) {
                return Err(OutboundError::Forbidden(ip.to_string()));
            }
        }
        Ok(parsed)
    }

    /// A POST to a checked URL.
    pub fn post(&self, url: &str) -> Result<reqwest::RequestBuilder, OutboundError> {
        Ok(self.client.post(self.check(url)?))
    }

    /// A GET of a checked URL.
    pub fn get(&self, url: &str) -> Result<reqwest::RequestBuilder, OutboundError> {
        Ok(self.client.get(self.check(url)?))
    }
}

/// Why a capped body was not read.
#[derive(Debug)]
pub enum ReadError {
    /// Longer than allowed (read no further).
    TooLarge,
    /// The connection failed mid-body.
    Broken(reqwest::Error),
}

/// Reads at most `max` bytes of a response body.
pub async fn read_limited(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Broken)? {
        if out.len() + chunk.len() > max {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads at most `max` bytes of a response body; `None` when it is longer (or fails).
pub async fn read_capped(resp: reqwest::Response, max: usize) -> Option<Vec<u8>> {
    read_limited(resp, max).await.ok()
}

/// The full chain of an error's sources, for logs (never for a customer: the chain says how far
/// a connection got, an oracle for probing the operator's network).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_in_the_table_parses() {
        assert_eq!(forbidden_nets().len(), FORBIDDEN.len());
    }

    #[test]
    fn forbidden_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "192.0.0.8",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378::1",
            "fec0::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(is_forbidden(a.parse().expect("ip")), "{a}");
        }
        for a in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "2a00:1450::1",
        ] {
            assert!(!is_forbidden(a.parse().expect("ip")), "{a}");
        }
    }

    #[test]
    fn literals_are_checked_before_any_request() -> Result<(), OutboundError> {
        let guarded = Outbound::new(Duration::from_secs(1), false, 1)?;
        for url in [
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[64:ff9b::7f00:1]:8080/",
            "http://127.1/",
            "http://2130706433/",
        ] {
            assert!(
                matches!(guarded.check(url), Err(OutboundError::Forbidden(_))),
                "{url}"
            );
        }
        assert!(matches!(
            guarded.check("file:///etc/passwd"),
            Err(OutboundError::BadUrl(_))
        ));
        assert!(guarded.check("https://bank.example/token").is_ok());
        let open = Outbound::new(Duration::from_secs(1), true, 1)?;
        assert!(open.check("http://127.0.0.1:9/").is_ok());
        Ok(())
    }
}
