//! What the agent knows of one container: its id, its name, the names its workload goes by
//! (for rule scopes) and whether it has a TTY.

use std::collections::HashMap;

use bollard::models::ContainerInspectResponse;

use crate::pipeline::messages::{ContainerInfo, ContainerSeen};

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

/// An RFC 3339 time from dockerd in ns since the epoch; None for its zero time (never).
fn docker_time(t: Option<&str>) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(t?).ok()?;
    u64::try_from(t.timestamp_nanos_opt()?)
        .ok()
        .filter(|&ns| ns > 0)
}

/// This run of a container from `docker inspect`, with its cgroup under `cgroup_root` and
/// its network namespace; None when Docker left out the id or the start.
pub fn run_of(
    c: &ContainerInspectResponse,
    info: &ContainerInfo,
    cgroup_root: Option<&std::path::Path>,
) -> Option<ContainerSeen> {
    use std::os::unix::fs::MetadataExt;
    let state = c.state.as_ref()?;
    let started_ns = docker_time(state.started_at.as_deref())?;
    let running = state.running.unwrap_or(false);
    let ended_ns = if running {
        None
    } else {
        docker_time(state.finished_at.as_deref()).filter(|&e| e >= started_ns)
    };
    let settings = c.network_settings.as_ref();
    // The namespace file dockerd keeps while the container runs (a bind mount of nsfs).
    let netns = settings
        .and_then(|n| n.sandbox_key.as_deref())
        .filter(|k| running && !k.is_empty())
        .and_then(|k| std::fs::metadata(k).ok())
        .and_then(|m| u32::try_from(m.ino()).ok());
    let mut addresses: Vec<std::net::IpAddr> = settings
        .and_then(|n| n.networks.as_ref())
        .into_iter()
        .flat_map(|nets| nets.values())
        .flat_map(|e| [e.ip_address.as_deref(), e.global_ipv6_address.as_deref()])
        .flatten()
        .filter_map(|a| a.parse().ok())
        .collect();
    addresses.sort();
    addresses.dedup();
    Some(ContainerSeen {
        id: info.id.clone(),
        name: info.name.clone(),
        image: c
            .config
            .as_ref()
            .and_then(|c| c.image.clone())
            .or_else(|| c.image.clone())
            .unwrap_or_default(),
        workload: info.workload().to_string(),
        started_ns,
        ended_ns,
        cgroup_id: cgroup_root
            .filter(|_| running)
            .and_then(|root| crate::pipeline::cgroups::docker_container_id(root, &info.id)),
        netns,
        addresses,
    })
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
