//! W3C Trace Context for deliveries: the `traceparent` sent to a receiver continues the
//! publisher's trace (same trace id and sampling flag) with a span id of our own, so the
//! receiver's traces join the publisher's. A missing or malformed `traceparent` starts a new
//! trace, as the specification asks, instead of forwarding garbage.

use std::fmt::Write as _;

/// A parsed `traceparent` (version 00 layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, never all zero.
    pub trace_id: [u8; 16],
    /// 8-byte id of the parent span, never all zero.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` header. Accepts version `00` exactly, and later versions by
    /// their first four fields (the specification's forward-compatibility rule); refuses
    /// version `ff`, upper-case hex and all-zero ids.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let b = s.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex::<1>(&s[0..2])?[0];
        if version == 0xff
            || (version == 0 && b.len() != 55)
            || (version != 0 && b.len() > 55 && b[55] != b'-')
        {
            return None;
        }
        let trace_id = hex::<16>(&s[3..35])?;
        let span_id = hex::<8>(&s[36..52])?;
        let flags = hex::<1>(&s[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A child of `parent` (or the root of a new, sampled trace): same trace id and flags,
    /// a new random span id.
    pub fn child_of(parent: Option<&Self>) -> Self {
        let span_id = nonzero();
        match parent {
            Some(p) => Self {
                trace_id: p.trace_id,
                span_id,
                flags: p.flags,
            },
            None => Self {
                trace_id: nonzero(),
                span_id,
                flags: 0x01,
            },
        }
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            self.flags
        )
    }
}

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_specification_example() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), EXAMPLE);
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version may append fields after a dash.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert!(TraceParent::parse(future).is_some());
    }

    #[test]
    fn a_child_continues_the_trace_with_a_new_span() {
        let parent = TraceParent::parse(EXAMPLE).unwrap();
        let child = TraceParent::child_of(Some(&parent));
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.flags, parent.flags);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(TraceParent::parse(&child.to_string()), Some(child));

        let root = TraceParent::child_of(None);
        assert_ne!(root.trace_id, parent.trace_id);
        assert_eq!(root.flags, 1);
        assert_eq!(TraceParent::parse(&root.to_string()), Some(root));
    }
}
