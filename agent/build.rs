//! Compiles the eBPF programs of `agent-ebpf/` with clang (CO-RE, `-target bpf`); the agent
//! embeds the object and loads it with aya at start.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap())
        .parent()
        .expect("the workspace")
        .join("agent-ebpf");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for f in [
        "src/process.bpf.c",
        "src/process.h",
        "src/socket.bpf.c",
        "src/socket.h",
        "include/kernel_types.h",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    duckdb_config_shim();
    println!("cargo:rerun-if-env-changed=NATTRAIL_CLANG");
    let clang = std::env::var("NATTRAIL_CLANG").unwrap_or_else(|_| "clang".into());
    // Two objects, so that a kernel refusing one (socket storage, cgroup attach) keeps the
    // other.
    for name in ["process", "socket"] {
        let src = dir.join(format!("src/{name}.bpf.c"));
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
            // asm/types.h, which the UAPI headers include, lives under the multiarch directory.
            .args(["-I", "/usr/include/x86_64-linux-gnu"])
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(out_dir.join(format!("{name}.bpf.o")))
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {clang} to build the eBPF programs: {e}; install clang and \
                     libbpf-dev (cargo xtask test and demo install them)"
                )
            });
        assert!(status.success(), "{clang} failed on {}", src.display());
    }
}

/// Compiles `src/store/duckdb_config.cpp` against the headers of the bundled DuckDB, which
/// libduckdb-sys publishes (its `links = "duckdb"`) as DEP_DUCKDB_INCLUDE.
fn duckdb_config_shim() {
    let shim = "src/store/duckdb_config.cpp";
    println!("cargo:rerun-if-changed={shim}");
    let include = std::env::var("DEP_DUCKDB_INCLUDE")
        .expect("libduckdb-sys (bundled) publishes the include directory of its DuckDB");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file(shim)
        .include(include)
        .warnings(false)
        .flag_if_supported("-w");
    // The choice libduckdb-sys makes for the library: a header may lay out a struct
    // differently under DEBUG.
    match std::env::var("DEBUG").as_deref() {
        Ok("false" | "0") | Err(_) => build.define("NDEBUG", None),
        Ok(_) => build.define("DEBUG", None),
    };
    build.compile("nattrail_duckdb_config");
}
