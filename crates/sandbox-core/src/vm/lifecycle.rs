//! VM identity and the VM lifecycle state machine.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifier of one microVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(Uuid);

impl VmId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// The id with this UUID (fixed ids for templates and tests).
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// A short form (first 12 hex digits) for file names that must stay short, such as
    /// unix socket paths (108-byte limit).
    pub fn short(&self) -> String {
        self.0.simple().to_string()[..12].to_owned()
    }
}

impl Default for VmId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Work dir, overlay, limits and command are being prepared.
    Creating,
    /// QEMU runs; waiting for the guest agent.
    Booting,
    /// The agent answered; the VM is idle.
    Ready,
    /// An operation is running in the guest.
    Executing,
    /// Teardown is in progress.
    Destroying,
    /// Everything is gone. Terminal.
    Destroyed,
    /// Something broke; only teardown is left.
    Failed,
}

impl VmState {
    /// Every state, for tests and exhaustive tables.
    pub const ALL: [VmState; 7] = [
        VmState::Creating,
        VmState::Booting,
        VmState::Ready,
        VmState::Executing,
        VmState::Destroying,
        VmState::Destroyed,
        VmState::Failed,
    ];

    /// Whether `self → next` is a legal transition.
    pub fn can_transition_to(self, next: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, next),
            (Creating, Booting | Failed | Destroying)
                | (Booting, Ready | Failed | Destroying)
                | (Ready, Executing | Failed | Destroying)
                | (Executing, Ready | Failed | Destroying)
                | (Failed, Destroying)
                | (Destroying, Destroyed)
        )
    }

    /// True for the terminal state.
    pub fn is_terminal(self) -> bool {
        self == VmState::Destroyed
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Creating => "creating",
            Self::Booting => "booting",
            Self::Ready => "ready",
            Self::Executing => "executing",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
            Self::Failed => "failed",
        };
        f.write_str(s)
    }
}

/// An attempted transition that the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal VM state transition {from} -> {to}")]
pub struct IllegalTransition {
    /// State before the attempt (unchanged).
    pub from: VmState,
    /// The refused target state.
    pub to: VmState,
}

/// The lifecycle of one VM: every change goes through [`VmLifecycle::transition`].
#[derive(Debug, Clone)]
pub struct VmLifecycle {
    state: VmState,
}

impl Default for VmLifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl VmLifecycle {
    /// A VM that is being created.
    pub fn new() -> Self {
        Self {
            state: VmState::Creating,
        }
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Move to `next`, or refuse and leave the state unchanged.
    pub fn transition(&mut self, next: VmState) -> Result<VmState, IllegalTransition> {
        if self.state.can_transition_to(next) {
            let prev = self.state;
            self.state = next;
            Ok(prev)
        } else {
            Err(IllegalTransition {
                from: self.state,
                to: next,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn happy_path() {
        let mut vm = VmLifecycle::new();
        for s in [
            VmState::Booting,
            VmState::Ready,
            VmState::Executing,
            VmState::Ready,
            VmState::Destroying,
            VmState::Destroyed,
        ] {
            vm.transition(s).unwrap();
        }
        assert!(vm.state().is_terminal());
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let mut vm = VmLifecycle::new();
        let err = vm.transition(VmState::Executing).unwrap_err();
        assert_eq!(err.from, VmState::Creating);
        assert_eq!(err.to, VmState::Executing);
        assert_eq!(vm.state(), VmState::Creating);
        // Nothing leaves Destroyed.
        for s in VmState::ALL {
            assert!(!VmState::Destroyed.can_transition_to(s));
        }
        // Failed only goes to teardown.
        for s in VmState::ALL {
            assert_eq!(
                VmState::Failed.can_transition_to(s),
                s == VmState::Destroying
            );
        }
    }

    fn state() -> impl Strategy<Value = VmState> {
        prop::sample::select(VmState::ALL.to_vec())
    }

    proptest! {
        /// Random transition sequences: every accepted step is in the table, every refused
        /// step leaves the state unchanged, and once destroyed the VM stays destroyed.
        #[test]
        fn random_sequences_never_reach_an_illegal_state(steps in prop::collection::vec(state(), 0..64)) {
            let mut vm = VmLifecycle::new();
            let mut destroyed = false;
            for next in steps {
                let before = vm.state();
                match vm.transition(next) {
                    Ok(prev) => {
                        prop_assert_eq!(prev, before);
                        prop_assert!(before.can_transition_to(next));
                        prop_assert_eq!(vm.state(), next);
                        prop_assert!(!destroyed);
                    }
                    Err(e) => {
                        prop_assert!(!before.can_transition_to(next));
                        prop_assert_eq!(e.from, before);
                        prop_assert_eq!(vm.state(), before);
                    }
                }
                if vm.state() == VmState::Destroyed {
                    destroyed = true;
                }
                // Destroyed is only reachable through Destroying.
                if vm.state() == VmState::Destroyed && before != VmState::Destroyed {
                    prop_assert_eq!(before, VmState::Destroying);
                }
            }
        }
    }
}
