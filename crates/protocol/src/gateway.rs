//! A catalog service of `kind = "gateway"` (SPEC §5, §9): the company's own API gateway,
//! deployed from a branch on the gateway agent, and how it learns its sandbox's routes.

use serde::{Deserialize, Serialize};

/// How the gateway agent tells a sandbox's gateway where to route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewaySpec {
    /// Where the agent writes the routes, relative to the gateway's working directory.
    pub routes_file: CheckoutPath,
    /// None: the routes as JSON ([`crate::GatewayRoutes`]); else this file of the gateway's
    /// own repository is rendered with them (a minijinja template) and written instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_template: Option<CheckoutPath>,
    /// What makes a running gateway read the file again.
    pub reload: Reload,
}

/// A path inside a checkout: relative, with no `.`, `..` or empty component, so that it can
/// never name anything outside the checkout by itself (links are the writer's business).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CheckoutPath(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidGatewaySetting(String);

impl CheckoutPath {
    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidGatewaySetting> {
        let raw = raw.into();
        let bad = |why: &str| InvalidGatewaySetting(format!("{raw:?} {why}"));
        if raw.is_empty() || raw.len() > 255 {
            return Err(bad("must be a path of 1 to 255 bytes"));
        }
        if raw.starts_with('/') {
            return Err(bad("must be relative to the service's working directory"));
        }
        if raw
            .chars()
            .any(|c| c.is_control() || c == '\\' || c == '\0')
        {
            return Err(bad("may not hold control characters or backslashes"));
        }
        if raw
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(bad("may not hold empty, `.` or `..` parts"));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CheckoutPath {
    type Error = InvalidGatewaySetting;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(raw)
    }
}

impl From<CheckoutPath> for String {
    fn from(path: CheckoutPath) -> String {
        path.0
    }
}

impl std::fmt::Display for CheckoutPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `restart` or `signal:<NAME>` (SPEC §9's `reload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Reload {
    /// The instance is stopped and started again (a health check follows).
    Restart,
    /// The instance is sent this signal.
    Signal(ReloadSignal),
}

/// The signals a gateway may ask to be reloaded with: those a program handles to reload,
/// never one that stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadSignal {
    Hup,
    Usr1,
    Usr2,
}

impl ReloadSignal {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadSignal::Hup => "HUP",
            ReloadSignal::Usr1 => "USR1",
            ReloadSignal::Usr2 => "USR2",
        }
    }
}

impl Reload {
    pub fn parse(raw: &str) -> Result<Self, InvalidGatewaySetting> {
        match raw {
            "restart" => Ok(Reload::Restart),
            "signal:HUP" => Ok(Reload::Signal(ReloadSignal::Hup)),
            "signal:USR1" => Ok(Reload::Signal(ReloadSignal::Usr1)),
            "signal:USR2" => Ok(Reload::Signal(ReloadSignal::Usr2)),
            other => Err(InvalidGatewaySetting(format!(
                "reload {:?} is not \"restart\", \"signal:HUP\", \"signal:USR1\" or \"signal:USR2\"",
                other.chars().take(40).collect::<String>()
            ))),
        }
    }
}

impl TryFrom<String> for Reload {
    type Error = InvalidGatewaySetting;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<Reload> for String {
    fn from(reload: Reload) -> String {
        reload.to_string()
    }
}

impl std::fmt::Display for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reload::Restart => f.write_str("restart"),
            Reload::Signal(signal) => write!(f, "signal:{}", signal.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routes_file_is_a_plain_relative_path_inside_the_checkout() {
        for good in [
            "config/routes.json",
            "routes.json",
            "a/b/c.tmpl",
            ".sdp/routes",
        ] {
            assert_eq!(CheckoutPath::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./x",
            "a/",
            "a\\b",
            "a\nb",
        ] {
            assert!(CheckoutPath::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reload_is_restart_or_a_reloading_signal() {
        for (raw, reload) in [
            ("restart", Reload::Restart),
            ("signal:HUP", Reload::Signal(ReloadSignal::Hup)),
            ("signal:USR2", Reload::Signal(ReloadSignal::Usr2)),
        ] {
            assert_eq!(Reload::parse(raw).unwrap(), reload);
            assert_eq!(reload.to_string(), raw);
        }
        for bad in ["signal:KILL", "signal:TERM", "hup", "signal:", ""] {
            assert!(Reload::parse(bad).is_err(), "{bad:?}");
        }
    }
}
