//! How llmq reaches Redis: one server (`redis://`, `rediss://`), a Redis Cluster
//! (`redis+cluster://host:port[,host:port...]`, `rediss+cluster://` with TLS: seed nodes,
//! the rest is discovered) or a master behind Redis Sentinel
//! (`redis+sentinel://host:port[,host:port...]/MASTER_NAME[/db]`). Every command goes through
//! a [`Conn`], so the rest of the queue module does not know which it is.
//!
//! Sentinel: the master is asked of the sentinels, and asked again after any sign that it
//! moved (a `READONLY` answer from a demoted master, a refused or dropped connection): the
//! command that met it fails as any Redis error does, and the next one goes to the master
//! the sentinels name then. redis-rs's own Sentinel client does not move open connections
//! (its issue 1438).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::{Error, Result};

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A blocking read with no bound of its own still ends: a day.
const NO_RESPONSE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What `REDIS_URL` names.
#[derive(Clone)]
pub(super) enum Backend {
    Single(Box<redis::Client>),
    Cluster { seeds: Vec<String> },
    Sentinel(std::sync::Arc<SentinelSpec>),
}

/// The sentinels, the master's name and how to log into the master.
pub(super) struct SentinelSpec {
    /// `redis://host:port` of each sentinel.
    sentinels: Vec<String>,
    master: String,
    /// `redis` or `rediss`, for the master.
    scheme: &'static str,
    /// `user:password@` or empty, for the master.
    userinfo: String,
    db: u32,
}

/// A connection to one Redis, a cluster, or Sentinel's master; cheap to clone (the clones
/// share it).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConn),
}

/// A connection to the master Sentinel names, found again after a failover.
#[derive(Clone)]
pub struct SentinelConn {
    spec: std::sync::Arc<SentinelSpec>,
    response_timeout: Option<Duration>,
    current: std::sync::Arc<tokio::sync::Mutex<Option<ConnectionManager>>>,
}

impl SentinelConn {
    /// The master's connection, found through the sentinels when there is none.
    async fn master(&self) -> redis::RedisResult<ConnectionManager> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            return Ok(c.clone());
        }
        let addr = self.spec.resolve().await?;
        let url = format!(
            "{}://{}{addr}/{}",
            self.spec.scheme, self.spec.userinfo, self.spec.db
        );
        let c = ConnectionManager::new_with_config(
            redis::Client::open(url)?,
            single_config(self.response_timeout),
        )
        .await?;
        *current = Some(c.clone());
        Ok(c)
    }

    /// After `e`, asks the sentinels again before the next command when it says the master
    /// may have moved.
    async fn after(&self, e: &redis::RedisError) {
        let moved = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.code() == Some("READONLY");
        if moved {
            *self.current.lock().await = None;
        }
    }
}

impl SentinelSpec {
    /// The master's `host:port`, from the first sentinel that knows it.
    async fn resolve(&self) -> redis::RedisResult<String> {
        let mut last: Option<redis::RedisError> = None;
        for s in &self.sentinels {
            // Connecting and asking, bounded together: a sentinel that accepts and never
            // answers must not hold a command for ever.
            let asked = async {
                let client = redis::Client::open(s.as_str())?;
                let mut c = client.get_multiplexed_async_connection().await?;
                let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master)
                    .query_async(&mut c)
                    .await?;
                Ok::<_, redis::RedisError>(addr)
            };
            let asked = async {
                tokio::time::timeout(CONNECT_TIMEOUT, asked)
                    .await
                    .unwrap_or_else(|_| {
                        Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "the sentinel gave no answer within 5 s",
                        )))
                    })
            };
            match asked.await {
                Ok(Some((host, port))) => return Ok(format!("{host}:{port}")),
                Ok(None) => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "no such master",
                        format!(
                            "the sentinels know no master named `{}`; check the name at the end of REDIS_URL",
                            self.master
                        ),
                    )));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "no sentinel"))))
    }
}

fn single_config(response_timeout: Option<Duration>) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(response_timeout)
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut c = s.master().await?;
                let r = c.req_packed_command(cmd).await;
                if let Err(e) = &r {
                    s.after(e).await;
                }
                r
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut c = s.master().await?;
                let r = c.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &r {
                    s.after(e).await;
                }
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(s) => i64::from(s.spec.db),
        }
    }
}

impl Conn {
    /// True for a Redis Cluster.
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl Backend {
    /// Reads `url`; a cluster URL's seeds become `redis://` (or `rediss://`) URLs, each with
    /// the URL's credentials.
    pub(super) fn parse(url: &str) -> Result<Self> {
        let bad = |why: String| {
            Error::Connect(format!(
                "bad REDIS_URL `{}`: {why}",
                crate::text::without_credentials(url)
            ))
        };
        let sentinel = [
            ("redis+sentinel://", "redis"),
            ("rediss+sentinel://", "rediss"),
        ]
        .into_iter()
        .find_map(|(scheme, single)| url.strip_prefix(scheme).map(|rest| (single, rest)));
        if let Some((scheme, rest)) = sentinel {
            return Self::parse_sentinel(scheme, rest).map_err(bad);
        }
        let cluster = [
            ("redis+cluster://", "redis://"),
            ("rediss+cluster://", "rediss://"),
        ]
        .into_iter()
        .find_map(|(scheme, single)| url.strip_prefix(scheme).map(|rest| (single, rest)));
        let Some((single, rest)) = cluster else {
            return redis::Client::open(url)
                .map(|c| Backend::Single(Box::new(c)))
                .map_err(|e| bad(e.to_string()));
        };
        let (userinfo, hosts) = match rest.rsplit_once('@') {
            Some((user, hosts)) => (format!("{user}@"), hosts),
            None => (String::new(), rest),
        };
        let hosts = hosts.split(['/', '?']).next().unwrap_or_default();
        let seeds: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("{single}{userinfo}{h}"))
            .collect();
        if seeds.is_empty() {
            return Err(bad(
                "a cluster URL needs at least one seed node: redis+cluster://host:port[,host:port...]"
                    .into(),
            ));
        }
        for seed in &seeds {
            redis::Client::open(seed.as_str()).map_err(|e| bad(e.to_string()))?;
        }
        Ok(Backend::Cluster { seeds })
    }

