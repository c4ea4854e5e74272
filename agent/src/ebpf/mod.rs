//! eBPF host attribution: the programs of `agent-ebpf/` (C, CO-RE), loaded with aya, read
//! from their ring buffer into the pipeline. So far: process executions.

pub mod event;
pub mod proc_snapshot;
pub mod source;
