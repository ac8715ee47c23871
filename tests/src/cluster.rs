//! Throwaway Redis topologies for tests. A Redis Cluster: three masters from `redis-server --cluster-enabled
//! yes` on free loopback ports (each port + 10000 free too, for the cluster bus), joined by
//! `redis-cli --cluster create`. Stopped and removed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{ephemeral_start, free_port};

/// How long the cluster may take to come up.
const UP_WITHIN: Duration = Duration::from_secs(30);

pub struct RedisCluster {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    dir: PathBuf,
}

/// A free loopback port whose cluster-bus port (+ 10000) is free too, both below the kernel's
/// ephemeral range ([`free_port`]): a port from `bind(0)`, released for `redis-server` to
/// bind, was once taken in between by another test's connection, and the node never started.
/// The bus is 10,000 places ahead of `free_port`'s counter, so no other caller is handed it
/// before redis-server binds it.
///
/// # Panics
/// No such port: the ephemeral range starts too low to leave room for the bus.
#[allow(clippy::panic)]
fn free_cluster_port() -> u16 {
    for _ in 0..10_000 {
        let port = free_port();
        if let Some(bus) = port.checked_add(10_000)
            && bus < ephemeral_start()
            && std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range has room for a cluster bus");
}

impl RedisCluster {
    /// Starts three masters and makes them one cluster.
    ///
    /// # Panics
    /// When the processes cannot start or the cluster does not come up: a test's setup.
    #[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    #[must_use]
    pub fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("llmq-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 {
            let port = free_cluster_port();
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("cannot start redis-server");
            ports.push(port);
            children.push(child);
        }
        let mut cluster = Self {
            children,
            ports,
            dir,
        };
        for (port, child) in cluster.ports.iter().zip(&mut cluster.children) {
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("redis-server on {port} exited ({status}) before it listened");
                }
                assert!(
                    started.elapsed() < UP_WITHIN,
                    "redis-server on {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("cannot run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let started = Instant::now();
        for port in &cluster.ports {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .expect("cannot run redis-cli");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(started.elapsed() < UP_WITHIN, "the cluster did not come up");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// `redis+cluster://` with every node as a seed.
    #[must_use]
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The slot of hash tag `{name}`.
    ///
    /// # Panics
    /// When `redis-cli` cannot be run.
    #[allow(clippy::expect_used)]
    #[must_use]
    pub fn slot(&self, name: &str) -> u16 {
        let out = Command::new("redis-cli")
            .args(["-p", &self.ports[0].to_string(), "cluster", "keyslot"])
            .arg(format!("llmq:{{{name}}}:stream"))
            .output()
            .expect("cannot run redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Three queue names, `<prefix>-<n>`, whose slots sit on the three masters (slots
    /// 0-5460, 5461-10922, 10923-16383, as `redis-cli --cluster create` splits them).
    #[must_use]
    pub fn queue_per_node(&self, prefix: &str) -> Vec<String> {
        let mut picked: [Option<String>; 3] = [None, None, None];
        let mut n = 0u32;
        while picked.iter().any(Option::is_none) {
            let name = format!("{prefix}-{n}");
            let node = match self.slot(&name) {
                0..=5460 => 0,
                5461..=10922 => 1,
                _ => 2,
            };
            picked[node].get_or_insert(name);
            n += 1;
        }
        picked.into_iter().flatten().collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway Redis Sentinel setup: a master, a replica and three sentinels on free
/// loopback ports, watching the master as `mymaster` (down after 1 s). Stopped and removed
/// when dropped.
pub struct RedisSentinel {
    children: Vec<(u16, Child)>,
    pub master_port: u16,
    pub replica_port: u16,
    pub sentinel_ports: Vec<u16>,
    dir: PathBuf,
}

impl RedisSentinel {
    /// # Panics
    /// When the processes cannot start or the sentinels do not see the replica: a test's
    /// setup.
    #[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    #[must_use]
    pub fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("llmq-sentinel-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = crate::harness::free_port;
        let (master_port, replica_port) = (port(), port());
        let mut children = Vec::new();
        for (p, replica_of) in [(master_port, None), (replica_port, Some(master_port))] {
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir);
            if let Some(m) = replica_of {
                cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
            }
            children.push((p, cmd.stdout(Stdio::null()).spawn().expect("redis-server")));
        }
        let mut sentinel_ports = Vec::new();
        for _ in 0..3 {
            let p = port();
            let conf = dir.join(format!("sentinel-{p}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {p}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 1\n"
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel");
            children.push((p, child));
            sentinel_ports.push(p);
        }
        let setup = Self {
            children,
            master_port,
            replica_port,
            sentinel_ports,
            dir,
        };
        // Every sentinel knows the replica (it is what a failover promotes).
        let started = Instant::now();
        for p in &setup.sentinel_ports {
            loop {
                let out = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "sentinel", "replicas", "mymaster"])
                    .output()
                    .expect("redis-cli");
                let text = String::from_utf8_lossy(&out.stdout);
                if text.contains(&replica_port.to_string()) && !text.contains("s_down") {
                    break;
                }
                assert!(
                    started.elapsed() < UP_WITHIN,
                    "sentinel {p} never saw the replica"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        setup
    }

    /// `redis+sentinel://` with every sentinel, for master `mymaster`.
    #[must_use]
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/mymaster", seeds.join(","))
    }

    /// SIGKILLs the master.
    pub fn kill_master(&mut self) {
        for (p, c) in &mut self.children {
            if *p == self.master_port {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
