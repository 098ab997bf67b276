//! Ethernet MAC addresses: parsing, printing and generating the locally administered ones Tapir gives
//! guests that were not told one.

use std::fmt;
use std::str::FromStr;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// Why a text is not a MAC address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("{0:?} is not a MAC address: expected six hex bytes separated by ':', like 52:54:00:12:34:56")]
    Syntax(String),
    #[error("{0} is a multicast address: a NIC needs a unicast MAC (even first byte)")]
    Multicast(MacAddr),
}

impl MacAddr {
    /// A random unicast, locally administered address (first byte `x2`, `x6`, `xa` or `xe`).
    pub fn random_local() -> Self {
        let mut bytes = [0u8; 6];
        fill_random(&mut bytes);
        bytes[0] = (bytes[0] & 0xfc) | 0x02;
        MacAddr(bytes)
    }

    /// The address as a guest NIC may use it: unicast.
    pub fn parse_unicast(text: &str) -> Result<Self, MacError> {
        let mac: MacAddr = text.parse()?;
        if mac.is_multicast() {
            return Err(MacError::Multicast(mac));
        }
        Ok(mac)
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

fn fill_random(bytes: &mut [u8]) {
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // getrandom cannot fail for 6 bytes on Linux >= 3.17; fall back to time and pid all the same.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id());
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed >> (i * 8)) as u8;
        }
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(text: &str) -> Result<Self, MacError> {
        let syntax = || MacError::Syntax(text.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for b in bytes.iter_mut() {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *b = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let cases = [
            ("52:54:00:12:34:56", Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])),
            (
                "AA:bb:cc:DD:ee:0f",
                Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]),
            ),
            ("52:54:00:12:34", None),
            ("52:54:00:12:34:56:78", None),
            ("52-54-00-12-34-56", None),
            ("5:54:00:12:34:56", None),
            ("zz:54:00:12:34:56", None),
            ("", None),
            ("+1:54:00:12:34:56", None),
        ];
        for (text, want) in cases {
            let got = text.parse::<MacAddr>().ok().map(|m| m.0);
            assert_eq!(got, want, "{text}");
            if let Some(bytes) = want {
                assert_eq!(MacAddr(bytes).to_string(), text.to_lowercase());
            }
        }
    }

    #[test]
    fn refuses_multicast_for_a_nic() {
        assert!(matches!(
            MacAddr::parse_unicast("01:00:5e:00:00:01"),
            Err(MacError::Multicast(_))
        ));
        assert!(MacAddr::parse_unicast("02:00:00:00:00:01").is_ok());
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let a = MacAddr::random_local();
        let b = MacAddr::random_local();
        for m in [a, b] {
            assert!(m.is_local() && !m.is_multicast(), "{m}");
        }
        assert_ne!(a, b);
    }
}
