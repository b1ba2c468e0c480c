//! Value types of configuration files: durations written like `30s`, sizes written like
//! `64MiB`, and secrets that never print.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written like `30s`, `12h` or `1h 30m`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(Duration);

impl ConfigDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for ConfigDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl fmt::Debug for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl std::str::FromStr for ConfigDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s)
            .map(Self)
            .map_err(|e| format!("{s:?} is not a duration like \"30s\" or \"12h\": {e}"))
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// A secret such as a token. `Debug` and `Serialize` print `[REDACTED]`, so that
/// `sdp config print` and logs can show a configuration whole; the value is wiped on drop.
#[derive(Clone)]
pub struct Secret(SecretString);

pub const REDACTED: &str = "[REDACTED]";

impl Secret {
    pub fn new(value: String) -> Self {
        Self(SecretString::from(value))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        if raw.is_empty() {
            return Err(serde::de::Error::custom("a secret cannot be empty"));
        }
        if raw == REDACTED {
            return Err(serde::de::Error::custom(
                "this secret was redacted by `sdp config print`; set the real value, preferably through the environment",
            ));
        }
        Ok(Self::new(raw))
    }
}

/// A size in bytes, written like `64MiB`, `512KiB`, `1GiB` or a plain number of bytes
/// (`1048576`, as a string or a TOML integer). Only binary units are taken: `MB` could mean
/// 10^6 or 2^20 bytes, and a limit should not depend on which the reader assumed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(u64);

const UNITS: [(&str, u64); 5] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

impl ByteSize {
    pub const fn bytes(n: u64) -> Self {
        Self(n)
    }

    pub const fn kib(n: u64) -> Self {
        Self(n << 10)
    }

    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    pub const fn gib(n: u64) -> Self {
        Self(n << 30)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that writes it whole: `64MiB`, `1536KiB`, `1000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in &UNITS[..4] {
            if self.0 >= *size && self.0.is_multiple_of(*size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let explain = || {
            format!(
                "{s:?} is not a size like \"64MiB\", \"512KiB\" or \"1048576\" (bytes); the units are B, KiB, MiB, GiB and TiB"
            )
        };
        let trimmed = s.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let number: u64 = number.parse().map_err(|_| explain())?;
        let unit = unit.trim_start();
        let multiplier = match unit {
            "" => 1,
            _ => {
                UNITS
                    .iter()
                    .find(|(name, _)| *name == unit)
                    .ok_or_else(explain)?
                    .1
            }
        };
        number
            .checked_mul(multiplier)
            .map(Self)
            .ok_or_else(|| format!("{s:?} is too large a size"))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"64MiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("a size cannot be negative ({v})")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_in_binary_units_or_bytes_and_written_back_whole() {
        for (text, bytes) in [
            ("64MiB", 64 << 20),
            ("512KiB", 512 << 10),
            ("1048576", 1 << 20),
            ("2 GiB", 2 << 30),
            ("10B", 10),
            ("0", 0),
        ] {
            assert_eq!(text.parse::<ByteSize>().unwrap().get(), bytes, "{text}");
        }
        assert_eq!(ByteSize::mib(64).to_string(), "64MiB");
        assert_eq!(ByteSize::kib(1536).to_string(), "1536KiB");
        assert_eq!(ByteSize::bytes(1000).to_string(), "1000");
    }

    #[test]
    fn a_size_that_is_not_one_is_refused_with_the_units_named() {
        for text in [
            "64MB",
            "lots",
            "-1",
            "64 mib",
            "",
            "1.5GiB",
            "99999999999TiB",
        ] {
            let err = text.parse::<ByteSize>().unwrap_err();
            assert!(err.contains(text), "{err}");
        }
        assert!("64M".parse::<ByteSize>().unwrap_err().contains("MiB"));
    }
}