    /// `host:port,host:port/MASTER[/db]` after `redis+sentinel://`; the credentials, if
    /// any, are the master's (the sentinels are asked without).
    fn parse_sentinel(scheme: &'static str, rest: &str) -> std::result::Result<Self, String> {
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((user, rest)) => (format!("{user}@"), rest),
            None => (String::new(), rest),
        };
        let mut parts = rest.split('/');
        let hosts = parts.next().unwrap_or_default();
        let master = parts.next().unwrap_or_default().to_owned();
        let db = match parts.next().filter(|d| !d.is_empty()) {
            None => 0,
            Some(d) => d
                .parse()
                .map_err(|_| format!("`{d}` is not a database number"))?,
        };
        let sentinels: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{h}"))
            .collect();
        if sentinels.is_empty() || master.is_empty() {
            return Err(
                "a Sentinel URL needs the sentinels and the master's name: redis+sentinel://host:port[,host:port...]/MASTER_NAME"
                    .into(),
            );
        }
        Ok(Backend::Sentinel(std::sync::Arc::new(SentinelSpec {
            sentinels,
            master,
            scheme,
            userinfo,
            db,
        })))
    }

    /// Opens a connection whose commands fail after `response_timeout` without an answer
    /// (`None`: a day, for blocking reads that bound themselves).
    pub(super) async fn connect(&self, response_timeout: Option<Duration>) -> Result<Conn> {
        match self {
            Backend::Sentinel(spec) => {
                let conn = SentinelConn {
                    spec: std::sync::Arc::clone(spec),
                    response_timeout,
                    current: std::sync::Arc::default(),
                };
                // The first master now, so a wrong URL is found at startup.
                conn.master().await.map_err(|e| {
                    Error::Connect(format!(
                        "no sentinel named a reachable master `{}` ({}): {}",
                        spec.master,
                        spec.sentinels.join(", "),
                        e.detail().unwrap_or(&e.to_string())
                    ))
                })?;
                Ok(Conn::Sentinel(conn))
            }
            Backend::Single(client) => {
                let config = single_config(response_timeout);
                ConnectionManager::new_with_config((**client).clone(), config)
                    .await
                    .map(Conn::Single)
                    .map_err(|e| Error::Connect(e.to_string()))
            }
            Backend::Cluster { seeds } => {
                let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(response_timeout.unwrap_or(NO_RESPONSE_TIMEOUT))
                    .retries(3)
                    .build()
                    .map_err(|e| Error::Connect(e.to_string()))?;
                client
                    .get_async_connection()
                    .await
                    .map(Conn::Cluster)
                    .map_err(|e| Error::Connect(cluster_connect_error(seeds, &e)))
            }
        }
    }
}

/// Why no cluster connection could be made, as a sentence naming the seeds.
fn cluster_connect_error(seeds: &[String], e: &redis::RedisError) -> String {
    let names: Vec<String> = seeds
        .iter()
        .map(|s| crate::text::without_credentials(s).into_owned())
        .collect();
    let text = e.to_string();
    if text.to_lowercase().contains("cluster support disabled")
        || text.contains("This instance has cluster support disabled")
    {
        format!(
            "REDIS_URL names a Redis Cluster (redis+cluster://), but {} is not in cluster mode ({text})",
            names.join(", ")
        )
    } else {
        format!(
            "no seed node of the Redis Cluster answered ({}): {text}",
            names.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_the_sentinels_the_master_and_its_database() {
        let Ok(Backend::Sentinel(spec)) =
            Backend::parse("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/2")
        else {
            panic!("not sentinel");
        };
        assert_eq!(
            spec.sentinels,
            ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379"]
        );
        assert_eq!((spec.master.as_str(), spec.db), ("mymaster", 2));
        assert_eq!(spec.userinfo, ":pw@");
        for bad in [
            "redis+sentinel://h:1",
            "redis+sentinel:///m",
            "redis+sentinel://h:1/m/x",
        ] {
            assert!(Backend::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cluster_urls_name_their_seeds_with_the_credentials() {
        let Ok(Backend::Cluster { seeds }) =
            Backend::parse("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001")
        else {
            panic!("not a cluster");
        };
        assert_eq!(
            seeds,
            ["redis://u:p@10.0.0.1:7000", "redis://u:p@10.0.0.2:7001"]
        );
        let Ok(Backend::Cluster { seeds }) = Backend::parse("rediss+cluster://h:1") else {
            panic!("not a cluster");
        };
        assert_eq!(seeds, ["rediss://h:1"]);
        assert!(matches!(
            Backend::parse("redis://127.0.0.1:6379/0"),
            Ok(Backend::Single(_))
        ));
        let Err(e) = Backend::parse("redis+cluster://") else {
            panic!("no seeds accepted");
        };
        assert!(e.to_string().contains("at least one seed node"), "{e}");
    }
}
