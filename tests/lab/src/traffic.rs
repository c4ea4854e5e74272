//! Traffic through the lab with ground truth: every flow carries a token, the server records
//! the translated address it saw, the client records its own address and when it was open.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};

use crate::netns::{run_in, spawn_in};

/// Transport of a test flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP: connect, send, half-close, read the reply.
    Tcp,
    /// UDP: one datagram each way.
    Udp,
}

impl Transport {
    /// The protocol's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// What the server saw of one flow.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The peer address: the gateway's translated address and port.
    pub peer: SocketAddr,
    /// Payload bytes received.
    pub bytes: usize,
}

/// A server in the server namespace: TCP and UDP on several ports, replying `reply_bytes`.
pub struct Server {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    threads: Vec<JoinHandle<Result<()>>>,
    /// Addresses listened on (TCP and UDP on each).
    pub addrs: Vec<SocketAddr>,
}

fn token_of(buf: &[u8]) -> String {
    let end = buf.iter().position(|b| *b == b'\n').unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl Server {
    /// Starts listeners on `ip` at each of `ports`.
    pub fn start(ns: &str, ip: IpAddr, ports: &[u16], reply_bytes: usize) -> Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
        let mut threads = Vec::new();
        let addrs: Vec<SocketAddr> = ports.iter().map(|p| SocketAddr::new(ip, *p)).collect();
        for &addr in &addrs {
            let (stop_t, seen_t) = (Arc::clone(&stop), Arc::clone(&seen));
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
            threads.push(spawn_in(ns, move || {
                let l = match TcpListener::bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("tcp bind {addr}: {e}")));
                        return Ok(());
                    }
                };
                l.set_nonblocking(true)?;
                let _ = ready_tx.send(Ok(()));
                while !stop_t.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, peer)) => {
                            let seen_c = Arc::clone(&seen_t);
                            std::thread::spawn(move || {
                                let _ = s.set_nonblocking(false);
                                let mut buf = Vec::new();
                                let mut chunk = [0u8; 16384];
                                let mut token = None;
                                loop {
                                    match s.read(&mut chunk) {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                    }
                                    // Recorded at the first line so still-open flows are known.
                                    if token.is_none() && buf.contains(&b'\n') {
                                        let t = token_of(&buf);
                                        seen_c.lock().unwrap().insert(
                                            t.clone(),
                                            Seen {
                                                peer,
                                                bytes: buf.len(),
                                            },
                                        );
                                        token = Some(t);
                                    }
                                }
                                let t = token.unwrap_or_else(|| token_of(&buf));
                                seen_c.lock().unwrap().insert(
                                    t,
                                    Seen {
                                        peer,
                                        bytes: buf.len(),
                                    },
                                );
                                let _ = s.write_all(&vec![b'r'; reply_bytes]);
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            })?);
            ready_rx.recv().context("tcp listener thread")??;
            let (stop_u, seen_u) = (Arc::clone(&stop), Arc::clone(&seen));
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
            threads.push(spawn_in(ns, move || {
                let u = match UdpSocket::bind(addr) {
                    Ok(u) => u,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("udp bind {addr}: {e}")));
                        return Ok(());
                    }
                };
                u.set_read_timeout(Some(Duration::from_millis(50)))?;
                let _ = ready_tx.send(Ok(()));
                let mut buf = vec![0u8; 65536];
                while !stop_u.load(Ordering::Relaxed) {
                    match u.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            seen_u
                                .lock()
                                .unwrap()
                                .insert(token_of(&buf[..n]), Seen { peer, bytes: n });
                            u.send_to(&vec![b'r'; reply_bytes], peer)?;
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            })?);
            ready_rx.recv().context("udp socket thread")??;
        }
        Ok(Server {
            stop,
            seen,
            threads,
            addrs,
        })
    }

    /// What the server saw for a token.
    pub fn seen(&self, token: &str) -> Option<Seen> {
        self.seen.lock().unwrap().get(token).cloned()
    }

    /// Stops the listeners.
    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().map_err(|_| anyhow!("server thread panicked"))??;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One flow to make.
#[derive(Debug, Clone)]
pub struct FlowSpec {
    /// Unique token (first line of the payload).
    pub token: String,
    /// TCP or UDP.
    pub transport: Transport,
    /// Client source address.
    pub client: IpAddr,
    /// UDP client source port; 0 lets the kernel pick one, as it always does for TCP.
    pub client_port: u16,
    /// Server address.
    pub server: SocketAddr,
    /// Payload size sent by the client (at least the token and a newline).
    pub send_bytes: usize,
    /// How long to keep the flow open before closing.
    pub hold: Duration,
}

/// What the client did.
#[derive(Debug, Clone)]
pub struct FlowDone {
    /// The spec.
    pub spec: FlowSpec,
    /// The client's own address and port.
    pub local: SocketAddr,
    /// After connect (TCP) or send (UDP).
    pub opened: SystemTime,
    /// Before close (TCP) or after the reply (UDP).
    pub closing: SystemTime,
    /// Reply bytes received.
    pub received: usize,
    /// Datagrams sent (UDP resends when no reply comes within a second; 1 for TCP).
    pub attempts: u32,
}

