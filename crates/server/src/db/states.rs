//! The states of sandboxes, deployments and services, stored as TEXT.

use std::fmt;
use std::str::FromStr;

macro_rules! state_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownState(s.chars().take(40).collect())),
                }
            }
        }
    };
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(String);

state_enum!(
    /// A sandbox's state (SPEC §3): it follows its latest deployment until it ends, but for
    /// sleep: a `ready` sandbox idle past `idle_after` is `sleeping` until it is woken.
    SandboxState {
        Deploying => "deploying",
        Ready => "ready",
        Failed => "failed",
        /// Its instances are stopped (builds kept) until a request or a person wakes it.
        Sleeping => "sleeping",
        Expired => "expired",
        Deleted => "deleted",
    }
);

impl SandboxState {
    pub const ALL: &[SandboxState] = &[
        SandboxState::Deploying,
        SandboxState::Ready,
        SandboxState::Failed,
        SandboxState::Sleeping,
        SandboxState::Expired,
        SandboxState::Deleted,
    ];

    /// Ended sandboxes keep their rows for history; their names are free again.
    pub fn has_ended(self) -> bool {
        matches!(self, SandboxState::Expired | SandboxState::Deleted)
    }
}

state_enum!(
    /// A deployment's state. `queued` and `running` are in progress; the others are final.
    DeploymentState {
        Queued => "queued",
        Running => "running",
        Ready => "ready",
        Failed => "failed",
        /// Its sandbox ended while it was in progress.
        Cancelled => "cancelled",
    }
);

impl DeploymentState {
    pub const ALL: &[DeploymentState] = &[
        DeploymentState::Queued,
        DeploymentState::Running,
        DeploymentState::Ready,
        DeploymentState::Failed,
        DeploymentState::Cancelled,
    ];

    pub fn in_progress(self) -> bool {
        matches!(self, DeploymentState::Queued | DeploymentState::Running)
    }
}

state_enum!(
    /// A sandbox's service: what runs of it now.
    ServiceState {
        /// A deployment of it is in progress.
        Deploying => "deploying",
        /// An instance runs, at `upstream`.
        Running => "running",
        /// An instance runs, but its health check failed three times in a row: not routed.
        Unhealthy => "unhealthy",
        /// Its instance ended by itself after it was ready; its agent may be restarting it
        /// (`restarts` counts the restarts). Not routed.
        Crashed => "crashed",
        /// Stopped on purpose with its sandbox, its build kept.
        Sleeping => "sleeping",
        /// No instance runs.
        Failed => "failed",
        /// Its sandbox ended.
        Stopped => "stopped",
    }
);

impl ServiceState {
    /// Whether requests for the service are answered 503 `instance_down` by the router:
    /// its instance was ready once and cannot serve now.
    pub fn is_down(self) -> bool {
        matches!(
            self,
            ServiceState::Unhealthy | ServiceState::Crashed | ServiceState::Sleeping
        )
    }
}

/// How the end of a sandbox came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Deleted,
    Expired,
}

impl Ending {
    pub fn state(self) -> SandboxState {
        match self {
            Ending::Deleted => SandboxState::Deleted,
            Ending::Expired => SandboxState::Expired,
        }
    }
}
