//! The `--net` spec and MAC parsers on arbitrary text: no panic, and what parses prints back as a
//! spec that parses to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapir_net_backend::{MacAddr, NicSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = text.parse::<NicSpec>() {
        let again: NicSpec = spec
            .to_string()
            .parse()
            .unwrap_or_else(|e| panic!("{spec} does not parse back: {e}"));
        assert_eq!(spec, again);
    }
    if let Ok(mac) = MacAddr::parse_unicast(text) {
        assert_eq!(MacAddr::parse_unicast(&mac.to_string()).ok(), Some(mac));
    }
});
