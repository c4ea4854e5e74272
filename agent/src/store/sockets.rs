//! Socket owners (`socket_events`) from the eBPF socket programs, and container runs
//! (`containers`) from the Docker source: what a flow is attributed with.

use std::net::IpAddr;

use duckdb::{Connection, params};

use super::chunk_appender::{ChunkAppender, Micros};
use super::schema::{StoreError, db_err};
use crate::pipeline::messages::ContainerSeen;
use crate::pipeline::process::SocketEvent;

/// The table the writer appends socket rows to.
pub const TABLE: &str = "socket_events";

/// An address as the trail's views give it: 128 bits, IPv4 as ::ffff:a.b.c.d.
pub fn wide(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().to_bits(),
        IpAddr::V6(v6) => v6.to_bits(),
    }
}

fn micros(ns: u64) -> Micros {
    Micros((ns / 1_000) as i64)
}

/// Appends one socket row.
pub fn append(app: &mut ChunkAppender, ev: &SocketEvent) -> Result<(), StoreError> {
    app.begin_row()?;
    app.set(0, micros(ev.ts_ns));
    app.set(1, ev.proto);
    app.set(2, wide(ev.src.ip()));
    app.set(3, ev.src.port());
    app.set(4, wide(ev.dst.ip()));
    app.set(5, ev.dst.port());
    app.set(6, ev.owner.is_some());
    match &ev.owner {
        Some(o) => {
            app.set(7, o.pid);
            app.set(8, o.tid);
            app.set(9, o.uid);
            app.set_str(10, &o.comm);
            app.set(11, micros(o.start_ns));
            app.set(12, o.netns);
        }
        None => {
            for col in 7..=12 {
                app.set_null(col);
            }
        }
    }
    app.set(13, ev.cgroup_id);
    app.set(14, ev.cookie);
    app.end_row();
    Ok(())
}

/// Records a container run, or its end: one row per (id, start), updated in place.
pub fn record_container(conn: &Connection, c: &ContainerSeen) -> Result<(), StoreError> {
    let addresses = c
        .addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    conn.execute(
        "INSERT INTO containers
         VALUES (?, make_timestamp(?), CASE WHEN ? IS NULL THEN NULL ELSE make_timestamp(?) END,
                 ?, ?, ?, ?, ?, CASE WHEN ? = '' THEN [] ELSE string_split(?, ',') END)
         ON CONFLICT (id, started) DO UPDATE SET
            ended = coalesce(excluded.ended, containers.ended), name = excluded.name,
            workload = excluded.workload,
            cgroup_id = coalesce(excluded.cgroup_id, containers.cgroup_id),
            netns = coalesce(excluded.netns, containers.netns),
            addresses = CASE WHEN len(excluded.addresses) > 0 THEN excluded.addresses
                             ELSE containers.addresses END",
        params![
            c.id,
            (c.started_ns / 1_000) as i64,
            c.ended_ns.map(|n| (n / 1_000) as i64),
            c.ended_ns.map(|n| (n / 1_000) as i64),
            c.name,
            c.image,
            c.workload,
            c.cgroup_id,
            c.netns,
            addresses,
            addresses,
        ],
    )
    .map_err(db_err("recording a container"))?;
    Ok(())
}

/// Records that the socket programs run from `at_ns` in this capture session.
pub fn record_coverage(conn: &Connection, session_id: u64, at_ns: u64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO ebpf_coverage VALUES (?, make_timestamp(?))",
        params![session_id, (at_ns / 1_000) as i64],
    )
    .map_err(db_err("recording the socket programs' start"))?;
    Ok(())
}
