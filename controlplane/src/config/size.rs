//! Byte sizes in the config: an integer (bytes) or a string with a binary unit.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Binary units, largest first: (suffix shown, shift).
const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];

/// A size in bytes. In TOML: an integer (bytes) or a string such as `"512KiB"`,
/// `"4MiB"`, `"8GiB"`, `"1TiB"`, `"4096"` or `"4096B"`. Units are binary (KiB = 1024);
/// case is ignored and `K`, `M`, `G`, `T` are accepted for KiB, MiB, GiB, TiB.
/// Decimal units (`KB`, `MB`, ...) are rejected as ambiguous, as are fractions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        ByteSize(n << 10)
    }

    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }

    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        ByteSize(n << 30)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

/// Why a size string was rejected (the message is shown to the operator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseSizeError(String);

impl fmt::Display for ParseSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseSizeError {}

const EXPECTED: &str =
    "expected bytes as an integer or a string like \"512KiB\", \"4MiB\", \"8GiB\"";

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |why: &str| {
            Err(ParseSizeError(format!(
                "invalid size {s:?}: {why}; {EXPECTED}"
            )))
        };
        let t = s.trim();
        if t.starts_with('-') {
            return fail("must not be negative");
        }
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits_end);
        if number.is_empty() {
            return fail("no number");
        }
        let unit = unit.trim_start();
        if unit.starts_with(['.', ',']) {
            return fail("fractions are not accepted, use a smaller unit");
        }
        let shift = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            "kb" | "mb" | "gb" | "tb" => {
                return fail(
                    "decimal units are ambiguous, use KiB, MiB, GiB or TiB (powers of 1024)",
                )
            }
            _ => return fail("unknown unit"),
        };
        let Ok(n) = number.parse::<u64>() else {
            return fail("too large");
        };
        match n.checked_mul(1u64 << shift) {
            Some(bytes) => Ok(ByteSize(bytes)),
            None => fail("too large"),
        }
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly, else plain bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 {
            for (suffix, shift) in UNITS {
                if self.0.trailing_zeros() >= shift {
                    return write!(f, "{}{suffix}", self.0 >> shift);
                }
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.0 != 0 && self.0.trailing_zeros() >= 10 {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED.trim_start_matches("expected "))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        for (s, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("512KiB", 512 << 10),
            ("4MiB", 4 << 20),
            ("4 MiB", 4 << 20),
            (" 8GiB ", 8 << 30),
            ("1TiB", 1 << 40),
            ("64k", 64 << 10),
            ("2M", 2 << 20),
            ("3g", 3 << 30),
            ("4mib", 4 << 20),
            ("4MIB", 4 << 20),
        ] {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{s}");
        }
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for (s, why) in [
            ("", "no number"),
            ("MiB", "no number"),
            ("-4MiB", "must not be negative"),
            ("1.5GiB", "fractions"),
            ("4MB", "decimal units are ambiguous"),
            ("4 kb", "decimal units are ambiguous"),
            ("4 parsecs", "unknown unit"),
            ("4MiB4", "unknown unit"),
            ("99999999999999999999", "too large"),
            ("17179869184GiB", "too large"),
        ] {
            let err = s.parse::<ByteSize>().unwrap_err().to_string();
            assert!(err.contains(why), "{s:?}: {err}");
            assert!(err.contains("\"4MiB\""), "{s:?}: {err}");
        }
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::mib(4).to_string(), "4MiB");
        assert_eq!(ByteSize(1536 << 10).to_string(), "1536KiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert_eq!(ByteSize(0).to_string(), "0");
        assert_eq!(ByteSize(1 << 40).to_string(), "1TiB");
        for v in [0, 1, 1000, 4096, 1 << 20, 3 << 30, u64::MAX] {
            assert_eq!(ByteSize(v).to_string().parse::<ByteSize>(), Ok(ByteSize(v)));
        }
    }
}
