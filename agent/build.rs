//! Compiles the eBPF programs of `agent-ebpf/` with clang (CO-RE, `-target bpf`); the agent
//! embeds the object and loads it with aya at start.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap())
        .parent()
        .expect("the workspace")
        .join("agent-ebpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("process.bpf.o");
    for f in [
        "src/process.bpf.c",
        "src/process.h",
        "include/kernel_types.h",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    let clang = std::env::var("NATTRAIL_CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-D__TARGET_ARCH_x86",
            "-Wall",
            "-Werror",
        ])
        .arg("-I")
        .arg(dir.join("include"))
        // asm/types.h, which libbpf's headers include, lives under the multiarch directory.
        .args(["-I", "/usr/include/x86_64-linux-gnu"])
        .arg("-c")
        .arg(dir.join("src/process.bpf.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {clang} to build the eBPF programs: {e}; install clang and libbpf-dev \
                 (cargo xtask test and demo install them)"
            )
        });
    assert!(
        status.success(),
        "{clang} failed on agent-ebpf/src/process.bpf.c"
    );
}
