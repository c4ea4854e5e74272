//! Where this host mounts its cgroup-v2 hierarchy: the eBPF source attaches its socket
//! programs at its root, and the Docker source reads container cgroup ids in it.

use std::path::PathBuf;

/// The cgroup-v2 root: `/sys/fs/cgroup/unified` on a hybrid host, `/sys/fs/cgroup` on a
/// unified one; None where no cgroup-v2 hierarchy is mounted (an agent started by `ip netns
/// exec` sees a fresh /sys without cgroups).
pub fn v2_root() -> Option<PathBuf> {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| statfs(*p).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC))
        .map(PathBuf::from)
}

/// The cgroup-v2 id of a Docker container's own cgroup: the inode of its directory, under
/// the cgroupfs driver (`docker/<id>`) or the systemd driver (`system.slice/docker-<id>.scope`).
/// None where its tasks have no cgroup of their own in v2 (the v2 root on some hybrid hosts):
/// attribution then falls back to the network namespace.
pub fn docker_container_id(root: &std::path::Path, container_id: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    // The id comes from dockerd: only hex digits make a path component.
    if container_id.is_empty() || !container_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    [
        root.join("docker").join(container_id),
        root.join("system.slice")
            .join(format!("docker-{container_id}.scope")),
    ]
    .iter()
    .find_map(|p| {
        std::fs::metadata(p)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| m.ino())
    })
}
