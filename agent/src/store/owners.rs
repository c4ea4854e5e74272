//! The owners of recent sockets, kept by the writer for half a minute so that a connection
//! event published to triggers names its process and container. The trail's own answers
//! (`who`, `flows`) join the stored rows instead (`query/attribution.rs`); this is the live
//! view, kept only while a trigger wants connection events.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use serde_json::{Value, json};

use super::sockets::wide;
use crate::pipeline::messages::ContainerSeen;
use crate::pipeline::process::SocketEvent;

/// How long a socket's owner is kept after its first packet.
const KEEP_NS: u64 = 30_000_000_000;
/// At most this many sockets, and as many processes' files, are kept; past it the oldest go.
const CAP: usize = 65_536;

/// Protocol, source address and port, destination address and port.
pub type Tuple = (u8, u128, u16, u128, u16);

/// A tuple from its parts.
pub fn tuple(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Tuple {
    (proto, wide(src), sport, wide(dst), dport)
}

struct Owner {
    pid: u32,
    comm: String,
    cgroup_id: u64,
    netns: u32,
}

/// Recent socket owners, the files processes executed, and the running containers.
#[derive(Default)]
pub struct RecentOwners {
    sockets: HashMap<Tuple, Owner>,
    order: VecDeque<(u64, Tuple)>,
    exe: HashMap<u32, String>,
    containers: HashMap<u64, (String, String)>,
    by_netns: HashMap<u32, (String, String)>,
}

impl RecentOwners {
    /// Keeps a socket's owner.
    pub fn socket(&mut self, ev: &SocketEvent) {
        let Some(o) = &ev.owner else {
            return;
        };
        if self.order.len() >= CAP
            && let Some((_, old)) = self.order.pop_front()
        {
            self.sockets.remove(&old);
        }
        let key = tuple(
            ev.proto,
            ev.src.ip(),
            ev.src.port(),
            ev.dst.ip(),
            ev.dst.port(),
        );
        self.order.push_back((ev.ts_ns, key));
        self.sockets.insert(
            key,
            Owner {
                pid: o.pid,
                comm: o.comm.clone(),
                cgroup_id: ev.cgroup_id,
                netns: o.netns,
            },
        );
    }

    /// Keeps the file a process executed.
    pub fn exec(&mut self, pid: u32, filename: &str) {
        if self.exe.len() < CAP || self.exe.contains_key(&pid) {
            self.exe.insert(pid, filename.to_string());
        }
    }

    /// Forgets an ended process.
    pub fn exit(&mut self, pid: u32) {
        self.exe.remove(&pid);
    }

    /// Keeps or forgets a container run.
    pub fn container(&mut self, c: &ContainerSeen) {
        let names = (c.name.clone(), c.workload.clone());
        if let Some(cg) = c.cgroup_id {
            if c.ended_ns.is_some() {
                self.containers.remove(&cg);
            } else {
                self.containers.insert(cg, names.clone());
            }
        }
        if let Some(ns) = c.netns {
            if c.ended_ns.is_some() {
                self.by_netns.remove(&ns);
            } else {
                self.by_netns.insert(ns, names);
            }
        }
    }

    /// Forgets sockets older than the keep time.
    pub fn expire(&mut self, now_ns: u64) {
        while let Some(&(ts, key)) = self.order.front() {
            if ts.saturating_add(KEEP_NS) >= now_ns {
                break;
            }
            self.order.pop_front();
            self.sockets.remove(&key);
        }
    }

    /// The owner of a flow seen by its original tuple (a container's socket) or its tuple
    /// after this host's source NAT (a host process's socket). Unknown when no socket is kept:
    /// a flow's conntrack event may reach the writer before its socket's record, so "no local
    /// owner" is only said by the stored trail, never here.
    pub fn describe(&self, original: Tuple, translated: Tuple) -> Value {
        let Some(o) = self
            .sockets
            .get(&original)
            .or_else(|| self.sockets.get(&translated))
        else {
            return json!({ "status": "unknown" });
        };
        let container = self
            .containers
            .get(&o.cgroup_id)
            .or_else(|| self.by_netns.get(&o.netns));
        json!({
            "status": "local",
            "pid": o.pid,
            "comm": o.comm,
            "exe": self.exe.get(&o.pid),
            "container": container.map(|c| &c.0),
            "workload": container.map(|c| &c.1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::process::SocketOwner;

    fn sock(sport: u16, ts_ns: u64, cgroup_id: u64) -> SocketEvent {
        SocketEvent {
            ts_ns,
            proto: 6,
            src: format!("172.17.0.2:{sport}").parse().unwrap(),
            dst: "192.0.2.9:443".parse().unwrap(),
            owner: Some(SocketOwner {
                pid: 42,
                tid: 42,
                uid: 0,
                comm: "curl".into(),
                start_ns: 1,
                netns: 7,
            }),
            cgroup_id,
            cookie: 1,
        }
    }

    #[test]
    fn a_flow_is_named_while_its_socket_is_kept() {
        let mut o = RecentOwners::default();
        o.exec(42, "/usr/bin/curl");
        o.container(&ContainerSeen {
            id: "a".into(),
            name: "web".into(),
            image: "i".into(),
            workload: "shop".into(),
            started_ns: 0,
            ended_ns: None,
            cgroup_id: Some(11),
            netns: Some(7),
            addresses: Vec::new(),
        });
        o.socket(&sock(40000, 1_000, 11));
        let dst: IpAddr = "192.0.2.9".parse().unwrap();
        let key = |sport| tuple(6, "172.17.0.2".parse().unwrap(), sport, dst, 443);
        let public = tuple(6, "203.0.113.1".parse().unwrap(), 1, dst, 443);
        assert_eq!(
            o.describe(key(40000), public),
            json!({"status": "local", "pid": 42, "comm": "curl", "exe": "/usr/bin/curl",
                   "container": "web", "workload": "shop"})
        );
        assert_eq!(o.describe(key(40001), public), json!({"status": "unknown"}));
        o.expire(1_000 + KEEP_NS + 1);
        assert_eq!(o.describe(key(40000), public), json!({"status": "unknown"}));
    }
}
