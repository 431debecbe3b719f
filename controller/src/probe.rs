//! Address-conflict probing: does some other host on the link already use an address?
//!
//! The contract: [`Prober::probe`] asks the link, without claiming or disturbing anything,
//! whether another host answers for an address, and returns that host's MAC
//! ([`Answer`]) or `None` once `timeout` has passed without an answer.
//!
//! - IPv4 uses an ARP probe (RFC 5227 §2.1.1): a broadcast ARP request with sender protocol
//!   address 0.0.0.0, so no neighbour cache learns anything from it. A conflict is any ARP
//!   packet (request or reply) whose sender protocol address is the probed one.
//! - IPv6 uses Duplicate Address Detection (RFC 4862 §5.4): a Neighbor Solicitation from the
//!   unspecified address to the solicited-node multicast group. A conflict is a Neighbor
//!   Advertisement for the address (its Target Link-Layer Address option, else the frame's
//!   source MAC).
//!
//! Unlike RFC 5227 §2.1.1 and RFC 4862 §5.4.3, another host's *probe* for the same address is
//! not a conflict: on a network Cairn manages it is most likely another cluster's controller
//! probing the same next free address ahead of need, and the store, not the wire, decides who
//! gets it. A host that then configures the address answers the next probe.
//!
//! Frames from the interface's own MAC are never answers: the socket sees what we send. The
//! prober assigns no address and needs none on the interface; it needs `CAP_NET_RAW` (an
//! `AF_PACKET` socket), and for IPv6 the interface must have IPv6 enabled, as a defender's
//! advertisement goes to the all-nodes group. `None` means "nobody answered in time", not
//! "free": a host that is down, filtered or slow is not seen.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pnet_datalink::{Channel, Config, MacAddr, NetworkInterface};
use pnet_packet::arp::{ArpHardwareTypes, ArpOperations, ArpPacket, MutableArpPacket};
use pnet_packet::ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket};
use pnet_packet::icmpv6::ndp::{
    Icmpv6Codes, MutableNeighborSolicitPacket, NdpOptionTypes, NeighborAdvertPacket,
};
use pnet_packet::icmpv6::{self, Icmpv6Packet, Icmpv6Types};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv6::{Ipv6Packet, MutableIpv6Packet};
use pnet_packet::{MutablePacket, Packet};

/// How long one receive waits before the loop looks at the clock again.
const READ_TICK: Duration = Duration::from_millis(20);
/// Ethernet header + ARP for IPv4 over Ethernet.
const ARP_FRAME_LEN: usize = 14 + 28;
/// Ethernet header + IPv6 header + Neighbor Solicitation without options.
const NS_FRAME_LEN: usize = 14 + 40 + NS_LEN;
/// Neighbor Solicitation/Advertisement up to the end of the target address.
const NS_LEN: usize = 24;

/// What answered for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The link-layer address of the host that claims the address.
    pub mac: [u8; 6],
}

impl Answer {
    /// The MAC as lowercase `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        let [a, b, c, d, e, f] = self.mac;
        format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
    }
}

