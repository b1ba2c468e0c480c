//! Newtypes that validate on construction, so that bad input is refused at the edge and can
//! never reach git, a shell or a URL.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Why a name was refused. The message is written for the person who typed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?} is not valid: {reason}")]
pub struct InvalidName {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl InvalidName {
    fn new(kind: &'static str, value: &str, reason: &'static str, echo: bool) -> Self {
        // Keep the echo of hostile input short; never echo what may hold a secret.
        let value: String = if echo {
            value.chars().take(80).collect()
        } else {
            "[REDACTED]".to_owned()
        };
        Self {
            kind,
            value,
            reason,
        }
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:path) => {
        name_type!($(#[$doc])* $name, $kind, $check, echo = true);
    };
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:path, echo = $echo:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidName> {
                let value = value.into();
                match $check(&value) {
                    Ok(()) => Ok(Self(value)),
                    Err(reason) => Err(InvalidName::new($kind, &value, reason, $echo)),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::parse(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A catalog service name: a DNS label, because it becomes part of container names and
    /// labels.
    ServiceName,
    "service name",
    check_dns_label
);
name_type!(
    /// A sandbox name: a DNS label, because it becomes `<sandbox>.<base_domain>`.
    SandboxName,
    "sandbox name",
    check_dns_label
);
name_type!(
    /// A git branch name, by git's ref-name rules, and never starting with `-` so that it can
    /// never be read as an option.
    BranchName,
    "branch name",
    check_branch
);
name_type!(
    /// An agent's name: letters, digits, `.`, `_` and `-`, starting with a letter or digit.
    AgentName,
    "agent name",
    check_agent_name
);
name_type!(
    /// A Bitbucket username as typed at login. It travels in HTTP Basic auth, so it can hold
    /// no `:` and no control character.
    Username,
    "username",
    check_username
);
name_type!(
    /// A git remote: a URL or a local path, never an option and never carrying credentials.
    /// A username in the URL is refused too: git would then ask only for the password and
    /// send the URL's username, not the one the user logged in with. A refused URL is not
    /// echoed in the error, as it may hold a password.
    RepoUrl,
    "repository URL",
    check_repo_url,
    echo = false
);

name_type!(
    /// A sandbox's id: `sbx_` and 16 lower-case hex digits. Agents key everything of a
    /// sandbox by it (its deployments in progress, checkouts, instances, labels, pid files),
    /// never by its name: a name can be reused the moment its sandbox has ended.
    SandboxId,
    "sandbox id",
    check_sandbox_id
);
name_type!(
    /// A deployment's id: `dep_` and 16 lower-case hex digits. It names the deployment's log
    /// file on the control plane, so it can never hold a path.
    DeploymentId,
    "deployment id",
    check_deployment_id
);

fn check_id(s: &str, prefix: &str) -> Result<(), &'static str> {
    let hex = s.strip_prefix(prefix).ok_or("it has the wrong prefix")?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("it must end in 16 lower-case hex digits");
    }
    Ok(())
}

fn check_sandbox_id(s: &str) -> Result<(), &'static str> {
    check_id(s, "sbx_")
}

fn check_deployment_id(s: &str) -> Result<(), &'static str> {
    check_id(s, "dep_")
}

fn check_dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > 63 {
        return Err("it is longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("use only lower-case letters, digits and '-'");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("it cannot start or end with '-'");
    }
    Ok(())
}

fn check_branch(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > 255 {
        return Err("it is longer than 255 bytes");
    }
    if s.starts_with('-') {
        return Err("it cannot start with '-'");
    }
    if s == "@" {
        return Err("'@' alone is not a branch");
    }
    if s.chars().any(|c| c.is_control() || c == ' ') {
        return Err("it cannot contain spaces or control characters");
    }
    if s.chars()
        .any(|c| matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return Err("it cannot contain ~ ^ : ? * [ or \\");
    }
    if s.contains("..") || s.contains("@{") || s.contains("//") {
        return Err("it cannot contain '..', '@{' or '//'");
    }
    if s.starts_with('/') || s.ends_with('/') || s.ends_with('.') {
        return Err("it cannot start or end with '/' or end with '.'");
    }
    if s.split('/')
        .any(|part| part.starts_with('.') || part.ends_with(".lock"))
    {
        return Err("no part of it can start with '.' or end with '.lock'");
    }
    Ok(())
}

fn check_agent_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 64 {
        return Err("it must be 1 to 64 characters long");
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("it must start with a letter or digit");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("use only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn check_username(s: &str) -> Result<(), &'static str> {
    if s.trim().is_empty() {
        return Err("it is empty");
    }
    if s.len() > 256 {
        return Err("it is longer than 256 bytes");
    }
    if s.chars().any(|c| c.is_control() || c == ':') {
        return Err("it cannot contain ':' or control characters");
    }
    Ok(())
}

fn check_repo_url(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.starts_with('-') {
        return Err("it cannot start with '-'");
    }
    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("it cannot contain spaces or control characters");
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') && matches!(scheme, "http" | "https") {
            return Err(
                "it carries a user name or password; credentials come from the user's login, never from the URL",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_a_prefix_and_sixteen_hex_digits_and_nothing_else() {
        assert!(SandboxId::parse("sbx_0123456789abcdef").is_ok());
        assert!(DeploymentId::parse("dep_0123456789abcdef").is_ok());
        for bad in [
            "",
            "sbx_",
            "dep_0123456789abcdef",
            "sbx_0123456789ABCDEF",
            "sbx_0123456789abcde",
            "sbx_0123456789abcdef0",
            "sbx_../../etc/passwd1",
            "pay-42",
        ] {
            assert!(SandboxId::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(DeploymentId::parse("sbx_0123456789abcdef").is_err());
    }

    #[test]
    fn branch_names_follow_git_rules_and_never_look_like_options() {
        for good in ["main", "feature/x", "release/1.0", "fix-123_a", "user@host"] {
            assert!(BranchName::parse(good).is_ok(), "{good} should be accepted");
        }
        for bad in [
            "",
            "--upload-pack=touch /tmp/x",
            "-x",
            "../x",
            "a..b",
            "with space",
            "tab\there",
            "nl\nx",
            "x~1",
            "x^",
            "a:b",
            "what?",
            "st*r",
            "br[",
            "back\\slash",
            "/lead",
            "trail/",
            "dot.",
            "a//b",
            ".hidden",
            "a/.hidden",
            "x.lock",
            "a@{1}",
            "@",
            "\u{7f}",
        ] {
            assert!(BranchName::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn sandbox_and_service_names_are_dns_labels() {
        for good in ["a", "pay-42", "x1"] {
            assert!(SandboxName::parse(good).is_ok());
            assert!(ServiceName::parse(good).is_ok());
        }
        let long = "a".repeat(64);
        for bad in ["", "A", "-a", "a-", "a_b", "a.b", "é", long.as_str()] {
            assert!(
                SandboxName::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn usernames_cannot_break_basic_auth() {
        assert!(Username::parse("alice").is_ok());
        assert!(Username::parse("alice.smith@example.com").is_ok());
        for bad in ["", "  ", "a:b", "a\nb", "a\0b"] {
            assert!(Username::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn repo_urls_never_carry_passwords_or_look_like_options() {
        assert!(RepoUrl::parse("https://git.example.com/scm/a/b.git").is_ok());
        assert!(RepoUrl::parse("/srv/git/a.git").is_ok());
        assert!(RepoUrl::parse("https://alice@git.example.com/scm/a/b.git").is_err());
        let err = RepoUrl::parse("https://alice:secret@git.example.com/a.git").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(RepoUrl::parse("--upload-pack=x").is_err());
        assert!(RepoUrl::parse("a b").is_err());
    }

    #[test]
    fn a_refused_name_says_why_in_words() {
        let err = BranchName::parse("-x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "branch name \"-x\" is not valid: it cannot start with '-'"
        );
    }

    #[test]
    fn deserializing_validates_too() {
        let err = serde_json::from_str::<SandboxName>("\"Bad_Name\"").unwrap_err();
        assert!(err.to_string().contains("sandbox name"), "{err}");
    }
}
