#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]
//! TLS to Redis, Postgres and the trace collector, each with a certificate this test makes
//! (openssl): a worker and the CLI on a `redis-server` that listens on its TLS port only, a
//! throwaway Postgres with `ssl=on` reached with `sslmode=verify-full`, and an `https://` OTLP
//! collector; and a clear sentence when the CA is not trusted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use llmq_tests::harness::{ScratchPostgres, TestEnv, WorkerProcess, binary, free_port};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const WAIT: Duration = Duration::from_secs(30);

/// A CA and a certificate for `localhost` and 127.0.0.1 that it signed, in a fresh folder.
/// (The client suites use it too.)
pub(crate) struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("llmq-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=llmq test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        Self { dir }
    }

    pub(crate) fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_port(port: u16) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < WAIT, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` with its plain port off: TLS or nothing.
pub(crate) struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    pub(crate) fn start(pki: &Pki) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &pki.path("server.pem"),
                "--tls-key-file",
                &pki.path("server.key"),
            ])
            .args([
                "--tls-ca-cert-file",
                &pki.path("ca.pem"),
                "--tls-auth-clients",
                "no",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port);
        Self { child, port }
    }

    pub(crate) fn url(&self) -> String {
        format!("rediss://localhost:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The throwaway Postgres with `ssl=on` and the test's certificate.
fn tls_postgres(pki: &Pki) -> ScratchPostgres {
    ScratchPostgres::start(Some((
        &pki.dir.join("server.pem"),
        &pki.dir.join("server.key"),
    )))
}

fn tls_postgres_url(pg: &ScratchPostgres, pki: &Pki) -> String {
    format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        pki.path("ca.pem")
    )
}

/// An OTLP/HTTP receiver behind a TLS front: how many trace exports arrived over https.
async fn https_collector(pki: &Pki) -> (String, Arc<Mutex<usize>>) {
    let received = Arc::new(Mutex::new(0usize));
    let counter = Arc::clone(&received);
    let app = Router::new().route(
        "/v1/traces",
        post(move |_: Bytes| {
            let counter = Arc::clone(&counter);
            async move {
                *counter.lock().unwrap() += 1;
                ""
            }
        }),
    );
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr: SocketAddr = plain.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(plain, app).await });

    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = front.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = front.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut back) = tokio::net::TcpStream::connect(plain_addr).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
            });
        }
    });
    (format!("https://localhost:{port}"), received)
}

/// Runs `llmq` without blocking the test's runtime, which serves the mock provider and the
/// collector.
async fn llmq(args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    tokio::process::Command::new(binary("llmq"))
        .args(args)
        .env_remove("SSL_CERT_FILE")
        .envs(vars.iter().copied())
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_worker_and_the_cli_speak_tls_to_redis_postgres_and_the_collector() {
    let env = TestEnv::new().await.unwrap();
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki);
    let pg = tls_postgres(&pki);
    let (collector, exports) = https_collector(&pki).await;
    let ca = pki.path("ca.pem");
    let trust = [("SSL_CERT_FILE", ca.as_str())];
    let database_url = tls_postgres_url(&pg, &pki);

    // An untrusted CA is a sentence that says what to do, for Redis and for Postgres.
    let out = llmq(
        &["--redis-url", &redis.url(), "status", "--queue", &env.queue],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("trust the CA that signed Redis's certificate with SSL_CERT_FILE"),
        "{stderr}"
    );
    let untrusted = database_url
        .split("&sslrootcert")
        .next()
        .unwrap()
        .to_owned();
    let out = llmq(&["migrate", "--database-url", &untrusted], &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("sslrootcert"), "{stderr}");

    let out = llmq(&["migrate", "--database-url", &database_url], &[]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ledger = llmq_shared::ledger::Ledger::connect(&database_url, 1)
        .await
        .unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(ledger.pool())
        .await
        .unwrap();
    assert!(ssl, "the ledger's connection is not encrypted");

    let mut worker = WorkerProcess::spawn_with_vars(
        &env,
        include_str!("../../../examples/providers.mock.yaml"),
        &[],
        &[
            ("REDIS_URL", &redis.url()),
            ("DATABASE_URL", &database_url),
            ("SSL_CERT_FILE", &ca),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector),
        ],
    )
    .unwrap();
    let out = llmq(
        &[
            "--redis-url",
            &redis.url(),
            "submit",
            "--prompt",
            "over tls",
            "--queue",
            &env.queue,
            "--wait",
            "--wait-timeout",
            "30s",
            "--format",
            "json",
        ],
        &trust,
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"status\": \"succeeded\""), "{stdout}");
    let calls: i64 = sqlx::query_scalar("SELECT count(*) FROM provider_calls WHERE queue = $1")
        .bind(&env.queue)
        .fetch_one(ledger.pool())
        .await
        .unwrap();
    assert_eq!(calls, 1, "the call is in the TLS Postgres's ledger");
    // The batch exporter sends what it holds when the worker stops.
    worker.signal("TERM").unwrap();
    worker.wait_exit(WAIT).await.unwrap();
    assert!(
        *exports.lock().unwrap() > 0,
        "no trace export arrived over https"
    );
}
