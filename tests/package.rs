//! The .deb as an operator meets it: lintian on the package, then a Debian 12 booted with
//! systemd as PID 1 (systemd-nspawn) that is the NAT gateway itself: the package installs
//! and starts the service as user nattrail with CAP_NET_ADMIN, CAP_BPF and CAP_PERFMON (and its eBPF exec program running), the gateway's own
//! MASQUERADE is recorded and `nattrail who` finds it for root and for a member of group
//! nattrail, the man page renders, an upgrade keeps the flows and the changed conffile,
//! remove keeps the trail and purge deletes it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use nattrail_lab::booted::{self, Booted};
use nattrail_lab::package::build_deb;
use nattrail_lab::scratch::Scratch;
use nattrail_lab::traffic::{FlowDone, FlowSpec, Server, Transport, make_flows};
use nattrail_lab::{packages, sh};

const CLIENT_NS: &str = "ntpkg-c";
const SERVER_NS: &str = "ntpkg-s";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const GW_INSIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const GW_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 2);
const SERVER_PORT: u16 = 9000;
/// Highest exposure `systemd-analyze security` may give the unit.
const MAX_EXPOSURE: f64 = 4.5;
/// CAP_NET_ADMIN (12), CAP_PERFMON (38) and CAP_BPF (39), as /proc/<pid>/status prints a
/// capability set.
const SERVICE_CAPS: &str = "000000c000001000";

/// The client and server namespaces, with the gateway's ends of their links left on the
/// host for the booted system to take.
struct Links;

impl Links {
    fn create() -> Result<Links> {
        Links::remove();
        let links = Links;
        for (ns, pair, addr, route) in [
            (CLIENT_NS, "ntpkg-c", CLIENT, Some(GW_INSIDE)),
            (SERVER_NS, "ntpkg-s", SERVER, None),
        ] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&[
                "ip",
                "link",
                "add",
                &format!("{pair}0"),
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{pair}1"),
            ])?;
            let inside = |args: &[&str]| {
                let mut full = vec!["ip", "netns", "exec", ns];
                full.extend_from_slice(args);
                sh(&full)
            };
            inside(&["ip", "link", "set", "lo", "up"])?;
            inside(&[
                "ip",
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &format!("{pair}0"),
            ])?;
            inside(&["ip", "link", "set", &format!("{pair}0"), "up"])?;
            if let Some(gw) = route {
                inside(&["ip", "route", "add", "default", "via", &gw.to_string()])?;
            }
        }
        Ok(links)
    }

    fn remove() {
        for ns in [CLIENT_NS, SERVER_NS] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        for l in ["ntpkg-c1", "ntpkg-s1"] {
            let _ = sh(&["ip", "link", "del", l]);
        }
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        Links::remove();
    }
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()
}

/// `nattrail who` inside the booted system, run by root or (with `user`) by another user;
/// the answer's (status, internal ip, internal port).
fn who(
    sys: &Booted,
    user: Option<&str>,
    port: u16,
    at: SystemTime,
) -> Result<(String, String, u64)> {
    let cmd = format!(
        "nattrail who --ip {GW_PUBLIC} --port {port} --at {} --tolerance 0s --proto tcp --json",
        rfc3339(at)
    );
    let script = match user {
        Some(u) => format!("runuser -u {u} -- {cmd}"),
        None => cmd,
    };
    let out = sys.sh(&script)?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("who's JSON: {out}"))?;
    let m = &v["matches"][0];
    Ok((
        v["status"].as_str().unwrap_or_default().to_string(),
        m["internal_ip"].as_str().unwrap_or_default().to_string(),
        m["internal_port"].as_u64().unwrap_or(0),
    ))
}

