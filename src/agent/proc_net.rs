//! Listening TCP sockets from `/proc/net/tcp` and `/proc/net/tcp6`.
//!
//! Both files are per network namespace and world-readable, so the agent (running as the
//! container's user, inside its netns) sees exactly the container's sockets without root.
//! Both must be read: a server bound to `[::]` shows up only in `tcp6`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::agent::protocol::ListeningPort;

/// IPv4 socket table of the current network namespace.
pub const PROC_NET_TCP: &str = "/proc/net/tcp";
/// IPv6 socket table; absent when the kernel has IPv6 disabled.
pub const PROC_NET_TCP6: &str = "/proc/net/tcp6";

/// `st` value of a socket in the LISTEN state (`TCP_LISTEN` in the kernel).
const STATE_LISTEN: &str = "0A";

/// Reads both tables and returns the listeners, deduplicated and sorted by (port, address).
/// A missing `tcp6` (IPv6 disabled) counts as empty; a missing `tcp` means /proc is not
/// mounted, which is an error rather than an empty list that would look like "no ports".
pub async fn listening_ports() -> io::Result<Vec<ListeningPort>> {
    let mut ports: Vec<_> = parse_table(&tokio::fs::read_to_string(PROC_NET_TCP).await?).collect();
    match tokio::fs::read_to_string(PROC_NET_TCP6).await {
        Ok(table) => ports.extend(parse_table(&table)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(normalize(ports))
}

/// Sorts by (port, address) and drops duplicates (SO_REUSEPORT groups list one line each).
pub fn normalize(mut ports: Vec<ListeningPort>) -> Vec<ListeningPort> {
    ports.sort_by_key(|p| (p.port, p.address));
    ports.dedup();
    ports
}

/// The LISTEN sockets of one table (either format). Lines that are not LISTEN sockets, the
/// header, and lines that don't parse are skipped: the kernel's format is stable, and one odd
/// line must not hide the others.
pub fn parse_table(table: &str) -> impl Iterator<Item = ListeningPort> + '_ {
    table.lines().filter_map(parse_line)
}

/// One table line: `sl local_address rem_address st ...`; `None` unless it is a LISTEN socket.
pub(crate) fn parse_line(line: &str) -> Option<ListeningPort> {
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let local = fields.next()?;
    let _remote = fields.next()?;
    let state = fields.next()?;
    if state != STATE_LISTEN {
        return None;
    }
    let (address, port) = local.split_once(':')?;
    let port = parse_hex_u16(port)?;
    let address = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(parse_word(address)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&parse_word(address.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(ListeningPort { address, port })
}

/// One 8-digit hex word as the kernel prints it: a u32 in host byte order, whose bytes in
/// memory are the address bytes in network order.
fn parse_word(hex: &str) -> Option<[u8; 4]> {
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes)
}

/// The port, printed big-endian (already converted to host order by the kernel).
fn parse_hex_u16(hex: &str) -> Option<u16> {
    if hex.len() != 4 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(hex, 16).ok()
}

// The sample lines below were printed by a little-endian kernel.
#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0
   1: 00000000:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 12347 1 0000000000000000 20 4 30 10 -1
   3: 0A00020F:0016 0100000A:C350 06 00000000:00000000 03:00000ABC 00000000     0        0 0 3 0000000000000000
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 00000000000000000000000001000000:0BB8 00000000000000000000000001000000:E2A0 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";

    fn port(address: &str, port: u16) -> ListeningPort {
        ListeningPort {
            address: address.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn ipv4_listeners_are_decoded() {
        let ports: Vec<_> = parse_table(TCP).collect();
        assert_eq!(ports, vec![port("127.0.0.1", 8080), port("0.0.0.0", 3000)]);
    }

    #[test]
    fn ipv6_listeners_are_decoded() {
        let ports: Vec<_> = parse_table(TCP6).collect();
        assert_eq!(ports, vec![port("::", 8080), port("::1", 3000)]);
    }

    #[test]
    fn non_listen_lines_are_skipped() {
        // ESTABLISHED (01) and TIME_WAIT (06) sockets share ports with listeners.
        let line =
            "   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000";
        assert_eq!(parse_line(line), None);
        assert_eq!(parse_table(TCP).count(), 2);
    }

    #[test]
    fn garbage_lines_are_skipped_without_panicking() {
        let garbage = [
            "",
            "   ",
            "0:",
            "0: 0100007F:1F90",
            "0: 0100007F 00000000:0000 0A",
            "0: 0100007F:1F9 00000000:0000 0A",
            "0: 0100007F:+F90 00000000:0000 0A",
            "0: +100007F:1F90 00000000:0000 0A",
            "0: 0100007G:1F90 00000000:0000 0A",
            "0: 0100007F0:1F90 00000000:0000 0A",
            // 32 and 8 bytes, with a multi-byte char across a word boundary.
            "0: 0000000é00000000000000000000000:1F90 00000000:0000 0A",
            "0: 00000é0:1F90 00000000:0000 0A",
            "0: :1F90 00000000:0000 0A",
            "0: 0100007F:1F90:00 00000000:0000 0A",
            "\u{0}\u{1}\u{2}",
        ];
        for line in garbage {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
        let mixed = format!("{}\n{}\n{TCP}", garbage.join("\n"), "x y z 0A");
        assert_eq!(parse_table(&mixed).count(), 2);
    }

    #[test]
    fn normalize_sorts_by_port_then_address_and_dedups() {
        let all = parse_table(TCP)
            .chain(parse_table(TCP6))
            .chain(parse_table(TCP6));
        assert_eq!(
            normalize(all.collect()),
            vec![
                port("0.0.0.0", 3000),
                port("::1", 3000),
                port("127.0.0.1", 8080),
                port("::", 8080),
            ]
        );
    }

    #[tokio::test]
    async fn this_machine_tables_parse() {
        // Whatever this machine listens on, reading must succeed and be normalized.
        let ports = listening_ports().await.unwrap();
        assert_eq!(ports, normalize(ports.clone()));
    }
}