/// Why a probe could not be made (never "the address is taken": that is an [`Answer`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No interface of that name in this network namespace.
    #[error("no network interface named {name:?}")]
    NoInterface {
        /// The name asked for.
        name: String,
    },
    /// The interface has no Ethernet address (loopback, tun, …), so ARP/NDP cannot run on it.
    #[error("network interface {name:?} has no Ethernet (MAC) address to probe from")]
    NoMac {
        /// The interface.
        name: String,
    },
    /// The address cannot be probed for (unspecified, multicast, loopback, broadcast).
    #[error("cannot probe for {ip}: {reason}")]
    Unprobeable {
        /// The address.
        ip: IpAddr,
        /// Why not.
        reason: &'static str,
    },
    /// The `AF_PACKET` socket could not be opened or bound.
    #[error("opening a packet socket on {interface}: {source}{}", cap_hint(source))]
    Socket {
        /// The interface.
        interface: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving failed (interface down or gone, …).
    #[error("probing on {interface}: {source}")]
    Io {
        /// The interface.
        interface: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The blocking probe task panicked or was cancelled (runtime shutting down).
    #[error("probe task on {interface} did not finish: {source}")]
    Task {
        /// The interface.
        interface: String,
        /// What tokio said.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The fix for the usual reason a packet socket is refused.
fn cap_hint(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::PermissionDenied {
        "; probing needs CAP_NET_RAW (run as root or grant the capability)"
    } else {
        ""
    }
}

/// A prober bound to one interface (by name). Cheap to clone; clones share the interface.
#[derive(Clone, Debug)]
pub struct Prober {
    // Index and MAC as seen by `new`: an interface deleted and recreated needs a new Prober.
    interface: Arc<NetworkInterface>,
}

impl Prober {
    /// Looks the interface up and remembers its index and MAC; opens no socket yet, so this
    /// works without privileges.
    pub fn new(interface: &str) -> Result<Prober, ProbeError> {
        let found = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == interface)
            .ok_or_else(|| ProbeError::NoInterface {
                name: interface.to_owned(),
            })?;
        // Loopback reports 00:00:00:00:00:00; a zero sender address means no Ethernet either.
        if found.mac.is_none_or(|m| m.is_zero()) {
            return Err(ProbeError::NoMac {
                name: interface.to_owned(),
            });
        }
        Ok(Prober {
            interface: Arc::new(found),
        })
    }

    /// The interface's name.
    pub fn interface(&self) -> &str {
        &self.interface.name
    }

    /// Probes `ip` on the interface: sends `attempts` probes (ARP for IPv4, DAD Neighbor
    /// Solicitation for IPv6; at least one) spaced evenly over `timeout`, and returns the first
    /// answer that claims `ip`, or `None` if nothing did within `timeout`. An IPv4-mapped IPv6
    /// address is probed as IPv4. Runs on tokio's blocking pool with its own packet socket, so
    /// concurrent probes are independent (each sees the others' frames, but they come from
    /// our own MAC and are skipped).
    pub async fn probe(
        &self,
        ip: IpAddr,
        timeout: Duration,
        attempts: u32,
    ) -> Result<Option<Answer>, ProbeError> {
        let ip = ip.to_canonical();
        check_probeable(ip)?;
        let interface = Arc::clone(&self.interface);
        tokio::task::spawn_blocking(move || probe_blocking(&interface, ip, timeout, attempts.max(1)))
            .await
            .map_err(|source| ProbeError::Task {
                interface: self.interface.name.clone(),
                source,
            })?
    }
}

/// Refuses addresses that no single host can hold: probing them would match unrelated
/// traffic (another host's probe comes from 0.0.0.0 / ::) or nothing at all.
fn check_probeable(ip: IpAddr) -> Result<(), ProbeError> {
    let reason = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("the loopback address"),
        _ => None,
    };
    match reason {
        Some(reason) => Err(ProbeError::Unprobeable { ip, reason }),
        None => Ok(()),
    }
}

/// Recognises, in a received frame, another host's claim on the address (given our MAC).
type Matcher = fn(&[u8], MacAddr, IpAddr) -> Option<Answer>;

fn probe_blocking(
    interface: &NetworkInterface,
    ip: IpAddr,
    timeout: Duration,
    attempts: u32,
) -> Result<Option<Answer>, ProbeError> {
    let io_err = |source| ProbeError::Io {
        interface: interface.name.clone(),
        source,
    };
    let ours = interface.mac.unwrap_or_else(MacAddr::zero);
    let config = Config {
        read_timeout: Some(READ_TICK),
        write_timeout: Some(READ_TICK),
        // Answers come to our MAC, broadcast or all-nodes; no need to disturb the interface.
        promiscuous: false,
        ..Config::default()
    };
    let (mut tx, mut rx) = match pnet_datalink::channel(interface, config) {
        Ok(Channel::Ethernet(tx, rx)) => (tx, rx),
        Ok(_) => {
            return Err(ProbeError::Socket {
                interface: interface.name.clone(),
                source: io::Error::other("not an Ethernet channel"),
            });
        }
        Err(source) => {
            return Err(ProbeError::Socket {
                interface: interface.name.clone(),
                source,
            });
        }
    };
    let (frame, answer): (Vec<u8>, Matcher) = match ip {
        IpAddr::V4(v4) => (arp_probe(ours, v4).to_vec(), arp_answer),
        IpAddr::V6(v6) => (ns_probe(ours, v6).to_vec(), ndp_answer),
    };

    // The socket is open before the first probe leaves, so no answer can slip past it.
    let start = Instant::now();
    // `None`: a timeout too large for the clock, i.e. never.
    let deadline = start.checked_add(timeout);
    let step = timeout / attempts;
    let mut sent = 0u32;
    loop {
        let now = Instant::now();
        while sent < attempts && start.checked_add(step * sent).is_some_and(|due| now >= due) {
            match tx.send_to(&frame, None) {
                Some(Ok(())) => sent += 1,
                Some(Err(e)) => return Err(io_err(e)),
                None => {
                    return Err(io_err(io::Error::other(
                        "probe frame larger than the write buffer",
                    )));
                }
            }
        }
        if deadline.is_some_and(|d| now >= d) {
            return Ok(None);
        }
        match rx.next() {
            Ok(received) => {
                if let Some(found) = answer(received, ours, ip) {
                    return Ok(Some(found));
                }
            }
            // The read tick passed quietly: look at the clock again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// The ARP probe for `ip` (RFC 5227 §2.1.1): broadcast request, sender `ours`/0.0.0.0,
/// target 00:00:00:00:00:00/`ip`.
fn arp_probe(ours: MacAddr, ip: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let mut frame = [0u8; ARP_FRAME_LEN];
    // Both views fit the fixed-size buffer; the unit tests check every field.
    if let Some(mut eth) = MutableEthernetPacket::new(&mut frame) {
        eth.set_destination(MacAddr::broadcast());
        eth.set_source(ours);
        eth.set_ethertype(EtherTypes::Arp);
        if let Some(mut arp) = MutableArpPacket::new(eth.payload_mut()) {
            arp.set_hardware_type(ArpHardwareTypes::Ethernet);
            arp.set_protocol_type(EtherTypes::Ipv4);
            arp.set_hw_addr_len(6);
            arp.set_proto_addr_len(4);
            arp.set_operation(ArpOperations::Request);
            arp.set_sender_hw_addr(ours);
            arp.set_sender_proto_addr(Ipv4Addr::UNSPECIFIED);
            arp.set_target_hw_addr(MacAddr::zero());
            arp.set_target_proto_addr(ip);
        }
    }
    frame
}

/// The solicited-node multicast group of `ip` (RFC 4291 §2.7.1): ff02::1:ff + its low 24 bits.
fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, o[13], o[14], o[15],
    ])
}

/// The DAD Neighbor Solicitation for `ip` (RFC 4862 §5.4.2): from ::, to the solicited-node
/// group (MAC 33:33 + its low 32 bits), hop limit 255, and no Source Link-Layer Address
/// option, which RFC 4861 §4.3 forbids with an unspecified source.
fn ns_probe(ours: MacAddr, ip: Ipv6Addr) -> [u8; NS_FRAME_LEN] {
    let group = solicited_node(ip);
    let g = group.octets();
    let mut frame = [0u8; NS_FRAME_LEN];
    if let Some(mut eth) = MutableEthernetPacket::new(&mut frame) {
        eth.set_destination(MacAddr::new(0x33, 0x33, g[12], g[13], g[14], g[15]));
        eth.set_source(ours);
        eth.set_ethertype(EtherTypes::Ipv6);
        if let Some(mut ip6) = MutableIpv6Packet::new(eth.payload_mut()) {
            ip6.set_version(6);
            ip6.set_payload_length(NS_LEN as u16);
            ip6.set_next_header(IpNextHeaderProtocols::Icmpv6);
            ip6.set_hop_limit(255);
            ip6.set_source(Ipv6Addr::UNSPECIFIED);
            ip6.set_destination(group);
            if let Some(mut ns) = MutableNeighborSolicitPacket::new(ip6.payload_mut()) {
                ns.set_icmpv6_type(Icmpv6Types::NeighborSolicit);
                ns.set_icmpv6_code(Icmpv6Codes::NoCode);
                ns.set_target_addr(ip);
                let sum = Icmpv6Packet::new(ns.packet())
                    .map(|p| icmpv6::checksum(&p, &Ipv6Addr::UNSPECIFIED, &group));
                if let Some(sum) = sum {
                    ns.set_checksum(sum);
                }
            }
        }
    }
    frame
}

/// Whether `frame` is an ARP packet from another host that claims `ip`; its sender MAC.
fn arp_answer(frame: &[u8], ours: MacAddr, ip: IpAddr) -> Option<Answer> {
    let IpAddr::V4(ip) = ip else { return None };
    let eth = EthernetPacket::new(frame)?;
    if eth.get_ethertype() != EtherTypes::Arp || eth.get_source() == ours {
        return None;
    }
    let arp = ArpPacket::new(eth.payload())?;
    let sender = arp.get_sender_hw_addr();
    if arp.get_hardware_type() != ArpHardwareTypes::Ethernet
        || arp.get_protocol_type() != EtherTypes::Ipv4
        || arp.get_hw_addr_len() != 6
        || arp.get_proto_addr_len() != 4
        || sender == ours
    {
        return None;
    }
    let op = arp.get_operation();
    let claims =
        (op == ArpOperations::Request || op == ArpOperations::Reply) && arp.get_sender_proto_addr() == ip;
    claims.then_some(Answer { mac: sender.octets() })
}

/// Whether `frame` is a valid NDP message from another host that claims `ip`: a Neighbor
/// Advertisement for it. The MAC is the advertisement's Target Link-Layer Address option if it
/// has one, else the frame's source.
fn ndp_answer(frame: &[u8], ours: MacAddr, ip: IpAddr) -> Option<Answer> {
    let IpAddr::V6(ip) = ip else { return None };
    let eth = EthernetPacket::new(frame)?;
    if eth.get_ethertype() != EtherTypes::Ipv6 || eth.get_source() == ours {
        return None;
    }
    let ip6 = Ipv6Packet::new(eth.payload())?;
    let body = ip6.payload();
    // Hop limit 255 proves the sender is on the link (RFC 4861 §7.1); a truncated packet or a
    // bad checksum is not evidence of anything.
    if ip6.get_version() != 6
        || ip6.get_next_header() != IpNextHeaderProtocols::Icmpv6
        || ip6.get_hop_limit() != 255
        || body.len() != usize::from(ip6.get_payload_length())
        || body.len() < NS_LEN
    {
        return None;
    }
    let (src, dst) = (ip6.get_source(), ip6.get_destination());
    let icmp = Icmpv6Packet::new(body)?;
    if icmp.get_icmpv6_code() != Icmpv6Codes::NoCode
        || icmpv6::checksum(&icmp, &src, &dst) != icmp.get_checksum()
    {
        return None;
    }
    let source_mac = eth.get_source().octets();
    match icmp.get_icmpv6_type() {
        t if t == Icmpv6Types::NeighborAdvert => {
            let na = NeighborAdvertPacket::new(body)?;
            if na.get_target_addr() != ip {
                return None;
            }
            let mac = target_link_layer_address(&body[NS_LEN..]).unwrap_or(source_mac);
            Some(Answer { mac })
        }
        _ => None,
    }
}

/// The Ethernet address in a Target Link-Layer Address option (RFC 4861 §4.6.1), if any.
/// Options are walked by hand: a zero length must end the walk (RFC 4861 §4.6), not loop.
fn target_link_layer_address(mut options: &[u8]) -> Option<[u8; 6]> {
    while let [kind, len, ..] = *options {
        let len = usize::from(len) * 8;
        if len == 0 || len > options.len() {
            return None;
        }
        if kind == NdpOptionTypes::TargetLLAddr.0 && len >= 8 {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&options[2..8]);
            return Some(mac);
        }
        options = &options[len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::icmpv6::ndp::NeighborSolicitPacket;

    const OURS: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x01);
    const THEIRS: MacAddr = MacAddr(0x02, 0, 0, 0, 0, 0x02);

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// `from`'s reply to our ARP probe, as a Linux host sends it.
    fn arp_reply(from: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
        let mut frame = arp_probe(from, ip).to_vec();
        let mut eth = MutableEthernetPacket::new(&mut frame).unwrap();
        eth.set_destination(OURS);
        let mut arp = MutableArpPacket::new(eth.payload_mut()).unwrap();
        arp.set_operation(ArpOperations::Reply);
        arp.set_sender_proto_addr(ip);
        arp.set_target_hw_addr(OURS);
        arp.set_target_proto_addr(Ipv4Addr::UNSPECIFIED);
        frame
    }

    /// A Neighbor Advertisement for `target` from `from` to all-nodes, with a Target
    /// Link-Layer Address option carrying `tlla` if given.
    fn na(from: MacAddr, target: Ipv6Addr, tlla: Option<MacAddr>) -> Vec<u8> {
        let src = v6("fe80::2");
        let dst = v6("ff02::1");
        let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        if let Some(m) = tlla {
            icmp.extend_from_slice(&[2, 1]);
            icmp.extend_from_slice(&m.octets());
        }
        let sum = icmpv6::checksum(&Icmpv6Packet::new(&icmp).unwrap(), &src, &dst);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut frame = vec![0u8; 14 + 40];
        let mut eth = MutableEthernetPacket::new(&mut frame).unwrap();
        eth.set_destination(MacAddr::new(0x33, 0x33, 0, 0, 0, 1));
        eth.set_source(from);
        eth.set_ethertype(EtherTypes::Ipv6);
        let mut ip6 = MutableIpv6Packet::new(eth.payload_mut()).unwrap();
        ip6.set_version(6);
        ip6.set_payload_length(icmp.len() as u16);
        ip6.set_next_header(IpNextHeaderProtocols::Icmpv6);
        ip6.set_hop_limit(255);
        ip6.set_source(src);
        ip6.set_destination(dst);
        frame.extend_from_slice(&icmp);
        frame
    }

    #[test]
    fn the_arp_probe_claims_nothing() {
        let frame = arp_probe(OURS, v4("192.0.2.10"));
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(eth.get_source(), OURS);
        assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_hardware_type(), ArpHardwareTypes::Ethernet);
        assert_eq!(arp.get_protocol_type(), EtherTypes::Ipv4);
        assert_eq!((arp.get_hw_addr_len(), arp.get_proto_addr_len()), (6, 4));
        assert_eq!(arp.get_operation(), ArpOperations::Request);
        assert_eq!(arp.get_sender_hw_addr(), OURS);
        assert_eq!(arp.get_sender_proto_addr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(arp.get_target_hw_addr(), MacAddr::zero());
        assert_eq!(arp.get_target_proto_addr(), v4("192.0.2.10"));
    }

    #[test]
    fn the_dad_solicitation_goes_to_the_solicited_node_group_with_a_valid_checksum() {
        let target = v6("2001:db8::12:3456");
        let frame = ns_probe(OURS, target);
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(
            eth.get_destination(),
            MacAddr::new(0x33, 0x33, 0xff, 0x12, 0x34, 0x56)
        );
        assert_eq!(eth.get_source(), OURS);
        assert_eq!(eth.get_ethertype(), EtherTypes::Ipv6);
        let ip6 = Ipv6Packet::new(eth.payload()).unwrap();
        assert_eq!(ip6.get_version(), 6);
        assert_eq!(ip6.get_hop_limit(), 255);
        assert_eq!(ip6.get_next_header(), IpNextHeaderProtocols::Icmpv6);
        assert_eq!(ip6.get_source(), Ipv6Addr::UNSPECIFIED);
        assert_eq!(ip6.get_destination(), v6("ff02::1:ff12:3456"));
        // Exactly the solicitation: no Source Link-Layer Address option.
        assert_eq!(ip6.payload().len(), NS_LEN);
        let ns = NeighborSolicitPacket::new(ip6.payload()).unwrap();
        assert_eq!(ns.get_icmpv6_type(), Icmpv6Types::NeighborSolicit);
        assert_eq!(ns.get_target_addr(), target);
        let icmp = Icmpv6Packet::new(ip6.payload()).unwrap();
        assert_ne!(icmp.get_checksum(), 0);
        assert_eq!(
            icmpv6::checksum(&icmp, &Ipv6Addr::UNSPECIFIED, &ip6.get_destination()),
            icmp.get_checksum()
        );
    }

    #[test]
    fn an_arp_claim_from_another_host_is_an_answer_and_our_own_frames_are_not() {
        let ip = v4("192.0.2.10");
        let theirs = Answer { mac: THEIRS.octets() };
        assert_eq!(arp_answer(&arp_reply(THEIRS, ip), OURS, ip.into()), Some(theirs));
        // A reply about another address, and our own probe seen on the way out.
        assert_eq!(
            arp_answer(&arp_reply(THEIRS, v4("192.0.2.11")), OURS, ip.into()),
            None
        );
        assert_eq!(arp_answer(&arp_probe(OURS, ip), OURS, ip.into()), None);
        // Another host's simultaneous probe for the same address (likely another cluster's
        // controller probing ahead) claims nothing.
        assert_eq!(arp_answer(&arp_probe(THEIRS, ip), OURS, ip.into()), None);
    }

    #[test]
    fn an_advertisement_names_its_target_link_layer_address_else_its_source() {
        let ip = v6("2001:db8::10");
        let other = MacAddr::new(0x02, 0, 0, 0, 0, 0x03);
        assert_eq!(
            ndp_answer(&na(THEIRS, ip, Some(other)), OURS, ip.into()),
            Some(Answer { mac: other.octets() })
        );
        assert_eq!(
            ndp_answer(&na(THEIRS, ip, None), OURS, ip.into()),
            Some(Answer { mac: THEIRS.octets() })
        );
        assert_eq!(
            ndp_answer(&na(THEIRS, v6("2001:db8::11"), None), OURS, ip.into()),
            None
        );
        assert_eq!(ndp_answer(&na(OURS, ip, None), OURS, ip.into()), None);
        // Neither our own solicitation nor another host's DAD probe claims the address.
        assert_eq!(ndp_answer(&ns_probe(OURS, ip), OURS, ip.into()), None);
        assert_eq!(ndp_answer(&ns_probe(THEIRS, ip), OURS, ip.into()), None);
    }

    #[test]
    fn a_forged_or_damaged_advertisement_is_not_an_answer() {
        let ip = v6("2001:db8::10");
        let good = na(THEIRS, ip, None);
        let mut bad_sum = good.clone();
        *bad_sum.last_mut().unwrap() ^= 1;
        assert_eq!(ndp_answer(&bad_sum, OURS, ip.into()), None);
        // Hop limit below 255: routed from off the link.
        let mut routed = good.clone();
        routed[14 + 7] = 254;
        assert_eq!(ndp_answer(&routed, OURS, ip.into()), None);
        assert_eq!(ndp_answer(&good[..good.len() - 1], OURS, ip.into()), None);
        // An option of length zero ends the walk instead of looping.
        assert_eq!(target_link_layer_address(&[2, 0, 1, 2, 3, 4, 5, 6]), None);
    }

    #[test]
    fn mac_strings_are_lowercase_and_colon_separated() {
        let a = Answer {
            mac: [0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0x0f],
        };
        assert_eq!(a.mac_string(), "aa:bb:0c:dd:ee:0f");
    }

    #[test]
    fn a_refused_socket_says_which_capability_is_missing() {
        let e = ProbeError::Socket {
            interface: "eth0".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        let text = e.to_string();
        assert!(text.contains("eth0") && text.contains("CAP_NET_RAW"), "{text}");
        let e = ProbeError::Socket {
            interface: "eth0".into(),
            source: io::Error::other("boom"),
        };
        assert!(!e.to_string().contains("CAP_NET_RAW"), "{e}");
    }

    #[test]
    fn addresses_no_host_can_hold_are_refused() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "127.0.0.1",
            "::",
            "ff02::1",
            "::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(
                matches!(check_probeable(ip), Err(ProbeError::Unprobeable { .. })),
                "{ip}"
            );
        }
        assert!(check_probeable("192.0.2.10".parse().unwrap()).is_ok());
        assert!(check_probeable("2001:db8::10".parse().unwrap()).is_ok());
    }
}
