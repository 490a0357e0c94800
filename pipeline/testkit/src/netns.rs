//! Test hosts in network namespaces the test makes itself, so that a test can cut a
//! host off (`ip link set down`: this kernel has no netem) and join it again.
//!
//! A [`Network`] is one layer-2 segment: a bridge in a namespace of its own (the
//! switch), a link to it from the namespace the test runs in (so the test, and the
//! processes it starts outside any host, reach every host), and one namespace per
//! [`Host`], each with a veth pair to the switch. Its subnet is a 10.x.y.0/24 that no
//! route of the machine uses. Traffic stays on the segment: no forwarding, no route
//! out. Dropping the network deletes every namespace and link it made, also when the
//! test panics. Needs root (`ip netns`).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A test host: a network namespace with one address on the [`Network`].
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name (`ip netns exec <netns> ...` runs a process on the host).
    pub netns: String,
    /// Its address.
    pub ip: String,
    /// Its link's end in the switch: down cuts the host off.
    switch_end: String,
}

impl Host {
    /// The argv prefix that runs a program on this host: `ip netns exec <netns>`.
    pub fn exec_prefix(&self) -> [String; 3] {
        ["netns".into(), "exec".into(), self.netns.clone()]
    }
}

/// A layer-2 segment of test hosts; removed, with every namespace and link, on drop.
pub struct Network {
    id: String,
    switch: String,
    subnet: (u8, u8),
    root_end: String,
    hosts: Vec<Host>,
}

/// `ip <args>`, panicking with its error output on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run `ip` (Debian's iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Network {
    /// A switch, and a link to it from this namespace at `10.x.y.1`.
    pub fn new() -> Self {
        assert_eq!(unsafe { libc::geteuid() }, 0, "network namespaces need root (`ip netns add`)");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let unique = (std::process::id() % 4096) * 16 + n % 16;
        let id = format!("fp{unique:04x}");
        let subnet = free_subnet(unique);
        let switch = format!("{id}-switch");
        let mut net = Self { id, switch, subnet, root_end: String::new(), hosts: Vec::new() };
        ip(&["netns", "add", &net.switch]);
        ip(&["-n", &net.switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.switch, "link", "set", "br0", "up"]);
        net.root_end = format!("{}r", net.id);
        let switch_end = format!("{}rs", net.id);
        ip(&["link", "add", &net.root_end, "type", "veth", "peer", "name", &switch_end, "netns", &net.switch]);
        ip(&["-n", &net.switch, "link", "set", &switch_end, "master", "br0", "up"]);
        ip(&["addr", "add", &format!("{}/24", net.address(1)), "dev", &net.root_end]);
        ip(&["link", "set", &net.root_end, "up"]);
        net
    }

    fn address(&self, last: u8) -> String {
        format!("10.{}.{}.{last}", self.subnet.0, self.subnet.1)
    }

    /// This namespace's address on the network (where the test's own processes are reached).
    pub fn root_ip(&self) -> String {
        self.address(1)
    }

    /// A new host, linked to the switch and up.
    pub fn add_host(&mut self) -> Host {
        let i = self.hosts.len() + 1;
        assert!(i < 100, "a test network has fewer than 100 hosts");
        let netns = format!("{}-h{i}", self.id);
        let host_end = format!("{}h{i}", self.id);
        let switch_end = format!("{}s{i}", self.id);
        ip(&["netns", "add", &netns]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&["link", "add", &host_end, "netns", &netns, "type", "veth", "peer", "name", &switch_end, "netns", &self.switch]);
        ip(&["-n", &self.switch, "link", "set", &switch_end, "master", "br0", "up"]);
        let address = self.address(10 + i as u8);
        ip(&["-n", &netns, "addr", "add", &format!("{address}/24"), "dev", &host_end]);
        ip(&["-n", &netns, "link", "set", &host_end, "up"]);
        let host = Host { netns, ip: address, switch_end };
        self.hosts.push(host.clone());
        host
    }

    /// Cuts `host` off the network: its link goes down at the switch, and whatever it
    /// sends or is sent is lost (no reset, as when a cable is pulled).
    pub fn cut(&self, host: &Host) {
        ip(&["-n", &self.switch, "link", "set", &host.switch_end, "down"]);
    }

    /// Joins `host` to the network again.
    pub fn heal(&self, host: &Host) {
        ip(&["-n", &self.switch, "link", "set", &host.switch_end, "up"]);
    }
}

impl Default for Network {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and with them their peers.
        for host in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &host.netns]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.switch]).status();
        let _ = Command::new("ip").args(["link", "del", &self.root_end]).stderr(std::process::Stdio::null()).status();
    }
}

/// A `10.x.y.0/24` derived from `seed` that no route of this machine covers.
fn free_subnet(seed: u32) -> (u8, u8) {
    let routes = Command::new("ip").args(["-4", "route", "show", "table", "all"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    (0..256u32)
        .map(|k| {
            let v = (seed.wrapping_mul(2654435761).wrapping_add(k * 7919)) % (200 * 256);
            ((16 + v / 256) as u8, (v % 256) as u8)
        })
        .find(|(a, b)| !routes.contains(&format!("10.{a}.{b}.")) && !routes.contains(&format!("10.{a}.0.0/16")) && !routes.contains("10.0.0.0/8"))
        .expect("a free 10.x.y.0/24")
}
