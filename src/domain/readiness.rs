//! Readiness: does this worker reach every component it needs?
//!
//! The shell probes each component (with a timeout) and hands the outcomes here;
//! this module only decides what they add up to. A deployment is ready only when
//! every component is up: a worker that cannot reach PostgreSQL can still serve
//! the reconnect hot path, but a load balancer or an operator needs to know.

use serde::Serialize;

/// The components `/readyz` proves, in the order they are reported.
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// Workers KV: a write and a read-back of a probe key.
    Kv,
    /// A Durable Object round trip that touches its transactional storage.
    DurableObject,
    /// A query to PostgreSQL through the uncached Hyperdrive binding.
    Database,
}

/// Why a probe failed. Stable codes: the raw error goes to the log, not the client.
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The probe did not finish within its time budget.
    Timeout,
    /// The component answered with an error.
    Error,
    /// The component answered, but not with what the probe wrote or expected.
    WrongAnswer,
}

/// The outcome of one probe.
#[cfg_attr(not(target_arch = "wasm32"), derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub component: Component,
    /// `"up"` or `"down"`.
    pub status: &'static str,
    /// Wall time the probe took, in milliseconds.
    pub latency_ms: u64,
    /// Present when the component is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

impl Probe {
    pub fn up(component: Component, latency_ms: u64) -> Self {
        Probe {
            component,
            status: "up",
            latency_ms,
            failure: None,
        }
    }

    pub fn down(component: Component, latency_ms: u64, failure: Failure) -> Self {
        Probe {
            component,
            status: "down",
            latency_ms,
            failure: Some(failure),
        }
    }

    pub fn is_up(&self) -> bool {
        self.failure.is_none()
    }
}

/// All probes of one `/readyz` call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub components: Vec<Probe>,
}

impl Report {
    pub fn new(components: Vec<Probe>) -> Self {
        Report { components }
    }

    /// Ready only if at least one component was probed and all are up.
    pub fn is_ready(&self) -> bool {
        !self.components.is_empty() && self.components.iter().all(Probe::is_up)
    }

    /// The components that are down, for the problem's `detail`.
    pub fn down(&self) -> impl Iterator<Item = Component> + '_ {
        self.components
            .iter()
            .filter(|p| !p.is_up())
            .map(|p| p.component)
    }
}

impl Component {
    pub const fn as_str(self) -> &'static str {
        match self {
            Component::Kv => "kv",
            Component::DurableObject => "durable_object",
            Component::Database => "database",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_components_up_is_ready() {
        let r = Report::new(vec![
            Probe::up(Component::Kv, 3),
            Probe::up(Component::DurableObject, 5),
            Probe::up(Component::Database, 7),
        ]);
        assert!(r.is_ready());
        assert_eq!(r.down().count(), 0);
    }

    #[test]
    fn one_component_down_is_not_ready_and_is_named() {
        let r = Report::new(vec![
            Probe::up(Component::Kv, 3),
            Probe::down(Component::Database, 2000, Failure::Timeout),
        ]);
        assert!(!r.is_ready());
        assert_eq!(r.down().collect::<Vec<_>>(), vec![Component::Database]);
    }

    #[test]
    fn no_probe_at_all_is_not_ready() {
        assert!(!Report::new(vec![]).is_ready());
    }

    #[test]
    fn a_probe_serialises_with_snake_case_names_and_omits_absent_failure() {
        let up = serde_json::to_value(Probe::up(Component::DurableObject, 4)).unwrap();
        assert_eq!(
            up,
            serde_json::json!({"component": "durable_object", "status": "up", "latency_ms": 4})
        );
        let down = serde_json::to_value(Probe::down(Component::Database, 9, Failure::WrongAnswer))
            .unwrap();
        assert_eq!(down["failure"], "wrong_answer");
        assert_eq!(down["status"], "down");
    }
}