/// Waits until `who` run by root names the client of `flow`, whose public port is `port`.
fn wait_found(sys: &Booted, flow: &FlowDone, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = who(sys, None, port, flow.inside())?;
        if got
            == (
                "found".into(),
                CLIENT.to_string(),
                u64::from(flow.local.port()),
            )
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "who for {GW_PUBLIC}:{port} answered {got:?}, not the client {}",
                flow.local
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Waits until the unit is active (Type=notify: after the agent's start-up dump); how long.
fn wait_active(sys: &Booted, within: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let (_, state) = sys.run("systemctl is-active nattrail.service")?;
        if state.trim() == "active" {
            return Ok(t.elapsed());
        }
        if t.elapsed() > within {
            let (_, journal) = sys.run("journalctl -u nattrail.service --no-pager | tail -20")?;
            bail!(
                "nattrail.service is {} after {within:?}:\n{journal}",
                state.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn main_pid(sys: &Booted) -> Result<u32> {
    Ok(sys
        .sh("systemctl show -p MainPID --value nattrail.service")?
        .trim()
        .parse()?)
}

#[test]
fn the_deb_installs_runs_upgrades_and_purges_on_a_booted_debian() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the booted install test needs root"
    );
    packages::ensure(&["lintian", "systemd-container", "debootstrap", "iproute2"])?;
    let t0 = Instant::now();
    let scratch = Scratch::new("package")?;
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_nattrail"));
    let target = binary
        .parent()
        .and_then(Path::parent)
        .context("the target directory")?
        .to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace")?;
    let debs = scratch.join("debs");
    let first = build_deb(root, &target, &binary, Some("0.1.0-1"), &debs)?;
    let second = build_deb(root, &target, &binary, Some("0.1.0-2"), &debs)?;
    let built = t0.elapsed();

    // Static checks: lintian, no errors (its warnings are printed for the note).
    let lint = std::process::Command::new("lintian")
        .arg(&first)
        .output()
        .context("running lintian")?;
    let lint = String::from_utf8_lossy(&lint.stdout).into_owned();
    println!("lintian:\n{lint}");
    let errors: Vec<&str> = lint.lines().filter(|l| l.starts_with("E:")).collect();
    ensure!(errors.is_empty(), "lintian errors: {errors:?}");

    let rootfs = booted::rootfs()?;
    let prepared = t0.elapsed();

    // Where systemd does not run (a chroot, a container build): the install succeeds, the
    // user exists and the unit is enabled for the next boot, nothing is started.
    let chroot = scratch.join("chroot");
    sh(&[
        "cp",
        "-a",
        &rootfs.display().to_string(),
        &chroot.display().to_string(),
    ])?;
    std::fs::copy(&first, chroot.join("tmp/nattrail.deb"))?;
    let chrooted =
        |script: &str| sh(&["chroot", &chroot.display().to_string(), "sh", "-c", script]);
    chrooted("dpkg -i /tmp/nattrail.deb")?;
    let enabled = chrooted("id -u nattrail >/dev/null && systemctl is-enabled nattrail.service")?;
    ensure!(enabled.trim() == "enabled", "in a chroot: {enabled}");
    std::fs::remove_dir_all(&chroot)?;
    let _links = Links::create()?;
    let sys = Booted::boot(
        &rootfs,
        &scratch.join("root"),
        &["ntpkg-c1", "ntpkg-s1"],
        &[(&debs, "/debs")],
    )?;
    let booted_at = t0.elapsed();

    // The booted system is the gateway: its links, forwarding and its own MASQUERADE.
    sys.sh(&format!(
        "ip addr add {GW_INSIDE}/24 dev ntpkg-c1 && ip link set ntpkg-c1 up && \
         ip addr add {GW_PUBLIC}/24 dev ntpkg-s1 && ip link set ntpkg-s1 up && \
         sysctl -qw net.ipv4.ip_forward=1 && \
         iptables -t nat -A POSTROUTING -o ntpkg-s1 -j MASQUERADE"
    ))?;

    // A Docker host's group: the package grants it to the service (a drop-in), and only
    // because it exists.
    sys.sh("groupadd --system docker")?;

    // Install: the operator's one command.
    let deb1 = format!("/debs/{}", first.file_name().unwrap().to_string_lossy());
    let deb2 = format!("/debs/{}", second.file_name().unwrap().to_string_lossy());
    let install = Instant::now();
    sys.sh(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y {deb1}"
    ))?;
    let installed = install.elapsed();
    let active = wait_active(&sys, Duration::from_secs(30))?;
    println!(
        "apt-get install took {:.1} s (postinst starts the unit and waits for its readiness); \
         active {:.1} s after",
        installed.as_secs_f64(),
        active.as_secs_f64()
    );

    // The kernel settings came from the package's sysctl.d file, applied by its postinst.
    let sysctls = sys.sh(
        "cat /proc/sys/net/netfilter/nf_conntrack_events /proc/sys/net/netfilter/nf_conntrack_acct \
         /proc/sys/net/netfilter/nf_conntrack_timestamp",
    )?;
    ensure!(
        sysctls.split_whitespace().eq(["1", "1", "1"]),
        "sysctls: {sysctls}"
    );

    // Its process: user nattrail, CAP_NET_ADMIN and nothing else, in every set.
    let pid = main_pid(&sys)?;
    let uid = sys.sh("id -u nattrail")?.trim().to_string();
    let status = sys.sh(&format!("cat /proc/{pid}/status"))?;
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    ensure!(
        field("Uid").split_whitespace().all(|u| u == uid) && uid != "0",
        "the agent runs as uid {} (nattrail is {uid})",
        field("Uid")
    );
    let docker_gid = sys
        .sh("getent group docker | cut -d: -f3")?
        .trim()
        .to_string();
    ensure!(
        field("Groups").split_whitespace().any(|g| g == docker_gid),
        "group docker ({docker_gid}) missing from the agent's groups {}",
        field("Groups")
    );
    for set in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        ensure!(
            field(set) == SERVICE_CAPS,
            "{set} is {}, not CAP_NET_ADMIN, CAP_BPF and CAP_PERFMON",
            field(set)
        );
    }

    // With those, its eBPF exec program runs: the install's own commands are recorded.
    let status: serde_json::Value = serde_json::from_str(&sys.sh("nattrail status --json")?)?;
    ensure!(
        status["agent"]["ebpf"]["running"] == true,
        "eBPF in the service: {}",
        status["agent"]["ebpf"]
    );

    // The unit as systemd sees it.
    let verify = sys.sh("systemd-analyze verify /lib/systemd/system/nattrail.service 2>&1")?;
    ensure!(verify.trim().is_empty(), "systemd-analyze verify: {verify}");
    let security = sys.sh("systemd-analyze security --no-pager nattrail.service")?;
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split("nattrail.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no exposure level in:\n{security}"))?;
    println!("systemd-analyze security: exposure {exposure}");
    ensure!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}"
    );

    // Traffic through the gateway's MASQUERADE.
    let server = Server::start(SERVER_NS, IpAddr::V4(SERVER), &[SERVER_PORT], 64)?;
    let specs: Vec<FlowSpec> = (0..5)
        .map(|i| FlowSpec {
            token: format!("pkg-{i}"),
            transport: Transport::Tcp,
            client: IpAddr::V4(CLIENT),
            client_port: 0,
            server: SocketAddr::new(IpAddr::V4(SERVER), SERVER_PORT),
            send_bytes: 128,
            hold: Duration::from_millis(100),
        })
        .collect();
    let done = make_flows(CLIENT_NS, specs, 1)?;
    let port_of = |d: &FlowDone| -> Result<u16> {
        let seen = server
            .seen(&d.spec.token)
            .with_context(|| format!("the server never saw {}", d.spec.token))?;
        ensure!(
            seen.peer.ip() == IpAddr::V4(GW_PUBLIC),
            "not translated: {seen:?}"
        );
        Ok(seen.peer.port())
    };
    for d in &done {
        wait_found(&sys, d, port_of(d)?)?;
    }
    // A member of group nattrail, through the API socket.
    sys.sh("useradd --create-home --groups nattrail alice")?;
    for d in &done {
        let got = who(&sys, Some("alice"), port_of(d)?, d.inside())?;
        ensure!(
            got == (
                "found".into(),
                CLIENT.to_string(),
                u64::from(d.local.port())
            ),
            "alice's who for {}: {got:?}",
            d.local
        );
    }
    // And someone outside the group is refused.
    sys.sh("useradd --create-home mallory")?;
    let (code, out) = sys.run(&format!(
        "runuser -u mallory -- nattrail who --ip {GW_PUBLIC} --port {} --at {} --json",
        port_of(&done[0])?,
        rfc3339(done[0].inside())
    ))?;
    ensure!(code != 0, "mallory got an answer: {out}");

    let man = sys.sh("MANWIDTH=80 man -P cat nattrail 2>&1")?;
    ensure!(
        man.starts_with("nattrail(1)")
            && man.contains("SYNOPSIS")
            && man.contains("nattrail-who(1)"),
        "man nattrail:\n{man}"
    );

    // Upgrade: the admin changed the conffile; the new version restarts the agent and keeps
    // both the change and the trail.
    sys.sh("sed -i 's/^#retain_days = 0$/retain_days = 400/' /etc/nattrail/nattrail.toml")?;
    ensure!(
        sys.sh("grep -c '^retain_days = 400$' /etc/nattrail/nattrail.toml")?
            .trim()
            == "1",
        "the conffile edit"
    );
    let before = main_pid(&sys)?;
    sys.sh(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y {deb2}"
    ))?;
    wait_active(&sys, Duration::from_secs(30))?;
    let version = sys.sh("dpkg-query -W -f '${Version}' nattrail")?;
    ensure!(version == "0.1.0-2", "installed version {version}");
    ensure!(
        main_pid(&sys)? != before,
        "the upgrade did not restart the agent"
    );
    ensure!(
        sys.sh("grep -c '^retain_days = 400$' /etc/nattrail/nattrail.toml")?
            .trim()
            == "1",
        "the upgrade lost the conffile change"
    );
    for d in &done {
        wait_found(&sys, d, port_of(d)?)?;
    }

    // remove stops the service and keeps the trail; purge deletes it.
    sys.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y nattrail")?;
    let (_, state) = sys.run("systemctl is-active nattrail.service")?;
    ensure!(state.trim() != "active", "still {state} after remove");
    sys.sh("test -s /var/lib/nattrail/nattrail.duckdb")?;
    sys.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y nattrail")?;
    let (code, _) = sys.run("test -e /var/lib/nattrail")?;
    ensure!(code != 0, "/var/lib/nattrail is still there after purge");
    for left in [
        "/etc/nattrail/nattrail.toml",
        "/etc/systemd/system/nattrail.service.d/docker-group.conf",
    ] {
        let (code, _) = sys.run(&format!("test -e {left}"))?;
        ensure!(code != 0, "{left} is still there after purge");
    }

    server.stop()?;
    println!(
        "times: packages built {:.0} s, root file system ready at {:.0} s, booted at {:.0} s, \
         all done at {:.0} s",
        built.as_secs_f64(),
        prepared.as_secs_f64(),
        booted_at.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
