//! How llmq reaches Redis: one server (`redis://`, `rediss://`) or a Redis Cluster
//! (`redis+cluster://host:port[,host:port...]`, `rediss+cluster://` with TLS: seed nodes,
//! the rest is discovered). Every command goes through a [`Conn`], so the rest of the queue
//! module does not know which it is.

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
}

/// A connection to one Redis or to a cluster; cheap to clone (the clones share it).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
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

    /// Opens a connection whose commands fail after `response_timeout` without an answer
    /// (`None`: a day, for blocking reads that bound themselves).
    pub(super) async fn connect(&self, response_timeout: Option<Duration>) -> Result<Conn> {
        match self {
            Backend::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(response_timeout)
                    .set_number_of_retries(3)
                    .set_max_delay(Duration::from_secs(2));
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
