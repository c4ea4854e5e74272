//! What the agent knows of one container: its id, its name, the names its workload goes by
//! (for rule scopes) and whether it has a TTY.

use std::collections::HashMap;

use bollard::models::ContainerInspectResponse;

use crate::pipeline::messages::ContainerInfo;

/// Docker compose's label naming a container's service.
pub const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";

impl ContainerInfo {
    /// Builds it from `docker inspect`; `workload_labels` are the configured labels whose
    /// values name a workload. None when Docker left out the id.
    pub fn from_inspect(c: &ContainerInspectResponse, workload_labels: &[String]) -> Option<Self> {
        let id = c.id.clone()?;
        let name = c
            .name
            .as_deref()
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.chars().take(12).collect());
        let config = c.config.as_ref();
        let empty = HashMap::new();
        let labels = config.and_then(|c| c.labels.as_ref()).unwrap_or(&empty);
        Some(ContainerInfo {
            workloads: workloads(&name, labels, workload_labels),
            tty: config.and_then(|c| c.tty).unwrap_or(false),
            running: c.state.as_ref().and_then(|s| s.running).unwrap_or(false),
            id,
            name,
        })
    }

    /// The workload shown in hits: its most specific name.
    pub fn workload(&self) -> &str {
        self.workloads
            .first()
            .map(String::as_str)
            .unwrap_or(&self.name)
    }
}

fn workloads(
    name: &str,
    labels: &HashMap<String, String>,
    workload_labels: &[String],
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let keys = workload_labels
        .iter()
        .map(String::as_str)
        .chain([COMPOSE_SERVICE_LABEL]);
    for v in keys
        .filter_map(|k| labels.get(k))
        .chain([&name.to_string()])
    {
        if !v.is_empty() && !out.contains(v) {
            out.push(v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_most_specific_first_without_repeats() {
        let labels: HashMap<String, String> = [
            ("nattrail.workload".to_string(), "shop".to_string()),
            (COMPOSE_SERVICE_LABEL.to_string(), "web".to_string()),
            ("other".to_string(), "x".to_string()),
        ]
        .into();
        assert_eq!(
            workloads("web", &labels, &["nattrail.workload".into()]),
            ["shop", "web"]
        );
        assert_eq!(workloads("db-1", &HashMap::new(), &[]), ["db-1"]);
    }
}
