//! The lowercase names of wire task states (`pending`, `leased`, …): the one
//! spelling the server's store, adcectl's flags, tables and JSON all use.
//! prost's own `as_str_name` gives the proto identifiers
//! (`TASK_STATE_PENDING`) instead.

use crate::v1::TaskState;

impl TaskState {
    /// Every state a task can be in, in life-cycle order (not `Unspecified`).
    pub const ALL: [TaskState; 6] = [
        TaskState::Pending,
        TaskState::Leased,
        TaskState::Done,
        TaskState::Dead,
        TaskState::Unavailable,
        TaskState::Cancelled,
    ];

    /// The lowercase name; empty for `Unspecified`.
    pub const fn name(self) -> &'static str {
        match self {
            TaskState::Unspecified => "",
            TaskState::Pending => "pending",
            TaskState::Leased => "leased",
            TaskState::Done => "done",
            TaskState::Dead => "dead",
            TaskState::Unavailable => "unavailable",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// The state with this lowercase name; `None` for any other text,
    /// the empty name included.
    pub fn from_name(name: &str) -> Option<Self> {
        TaskState::ALL
            .into_iter()
            .find(|state| state.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_has_a_name_that_parses_back() {
        let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "pending",
                "leased",
                "done",
                "dead",
                "unavailable",
                "cancelled"
            ]
        );
        for state in TaskState::ALL {
            assert_eq!(TaskState::from_name(state.name()), Some(state));
        }
        assert_eq!(TaskState::Unspecified.name(), "");
        assert_eq!(TaskState::from_name(""), None);
        assert_eq!(TaskState::from_name("PENDING"), None);
    }
}