impl FlowDone {
    /// An instant certainly inside the kernel's view of the flow.
    pub fn inside(&self) -> SystemTime {
        let span = self.closing.duration_since(self.opened).unwrap_or_default();
        self.opened + span / 2
    }
}

fn payload(token: &str, size: usize) -> Vec<u8> {
    let mut p = format!("{token}\n").into_bytes();
    if p.len() < size {
        p.resize(size, b'x');
    }
    p
}

/// Makes one flow from the current thread (which must be in the client namespace).
pub fn make_flow(spec: &FlowSpec) -> Result<FlowDone> {
    let data = payload(&spec.token, spec.send_bytes);
    match spec.transport {
        Transport::Tcp => {
            let sock = socket2_tcp(spec.client, spec.server)?;
            let opened = SystemTime::now();
            let local = sock.local_addr()?;
            let mut s = sock;
            s.write_all(&data)?;
            std::thread::sleep(spec.hold);
            let closing = SystemTime::now();
            s.shutdown(Shutdown::Write)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut reply = Vec::new();
            s.read_to_end(&mut reply)?;
            Ok(FlowDone {
                spec: spec.clone(),
                local,
                opened,
                closing,
                received: reply.len(),
                attempts: 1,
            })
        }
        Transport::Udp => {
            let u = bind_udp(SocketAddr::new(spec.client, spec.client_port))?;
            u.connect(spec.server)?;
            u.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut buf = vec![0u8; 65536];
            let mut attempts = 0;
            let mut opened;
            let n = loop {
                u.send(&data)?;
                // A datagram the NAT dropped (all ports busy) created no flow: the flow
                // starts with the send that was answered.
                opened = SystemTime::now();
                attempts += 1;
                match u.recv(&mut buf) {
                    Ok(n) => break n,
                    Err(_) if attempts < 5 => continue,
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("udp reply for {} after {attempts} tries", spec.token)
                        });
                    }
                }
            };
            std::thread::sleep(spec.hold);
            let closing = SystemTime::now();
            Ok(FlowDone {
                spec: spec.clone(),
                local: u.local_addr()?,
                opened,
                closing,
                received: n,
                attempts,
            })
        }
    }
}

/// A TCP connection from a chosen source address.
/// A UDP socket bound to `addr`. A fixed port the previous flow just released can still be
/// held for an instant: a process another test forks in that instant inherits the socket until
/// it executes (CI failed once with EADDRINUSE on the twin flows' second bind). So a fixed
/// port is tried again for up to a second.
fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let mut tries = 0;
    loop {
        match UdpSocket::bind(addr) {
            Err(e)
                if addr.port() != 0 && e.kind() == std::io::ErrorKind::AddrInUse && tries < 50 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r.with_context(|| format!("binding UDP {addr}")),
        }
    }
}

fn socket2_tcp(client: IpAddr, server: SocketAddr) -> Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket,
    };
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fam = if client.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(SocketAddr::new(client, 0)),
    )
    .with_context(|| format!("binding {client}"))?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(server),
    )
    .with_context(|| format!("connecting {client} -> {server}"))?;
    // SAFETY: we own the fd and hand it to TcpStream.
    Ok(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
}

/// `n` short flows to the server's first address and port, alternating TCP and UDP and
/// cycling through the lab's IPv4 clients, tokens `<tag>-<i>`.
pub fn alternating(lab: &crate::NatLab, server: &Server, n: usize, tag: &str) -> Vec<FlowSpec> {
    (0..n)
        .map(|i| FlowSpec {
            token: format!("{tag}-{i}"),
            transport: if i % 2 == 0 {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            client: IpAddr::V4(lab.clients_v4[i % lab.clients_v4.len()]),
            server: server.addrs[0],
            send_bytes: 100 + i,
            hold: Duration::from_millis(10),
            client_port: 0,
        })
        .collect()
}

/// Makes all flows from the client namespace, `parallel` at a time, in order of the list.
pub fn make_flows(ns: &str, specs: Vec<FlowSpec>, parallel: usize) -> Result<Vec<FlowDone>> {
    let queue = Arc::new(Mutex::new(
        specs.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    queue.lock().unwrap().reverse();
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..parallel.max(1) {
        let (q, r) = (Arc::clone(&queue), Arc::clone(&results));
        workers.push(spawn_in(ns, move || {
            loop {
                let next = q.lock().unwrap().pop();
                let Some((i, spec)) = next else { break };
                let done = make_flow(&spec)?;
                r.lock().unwrap().push((i, done));
            }
            Ok(())
        })?);
    }
    for w in workers {
        w.join().map_err(|_| anyhow!("client worker panicked"))??;
    }
    let mut out = std::mem::take(&mut *results.lock().unwrap());
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, d)| d).collect())
}

/// Opens a TCP connection in the client namespace and keeps it open until the handle drops.
pub fn open_tcp(
    ns: &str,
    client: IpAddr,
    server: SocketAddr,
    token: &str,
) -> Result<(TcpStream, SocketAddr)> {
    let token = token.to_string();
    run_in(ns, move || {
        let mut s = socket2_tcp(client, server)?;
        s.write_all(format!("{token}\n").as_bytes())?;
        let local = s.local_addr()?;
        Ok((s, local))
    })
}
