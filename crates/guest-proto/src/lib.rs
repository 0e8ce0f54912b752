//! Wire protocol between the sbx host and the guest agent.
//!
//! Work in progress: message types and codec land with the workspace issue.

pub mod limits;
