//! `llmq-bench`: how fast llmq moves tasks, measured against a real Redis (and Postgres for
//! the end-to-end run). A benchmark, never a test: it prints one `key=value` line per
//! benchmark so that runs can be compared by script. `docs/benchmarks.md` explains the lines.
//!
//! ```text
//! cargo run --release -p llmq-tests --bin llmq-bench -- [--only queue_noop|queue_noop_keyed|queue_noop_classed|priority|fair_share|e2e_mock|pickup|rate_limited|overhead|memory|chain|inflight|routing_savings|stream_first_token|idle_fleet|provider_batch|cluster_noop|web_pages|ledger_scale|cancel] [--tasks N]
//! ```
//!
//! Every run uses fresh queues (`bench-<8 hex>`) and deletes their keys at the end; it never
//! touches other keys. The end-to-end run writes its ledger rows into the database
//! `llmq_bench`, created next to `DATABASE_URL`'s database when missing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::Utc;
use clap::{Parser, ValueEnum};
use llmq_shared::config::Config;
use llmq_shared::envelope::Envelope;
use llmq_shared::ids::TaskId;
use llmq_shared::keys::{QUEUES, QueueKeys};
use llmq_shared::ledger::{Ledger, Scope};
use llmq_shared::outcome::Status;
use llmq_shared::provider::{CallFuture, Completion, Provider, Request, Usage};
use llmq_shared::queue::{Client, OutEntry};
use llmq_tests::mock::{MockOptions, MockServer};
use llmq_worker::Settings;
use redis::aio::MultiplexedConnection as Redis;
use sqlx::Connection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The database the end-to-end benchmark writes its ledger rows into.
const BENCH_DB: &str = "llmq_bench";
/// Envelopes per `enqueue_many` call when building a backlog.
const ENQUEUE_CHUNK: usize = 1000;
/// How often the benchmarks look at the queue counts to see whether it is drained.
const POLL: Duration = Duration::from_millis(10);
/// A benchmark that has not drained by then has failed.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// Throughput and pickup latency of llmq workers against a real Redis.
#[derive(Debug, Parser)]
#[command(name = "llmq-bench")]
struct Args {
    /// Run only this benchmark.
    #[arg(long, value_enum)]
    only: Option<Bench>,

    /// Tasks per benchmark [default: queue_noop 50000, e2e_mock 20000, pickup rate x 10 s].
    #[arg(long)]
    tasks: Option<usize>,

    /// Concurrency of each worker [default: 256 for queue_noop and pickup, 128 for e2e_mock].
    #[arg(long)]
    concurrency: Option<usize>,

    /// In-process workers [default: 1 for queue_noop and pickup, 2 for e2e_mock].
    #[arg(long)]
    workers: Option<usize>,

    /// Latency the mock server adds to every answer in e2e_mock, in milliseconds.
    #[arg(long, default_value_t = 0)]
    mock_latency_ms: u64,

    /// How long the in-process provider of `inflight` takes to answer, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    latency_ms: u64,

    /// In `inflight` and `provider_batch`, every task's prompt padded to this many bytes (a
    /// real task's prompt is kilobytes; the default keeps the bench's short one).
    #[arg(long, default_value_t = 0)]
    prompt_bytes: usize,

    /// The provider's limit in the one-minute run of `priority` and `fair_share` (issue 69),
    /// as the provider file's `quotas` says it; 10 % is held for priority 0 on top.
    #[arg(long, default_value = "rpm: 60")]
    minute_quotas: String,

    /// Tasks per second the pickup benchmark enqueues.
    #[arg(long, default_value_t = 2000)]
    rate: u64,

    /// Also print per-command Redis deltas (INFO commandstats) for each benchmark.
    #[arg(long)]
    verbose: bool,

    /// In e2e_mock, speak HTTP/2 to the mock (`http2: prior_knowledge`, h2c) instead of
    /// HTTP/1.1.
    #[arg(long)]
    http2: bool,

    /// In e2e_mock, the provider's `connections` (HTTP clients calls are spread over).
    #[arg(long, default_value_t = llmq_shared::config::DEFAULT_CONNECTIONS)]
    connections: usize,

    /// In `chain`, the steps between the plan and the merge (the chain has this many and
    /// three more, at most a chain's 64): each step reads only its own state and its
    /// neighbours', so a wider chain should cost the same per step.
    #[arg(long, default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=(llmq_shared::chain::MAX_STEPS as u64 - 3)))]
    chain_width: u64,

    /// In `ledger_scale`, only the fresh ledger or only the upgraded one (both by default).
    #[arg(long, value_parser = ["fresh", "upgraded"])]
    ledger: Option<String>,

    /// Redis to benchmark against; only the bench's own `llmq:{bench-*}` keys are touched.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,

    /// Postgres server for e2e_mock; the bench uses the database `llmq_bench` next to this
    /// URL's database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum Bench {
    QueueNoop,
    QueueNoopKeyed,
    QueueNoopClassed,
    Priority,
    FairShare,
    E2eMock,
    Pickup,
    RateLimited,
    Overhead,
    Memory,
    Chain,
    Inflight,
    RoutingSavings,
    StreamFirstToken,
    IdleFleet,
    ProviderBatch,
    PromptCache,
    AnswerCache,
    IdempotentEnqueue,
    BatchEnqueue,
    ClusterNoop,
    WebPages,
    Web,
    LedgerScale,
    Gateway,
    GatewayBatch,
    Cancel,
    TenantLimits,
}

fn main() -> Result<()> {
    // The workers run in this process: their allocator is set up as llmq-worker's is,
    // before the runtime's threads exist.
    llmq_worker::tune_malloc();
    // And with the Prometheus recorder a deployed worker has (its manifests serve /metrics),
    // so recording a call's figures costs here what it costs there.
    let _ = llmq_shared::health::recorder();
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> Result<()> {
    let args = Args::parse();
    let mut redis = redis::Client::open(args.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| {
            format!(
                "cannot reach Redis at {}; start it or set REDIS_URL",
                args.redis_url
            )
        })?;
    println!("{}", machine(&mut redis).await?);

    let benches = match args.only {
        Some(b) => vec![b],
        None => vec![
            Bench::QueueNoop,
            Bench::QueueNoopKeyed,
            Bench::QueueNoopClassed,
            Bench::Priority,
            Bench::FairShare,
            Bench::E2eMock,
            Bench::Pickup,
            Bench::RateLimited,
            Bench::Overhead,
            Bench::Chain,
            Bench::Inflight,
            Bench::RoutingSavings,
            Bench::StreamFirstToken,
            Bench::IdleFleet,
            Bench::ProviderBatch,
            Bench::PromptCache,
            Bench::AnswerCache,
            Bench::IdempotentEnqueue,
            Bench::BatchEnqueue,
            Bench::ClusterNoop,
            Bench::WebPages,
            Bench::Gateway,
            Bench::Cancel,
            Bench::TenantLimits,
        ],
    };
    let mut failed = 0;
    for bench in benches {
        let result = match bench {
            Bench::QueueNoop | Bench::QueueNoopKeyed | Bench::QueueNoopClassed => {
                queue_noop(&args, &mut redis, bench).await
            }
            Bench::Priority => priority(&args, &mut redis).await,
            Bench::FairShare => fair_share(&args, &mut redis).await,
            Bench::E2eMock => e2e_mock(&args, &mut redis).await,
            Bench::Pickup => pickup(&args, &mut redis).await,
            Bench::RateLimited => rate_limited(&args, &mut redis).await,
            Bench::Overhead => overhead(&args, &mut redis).await,
            Bench::Memory => memory(&args, &mut redis).await,
            Bench::Chain => chain(&args, &mut redis).await,
            Bench::Inflight => inflight(&args, &mut redis).await,
            Bench::RoutingSavings => routing_savings(&args, &mut redis).await,
            Bench::StreamFirstToken => stream_first_token(&args, &mut redis).await,
            Bench::IdleFleet => idle_fleet(&args, &mut redis).await,
            Bench::ProviderBatch => provider_batch(&args, &mut redis).await,
            Bench::PromptCache => prompt_cache(&args).await,
            Bench::AnswerCache => answer_cache(&args, &mut redis).await,
            Bench::IdempotentEnqueue => idempotent_enqueue(&args, &mut redis).await,
            Bench::BatchEnqueue => batch_enqueue(&args, &mut redis).await,
            Bench::ClusterNoop => cluster_noop(&args).await,
            Bench::WebPages => web_pages(&args, &mut redis).await,
            Bench::Web => web(&args, &mut redis).await,
            Bench::LedgerScale => ledger_scale(&args).await,
            Bench::Gateway => gateway(&args, &mut redis).await,
            Bench::GatewayBatch => gateway_batch(&args, &mut redis).await,
            Bench::Cancel => cancel(&args, &mut redis).await,
            Bench::TenantLimits => tenant_limits(&args, &mut redis).await,
        };
        match result {
            Ok(line) => println!("{line}"),
            Err(e) => {
                failed += 1;
                println!(
                    "bench={} error={}",
                    bench_name(bench),
                    quote(&format!("{e:#}"))
                );
            }
        }
    }
    ensure!(failed == 0, "{failed} benchmark(s) failed");
    Ok(())
}

fn bench_name(b: Bench) -> &'static str {
    match b {
        Bench::QueueNoop => "queue_noop",
        Bench::QueueNoopKeyed => "queue_noop_keyed",
        Bench::QueueNoopClassed => "queue_noop_classed",
        Bench::Priority => "priority",
        Bench::FairShare => "fair_share",
        Bench::E2eMock => "e2e_mock",
        Bench::Pickup => "pickup",
        Bench::RateLimited => "rate_limited",
        Bench::Overhead => "overhead",
        Bench::Memory => "memory",
        Bench::Chain => "chain",
        Bench::Inflight => "inflight",
        Bench::RoutingSavings => "routing_savings",
        Bench::StreamFirstToken => "stream_first_token",
        Bench::IdleFleet => "idle_fleet",
        Bench::ProviderBatch => "provider_batch",
        Bench::PromptCache => "prompt_cache",
        Bench::AnswerCache => "answer_cache",
        Bench::IdempotentEnqueue => "idempotent_enqueue",
        Bench::BatchEnqueue => "batch_enqueue",
        Bench::ClusterNoop => "cluster_noop",
        Bench::WebPages => "web_pages",
        Bench::Web => "web",
        Bench::LedgerScale => "ledger_scale",
        Bench::Gateway => "gateway",
        Bench::GatewayBatch => "gateway_batch",
        Bench::Cancel => "cancel",
        Bench::TenantLimits => "tenant_limits",
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmarks

/// (a) A 50,000-task backlog drained by one worker whose provider answers at once, ledger off.
/// `keyed`: every task carries one concurrency key whose limit is the concurrency, so no task
/// waits and what is measured is what a key costs: taking and freeing a slot.
async fn queue_noop(args: &Args, redis: &mut Redis, bench: Bench) -> Result<String> {
    let tasks = args.tasks.unwrap_or(50_000);
    let workers = args.workers.unwrap_or(1);
    let concurrency = args.concurrency.unwrap_or(256);
    let name = bench_name(bench);
    let shape = match bench {
        Bench::QueueNoopKeyed => Shape::Keyed((workers * concurrency) as u32),
        Bench::QueueNoopClassed => Shape::Classed,
        _ => Shape::Plain,
    };
    let d = plain_run(args, redis, tasks, workers, concurrency, shape).await?;
    if args.verbose {
        d.print_commands(name);
    }
    // The peer the issue sets llmq beside, in the same run: BullMQ's no-op right after.
    let peer = match bench {
        Bench::QueueNoop => bullmq_noop(args, tasks)
            .await
            .map_or_else(String::new, |per_s| {
                format!(
                    " bullmq_tasks_per_s={per_s:.0} ratio_to_bullmq={:.2}",
                    d.tasks_per_s / per_s
                )
            }),
        _ => String::new(),
    };
    Ok(format!(
        "bench={name} tasks={tasks} workers={workers} concurrency={concurrency} \
         tasks_per_s={:.0} redis_cpu_us_per_task={:.1} ledger=off secs={:.3} \
         proc_cpu_us_per_task={:.1} other_cpu_cores={:.2}{peer}",
        d.tasks_per_s, d.redis_cpu_us_per_task, d.secs, d.proc_cpu_us_per_task, d.other_cpu_cores
    ))
}

/// BullMQ's no-op (`tests/bullmq/bench.mjs noop`, as many jobs) on the same Redis: its jobs
/// per second, or `None`, said on stderr, when Node or BullMQ (`make bullmq-deps`) is not
/// installed or its run failed.
async fn bullmq_noop(args: &Args, jobs: usize) -> Option<f64> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bullmq");
    if !dir.join("node_modules/bullmq").is_dir() {
        eprintln!("queue_noop: BullMQ's peer not run: install it with `make bullmq-deps`");
        return None;
    }
    let out = tokio::process::Command::new("node")
        .args(["bench.mjs", "noop"])
        .current_dir(&dir)
        .env("REDIS_URL", &args.redis_url)
        .env("JOBS", jobs.to_string())
        .kill_on_drop(true)
        .output()
        .await;
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            eprintln!("queue_noop: BullMQ's peer failed: {}", err.trim());
            return None;
        }
        Err(e) => {
            eprintln!("queue_noop: BullMQ's peer not run: cannot start node: {e}");
            return None;
        }
    };
    let line = String::from_utf8_lossy(&out.stdout);
    let per_s = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("jobs_per_s="))
        .and_then(|v| v.parse().ok());
    if per_s.is_none() {
        eprintln!(
            "queue_noop: BullMQ's peer printed no jobs_per_s: {}",
            line.trim()
        );
    }
    per_s
}

/// A backlog of `tasks` tasks shaped by `shape` on a fresh queue drained by `workers` whose provider answers at
/// once: what a task costs, the peer other benchmarks are set beside in the same run.
async fn plain_run(
    args: &Args,
    redis: &mut Redis,
    tasks: usize,
    workers: usize,
    concurrency: usize,
    shape: Shape,
) -> Result<Delta> {
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        let ids = backlog_shaped(&client, &keys, tasks, shape).await?;
        let provider = NoopProvider::default();
        let (before, after) = run_noop(args, redis, &keys, provider, workers, concurrency).await?;
        verify_results(&client, &keys, &ids).await?;
        Ok(after.since(&before, tasks))
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// The simulated workload of `routing_savings`: task type, its share of the tasks, and the
/// share of good answers of each model (cheap, mid, premium) on it.
const WORKLOAD: [(&str, f64, [f64; 3]); 4] = [
    ("documentation", 0.40, [0.97, 0.98, 0.98]),
    ("code_generation", 0.30, [0.60, 0.96, 0.97]),
    ("code_review", 0.15, [0.40, 0.70, 0.96]),
    ("data_analysis", 0.15, [0.95, 0.97, 0.97]),
];
/// The models: id, input and output price per million tokens.
const SIM_MODELS: [(&str, f64, f64); 3] = [
    ("cheap", 0.15, 0.60),
    ("mid", 1.10, 4.40),
    ("premium", 3.00, 15.00),
];
/// How much success a cheaper model may give up, for `learning` and for the oracle.
const SIM_TOLERANCE: f64 = 0.02;

/// How the work step of each simulated task is routed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Router {
    /// Pinned to the premium model.
    Premium,
    /// Pinned to the cheapest model whose quality on the type is within the tolerance of
    /// the premium model's: the most any router could save on this workload.
    Oracle,
    /// `routing.strategy: learning`, from a cold start.
    Learning,
}

/// (i) Learned routing against a single premium model, on a simulated workload (llmq-mock's
/// quality models, `WORKLOAD`): each task is a two-step chain, the work on a task type and a
/// check that passes only good work (its verdict reaches the ledger, as a review's would). The
/// same tasks run three times: pinned to the premium model, pinned to the oracle's model,
/// and with `learning` from an empty ledger, the scheduler refreshing the stats as they come.
/// Costs are the work steps' (the check costs nothing); success is the share of chains whose
/// check passed.
async fn routing_savings(args: &Args, redis: &mut Redis) -> Result<String> {
    let tasks = args.tasks.unwrap_or(6_000);
    let concurrency = args.concurrency.unwrap_or(64);
    let bench_url = with_database(&args.database_url, BENCH_DB)?;
    let ledger = bench_ledger(&args.database_url, &bench_url).await?;
    let quality = SIM_MODELS
        .iter()
        .enumerate()
        .map(|(m, (id, _, _))| llmq_tests::mock::Quality {
            model: (*id).to_owned(),
            by_type: WORKLOAD
                .iter()
                .map(|(ty, _, q)| ((*ty).to_owned(), q[m]))
                .collect(),
        })
        .collect();
    let mock = MockServer::start(MockOptions {
        quality,
        ..MockOptions::default()
    })
    .await
    .context("cannot start the mock LLM server")?;
    // The same tasks for every router: types drawn by their shares from a fixed seed.
    let mut rng = llmq_tests::harness::SeededRng(0x5EED_0018);
    let types: Vec<usize> = (0..tasks)
        .map(|_| {
            let x = rng.below(1_000_000) as f64 / 1e6;
            let mut acc = 0.0;
            WORKLOAD
                .iter()
                .position(|(_, share, _)| {
                    acc += share;
                    x < acc
                })
                .unwrap_or(WORKLOAD.len() - 1)
        })
        .collect();
    let mut runs = Vec::new();
    for router in [Router::Premium, Router::Oracle, Router::Learning] {
        let run = simulate(
            args,
            redis,
            &ledger,
            &bench_url,
            &mock,
            &types,
            concurrency,
            router,
        )
        .await;
        runs.push(run?);
    }
    mock.shutdown().await;
    let [premium, oracle, learning] = [&runs[0], &runs[1], &runs[2]];
    let total = |r: &[(f64, bool)]| r.iter().map(|(c, _)| c).sum::<f64>();
    let success = |r: &[(f64, bool)]| {
        100.0 * r.iter().filter(|(_, ok)| *ok).count() as f64 / r.len().max(1) as f64
    };
    let savings = |r: &[(f64, bool)], base: &[(f64, bool)]| 100.0 * (1.0 - total(r) / total(base));
    // The learning curve: per 1,000 tasks, in the order they were submitted.
    let curve: Vec<String> = learning
        .chunks(1000)
        .zip(premium.chunks(1000))
        .map(|(l, p)| format!("{:.0}/{:.1}", savings(l, p), success(l)))
        .collect();
    Ok(format!(
        "bench=routing_savings tasks={tasks} savings_pct={:.1} success_pct={:.1} \
         premium_success_pct={:.1} oracle_savings_pct={:.1} oracle_success_pct={:.1} \
         share_of_oracle_pct={:.0} premium_cost_usd={:.4} learning_cost_usd={:.4} \
         curve_savings_success_per_1000={}",
        savings(learning, premium),
        success(learning),
        success(premium),
        savings(oracle, premium),
        success(oracle),
        100.0 * savings(learning, premium) / savings(oracle, premium),
        total(premium),
        total(learning),
        curve.join(","),
    ))
}

/// One router's run of the simulated workload: per task, in order, the work step's cost and
/// whether its check passed.
#[allow(clippy::too_many_arguments)]
async fn simulate(
    args: &Args,
    redis: &mut Redis,
    ledger: &Ledger,
    bench_url: &str,
    mock: &MockServer,
    types: &[usize],
    concurrency: usize,
    router: Router,
) -> Result<Vec<(f64, bool)>> {
    let queue = fresh_queue();
    let provider = format!("sim-{}", &queue[6..]);
    let models: String = SIM_MODELS
        .iter()
        .map(|(id, i, o)| {
            format!("      - {{id: {id}, input_usd_per_mtok: {i}, output_usd_per_mtok: {o}}}\n")
        })
        .collect();
    let config = Config::parse(
        "llmq-bench.yaml",
        &format!(
            "providers:\n  - name: {provider}\n    kind: openai_compatible\n    base_url: {}/v1\n    \
             api_key: bench\n    models:\n{models}\
             routing:\n  strategy: learning\n  explore: 0.05\n  tolerance: {SIM_TOLERANCE}\n  \
             retry: {{tries_per_provider: 1, backoff: [10ms]}}\n\
             checks:\n  good: {{program: grep, args: [\"-qF\", \"verdict:good\"]}}\n",
            mock.url()
        ),
        &|_| None,
    )?;
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        client.ensure_group(&keys).await?;
        // The scheduler refreshes the stats from the ledger as the tasks finish.
        let mut sched = llmq_scheduler::Settings::new(&args.redis_url, bench_url, config.clone())?;
        sched.id = Some(format!("{queue}-scheduler"));
        sched.namespace = Some(queue.clone());
        sched.queues = vec![queue.clone()];
        sched.tick = Duration::from_millis(100);
        sched.routing_stats_every = Duration::from_millis(250);
        let stop_scheduler = CancellationToken::new();
        let scheduler = tokio::spawn(llmq_scheduler::run(sched, stop_scheduler.clone()));
        let running = Workers::start(1, |i| {
            let mut s = settings(&args.redis_url, &config, &queue, concurrency, i)?;
            s.database_url = Some(bench_url.to_owned());
            s.scheduler_namespace = Some(queue.clone());
            s.stats_every = Duration::from_millis(250);
            Ok(s)
        })?;
        let oracle = |t: usize| {
            let q = WORKLOAD[t].2;
            // Cheapest first: the first within the tolerance of the premium model.
            let m = (0..q.len())
                .find(|m| q[*m] >= q[2] - SIM_TOLERANCE)
                .unwrap_or(2);
            SIM_MODELS[m].0
        };
        // Submitted at a steady pace, so what is learned early routes what comes later.
        let mut ids = Vec::with_capacity(types.len());
        for (i, t) in types.iter().enumerate() {
            let id = format!("{queue}-{i}");
            let mut work = serde_json::json!({"name": "work", "type": WORKLOAD[*t].0,
                "prompt": format!("[[type:{}]] task {i}: do the work well", WORKLOAD[*t].0)});
            match router {
                Router::Premium => work["model"] = serde_json::json!("premium"),
                Router::Oracle => work["model"] = serde_json::json!(oracle(*t)),
                Router::Learning => {}
            }
            let spec = serde_json::json!({"v": 1, "chain_id": id, "steps": [work,
                {"name": "check", "kind": "check", "after": ["work"], "command": "good"}]});
            client.submit_chain(&keys, &spec.to_string()).await?;
            ids.push(id);
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut out = Vec::with_capacity(ids.len());
        for id in &ids {
            let state = loop {
                match client.chain(&keys, id).await? {
                    Some(c) if c.state != "running" => break c,
                    _ => {
                        running.check()?;
                        ensure!(
                            Instant::now() < deadline,
                            "chain {id} not ended after {DRAIN_LIMIT:?}"
                        );
                        tokio::time::sleep(POLL).await;
                    }
                }
            };
            let cost = state.steps.get("work").map_or(0.0, |s| s.cost_usd);
            out.push((cost, state.state == "succeeded"));
        }
        running.stop().await?;
        stop_scheduler.cancel();
        scheduler.await??;
        Ok(out)
    }
    .await;
    for table in ["provider_calls", "tasks"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE queue = $1"))
            .bind(&queue)
            .execute(ledger.pool())
            .await?;
    }
    cleanup(redis, &queue).await?;
    result
}

/// (h) One worker keeping thousands of calls in flight: 40,000 tasks, concurrency 10,000, an
/// in-process provider that answers after `--latency-ms` (BullMQ's sleeping processor), ledger
/// off. Efficiency is the rate against concurrency / latency; memory is the process's peak
/// RSS over its RSS before the worker started, per task in flight.
async fn inflight(args: &Args, redis: &mut Redis) -> Result<String> {
    let tasks = args.tasks.unwrap_or(40_000);
    let concurrency = args.concurrency.unwrap_or(10_000);
    let latency = Duration::from_millis(args.latency_ms);
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        let ids = backlog_shaped(&client, &keys, tasks, Shape::Prompt(args.prompt_bytes)).await?;
        let starts = Arc::new(Starts {
            fill: concurrency.min(tasks),
            ..Starts::default()
        });
        let provider = NoopProvider {
            latency,
            starts: Some(Arc::clone(&starts)),
            ..NoopProvider::default()
        };
        let idle_kib = rss_kib()?;
        let peak = Peak::start(|| rss_kib().unwrap_or(0));
        let began = Instant::now();
        let run = run_noop(args, redis, &keys, provider, 1, concurrency).await;
        let (first_call_ms, filled_ms) = starts.since(began);
        let peak_kib = peak.stop().await;
        let (before, after) = run?;
        verify_results(&client, &keys, &ids).await?;

        let d = after.since(&before, tasks);
        if args.verbose {
            d.print_commands("inflight");
        }
        let ideal = concurrency as f64 / latency.as_secs_f64().max(1e-3);
        Ok(format!(
            "bench=inflight tasks={tasks} concurrency={concurrency} latency_ms={} \
             prompt_bytes={} tasks_per_s={:.0} ideal_per_s={ideal:.0} efficiency_pct={:.1} \
             redis_cpu_us_per_task={:.1} proc_cpu_us_per_task={:.1} rss_kib_per_inflight={:.2} \
             ledger=off secs={:.3} first_call_ms={first_call_ms:.1} filled_ms={filled_ms:.1}",
            args.latency_ms,
            args.prompt_bytes,
            d.tasks_per_s,
            100.0 * d.tasks_per_s / ideal,
            d.redis_cpu_us_per_task,
            d.proc_cpu_us_per_task,
            peak_kib.saturating_sub(idle_kib) as f64 / concurrency.min(tasks) as f64,
            d.secs,
        ))
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// Runs `workers` workers on `keys`' queue, `provider` answering for `noop`, until the queue
/// is drained: Redis as it was before they started and when the queue was drained.
async fn run_noop(
    args: &Args,
    redis: &mut Redis,
    keys: &QueueKeys,
    provider: NoopProvider,
    workers: usize,
    concurrency: usize,
) -> Result<(Snapshot, Snapshot)> {
    let config = noop_config()?;
    run_noop_with(args, redis, keys, provider, (workers, concurrency), &config).await
}

/// [`run_noop`] with provider file `config` (its provider named `noop`).
async fn run_noop_with(
    args: &Args,
    redis: &mut Redis,
    keys: &QueueKeys,
    provider: NoopProvider,
    (workers, concurrency): (usize, usize),
    config: &Config,
) -> Result<(Snapshot, Snapshot)> {
    let client = Client::new(&args.redis_url)?;
    let provider: Arc<dyn Provider> = Arc::new(provider);
    let before = Snapshot::take(redis).await?;
    let running = Workers::start(workers, |i| {
        let mut s = settings(&args.redis_url, config, keys.name(), concurrency, i)?;
        s.provider_overrides = vec![("noop".into(), Arc::clone(&provider))];
        Ok(s)
    })?;
    let drained = wait_drained(&client, keys, &running).await;
    let after = Snapshot::take(redis).await;
    running.stop().await?;
    drained?;
    Ok((before, after?))
}

/// (y) Tenant limits (issue 72). Redis CPU per task of a 20,000-task backlog of ten tenants
/// drained by one worker whose provider answers at once, without limits and with each
/// tenant's budget (day and month) and `rpm` configured high enough that none refuses: the
/// reservation and settle every call adds. Three runs of each, alternating, medians. Then
/// four workers of 64 slots race one tenant's budget of 500 estimates, the provider
/// answering in 2 ms: what the tenant spent beyond its budget, in estimates (goal: at most
/// one), and how many of its 2,000 tasks ran before it was held.
async fn tenant_limits(args: &Args, redis: &mut Redis) -> Result<String> {
    let tasks = args.tasks.unwrap_or(20_000);
    let mut limited = noop_config()?;
    limited.tenants.default_limits = Some(llmq_shared::config::TenantLimits {
        budget_usd_day: Some(1e6),
        budget_usd_month: Some(1e7),
        rpm: Some(100_000_000),
        ..llmq_shared::config::TenantLimits::default()
    });
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..6 {
        let config = if round % 2 == 0 {
            noop_config()?
        } else {
            limited.clone()
        };
        let queue = fresh_queue();
        let d = async {
            let keys = QueueKeys::new(&queue);
            let client = Client::new(&args.redis_url)?;
            let ids = backlog_shaped(&client, &keys, tasks, Shape::Tenants).await?;
            let provider = NoopProvider::default();
            let (before, after) =
                run_noop_with(args, redis, &keys, provider, (1, 256), &config).await?;
            verify_results(&client, &keys, &ids).await?;
            Ok::<_, anyhow::Error>(after.since(&before, tasks))
        }
        .await;
        cleanup(redis, &queue).await?;
        let d = d?;
        if round % 2 == 0 { &mut off } else { &mut on }.push(d.redis_cpu_us_per_task);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut off), median(&mut on));
    let (spent, estimate, ran, budget) = tenant_race(args, redis).await?;
    Ok(format!(
        "bench=tenant_limits tasks={tasks} redis_cpu_us_per_task_off={off:.1} \
         redis_cpu_us_per_task_on={on:.1} ratio={:.2} race_workers=4x64 race_budget_usd={budget:.6} \
         race_spent_usd={spent:.6} race_estimate_usd={estimate:.8} \
         race_overspend_estimates={:.2} race_ran={ran}",
        on / off,
        (spent - budget).max(0.0) / estimate
    ))
}

/// The race of [`tenant_limits`]: what the tenant spent, one call's estimate, how many
/// of its tasks ran, and its budget.
async fn tenant_race(args: &Args, redis: &mut Redis) -> Result<(f64, f64, usize, f64)> {
    let queue = fresh_queue();
    let tenant = format!("race-{queue}");
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        let mut config = noop_config()?;
        // One call's estimate, as the worker makes it: the prompt's tokens and 16 out.
        let mut probe = Envelope::new("benchmark task 0");
        probe.max_tokens = Some(16);
        probe.model = Some("noop".into());
        let plan = llmq_shared::routing::plan(
            &config,
            &probe,
            &llmq_shared::routing::Constraints::default(),
            &llmq_shared::routing::Stats::default(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let estimate = plan.candidates[0].estimated_usd;
        let budget = estimate * 500.0;
        config.tenants.limits.insert(
            tenant.clone(),
            llmq_shared::config::TenantLimits {
                budget_usd_day: Some(budget),
                ..llmq_shared::config::TenantLimits::default()
            },
        );
        client.ensure_group(&keys).await?;
        let envs: Vec<Envelope> = (0..2000)
            .map(|i| {
                let mut e = Envelope::new(format!("benchmark task {i}"));
                e.max_tokens = Some(16);
                e.model = Some("noop".into());
                e.tenant = Some(tenant.as_str().into());
                e
            })
            .collect();
        for chunk in envs.chunks(ENQUEUE_CHUNK) {
            client.enqueue_many(&keys, chunk).await?;
        }
        // Each answer uses what its estimate counted out (max_tokens whole): a call costs
        // about its estimate, so the budget runs out.
        let provider: Arc<dyn Provider> = Arc::new(NoopProvider {
            latency: Duration::from_millis(2),
            output_tokens: 16,
            ..NoopProvider::default()
        });
        let running = Workers::start(4, |i| {
            let mut s = settings(&args.redis_url, &config, keys.name(), 64, i)?;
            s.provider_overrides = vec![("noop".into(), Arc::clone(&provider))];
            Ok(s)
        })?;
        // Until the ran count stops moving for a second: the rest are held.
        let ids: Vec<TaskId> = envs.iter().filter_map(|e| e.id).collect();
        let (mut ran, mut still) = (0, 0);
        let deadline = Instant::now() + DRAIN_LIMIT;
        while still < 10 {
            running.check()?;
            ensure!(Instant::now() < deadline, "the race did not settle");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut now = 0;
            for chunk in ids.chunks(1000) {
                now += client
                    .results(&keys, chunk)
                    .await?
                    .iter()
                    .filter(|r| {
                        r.as_ref()
                            .is_some_and(|r| r.status == llmq_shared::outcome::Status::Succeeded)
                    })
                    .count();
            }
            still = if now == ran { still + 1 } else { 0 };
            ran = now;
        }
        running.stop().await?;
        let limiter = llmq_shared::quota::Limiter::new(client.clone());
        let limits = config.tenants.limits[&tenant];
        let usage = limiter.tenant_usage(&tenant, &limits, Utc::now()).await?;
        let spent = usage
            .iter()
            .find(|l| l.quota == "budget_usd_day")
            .map_or(0.0, |l| l.used);
        Ok((spent, estimate, ran, budget))
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// The most a reading reached, read every 100 ms until stopped.
struct Peak {
    stop: CancellationToken,
    most: JoinHandle<u64>,
}

impl Peak {
    fn start(read: impl Fn() -> u64 + Send + 'static) -> Self {
        let stop = CancellationToken::new();
        let most = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut most = 0;
                while !stop.is_cancelled() {
                    most = most.max(read());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                most
            }
        });
        Self { stop, most }
    }

    async fn stop(self) -> u64 {
        self.stop.cancel();
        self.most.await.unwrap_or(0)
    }
}

/// The process's resident memory, in KiB.
fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/self/status"))
}

/// (g) Chains of 5 steps (one fans out to two, a merge joins them, one more after it; with
/// `--chain-width` the plan fans out to that many), each submitted with one XADD, run by one
/// worker whose provider answers at once, ledger off: chains and steps per second, and Redis
/// CPU per step, to set beside a plain task's.
async fn chain(args: &Args, redis: &mut Redis) -> Result<String> {
    let width = usize::try_from(args.chain_width)?;
    let steps = width + 3;
    // About 20,000 steps (4,000 chains at the default width).
    let chains = args.tasks.unwrap_or(20_000 / steps);
    let workers = args.workers.unwrap_or(1);
    let concurrency = args.concurrency.unwrap_or(256);
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        client.ensure_group(&keys).await?;
        let ids: Vec<String> = (0..chains).map(|i| format!("{queue}-{i}")).collect();
        // The two of the default width are `a` and `b`, as this bench always named them.
        let fan: Vec<String> = (0..width)
            .map(|i| match i {
                0 => "a".to_owned(),
                1 => "b".to_owned(),
                i => format!("s{i}"),
            })
            .collect();
        for id in &ids {
            let mut spec = vec![serde_json::json!({"name": "plan", "prompt": "plan"})];
            for name in &fan {
                spec.push(serde_json::json!({"name": name, "after": ["plan"],
                    "prompt": format!("{name} {{{{plan.summary}}}}")}));
            }
            spec.push(serde_json::json!({"name": "merge", "after": fan, "prompt": "merge"}));
            spec.push(serde_json::json!({"name": "docs", "after": ["merge"],
                "prompt": "docs {{merge.output}}"}));
            let spec = serde_json::json!({"v": 1, "chain_id": id, "steps": spec});
            client.submit_chain(&keys, &spec.to_string()).await?;
        }
        // From here on: expansion, every step, every finish.
        let (before, after) = run_noop(
            args,
            redis,
            &keys,
            NoopProvider::default(),
            workers,
            concurrency,
        )
        .await?;
        for id in &ids {
            let state = client.chain(&keys, id).await?.map(|c| c.state);
            ensure!(
                state.is_some_and(|s| s == "succeeded"),
                "chain {id} ended {state:?}"
            );
        }
        let d = after.since(&before, chains * steps);
        if args.verbose {
            d.print_commands("chain");
        }
        Ok(d)
    }
    .await;
    cleanup(redis, &queue).await?;
    let d = result?;
    // The peer, in the same run: as many plain tasks as the chains had steps.
    let plain = plain_run(
        args,
        redis,
        chains * steps,
        workers,
        concurrency,
        Shape::Plain,
    )
    .await?;
    Ok(format!(
        "bench=chain chains={chains} steps_per_chain={steps} workers={workers} \
         concurrency={concurrency} chains_per_s={:.0} steps_per_s={:.0} \
         redis_cpu_us_per_step={:.1} queue_noop_redis_cpu_us_per_task={:.1} \
         ratio_to_queue_noop={:.2} ledger=off secs={:.3} proc_cpu_us_per_step={:.1}",
        d.tasks_per_s / steps as f64,
        d.tasks_per_s,
        d.redis_cpu_us_per_task,
        plain.redis_cpu_us_per_task,
        d.redis_cpu_us_per_task / plain.redis_cpu_us_per_task,
        d.secs,
        d.proc_cpu_us_per_task,
    ))
}

/// 1,000 tasks sharing a 3,000-token system prompt (the instructions), each with a short
/// document of its own, to an Anthropic model through llmq-mock (which caches what
/// `cache_control` marks, as Anthropic does), with the provider's `prompt_cache` on and
/// then off, each run on a fresh mock: the input cost of each, what caching saved of the
/// prefix's cost, and whether the ledger's cost equals what the mock billed at each rate.
async fn prompt_cache(args: &Args) -> Result<String> {
    const INPUT: f64 = 3.0;
    const CACHED: f64 = 0.3;
    const OUTPUT: f64 = 15.0;
    // How long the mock takes to answer: a cache entry serves the requests sent after
    // the answer that wrote it, so the first `concurrency` requests all write.
    const ANSWER_TIME: Duration = Duration::from_millis(300);
    let tasks = args.tasks.unwrap_or(1000);
    let concurrency = args.concurrency.unwrap_or(32);
    // 12,000 characters: the mock counts 3,003 tokens (four characters a token, 3 a message).
    let instructions = "Read the document and say its tone, its topic and who it is for. "
        .repeat(185)
        .chars()
        .take(12_000)
        .collect::<String>();
    const PREFIX_TOKENS: u64 = 3003;
    let bench_url = with_database(&args.database_url, BENCH_DB)?;
    let ledger = bench_ledger(&args.database_url, &bench_url).await?;
    let client = Client::new(&args.redis_url)?;
    let mut input_usd = [0.0; 2];
    let mut billed_tokens = [[0; 4]; 2];
    let mut ledger_matches = true;
    for (run, on) in [true, false].into_iter().enumerate() {
        let queue = fresh_queue();
        let keys = QueueKeys::new(&queue);
        let mock = MockServer::start(MockOptions {
            latency: ANSWER_TIME,
            ..MockOptions::default()
        })
        .await
        .context("cannot start the mock LLM server")?;
        let config = Config::parse(
            "llmq-bench.yaml",
            &format!(
                "providers:\n  - name: claude\n    kind: anthropic\n    base_url: {}\n    \
                 api_key: bench\n    prompt_cache: {on}\n    models:\n      - {{id: claude-sonnet-4-5, \
                 input_usd_per_mtok: {INPUT}, output_usd_per_mtok: {OUTPUT}, \
                 cached_input_usd_per_mtok: {CACHED}}}\n",
                mock.url()
            ),
            &|_| None,
        )?;
        client.ensure_group(&keys).await?;
        let envs: Vec<Envelope> = (0..tasks)
            .map(|i| Envelope {
                system: Some(instructions.clone().into()),
                ..Envelope::new(format!("Document {i}: the quarterly numbers are in."))
            })
            .collect();
        for part in envs.chunks(ENQUEUE_CHUNK) {
            client.enqueue_many(&keys, part).await?;
        }
        let running = Workers::start(1, |i| {
            let mut s = settings(&args.redis_url, &config, &queue, concurrency, i)?;
            s.database_url = Some(bench_url.clone());
            Ok(s)
        })?;
        let drained = wait_drained(&client, &keys, &running).await;
        running.stop().await?;
        drained?;
        let billed = mock.anthropic_billed();
        mock.shutdown().await;
        let [fresh, read, written, output] = billed;
        input_usd[run] =
            (fresh as f64 * INPUT + read as f64 * CACHED + written as f64 * INPUT * 1.25) / 1e6;
        let mock_usd = input_usd[run] + output as f64 * OUTPUT / 1e6;
        let (ledger_usd,): (Option<f64>,) = sqlx::query_as(
            "SELECT sum(cost_usd)::float8 FROM provider_calls WHERE queue = $1 AND outcome = 'ok'",
        )
        .bind(&queue)
        .fetch_one(ledger.pool())
        .await?;
        ledger_matches &= (ledger_usd.unwrap_or(0.0) - mock_usd).abs() < 1e-6;
        for table in ["provider_calls", "tasks"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE queue = $1"))
                .bind(&queue)
                .execute(ledger.pool())
                .await?;
        }
        billed_tokens[run] = billed;
    }
    let prefix_usd = (tasks as u64 * PREFIX_TOKENS) as f64 * INPUT / 1e6;
    let [on, off] = billed_tokens;
    Ok(format!(
        "bench=prompt_cache tasks={tasks} concurrency={concurrency} answer_ms={} prefix_tokens={PREFIX_TOKENS} \
         input_usd_cached={:.4} input_usd_uncached={:.4} prefix_saved_pct={:.1} \
         cache_writes={} cache_read_tokens={} cache_write_tokens={} uncached_read_tokens={} \
         ledger_matches_mock={ledger_matches}",
        ANSWER_TIME.as_millis(),
        input_usd[0],
        input_usd[1],
        100.0 * (input_usd[1] - input_usd[0]) / prefix_usd,
        on[2] / PREFIX_TOKENS,
        on[1],
        on[2],
        off[1],
    ))
}

/// 10,000 tasks of which 2,000 are unique (each request five times, interleaved), enqueued at
/// once to a queue whose answers are cached, through the mock over real HTTP (100 ms a call),
/// ledger off: the calls made (goal: one per unique request) and Redis CPU per task. Then the
/// same 10,000 requests again, every one a hit: the Redis CPU a hit costs. And, in the same
/// run, 10,000 unique tasks without the cache, every one called (what a called task costs at
/// the mock's pace), and 10,000 no-op tasks (a hit's peer: a task answered at once).
async fn answer_cache(args: &Args, redis: &mut Redis) -> Result<String> {
    const UNIQUE: usize = 2_000;
    let tasks = args.tasks.unwrap_or(10_000);
    let concurrency = args.concurrency.unwrap_or(256);
    let latency = Duration::from_millis(100);
    let (mock, mut config) = mock_fast(latency).await?;
    let client = Client::new(&args.redis_url)?;
    // One run: `tasks` tasks of `unique` requests to a fresh queue, cached or not; the calls
    // the mock saw and the Redis figures.
    let run =
        async |redis: &mut Redis, config: &Config, queue: &str, unique: usize, rounds: usize| {
            let keys = QueueKeys::new(queue);
            client.ensure_group(&keys).await?;
            let calls_before = mock.total_calls();
            let mut deltas = Vec::new();
            for _ in 0..rounds {
                let envs: Vec<Envelope> = (0..tasks)
                    .map(|i| Envelope {
                        temperature: Some(0.0),
                        ..Envelope::new(format!("Classify support ticket {}", i % unique))
                    })
                    .collect();
                for part in envs.chunks(ENQUEUE_CHUNK) {
                    client.enqueue_many(&keys, part).await?;
                }
                let before = Snapshot::take(redis).await?;
                let running = Workers::start(1, |i| {
                    settings(&args.redis_url, config, queue, concurrency, i)
                })?;
                // Drained, and nothing parked behind a call.
                let drained = wait_unparked(&client, &keys, &running, redis).await;
                let after = Snapshot::take(redis).await;
                running.stop().await?;
                drained?;
                let ids: Vec<TaskId> = envs.iter().filter_map(|e| e.id).collect();
                verify_results(&client, &keys, &ids).await?;
                let d = after?.since(&before, tasks);
                if args.verbose {
                    d.print_commands("answer_cache");
                }
                deltas.push(d);
            }
            anyhow::Ok((mock.total_calls() - calls_before, deltas))
        };
    let cached = fresh_queue();
    let plain = fresh_queue();
    config.answer_cache.queues.insert(
        cached.clone(),
        llmq_shared::config::QueueCache {
            ttl: Duration::from_secs(3600),
            sampled: false,
        },
    );
    let result = async {
        let (calls, cold_warm) = run(redis, &config, &cached, UNIQUE, 2).await?;
        let (plain_calls, called) = run(redis, &config, &plain, tasks, 1).await?;
        ensure!(
            plain_calls == tasks as u64,
            "{plain_calls} calls for {tasks} uncached tasks"
        );
        // The peer of a hit: a task whose provider answers at once, in the same run.
        let noop = plain_run(args, redis, tasks, 1, concurrency, Shape::Plain).await?;
        let (cold, warm, called) = (&cold_warm[0], &cold_warm[1], &called[0]);
        Ok(format!(
            "bench=answer_cache tasks={tasks} unique={UNIQUE} concurrency={concurrency} \
             mock_latency_ms={} calls={calls} cold_tasks_per_s={:.0} \
             cold_redis_cpu_us_per_task={:.1} redis_cpu_us_per_hit={:.1} \
             hit_tasks_per_s={:.0} called_redis_cpu_us_per_task={:.1} \
             noop_redis_cpu_us_per_task={:.1} noop_tasks_per_s={:.0} \
             hit_ratio_to_noop={:.2} ledger=off",
            latency.as_millis(),
            cold.tasks_per_s,
            cold.redis_cpu_us_per_task,
            warm.redis_cpu_us_per_task,
            warm.tasks_per_s,
            called.redis_cpu_us_per_task,
            noop.redis_cpu_us_per_task,
            noop.tasks_per_s,
            warm.redis_cpu_us_per_task / noop.redis_cpu_us_per_task,
        ))
    }
    .await;
    mock.shutdown().await;
    cleanup(redis, &cached).await?;
    cleanup(redis, &plain).await?;
    result
}

/// Idempotency keys. What a key costs: no-op tasks each with a key of its own against the same
/// tasks without one, alternating (keyless, keyed, keyless, keyed) in the same run: Redis CPU
/// per task, and the keyed runs' over the keyless' (goal: at most 1.2). Then what a copy
/// costs: 10,000 tasks of 1,000 keys (each key's task ten times, interleaved, each copy with
/// an id of its own) enqueued at once through the mock over real HTTP (100 ms a call), ledger
/// off: the calls made (goal: 1,000) and Redis CPU per task.
async fn idempotent_enqueue(args: &Args, redis: &mut Redis) -> Result<String> {
    const KEYS: usize = 1_000;
    const COPIES: usize = 10_000;
    let tasks = args.tasks.unwrap_or(20_000);
    let concurrency = args.concurrency.unwrap_or(256);
    let mut keyless = Vec::new();
    let mut keyed = Vec::new();
    let mut batched = Vec::new();
    for _ in 0..2 {
        keyless.push(plain_run(args, redis, tasks, 1, concurrency, Shape::Plain).await?);
        keyed.push(plain_run(args, redis, tasks, 1, concurrency, Shape::Idempotent).await?);
        batched.push(plain_run(args, redis, tasks, 1, concurrency, Shape::Batch).await?);
    }
    if args.verbose {
        keyless[0].print_commands("idempotent_enqueue_keyless");
        keyed[0].print_commands("idempotent_enqueue_keyed");
    }
    let cpu =
        |ds: &[Delta]| ds.iter().map(|d| d.redis_cpu_us_per_task).sum::<f64>() / ds.len() as f64;
    let (keyless_cpu, keyed_cpu, batch_cpu) = (cpu(&keyless), cpu(&keyed), cpu(&batched));

    let latency = Duration::from_millis(100);
    let (mock, config) = mock_fast(latency).await?;
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        client.ensure_group(&keys).await?;
        let envs: Vec<Envelope> = (0..COPIES)
            .map(|i| Envelope {
                idempotency_key: Some(format!("refund-{}", i % KEYS).into()),
                ..Envelope::new(format!("Refund order {}", i % KEYS))
            })
            .collect();
        for part in envs.chunks(ENQUEUE_CHUNK) {
            client.enqueue_many(&keys, part).await?;
        }
        let before = Snapshot::take(redis).await?;
        let running = Workers::start(1, |i| settings(&args.redis_url, &config, &queue, concurrency, i))?;
        // Drained, and no copy parked behind a first.
        let drained = wait_unparked(&client, &keys, &running, redis).await;
        let after = Snapshot::take(redis).await;
        running.stop().await?;
        drained?;
        let ids: Vec<TaskId> = envs.iter().filter_map(|e| e.id).collect();
        verify_results(&client, &keys, &ids).await?;
        let copies = client.duplicates(&keys).await?;
        let d = after?.since(&before, COPIES);
        if args.verbose {
            d.print_commands("idempotent_enqueue");
        }
        Ok(format!(
            "bench=idempotent_enqueue tasks={tasks} concurrency={concurrency} \
             keyless_redis_cpu_us_per_task={keyless_cpu:.1} keyed_redis_cpu_us_per_task={keyed_cpu:.1} \
             keyed_ratio={:.2} batch_task_redis_cpu_us_per_task={batch_cpu:.1} batch_task_ratio={:.2} \
             keyless_tasks_per_s={:.0} keyed_tasks_per_s={:.0} \
             copies_sent={COPIES} keys={KEYS} mock_latency_ms={} calls={} copies_answered={copies} \
             copies_redis_cpu_us_per_task={:.1} copies_tasks_per_s={:.0} ledger=off",
            keyed_cpu / keyless_cpu,
            batch_cpu / keyless_cpu,
            keyless.iter().map(|d| d.tasks_per_s).sum::<f64>() / keyless.len() as f64,
            keyed.iter().map(|d| d.tasks_per_s).sum::<f64>() / keyed.len() as f64,
            latency.as_millis(),
            mock.total_calls(),
            d.redis_cpu_us_per_task,
            d.tasks_per_s,
        ))
    }
    .await;
    mock.shutdown().await;
    cleanup(redis, &queue).await?;
    result
}

/// `llmq batch` (the release binary beside this one, run as a user runs it) enqueuing a JSON
/// Lines file of `--tasks` tasks (1,000,000 by default), each with a `custom_id`, with a
/// `--batch-id`: tasks per second, wall clock from start to exit (both passes: the file is
/// checked whole first), and the CLI's peak resident memory (`VmHWM`, read every 20 ms).
async fn batch_enqueue(args: &Args, redis: &mut Redis) -> Result<String> {
    use std::io::Write as _;
    let tasks = args.tasks.unwrap_or(1_000_000);
    let llmq = std::env::current_exe()?.with_file_name("llmq");
    ensure!(
        llmq.exists(),
        "{} is missing; build it with `cargo build --release --bin llmq` (make bench does)",
        llmq.display()
    );
    let queue = fresh_queue();
    let path = std::env::temp_dir().join(format!("llmq-bench-{queue}.jsonl"));
    let result = async {
        {
            let mut w = std::io::BufWriter::new(std::fs::File::create(&path)?);
            for i in 0..tasks {
                writeln!(
                    w,
                    r#"{{"custom_id":"req-{i}","prompt":"Summarise support ticket number {i} and say who should handle it","model":"mock-fast"}}"#
                )?;
            }
        }
        let file_mb = std::fs::metadata(&path)?.len() as f64 / 1e6;
        let started = Instant::now();
        let mut child = std::process::Command::new(&llmq)
            .args(["--redis-url", &args.redis_url, "batch", "--input"])
            .arg(&path)
            .args(["--queue", &queue, "--batch-id", "bench"])
            .env_remove("LLMQ_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let status_file = format!("/proc/{}/status", child.id());
        let mut peak_kib = 0u64;
        let status = loop {
            if let Ok(text) = std::fs::read_to_string(&status_file)
                && let Some(kib) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
            if let Some(status) = child.try_wait()? {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let secs = started.elapsed().as_secs_f64();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err)?;
        }
        ensure!(status.success(), "llmq batch failed: {err}");
        let len: u64 = redis::cmd("XLEN")
            .arg(QueueKeys::new(&queue).stream())
            .query_async(redis)
            .await?;
        ensure!(len == tasks as u64, "{len} entries for {tasks} tasks");
        Ok(format!(
            "bench=batch_enqueue tasks={tasks} format=jsonl file_mb={file_mb:.0} secs={secs:.2} \
             tasks_per_s={:.0} cli_peak_rss_mb={:.1}",
            tasks as f64 / secs,
            peak_kib as f64 / 1024.0,
        ))
    }
    .await;
    let _ = std::fs::remove_file(&path);
    cleanup(redis, &queue).await?;
    result
}

/// (b) Like (a), through the mock LLM server over real HTTP, with the Postgres ledger on.
async fn e2e_mock(args: &Args, redis: &mut Redis) -> Result<String> {
    let tasks = args.tasks.unwrap_or(20_000);
    let workers = args.workers.unwrap_or(2);
    let concurrency = args.concurrency.unwrap_or(128);
    let latency = Duration::from_millis(args.mock_latency_ms);
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        let bench_url = with_database(&args.database_url, BENCH_DB)?;
        let ledger = bench_ledger(&args.database_url, &bench_url).await?;
        let mock = MockServer::start(MockOptions { latency, ..MockOptions::default() })
            .await
            .context("cannot start the mock LLM server")?;
        let config = Config::parse(
            "llmq-bench.yaml",
            &format!(
                "providers:\n  - name: mock\n    kind: openai_compatible\n    base_url: {}/v1\n    \
                 api_key: bench\n    http2: {}\n    connections: {}\n    models:\n      - {{id: mock-fast, input_usd_per_mtok: 0.15, \
                 output_usd_per_mtok: 0.6}}\n",
                mock.url(),
                if args.http2 { "prior_knowledge" } else { "auto" },
                args.connections,
            ),
            &|_| None,
        )?;
        let ids = backlog(&client, &keys, tasks).await?;

        let before = Snapshot::take(redis).await?;
        let running = Workers::start(workers, |i| {
            let mut s = settings(&args.redis_url, &config, &queue, concurrency, i)?;
            s.database_url = Some(bench_url.clone());
            Ok(s)
        })?;
        // The most connections open to the mock at once, sampled while the tasks run.
        let port = mock.addr().port();
        let peak = Peak::start(move || llmq_tests::mock::connections_to(port));
        let drained = wait_drained(&client, &keys, &running).await;
        let max_connections = peak.stop().await;
        let after = Snapshot::take(redis).await;
        running.stop().await?;
        drained?;
        let after = after?;
        verify_results(&client, &keys, &ids).await?;
        let calls = mock.total_calls();
        mock.shutdown().await;
        ensure!(
            calls == tasks as u64,
            "the mock server saw {calls} calls for {tasks} tasks"
        );
        // The rollups are summed after the rows are written (the scheduler's
        // `ledger_rollups` duty, every report): what summing this run's rows takes, apart
        // from the run's own time.
        let rolled = Instant::now();
        llmq_shared::ledger::roll(ledger.pool()).await?;
        let roll_us = rolled.elapsed().as_secs_f64() * 1e6 / tasks as f64;
        // Answered calls must match the mock one for one; calls the worker could not make
        // (out of descriptors: no socket, nothing billed) are rows too, and counted apart.
        let (recorded, refused): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE outcome = 'ok'), count(*) FILTER (WHERE outcome <> 'ok') \
             FROM provider_calls WHERE queue = $1",
        )
        .bind(&queue)
        .fetch_one(ledger.pool())
        .await?;
        // The rows have been counted; drop them so that runs stay alike.
        for table in ["provider_calls", "tasks"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE queue = $1"))
                .bind(&queue)
                .execute(ledger.pool())
                .await?;
        }
        ensure!(
            recorded == tasks as i64,
            "the ledger holds {recorded} answered calls for queue {queue}, expected {tasks}"
        );

        let d = after.since(&before, tasks);
        if args.verbose {
            d.print_commands("e2e_mock");
        }
        Ok(format!(
            "bench=e2e_mock tasks={tasks} workers={workers} concurrency={concurrency} \
             tasks_per_s={:.0} redis_cpu_us_per_task={:.1} ledger=on mock_latency_ms={} \
             secs={:.3} proc_cpu_us_per_task={:.1} other_cpu_cores={:.2} http={} \
             max_connections={max_connections} refused_calls={refused} roll_us_per_task={roll_us:.1} \
             efficiency_pct={}",
            d.tasks_per_s,
            d.redis_cpu_us_per_task,
            args.mock_latency_ms,
            d.secs,
            d.proc_cpu_us_per_task,
            d.other_cpu_cores,
            if args.http2 { "h2c" } else { "1.1" },
            // Against what the concurrency allows at this latency; without latency, none.
            if args.mock_latency_ms == 0 {
                "-".to_owned()
            } else {
                let ideal = (workers * concurrency) as f64 * 1000.0 / args.mock_latency_ms as f64;
                format!("{:.1}", 100.0 * d.tasks_per_s / ideal)
            },
        ))
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// Live answers through the mock over real HTTP, with the ledger on, its answers in four
/// pieces 20 ms apart (as a model writes): the time from the call's start (its ledger row)
/// until its first text is visible to a reader blocked on the task's live answer, one task
/// at a time; and what streaming costs Redis per answer, against the same tasks unstreamed
/// on a model as slow as the streamed one's four pieces (60 ms), both drained from a backlog
/// at concurrency 64 in the same run.
async fn stream_first_token(args: &Args, redis: &mut Redis) -> Result<String> {
    const GAP_MS: u64 = 20;
    let tasks = args.tasks.unwrap_or(1000);
    let followed = 200.min(tasks);
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        client.ensure_group(&keys).await?;
        let bench_url = with_database(&args.database_url, BENCH_DB)?;
        let ledger = bench_ledger(&args.database_url, &bench_url).await?;
        let mock = MockServer::start(MockOptions::default())
            .await
            .context("cannot start the mock LLM server")?;
        let config = Config::parse(
            "llmq-bench.yaml",
            &format!(
                "providers:\n  - name: mock\n    kind: openai_compatible\n    base_url: {}/v1\n    \
                 api_key: bench\n    models:\n      - {{id: stream-gap-{GAP_MS}, input_usd_per_mtok: 0.15, \
                 output_usd_per_mtok: 0.6}}\n      - {{id: slow-{}, input_usd_per_mtok: 0.15, \
                 output_usd_per_mtok: 0.6}}\n",
                mock.url(),
                3 * GAP_MS
            ),
            &|_| None,
        )?;
        let running = Workers::start(1, |i| {
            let mut s = settings(&args.redis_url, &config, &queue, 64, i)?;
            s.database_url = Some(bench_url.clone());
            Ok(s)
        })?;
        // The plain peer's model answers in the time the streamed one takes to write its
        // pieces, so the two runs differ only by the live answer.
        let task = |i: usize, stream: bool| {
            let mut e = Envelope::new(format!("tell the story of river number {i} in a few words"));
            e.stream = stream.then_some(true);
            e.model = Some(if stream {
                format!("stream-gap-{GAP_MS}").into()
            } else {
                format!("slow-{}", 3 * GAP_MS).into()
            });
            e
        };
        // Redis per answer: the same tasks drained from a backlog, plain, then streamed.
        let mut per_task = Vec::new();
        for stream in [false, true] {
            let chunk: Vec<Envelope> = (0..tasks).map(|i| task(i, stream)).collect();
            let before = Snapshot::take(redis).await?;
            for part in chunk.chunks(ENQUEUE_CHUNK) {
                client.enqueue_many(&keys, part).await?;
            }
            wait_drained(&client, &keys, &running).await?;
            let d = Snapshot::take(redis).await?.since(&before, tasks);
            if args.verbose {
                d.print_commands(if stream { "stream_streamed" } else { "stream_plain" });
            }
            // The live answer's own commands: its XADDs and EXPIREs (an enqueue is an XADD too,
            // in both runs).
            let (calls, usec) = d
                .commands
                .iter()
                .filter(|(name, _, _)| name == "xadd" || name == "expire")
                .fold((0, 0), |(c, u), (_, calls, usec)| (c + calls, u + usec));
            let n = tasks as f64;
            per_task.push((d.redis_cpu_us_per_task, calls as f64 / n, usec as f64 / n));
        }
        // First text, one task at a time, followed as any reader would.
        let mut conn = client.blocking_conn().await?;
        let mut firsts = Vec::with_capacity(followed);
        for i in 0..followed {
            let e = task(tasks + i, true);
            let id = e.id.context("Envelope::new names its task")?;
            client.enqueue(&keys, &e).await?;
            let seen = loop {
                let entries =
                    Client::read_out(&mut conn, &keys, id, "0", Duration::from_secs(10)).await?;
                if entries.iter().any(|(_, e)| matches!(e, OutEntry::Text(_))) {
                    break Utc::now();
                }
                ensure!(!entries.is_empty(), "no text in task {id}'s live answer within 10 s");
            };
            firsts.push((id, seen));
        }
        wait_drained(&client, &keys, &running).await?;
        running.stop().await?;
        mock.shutdown().await;
        let mut waits = Vec::with_capacity(followed);
        for (id, seen) in &firsts {
            let started: chrono::DateTime<Utc> = sqlx::query_scalar(
                "SELECT min(called_at) FROM provider_calls WHERE task_id = $1::uuid AND queue = $2",
            )
            .bind(id)
            .bind(&queue)
            .fetch_one(ledger.pool())
            .await?;
            waits.push(u64::try_from((*seen - started).num_microseconds().unwrap_or(0)).unwrap_or(0));
        }
        for table in ["provider_calls", "tasks"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE queue = $1"))
                .bind(&queue)
                .execute(ledger.pool())
                .await?;
        }
        waits.sort_unstable();
        let ((plain_us, plain_cmds, plain_cmd_us), (streamed_us, cmds, cmd_us)) =
            (per_task[0], per_task[1]);
        Ok(format!(
            "bench=stream_first_token followed={followed} first_token_p50_ms={:.2} first_token_p99_ms={:.2} \
             tasks={tasks} pieces_per_answer=4 gap_ms={GAP_MS} redis_us_per_task_plain={plain_us:.1} \
             redis_us_per_task_streamed={streamed_us:.1} live_answer_cmds_per_task={:.2} \
             live_answer_us_per_task={:.1}",
            percentile(&waits, 0.50) as f64 / 1000.0,
            percentile(&waits, 0.99) as f64 / 1000.0,
            cmds - plain_cmds,
            cmd_us - plain_cmd_us,
        ))
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// Result keys `provider_batch` asks about in one `EXISTS`.
const RESULT_POLL_KEYS: usize = 32;

/// What Redis spends on a task that goes through a provider batch (`deadline`): parked by a
/// worker, taken into a batch and settled by the scheduler, then finished by a worker with
/// its answer; against the same tasks called at once, in the same run. One worker and one
/// scheduler, in this process, over real HTTP to the mock's OpenAI batch API.
async fn provider_batch(args: &Args, redis: &mut Redis) -> Result<String> {
    let tasks = args.tasks.unwrap_or(2000);
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        client.ensure_group(&keys).await?;
        let bench_url = with_database(&args.database_url, BENCH_DB)?;
        let ledger = bench_ledger(&args.database_url, &bench_url).await?;
        let mock = MockServer::start(MockOptions::default())
            .await
            .context("cannot start the mock LLM server")?;
        let config = Config::parse(
            "llmq-bench.yaml",
            &format!(
                "providers:\n  - name: mock\n    kind: openai\n    base_url: {}/v1\n    \
                 api_key: bench\n    batch: {{gather: 500ms, max_requests: 10000}}\n    models:\n      \
                 - {{id: mock-fast, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}\n  \
                 - name: direct\n    kind: openai\n    base_url: {}/v1\n    api_key: bench\n    \
                 models:\n      - {{id: mock-direct, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}\n",
                mock.url(),
                mock.url()
            ),
            &|_| None,
        )?;
        let mut sched = llmq_scheduler::Settings::new(&args.redis_url, &bench_url, config.clone())?;
        sched.namespace = Some(queue.clone());
        sched.queues = vec![queue.clone()];
        sched.tick = Duration::from_millis(50);
        sched.batches_every = Duration::from_millis(100);
        let stop = tokio_util::sync::CancellationToken::new();
        let scheduler = tokio::spawn(llmq_scheduler::run(sched, stop.clone()));
        let running = Workers::start(1, |i| {
            let mut s = settings(&args.redis_url, &config, &queue, 64, i)?;
            s.database_url = Some(bench_url.clone());
            Ok(s)
        })?;
        let batcher = keys.batcher();
        let up = Instant::now();
        while !redis::AsyncCommands::exists::<_, bool>(redis, &batcher).await? {
            ensure!(up.elapsed() < Duration::from_secs(30), "no scheduler sent batches within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut per_task = Vec::new();
        // Called at once; through a batch; able to wait, but kept to a provider with no batch
        // API (no fallback: a plan with a batch API among its fallbacks may go to a batch).
        let runs = [
            ("plain", None, None),
            ("batched", Some("24h"), None),
            ("waiting_direct", Some("24h"), Some("direct")),
        ];
        for (run, deadline, provider) in runs {
            let chunk: Vec<Envelope> = (0..tasks)
                .map(|i| {
                    let mut e = Envelope::new(format!("classify ticket number {i}"));
                    Shape::Prompt(args.prompt_bytes).apply(i, &mut e);
                    e.deadline = deadline.map(Into::into);
                    if let Some(p) = provider {
                        e.provider = Some(p.into());
                        e.model = Some("mock-direct".into());
                        e.fallback = Some(false);
                    }
                    e
                })
                .collect();
            let ids: Vec<TaskId> = chunk.iter().filter_map(|e| e.id).collect();
            let before = Snapshot::take(redis).await?;
            for part in chunk.chunks(ENQUEUE_CHUNK) {
                client.enqueue_many(&keys, part).await?;
            }
            // Done when every result is stored: a batched task leaves the stream long before.
            // The results are polled in order, one EXISTS of a few keys a round trip, so that
            // the polling's own Redis CPU (in the figure: INFO cpu cannot tell it apart) stays
            // small however long a batch takes; polling all 2,000 keys every round cost a
            // batched run about 8 EXISTS a task, against 5 for a run called at once.
            let started = Instant::now();
            let mut c = client.conn().await?;
            let mut polls = 0;
            let mut next = 0;
            while next < ids.len() {
                let chunk = &ids[next..ids.len().min(next + RESULT_POLL_KEYS)];
                let stored: usize = redis::cmd("EXISTS")
                    .arg(chunk.iter().map(|id| keys.result(*id)).collect::<Vec<_>>())
                    .query_async(&mut c)
                    .await?;
                polls += 1;
                if stored == chunk.len() {
                    next += chunk.len();
                    continue;
                }
                ensure!(started.elapsed() < Duration::from_secs(300), "tasks unfinished after 300 s");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            wait_drained(&client, &keys, &running).await?;
            let d = Snapshot::take(redis).await?.since(&before, tasks);
            if args.verbose {
                d.print_commands(&format!("provider_batch_{run}"));
            }
            // The polling above is the bench's own, not llmq's: its EXISTS calls are taken
            // out, and their share of EXISTS's time by count (a parked task's EXISTS stay in).
            let (calls, usec) = d
                .commands
                .iter()
                .map(|(name, calls, usec)| {
                    if name == "exists" {
                        let own = polls.min(*calls);
                        let usec = usec - usec * own / (*calls).max(1);
                        (calls - own, usec)
                    } else {
                        (*calls, *usec)
                    }
                })
                .fold((0, 0), |(c, u), (calls, usec)| (c + calls, u + usec));
            let n = tasks as f64;
            verify_results(&client, &keys, &ids).await?;
            per_task.push((d.redis_cpu_us_per_task, calls as f64 / n, usec as f64 / n));
        }
        running.stop().await?;
        stop.cancel();
        let _ = scheduler.await;
        let batches = mock.batches("mock-fast");
        mock.shutdown().await;
        for table in ["provider_calls", "tasks"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE queue = $1"))
                .bind(&queue)
                .execute(ledger.pool())
                .await?;
        }
        let ((plain_us, plain_cmds, plain_cmd_us), (batched_us, cmds, cmd_us)) =
            (per_task[0], per_task[1]);
        let (direct_us, direct_cmds, _) = per_task[2];
        Ok(format!(
            "bench=provider_batch tasks={tasks} prompt_bytes={} batches={batches} \
             redis_us_per_task_plain={plain_us:.1} \
             redis_us_per_task_batched={batched_us:.1} cmds_per_task_plain={plain_cmds:.1} \
             cmds_per_task_batched={cmds:.1} cmd_us_per_task_plain={plain_cmd_us:.1} \
             cmd_us_per_task_batched={cmd_us:.1} redis_us_per_task_waiting_direct={direct_us:.1} \
             cmds_per_task_waiting_direct={direct_cmds:.1}",
            args.prompt_bytes
        ))
    }
    .await;
    cleanup(redis, &queue).await?;
    unlink_matching(redis, &format!("llmq:scheduler:{queue}:*")).await?;
    result
}

/// How a Redis Cluster spreads the work: on a three-master cluster the bench starts from
/// `redis-server`, a backlog on one queue drained by one worker, then three times that on three
/// queues whose slots sit on the three nodes, one worker each (the noop provider, ledger
/// off); the scale-out factor is the second throughput over the first.
async fn cluster_noop(args: &Args) -> Result<String> {
    let tasks = args.tasks.unwrap_or(20_000);
    let concurrency = args.concurrency.unwrap_or(256);
    let cluster = llmq_tests::cluster::RedisCluster::start();
    let url = cluster.url();
    let client = Client::new(&url)?;
    let queues = cluster.queue_per_node(&fresh_queue());
    let provider: Arc<dyn Provider> = Arc::new(NoopProvider::default());
    let config = noop_config()?;
    let mut rates = Vec::new();
    for n in [1, 3] {
        let chosen = &queues[..n];
        let mut ids = Vec::new();
        for q in chosen {
            let keys = QueueKeys::new(q);
            client.ensure_group(&keys).await?;
            ids.push(backlog(&client, &keys, tasks).await?);
        }
        let started = Instant::now();
        let running = Workers::start(n, |i| {
            let mut s = settings(&url, &config, &chosen[i], concurrency, i)?;
            s.provider_overrides = vec![("noop".into(), Arc::clone(&provider))];
            Ok(s)
        })?;
        for q in chosen {
            wait_drained(&client, &QueueKeys::new(q), &running).await?;
        }
        let secs = started.elapsed().as_secs_f64();
        running.stop().await?;
        for (q, ids) in chosen.iter().zip(&ids) {
            verify_results(&client, &QueueKeys::new(q), ids).await?;
        }
        rates.push((n * tasks) as f64 / secs);
    }
    Ok(format!(
        "bench=cluster_noop tasks_per_queue={tasks} concurrency={concurrency} nodes=3 \
         one_queue_tasks_per_s={:.0} three_queues_tasks_per_s={:.0} scale_out={:.2}",
        rates[0],
        rates[1],
        rates[1] / rates[0]
    ))
}

/// What a fleet costs Redis while it waits: N workers (default 20) on one empty queue,
/// left to settle for 3 s, then every command Redis ran and the CPU it used over 10 s.
async fn idle_fleet(args: &Args, redis: &mut Redis) -> Result<String> {
    const SETTLE: Duration = Duration::from_secs(3);
    const WINDOW: Duration = Duration::from_secs(10);
    let workers = args.workers.unwrap_or(20);
    let queue = fresh_queue();
    let result = async {
        let config = noop_config()?;
        let running = Workers::start(workers, |i| {
            settings(&args.redis_url, &config, &queue, 16, i)
        })?;
        tokio::time::sleep(SETTLE).await;
        let before = Snapshot::take(redis).await?;
        tokio::time::sleep(WINDOW).await;
        let after = Snapshot::take(redis).await?;
        running.check()?;
        running.stop().await?;
        let d = after.since(&before, 1);
        // The bench's own two INFO calls are left out.
        let calls: u64 = d
            .commands
            .iter()
            .filter(|(name, _, _)| name != "info")
            .map(|(_, calls, _)| calls)
            .sum();
        if args.verbose {
            for (name, c, usec) in &d.commands {
                println!(
                    "cmdstat bench=idle_fleet cmd={name} calls={c} per_s_per_worker={:.2} usec={usec}",
                    *c as f64 / d.secs / workers as f64
                );
            }
        }
        let per_s = calls as f64 / d.secs;
        let cpu_pct = d.redis_cpu_us_per_task / 1e6 / d.secs * 100.0;
        Ok(format!(
            "bench=idle_fleet workers={workers} secs={:.1} cmds_per_s={per_s:.0} \
             cmds_per_s_per_worker={:.1} redis_cpu_pct={cpu_pct:.2} redis_cpu_pct_per_worker={:.3}",
            d.secs,
            per_s / workers as f64,
            cpu_pct / workers as f64,
        ))
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// (c) Pickup latency: tasks enqueued at a steady rate onto an idle worker; the time from
/// enqueue until the provider is called.
async fn pickup(args: &Args, redis: &mut Redis) -> Result<String> {
    let rate = args.rate.max(1);
    let tasks = args.tasks.unwrap_or(rate as usize * 10);
    let workers = args.workers.unwrap_or(1);
    let concurrency = args.concurrency.unwrap_or(256);
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        client.ensure_group(&keys).await?;
        let seen = Arc::new(Mutex::new(Vec::with_capacity(tasks)));
        let provider: Arc<dyn Provider> = Arc::new(NoopProvider {
            pickups: Some(Arc::clone(&seen)),
            ..NoopProvider::default()
        });
        let config = noop_config()?;
        let running = Workers::start(workers, |i| {
            let mut s = settings(&args.redis_url, &config, &queue, concurrency, i)?;
            s.provider_overrides = vec![("noop".into(), Arc::clone(&provider))];
            Ok(s)
        })?;
        // Wait until every worker has announced itself, then a little more so that each one
        // sits in its blocking read.
        let ready = async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if client.counts(&keys).await?.workers >= workers as u64 {
                    return Ok(());
                }
                running.check()?;
                if Instant::now() > deadline {
                    bail!("the workers did not start within 10 s");
                }
                tokio::time::sleep(POLL).await;
            }
        }
        .await;
        if let Err(e) = ready {
            running.stop().await?;
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Two tasks per tick: small batches at a steady pace.
        const BATCH: u64 = 2;
        let mut tick = tokio::time::interval(Duration::from_micros(BATCH * 1_000_000 / rate));
        let mut sent = 0usize;
        let before = Snapshot::take(redis).await?;
        let send = async {
            while sent < tasks {
                tick.tick().await;
                let n = (BATCH as usize).min(tasks - sent);
                let now = Utc::now();
                let batch: Vec<Envelope> = (0..n)
                    .map(|_| {
                        let mut env = Envelope::new(format!("t={}", now.timestamp_micros()));
                        env.enqueued_at = Some(now);
                        env
                    })
                    .collect();
                client.enqueue_many(&keys, &batch).await?;
                sent += n;
            }
            anyhow::Ok(())
        }
        .await;
        let drained = match send {
            Ok(()) => wait_drained(&client, &keys, &running).await,
            Err(e) => Err(e),
        };
        let after = Snapshot::take(redis).await;
        running.stop().await?;
        drained?;
        let d = after?.since(&before, tasks);
        if args.verbose {
            d.print_commands("pickup");
        }
        let bare = bare_streams(&client, redis, rate, BATCH, tasks).await?;

        let mut ms: Vec<u64> =
            std::mem::take(&mut *seen.lock().unwrap_or_else(PoisonError::into_inner));
        ensure!(
            ms.len() == tasks,
            "the provider saw {} calls for {tasks} tasks",
            ms.len()
        );
        ms.sort_unstable();
        let pct = |p: f64| percentile(&ms, p) as f64 / 1000.0;
        Ok(format!(
            "bench=pickup rate_per_s={rate} tasks={tasks} p50_ms={:.2} p99_ms={:.2} \
             max_ms={:.2} workers={workers} concurrency={concurrency} \
             redis_cpu_us_per_task={:.1} bare_redis_cpu_us_per_task={bare:.1} \
             other_cpu_cores={:.2}",
            pct(50.0),
            pct(99.0),
            pct(100.0),
            d.redis_cpu_us_per_task,
            d.other_cpu_cores
        ))
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// The pickup benchmark's traffic through Redis Streams with nothing of llmq, for its Redis
/// CPU per task in the same minutes: the same envelopes in the same batches at the same
/// pace, one consumer's blocking `XREADGROUP` and one `XACK` + `XDEL` per read. No queue
/// that blocks to read a stream costs Redis less per task at this rate.
async fn bare_streams(
    client: &Client,
    redis: &mut Redis,
    rate: u64,
    batch: u64,
    tasks: usize,
) -> Result<f64> {
    const GROUP: &str = "bare";
    let stream = format!("llmq-bench:bare:{}", fresh_queue());
    let result = async {
        let () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(GROUP)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(redis)
            .await?;
        let block = Duration::from_millis(100);
        let mut reader = client.reading_conn(block).await?;
        let mut acker = client.reading_conn(block).await?;
        let consume = {
            let stream = stream.clone();
            tokio::spawn(async move {
                type Read = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;
                let mut done = 0;
                while done < tasks {
                    let read: Read = redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(GROUP)
                        .arg("c")
                        .arg("COUNT")
                        .arg(256)
                        .arg("BLOCK")
                        .arg(block.as_millis() as u64)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(">")
                        .query_async(&mut reader)
                        .await?;
                    let ids: Vec<String> = read
                        .into_iter()
                        .flatten()
                        .flat_map(|(_, entries)| entries.into_iter().map(|(id, _)| id))
                        .collect();
                    if ids.is_empty() {
                        continue;
                    }
                    redis::pipe()
                        .cmd("XACK")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg(&ids)
                        .ignore()
                        .cmd("XDEL")
                        .arg(&stream)
                        .arg(&ids)
                        .ignore()
                        .query_async::<()>(&mut acker)
                        .await?;
                    done += ids.len();
                }
                anyhow::Ok(())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = Snapshot::take(redis).await?;
        let mut tick = tokio::time::interval(Duration::from_micros(batch * 1_000_000 / rate));
        let mut sent = 0usize;
        while sent < tasks {
            tick.tick().await;
            let n = (batch as usize).min(tasks - sent);
            let now = Utc::now();
            let mut pipe = redis::pipe();
            for _ in 0..n {
                let mut env = Envelope::new(format!("t={}", now.timestamp_micros()));
                env.enqueued_at = Some(now);
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("task")
                    .arg(env.to_json())
                    .ignore();
            }
            pipe.query_async::<()>(redis).await?;
            sent += n;
        }
        let abort = consume.abort_handle();
        let drained = tokio::time::timeout(Duration::from_secs(30), consume).await;
        if drained.is_err() {
            // Not left reading for the rest of the run.
            abort.abort();
        }
        drained.context("the bare consumer did not drain the stream within 30 s")???;
        let after = Snapshot::take(redis).await?;
        anyhow::Ok(after.since(&before, tasks).redis_cpu_us_per_task)
    }
    .await;
    let () = redis::cmd("DEL").arg(&stream).query_async(redis).await?;
    result
}

/// The ledger's reports at scale, on two ledgers of `--tasks` calls (default 5 million) and as
/// many finished tasks over 60 days, about a third of them chain steps (chains of five), each
/// in a database of its own that is kept between runs (filled again only when its size
/// differs):
/// - `kind=fresh`: filled through today's schema, as a ledger written since rollups and
///   partitions existed; a fill cut off goes on where it stopped;
/// - `kind=upgraded`: filled in the shapes of the last release before rollups and partitions
///   (the migrations before `20261126000001`, release `c7011cf`), then migrated by today's
///   `llmq migrate` while a writer adds a call and a task every 10 ms as a worker of that
///   release would (`migrate_s`, the writer's slowest statement `writer_max_ms` and how many
///   of its writes failed, `writer_failed`; the migration's steps go to stderr).
///
/// Each prints how fast it filled (rows a second, of this run's part of the fill), how long
/// the roll after it took to sum what it left (`roll_s`), how long a roll with nothing new to
/// sum takes (`idle_roll_ms`), and the median of three runs of each report's queries, in ms;
/// `raw_by_model_ms` is the same report summed over the raw rows, as before the rollups, for
/// comparison in the same run.
async fn ledger_scale(args: &Args) -> Result<String> {
    let n = args.tasks.unwrap_or(5_000_000) as i64;
    let mut lines = Vec::new();
    for upgraded in [false, true] {
        let kind = if upgraded { "upgraded" } else { "fresh" };
        if args.ledger.as_deref().is_none_or(|k| k == kind) {
            lines.push(ledger_scale_of(args, n, upgraded).await?);
        }
    }
    Ok(lines.join("\n"))
}

/// Rows a fill of the bench ledgers commits at once.
const CHUNK: i64 = 250_000;

/// The fresh bench ledger (`llmq_bench_ledger`) of `n` calls and their tasks, migrated and
/// filled (kept from an earlier run when it holds them, a cut-off fill resumed): the ledger,
/// how long migrating took (s), and the fill's rows a second (0 when kept).
async fn fresh_ledger(args: &Args, n: i64) -> Result<(Ledger, f64, f64)> {
    let db = "llmq_bench_ledger";
    let url = with_database(&args.database_url, db)?;
    // Migrating a ledger filled by an earlier version is timed too.
    let migrating = Instant::now();
    let ledger = bench_ledger_named(&args.database_url, &url, db, true).await?;
    let migrate_s = migrating.elapsed().as_secs_f64();
    let pool = ledger.pool();
    let (have, tasks_have): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM provider_calls), (SELECT count(*) FROM tasks)",
    )
    .fetch_one(pool)
    .await?;
    let mut fill_rows_per_s = 0.0;
    if have != n {
        // A fill cut off between chunks goes on where it stopped (each chunk commits
        // whole); anything else is filled again from the start.
        let resume = have < n && tasks_have == have && have % CHUNK == 0;
        if !resume {
            sqlx::query(
                "TRUNCATE provider_calls, tasks, call_rollups, task_rollups, chain_costs,
                    routing_rollups, spend_rollups, ledger_queues",
            )
            .execute(pool)
            .await?;
        }
        let first = if resume { have } else { 0 };
        fill_rows_per_s = fill_ledger(pool, first, n, CHUNK, false).await?;
        sqlx::query("VACUUM ANALYZE").execute(pool).await?;
    }
    Ok((ledger, migrate_s, fill_rows_per_s))
}

/// One ledger of [`ledger_scale`]: `upgraded` says which.
async fn ledger_scale_of(args: &Args, n: i64, upgraded: bool) -> Result<String> {
    // Before rollups and partitions: the release `c7011cf`'s migrations.
    const FIRST_NEW: i64 = 20261126000001;
    let db = if upgraded {
        "llmq_bench_ledger_upgraded"
    } else {
        "llmq_bench_ledger"
    };
    let url = with_database(&args.database_url, db)?;
    let (mut migrate_s, mut writer_max_ms, mut writer_failed) = (0.0, 0.0, 0);
    let mut fill_rows_per_s = 0.0;
    let ledger = if upgraded {
        let ledger = bench_ledger_named(&args.database_url, &url, db, false).await?;
        let pool = ledger.pool();
        let filled: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await?;
        let (mut migrated, mut have) = (false, 0_i64);
        if filled {
            migrated = sqlx::query_scalar(
                "SELECT EXISTS (SELECT FROM _sqlx_migrations WHERE version >= $1)",
            )
            .bind(FIRST_NEW)
            .fetch_one(pool)
            .await?;
            have = sqlx::query_scalar("SELECT count(*) FROM provider_calls")
                .fetch_one(pool)
                .await?;
        }
        // A ledger migrated by an earlier run of this bench is kept if it has the size asked
        // for (every writer row is made after the fill, so it counts toward a new fill's).
        if have < n || !migrated {
            drop_database(&args.database_url, db).await?;
            let ledger = bench_ledger_named(&args.database_url, &url, db, false).await?;
            let old = sqlx::migrate::Migrator {
                migrations: std::borrow::Cow::Owned(
                    llmq_shared::ledger::MIGRATOR
                        .iter()
                        .filter(|m| m.version < FIRST_NEW)
                        .cloned()
                        .collect(),
                ),
                ..sqlx::migrate::Migrator::DEFAULT
            };
            old.run(ledger.pool()).await?;
            fill_rows_per_s = fill_ledger(ledger.pool(), 0, n, CHUNK, true).await?;
            sqlx::query("VACUUM ANALYZE").execute(ledger.pool()).await?;
            let (s, max_ms, failed) = migrate_under_writes(&ledger, &url).await?;
            (migrate_s, writer_max_ms, writer_failed) = (s, max_ms, failed);
            ledger
        } else {
            ledger.migrate().await?;
            ledger
        }
    } else {
        let (ledger, s, rate) = fresh_ledger(args, n).await?;
        (migrate_s, fill_rows_per_s) = (s, rate);
        ledger
    };
    let pool = ledger.pool();
    // The rows are summed after they are written: what the fill left to sum (all of it, the
    // first time), as the scheduler's duty would, before the reports are timed.
    let rolling = Instant::now();
    llmq_shared::ledger::roll(pool).await?;
    let roll_s = rolling.elapsed().as_secs_f64();
    let idle_roll = median_ms(|| llmq_shared::ledger::roll(pool)).await?;

    let today = Utc::now().date_naive();
    let day = |d: i64| {
        chrono::TimeZone::from_utc_datetime(
            &Utc,
            &(today - chrono::Duration::days(d))
                .and_hms_opt(0, 0, 0)
                .unwrap_or_default(),
        )
    };
    let until = day(-1);
    use llmq_shared::ledger::GroupBy;
    async fn median_ms<F, Fut, T>(mut read: F) -> Result<f64>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, llmq_shared::ledger::Error>>,
    {
        let mut ms = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            read().await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[1])
    }
    let epoch = chrono::DateTime::<Utc>::UNIX_EPOCH;
    let costs = median_ms(|| ledger.costs(epoch, until, Scope::All, GroupBy::Provider)).await?;
    let by_model = median_ms(|| ledger.costs(day(30), until, Scope::All, GroupBy::Model)).await?;
    let by_day = median_ms(|| ledger.costs(day(60), until, Scope::All, GroupBy::Day)).await?;
    let by_chain = median_ms(|| ledger.costliest_chains(day(30), until, 50)).await?;
    let tasks = median_ms(|| ledger.tasks_in(day(30), until, Scope::All)).await?;
    // Spend by tenant and tag (issue 72): every tenant's, every team's, one tenant's.
    let by_tenant = median_ms(|| ledger.costs(day(30), until, Scope::All, GroupBy::Tenant)).await?;
    let by_tag =
        median_ms(|| ledger.costs(day(30), until, Scope::All, GroupBy::Tag("team"))).await?;
    let tenant =
        median_ms(|| ledger.costs(day(30), until, Scope::Tenant("tenant-7"), GroupBy::Model))
            .await?;
    let filter = llmq_shared::insights::Filter {
        since: Some(day(30)),
        ..Default::default()
    };
    let insights = median_ms(|| llmq_shared::insights::by_model(pool, &filter)).await?;
    let queues = median_ms(|| llmq_shared::insights::queues(pool)).await?;
    let names = llmq_shared::insights::queues(pool).await?;
    let routing = median_ms(|| ledger.routing_stats(&names, day(30))).await?;
    // The costs page: what `llmq web` reads for 30 days, at once as it reads them.
    let web = median_ms(|| async {
        tokio::try_join!(
            futures_util::future::try_join_all(GroupBy::PAGE.map(|by| ledger.costs(
                day(29),
                until,
                Scope::All,
                by
            ))),
            ledger.costliest_chains(day(29), until, 20),
            llmq_shared::insights::by_model(pool, &filter),
        )
    })
    .await?;
    let raw = median_ms(|| async {
        sqlx::query(
            "SELECT provider || '/' || model, count(*), count(DISTINCT task_id), sum(cost_usd)
             FROM provider_calls WHERE called_at >= $1 AND called_at < $2 GROUP BY 1",
        )
        .bind(day(30))
        .bind(until)
        .fetch_all(pool)
        .await
        .map_err(llmq_shared::ledger::Error::from)
    })
    .await?;
    let rollup_rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM call_rollups) + (SELECT count(*) FROM task_rollups)
            + (SELECT count(*) FROM chain_costs) + (SELECT count(*) FROM routing_rollups)
            + (SELECT count(*) FROM spend_rollups)",
    )
    .fetch_one(pool)
    .await?;
    pool.close().await;
    let kind = if upgraded { "upgraded" } else { "fresh" };
    let writer = if upgraded {
        format!(" writer_max_ms={writer_max_ms:.0} writer_failed={writer_failed}")
    } else {
        String::new()
    };
    Ok(format!(
        "bench=ledger_scale kind={kind} calls={n} fill_rows_per_s={fill_rows_per_s:.0} \
         rollup_rows={rollup_rows} costs_ms={costs:.1} by_model_ms={by_model:.1} \
         by_day_ms={by_day:.1} by_chain_ms={by_chain:.1} tasks_ms={tasks:.1} \
         by_tenant_ms={by_tenant:.1} by_tag_ms={by_tag:.1} tenant_ms={tenant:.1} \
         insights_ms={insights:.1} queues_ms={queues:.1} routing_ms={routing:.1} \
         web_costs_ms={web:.1} raw_by_model_ms={raw:.1} migrate_s={migrate_s:.1}{writer} \
         roll_s={roll_s:.1} idle_roll_ms={idle_roll:.1}"
    ))
}

/// Fills calls `first..n` of a [`ledger_scale`] ledger and their tasks, `chunk` of each a
/// transaction; `old` in the columns the release before rollups had. Rows written a second.
async fn fill_ledger(
    pool: &sqlx::PgPool,
    first: i64,
    n: i64,
    chunk: i64,
    old: bool,
) -> Result<f64> {
    let started = Instant::now();
    // Call i is made at an even pace over the last 60 days; calls 5k..5k+4 of every third
    // k are one chain's steps.
    let at = "now() - interval '60 days' + i * (interval '60 days' / $3)";
    let chain = "CASE WHEN (i / 5) % 3 = 0 THEN 'chain-' || (i / 5) END";
    // What a call and its task share: queue, chain, type, provider, model.
    let shared = format!(
        "'queue-' || (i % 4), {chain},
         (ARRAY['research', 'code_review', 'summarize', 'code_generation'])[1 + i % 4],
         (ARRAY['openai', 'anthropic', 'gemini'])[1 + i % 3], 'model-' || (i % 7)"
    );
    // The task's status and risk, which its call carries as the finisher writes it (the
    // call and its task in one batch): the task's trigger has nothing to copy. The release
    // before rollups kept them on the task alone.
    let status = "CASE WHEN i % 10 = 0 THEN 'dead' ELSE 'succeeded' END";
    let risk = "(ARRAY['low', 'medium', 'high'])[1 + i % 3]";
    // Fifty tenants and a fifth of the work with none; a team tag on two calls of three.
    let spend = "CASE WHEN i % 5 <> 0 THEN 'tenant-' || (i % 50) END,
        CASE WHEN i % 3 <> 0 THEN jsonb_build_object('team', 'team-' || (i % 12)) END";
    let (view_columns, view, spend_columns, spend) = if old {
        (String::new(), String::new(), "", String::new())
    } else {
        (
            ", task_status, task_risk".to_owned(),
            format!(", {status}, {risk}"),
            ", tenant, tags",
            format!(", {spend}"),
        )
    };
    for from in (first..n).step_by(chunk as usize) {
        let to = (from + chunk).min(n) - 1;
        let mut tx = pool.begin().await?;
        for sql in [
            format!(
                "INSERT INTO provider_calls (task_id, delivery, run, attempt, call_no, queue,
                    chain_id, task_type, provider, model, input_tokens, output_tokens,
                    cached_tokens, reasoning_tokens, cost_usd, latency_ms, outcome, worker,
                    called_at{view_columns}{spend_columns})
                 SELECT md5(i::text)::uuid, md5('d' || i)::uuid, 0, 1, 0, {shared},
                    1000 + i % 500, 200 + i % 300, i % 100, 0, (i % 1000) / 1e6, 100 + i % 2000,
                    'ok', 'w', {at}{view}{spend}
                 FROM generate_series($1::int8, $2::int8) i"
            ),
            format!(
                "INSERT INTO tasks (task_id, queue, chain_id, task_type, provider, model,
                    status, attempts, input_tokens, output_tokens, cost_usd, finished_at, risk,
                    duration_ms{spend_columns})
                 SELECT md5(i::text)::uuid, {shared}, {status}, 1,
                    1000 + i % 500, 200 + i % 300, (i % 1000) / 1e6,
                    {at} + interval '2 seconds', {risk}, 100 + i % 2000{spend}
                 FROM generate_series($1::int8, $2::int8) i"
            ),
        ] {
            sqlx::query(&sql)
                .bind(from)
                .bind(to)
                .bind(n as f64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    Ok((2 * (n - first)) as f64 / started.elapsed().as_secs_f64())
}

/// `llmq migrate` on `ledger` while a writer on a connection of its own adds a call and its
/// task every 10 ms, in the columns every release has: how long the migration took (s), the
/// writer's slowest statement (ms) and how many of its writes failed (each failure printed).
async fn migrate_under_writes(ledger: &Ledger, url: &str) -> Result<(f64, f64, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Ledger::connect(url, 1).await?;
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut slowest, mut failed) = (Duration::ZERO, 0);
            while !stop.load(Ordering::Relaxed) {
                let task = uuid::Uuid::new_v4();
                for sql in [
                    "INSERT INTO provider_calls (task_id, delivery, run, attempt, call_no, queue,
                        task_type, provider, model, input_tokens, output_tokens, cached_tokens,
                        reasoning_tokens, cost_usd, latency_ms, outcome, worker, called_at)
                     VALUES ($1, $1, 0, 1, 0, 'queue-w', 'research', 'openai', 'model-w', 10, 2,
                        0, 0, 0.001, 300, 'ok', 'w', now())",
                    "INSERT INTO tasks (task_id, queue, task_type, status, attempts, provider,
                        model, cost_usd, finished_at)
                     VALUES ($1, 'queue-w', 'research', 'succeeded', 1, 'openai', 'model-w',
                        0.001, now())",
                ] {
                    let started = Instant::now();
                    let wrote = sqlx::query(sql).bind(task).execute(writes.pool()).await;
                    slowest = slowest.max(started.elapsed());
                    if let Err(e) = wrote {
                        failed += 1;
                        eprintln!("ledger_scale: a write during the migration failed: {e}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (slowest, failed)
        })
    };
    let started = Instant::now();
    let migrated = ledger
        .migrate_telling(&mut |step| eprintln!("ledger_scale: llmq migrate: {step}"))
        .await;
    let migrate_s = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (slowest, failed) = writer.await?;
    migrated?;
    Ok((migrate_s, slowest.as_secs_f64() * 1000.0, failed))
}

async fn drop_database(admin_url: &str, name: &str) -> Result<()> {
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Answers every request after `latency` (at once by default). With `pickups`, records how
/// long ago the request's prompt `t=<µs since the epoch>` was written, in µs.
#[derive(Default)]
struct NoopProvider {
    pickups: Option<Arc<Mutex<Vec<u64>>>>,
    starts: Option<Arc<Starts>>,
    latency: Duration,
    /// The tokens out each answer uses (1 when 0).
    output_tokens: u64,
}

/// When the calls began: the first, and the one that filled every slot (`fill`, the
/// concurrency). What `inflight`'s efficiency loses before its first round is under way.
#[derive(Default)]
struct Starts {
    fill: usize,
    calls: std::sync::atomic::AtomicUsize,
    first: std::sync::OnceLock<Instant>,
    filled: std::sync::OnceLock<Instant>,
}

impl Starts {
    fn call(&self) {
        let n = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n == 1 {
            let _ = self.first.set(Instant::now());
        }
        if n == self.fill {
            let _ = self.filled.set(Instant::now());
        }
    }

    /// Milliseconds from `from` to the first call and to the call that filled the slots.
    fn since(&self, from: Instant) -> (f64, f64) {
        let ms = |t: Option<&Instant>| t.map_or(f64::NAN, |t| (*t - from).as_secs_f64() * 1e3);
        (ms(self.first.get()), ms(self.filled.get()))
    }
}

impl Provider for NoopProvider {
    fn name(&self) -> &str {
        "noop"
    }

    fn complete<'a>(&'a self, request: &'a Request<'_>) -> CallFuture<'a> {
        if let Some(starts) = &self.starts {
            starts.call();
        }
        if let Some(pickups) = &self.pickups
            && let Some(sent) = request
                .prompt
                .strip_prefix("t=")
                .and_then(|t| t.parse::<i64>().ok())
        {
            let waited = u64::try_from(Utc::now().timestamp_micros() - sent).unwrap_or(0);
            pickups
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(waited);
        }
        let answer = Ok(Completion {
            text: "ok".into(),
            usage: Usage {
                input_tokens: 8,
                output_tokens: self.output_tokens.max(1),
                ..Usage::default()
            },
            ..Completion::default()
        });
        if self.latency.is_zero() {
            return Box::pin(std::future::ready(answer));
        }
        let latency = self.latency;
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            answer
        })
    }
}

/// (x) A batch cancelled while it runs: 100,000 tasks of one batch, two workers at
/// concurrency 256 whose provider answers in 50 ms; once 5,000 have been called, the batch is
/// cancelled (`llmq cancel --batch`'s script). `none_run_after_ms`: from the cancel to the last
/// call that started after it (0: none did), how long until no task of it can run; `ended_s`,
/// until every task had ended; Redis CPU per cancelled task, beside Redis CPU per task that ran
/// before the cancel (the same run's peer).
async fn cancel(args: &Args, redis: &mut Redis) -> Result<String> {
    let tasks = args.tasks.unwrap_or(100_000);
    let workers = args.workers.unwrap_or(2);
    let concurrency = args.concurrency.unwrap_or(256);
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        client.ensure_group(&keys).await?;
        let batch = format!("{queue}-batch");
        let mut left = tasks;
        while left > 0 {
            let chunk: Vec<Envelope> = (0..left.min(ENQUEUE_CHUNK))
                .map(|i| {
                    let mut e = Envelope::new(format!("benchmark task {}", tasks - left + i));
                    e.batch_id = Some(batch.as_str().into());
                    e
                })
                .collect();
            client.enqueue_many(&keys, &chunk).await?;
            left -= chunk.len();
        }
        let clock = Arc::new(CallClock::default());
        let provider: Arc<dyn Provider> = Arc::new(ClockedProvider {
            clock: Arc::clone(&clock),
            inner: NoopProvider {
                latency: Duration::from_millis(50),
                ..NoopProvider::default()
            },
        });
        let config = noop_config()?;
        let started = Snapshot::take(redis).await?;
        let running = Workers::start(workers, |i| {
            let mut s = settings(&args.redis_url, &config, keys.name(), concurrency, i)?;
            s.provider_overrides = vec![("noop".into(), Arc::clone(&provider))];
            Ok(s)
        })?;
        let deadline = Instant::now() + DRAIN_LIMIT;
        while clock.calls.load(Ordering::Relaxed) < 5_000 {
            running.check()?;
            ensure!(
                Instant::now() < deadline,
                "5,000 calls were not made in {DRAIN_LIMIT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
        let before = Snapshot::take(redis).await?;
        let ran_before = clock.calls.load(Ordering::Relaxed);
        let at = Instant::now();
        client
            .cancel(&keys, &[llmq_shared::queue::Target::Batch(batch.clone())])
            .await?;
        let drained = wait_drained(&client, &keys, &running).await;
        let ended = at.elapsed();
        let after = Snapshot::take(redis).await;
        running.stop().await?;
        drained?;
        let after = after?;
        let calls = clock.calls.load(Ordering::Relaxed);
        let last_after = clock
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .filter(|t| *t > at)
            .map_or(0.0, |t| (t - at).as_secs_f64() * 1e3);
        let cancelled = tasks.saturating_sub(calls);
        let run = before.since(&started, ran_before);
        let gone = after.since(&before, cancelled);
        if args.verbose {
            gone.print_commands("cancel");
        }
        Ok(format!(
            "bench=cancel tasks={tasks} workers={workers} concurrency={concurrency} \
             called_before={ran_before} called_after={} cancelled={cancelled} \
             none_run_after_ms={last_after:.0} ended_s={:.2} \
             redis_cpu_us_per_cancelled={:.1} redis_cpu_us_per_run_task={:.1}",
            calls - ran_before,
            ended.as_secs_f64(),
            gone.redis_cpu_us_per_task,
            run.redis_cpu_us_per_task,
        ))
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// How many calls started, and when the last did.
#[derive(Default)]
struct CallClock {
    calls: std::sync::atomic::AtomicUsize,
    last: Mutex<Option<Instant>>,
}

/// Answers as `inner` does, counting each call's start on `clock`.
struct ClockedProvider {
    clock: Arc<CallClock>,
    inner: NoopProvider,
}

impl Provider for ClockedProvider {
    fn name(&self) -> &str {
        "noop"
    }

    fn complete<'a>(&'a self, request: &'a Request<'_>) -> CallFuture<'a> {
        self.clock.calls.fetch_add(1, Ordering::Relaxed);
        *self
            .clock
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        self.inner.complete(request)
    }
}

/// A provider file naming the `noop` provider. Its URL is never called: the override wins.
fn noop_config() -> Result<Config> {
    Ok(Config::parse(
        "llmq-bench.yaml",
        "providers:
  - name: noop
    kind: openai_compatible
    base_url: http://127.0.0.1:9/v1
    models:
      - {id: noop, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}
",
        &|_| None,
    )?)
}

fn settings(
    redis_url: &str,
    config: &Config,
    queue: &str,
    concurrency: usize,
    i: usize,
) -> Result<Settings> {
    let mut s = Settings::new(redis_url, config.clone())?;
    s.queues = vec![queue.to_owned()];
    s.concurrency = concurrency;
    s.worker_id = Some(format!("{queue}-w{i}"));
    // If the bench dies before it cleans up, the results still go away.
    s.result_ttl = Duration::from_secs(3600);
    s.grace = Duration::from_secs(10);
    Ok(s)
}

/// (d) Three workers share one provider limited to R requests per window, through the mock
/// over real HTTP with the ledger on: how much of R llmq uses, and whether any task dies.
/// The window is 5 s instead of a minute so a run takes seconds, not minutes; the limiter
/// treats every window alike.
async fn rate_limited(args: &Args, redis: &mut Redis) -> Result<String> {
    let per_window: usize = 100;
    let window = Duration::from_secs(5);
    let tasks = args.tasks.unwrap_or(per_window * 4);
    let workers = args.workers.unwrap_or(3);
    let concurrency = args.concurrency.unwrap_or(64);
    let queue = fresh_queue();
    let provider = format!("rl-{}", &queue[6..]);
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        let bench_url = with_database(&args.database_url, BENCH_DB)?;
        let ledger = bench_ledger(&args.database_url, &bench_url).await?;
        let mock = MockServer::start(MockOptions::default()).await.context("cannot start the mock LLM server")?;
        let config = Config::parse(
            "llmq-bench.yaml",
            &format!(
                "providers:\n  - name: {provider}\n    kind: openai_compatible\n    base_url: {}/v1\n    \
                 api_key: bench\n    quotas: {{rpm: {per_window}, window: {}s}}\n    models:\n      \
                 - {{id: mock-fast, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}\n",
                mock.url(),
                window.as_secs()
            ),
            &|_| None,
        )?;
        let ids = backlog(&client, &keys, tasks).await?;
        let running = Workers::start(workers, |i| {
            let mut s = settings(&args.redis_url, &config, &queue, concurrency, i)?;
            s.database_url = Some(bench_url.clone());
            s.promote_every = Duration::from_millis(20);
            Ok(s)
        })?;
        let drained = wait_drained(&client, &keys, &running).await;
        running.stop().await?;
        drained?;
        verify_results(&client, &keys, &ids).await?;
        // As the provider saw them: when each request arrived.
        let arrived = mock.arrivals();
        mock.shutdown().await;
        let at: Vec<i64> = sqlx::query_scalar(
            "SELECT (extract(epoch from called_at) * 1000)::int8 FROM provider_calls
             WHERE queue = $1 ORDER BY called_at",
        )
        .bind(&queue)
        .fetch_all(ledger.pool())
        .await?;
        for table in ["provider_calls", "tasks"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE queue = $1")).bind(&queue).execute(ledger.pool()).await?;
        }
        ensure!(at.len() == tasks, "the ledger holds {} calls for {tasks} tasks", at.len());
        ensure!(arrived.len() == tasks, "the provider saw {} requests for {tasks} tasks", arrived.len());
        let window_ms = window.as_millis() as i64;
        // The most requests within any one window: as the provider saw them arrive, and as
        // the ledger stamps them sent.
        let busiest = |at: &[i64]| {
            (0..at.len())
                .map(|i| at[i..].iter().take_while(|t| **t < at[i] + window_ms).count())
                .max()
                .unwrap_or(0)
        };
        let (busiest_arrived, busiest_sent) = (busiest(&arrived), busiest(&at));
        // The k-th arrival against the k-th send, both in order: a lower bound on the longest
        // a request took from its stamp to the provider.
        let mut sorted = arrived.clone();
        sorted.sort_unstable();
        let lag = sorted.iter().zip(&at).map(|(a, s)| a - s).max().unwrap_or(0);
        // The limit's use: the rate of calls from the first to the last against R a window.
        // A paced limiter spends R as one call every window / R (with the counted window's
        // 1 % margin, 99 %); one that sends each window's calls at once would read higher.
        let span_ms = (at[at.len() - 1] - at[0]).max(1);
        let ideal_ms = (tasks as i64 - 1) * window_ms / per_window as i64;
        let used_pct = 100.0 * ideal_ms as f64 / span_ms as f64;
        let dead = client.counts(&keys).await?.dead;
        Ok(format!(
            "bench=rate_limited limit_per_window={per_window} window_s={} tasks={tasks} workers={workers} \
             used_pct={used_pct:.1} busiest_window_arrivals={busiest_arrived} busiest_window_sent={busiest_sent} \
             send_to_arrival_ms_min={lag} \
             span_s={:.2} dead_letters={dead}",
            window.as_secs(),
            span_ms as f64 / 1000.0
        ))
    }
    .await;
    cleanup(redis, &queue).await?;
    cleanup_provider(redis, &provider).await?;
    result
}

/// `bench=priority` (issue 34): interactive tasks arrive one every 250 ms for 10 s; a second
/// in, a flood of less urgent ones lands and saturates a provider's rate limit (R requests
/// per 5 s window, through the mock over HTTP): the time from enqueue to answer of each
/// interactive task sent after the flood landed (`measured`), p50 and p99,
/// with priorities on (the flood at priority 5, `quotas.reserve: {0: 20}`) and off (the
/// flood without a class and no share: today's FIFO), in the same run.
async fn priority(args: &Args, redis: &mut Redis) -> Result<String> {
    let flood = args.tasks.unwrap_or(1000);
    let mut line = format!(
        "bench=priority flood={flood} per_window={PRIORITY_PER_WINDOW} window_s=5 interactive={INTERACTIVE}"
    );
    for on in [false, true] {
        let (mut waits, left, flood_per_s) = priority_run(args, redis, flood, on).await?;
        waits.sort_unstable();
        let mode = if on { "on" } else { "off" };
        line.push_str(&format!(
            " {mode}_measured={} {mode}_p50_ms={} {mode}_p99_ms={} {mode}_max_ms={} {mode}_flood_left={left} {mode}_flood_per_s={flood_per_s:.1}",
            waits.len(),
            percentile(&waits, 50.0),
            percentile(&waits, 99.0),
            waits.last().copied().unwrap_or(0)
        ));
    }
    let workers = args.workers.unwrap_or(2);
    let mut m = minute_limit(args, redis, workers).await?;
    m.urgent_ms.sort_unstable();
    line.push_str(&format!(
        " minute_quotas=\"{}\" minute_workers={workers}x32 minute_urgent={} minute_urgent_p50_ms={} \
         minute_urgent_p99_ms={} minute_goal_ms={} minute_busiest_minute={} minute_per_minute={:.1} \
         minute_tokens_per_minute={:.0} minute_busiest_tokens_minute={} minute_redis_cpu_us_per_call={:.0}",
        args.minute_quotas,
        m.urgent_ms.len(),
        percentile(&m.urgent_ms, 50.0),
        percentile(&m.urgent_ms, 99.0),
        2 * 60_000 / MINUTE_RPM + 100,
        m.busiest_minute,
        m.per_minute,
        m.tokens_per_minute,
        m.busiest_tokens_minute,
        m.redis_cpu_us_per_call
    ));
    Ok(line)
}

/// The rate limit of `bench=priority`, per 5 s window.
const PRIORITY_PER_WINDOW: usize = 200;
/// Interactive tasks in `bench=priority`, one every 250 ms.
const INTERACTIVE: usize = 40;

/// One half of `bench=priority`: the interactive tasks' waits (ms), how much of the flood
/// was still waiting when the last of them answered (it lasted throughout when > 0), and
/// the flood's tasks done per second since it landed (with the interactive ones, the use of
/// the limit: R / 5 s in all).
async fn priority_run(
    args: &Args,
    redis: &mut Redis,
    flood: usize,
    on: bool,
) -> Result<(Vec<u64>, u64, f64)> {
    let queue = fresh_queue();
    let provider = format!("pr-{}", &queue[6..]);
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        let mock = MockServer::start(MockOptions::default()).await.context("cannot start the mock LLM server")?;
        let reserve = if on { ", reserve: {0: 20}" } else { "" };
        let config = Config::parse(
            "llmq-bench.yaml",
            &format!(
                "providers:\n  - name: {provider}\n    kind: openai_compatible\n    base_url: {}/v1\n    \
                 api_key: bench\n    quotas: {{rpm: {PRIORITY_PER_WINDOW}, window: 5s{reserve}}}\n    models:\n      \
                 - {{id: mock-fast, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}\n",
                mock.url(),
            ),
            &|_| None,
        )?;
        client.ensure_group(&keys).await?;
        let running = Workers::start(2, |i| {
            let mut s = settings(&args.redis_url, &config, &queue, 32, i)?;
            s.promote_every = Duration::from_millis(20);
            Ok(s)
        })?;
        // Interactive traffic is under way when the flood lands, a second in.
        let landing = {
            let (client, keys) = (client.clone(), keys.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for start in (0..flood).step_by(ENQUEUE_CHUNK) {
                    let chunk: Vec<Envelope> = (start..flood.min(start + ENQUEUE_CHUNK))
                        .map(|i| {
                            let mut e = Envelope::new(format!("nightly {i}"));
                            e.model = Some("mock-fast".into());
                            e.priority = on.then_some(5);
                            e
                        })
                        .collect();
                    client.enqueue_many(&keys, &chunk).await?;
                }
                anyhow::Ok(chrono::Utc::now())
            })
        };
        let mut sent = Vec::with_capacity(INTERACTIVE);
        for i in 0..INTERACTIVE {
            let mut e = Envelope::new(format!("interactive {i}"));
            e.model = Some("mock-fast".into());
            let at = chrono::Utc::now();
            client.enqueue(&keys, &e).await?;
            sent.push((e.id.context("Envelope::new names its task")?, at));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let landed = landing.await??;
        // Only the tasks sent while the flood was there count.
        sent.retain(|(_, at)| *at >= landed);
        let ids: Vec<TaskId> = sent.iter().map(|(id, _)| *id).collect();
        let deadline = Instant::now() + DRAIN_LIMIT;
        let waits = loop {
            let records = client.results(&keys, &ids).await?;
            if records.iter().all(|r| r.as_ref().is_some_and(|r| r.status == Status::Succeeded)) {
                break records
                    .iter()
                    .zip(&sent)
                    .map(|(r, (_, at))| {
                        let done = r.as_ref().and_then(|r| r.finished_at).unwrap_or(*at);
                        u64::try_from((done - *at).num_milliseconds()).unwrap_or(0)
                    })
                    .collect::<Vec<u64>>();
            }
            ensure!(Instant::now() < deadline, "the interactive tasks did not all answer");
            tokio::time::sleep(POLL).await;
        };
        let left = client.counts(&keys).await?;
        let secs = (chrono::Utc::now() - landed).num_milliseconds() as f64 / 1000.0;
        running.stop().await?;
        mock.shutdown().await;
        let left = left.ready + left.delayed;
        let flood_per_s = (flood as u64).saturating_sub(left) as f64 / secs;
        Ok((waits, left, flood_per_s))
    }
    .await;
    cleanup(redis, &queue).await?;
    cleanup_provider(redis, &provider).await?;
    result
}

/// `bench=fair_share` (issue 34): three tenants offer 10:1:1 (1,000, 100 and 100 tasks, the
/// big one enqueued first) to a worker kept saturated (concurrency 8, the mock answering in
/// 5 ms): each tenant's share of the calls while all three have work, and Jain's fairness
/// index over them (each share divided by its tenant's weight), with tenants (on), without
/// (off: FIFO), and with the big tenant weighted 2 (weighted: 2:1:1), in the same run.
async fn fair_share(args: &Args, redis: &mut Redis) -> Result<String> {
    let big = args.tasks.unwrap_or(1000);
    let small = big / 10;
    let mut line = format!("bench=fair_share offered={big}:{small}:{small}");
    for (mode, tenants, weighted) in [
        ("off", false, false),
        ("on", true, false),
        ("weighted", true, true),
    ] {
        let shares = fair_share_run(args, redis, big, small, tenants, weighted).await?;
        let total: f64 = shares.iter().sum();
        // Jain's index over each tenant's share divided by its weight.
        let weights = if weighted { [2.0, 1.0, 1.0] } else { [1.0; 3] };
        let x: Vec<f64> = shares.iter().zip(weights).map(|(s, w)| s / w).collect();
        let jain = x.iter().sum::<f64>().powi(2) / (3.0 * x.iter().map(|x| x * x).sum::<f64>());
        line.push_str(&format!(
            " {mode}_shares_pct={:.1}/{:.1}/{:.1} {mode}_jain={jain:.3}",
            100.0 * shares[0] / total,
            100.0 * shares[1] / total,
            100.0 * shares[2] / total
        ));
    }
    let workers = args.workers.unwrap_or(2);
    let m = minute_limit(args, redis, workers).await?;
    line.push_str(&format!(
        " minute_quotas=\"{}\" minute_workers={workers}x32 minute_small_of_first_90={}/{} \
         minute_jain_min_90={:.3} minute_busiest_minute={} minute_per_minute={:.1}",
        args.minute_quotas,
        m.first_90[0],
        m.first_90[1],
        m.jain_min,
        m.busiest_minute,
        m.per_minute
    ));
    Ok(line)
}

/// One half of `bench=fair_share`: each tenant's calls until the first tenant ran out.
async fn fair_share_run(
    args: &Args,
    redis: &mut Redis,
    big: usize,
    small: usize,
    on: bool,
    weighted: bool,
) -> Result<[f64; 3]> {
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        let mock = MockServer::start(MockOptions {
            latency: Duration::from_millis(5),
            ..MockOptions::default()
        })
        .await
        .context("cannot start the mock LLM server")?;
        let mut config = llmq_tests::harness::mock_config(&mock.url());
        if weighted {
            config.tenants.weights.insert("tenant-0".into(), 2);
        }
        client.ensure_group(&keys).await?;
        let mut tasks: Vec<(TaskId, usize)> = Vec::new();
        for (tenant, n) in [big, small, small].into_iter().enumerate() {
            let envs: Vec<Envelope> = (0..n)
                .map(|i| {
                    let mut e = Envelope::new(format!("tenant {tenant} task {i}"));
                    e.model = Some("mock-fast".into());
                    e.tenant = on.then(|| format!("tenant-{tenant}")).map(Into::into);
                    e
                })
                .collect();
            for chunk in envs.chunks(ENQUEUE_CHUNK) {
                client.enqueue_many(&keys, chunk).await?;
            }
            tasks.extend(envs.iter().filter_map(|e| Some((e.id?, tenant))));
        }
        let running = Workers::start(1, |i| settings(&args.redis_url, &config, &queue, 8, i))?;
        let drained = wait_drained(&client, &keys, &running).await;
        running.stop().await?;
        mock.shutdown().await;
        drained?;
        let ids: Vec<TaskId> = tasks.iter().map(|(id, _)| *id).collect();
        let mut done: Vec<(chrono::DateTime<chrono::Utc>, usize)> = Vec::with_capacity(ids.len());
        for (chunk, owners) in ids.chunks(1000).zip(tasks.chunks(1000)) {
            for (r, (_, tenant)) in client.results(&keys, chunk).await?.into_iter().zip(owners) {
                let r = r.context("a task has no result")?;
                done.push((
                    r.finished_at.context("a result has no finish time")?,
                    *tenant,
                ));
            }
        }
        done.sort_unstable();
        // Calls per tenant until one of them has none left.
        let mut left = [big, small, small];
        let mut calls = [0.0; 3];
        for (_, tenant) in done {
            if left.contains(&0) {
                break;
            }
            left[tenant] -= 1;
            calls[tenant] += 1.0;
        }
        Ok(calls)
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// What `bench=priority` and `bench=fair_share` saw under a provider's one-minute limit
/// (issue 69), from [`minute_limit`].
struct MinuteLimit {
    /// Each urgent task's wait from its enqueue to its call's arrival at the provider (ms).
    urgent_ms: Vec<u64>,
    /// Calls the small tenants got among the first 90 made after they arrived.
    first_90: [usize; 2],
    /// The lowest Jain index, over the three tenants, of any 90 consecutive calls while all
    /// three had tasks left.
    jain_min: f64,
    /// The most calls the provider saw arrive in any minute.
    busiest_minute: usize,
    /// Calls per minute over the run, as the provider saw them arrive.
    per_minute: f64,
    /// Tokens a minute over the run, as the provider answered them.
    tokens_per_minute: f64,
    /// The most tokens the provider answered in any minute.
    busiest_tokens_minute: u64,
    /// Redis CPU per call over the run (µs).
    redis_cpu_us_per_call: f64,
}

/// How the gaps between the provider's arrivals spread, against the pace's interval, and
/// how much time the gaps over it lost (`--verbose`).
fn print_gaps(arrived: &[i64]) {
    let mut sorted = arrived.to_vec();
    sorted.sort_unstable();
    let gaps: Vec<i64> = sorted.windows(2).map(|w| w[1] - w[0]).collect();
    let bounds = [900, 1000, 1050, 1100, 1200, 1500, 2000, 5000, i64::MAX];
    let mut counts = [0usize; 9];
    let mut lost = [0i64; 9];
    for &g in &gaps {
        let i = bounds.iter().position(|&b| g < b).unwrap_or(8);
        counts[i] += 1;
        lost[i] += (g - 990).max(0);
    }
    for (i, b) in bounds.iter().enumerate() {
        println!("# gap < {b} ms: {} (lost {} ms)", counts[i], lost[i]);
    }
}

/// The limit of [`minute_limit`] by default (`--minute-quotas`): `rpm` a one-minute window,
/// as providers count.
const MINUTE_RPM: usize = 60;

/// Issue 69's run: `workers` workers at concurrency 32 (more slots than the limit allows)
/// on a provider limited to 60 requests a minute (`--minute-quotas`) with 10 % held for
/// priority 0, through the
/// mock over HTTP (200 ms an answer). A tenant floods 300 tasks at priority 5; three seconds
/// later two small tenants add 30 each; four seconds after that urgent tasks (priority 0)
/// come, one every 3 s, twenty in all. The run ends when the urgent tasks and the small
/// tenants are done (the flood is left).
async fn minute_limit(args: &Args, redis: &mut Redis, workers: usize) -> Result<MinuteLimit> {
    let queue = fresh_queue();
    let provider = format!("ml-{}", &queue[6..]);
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        let mock = MockServer::start(MockOptions {
            latency: Duration::from_millis(200),
            ..MockOptions::default()
        })
        .await
        .context("cannot start the mock LLM server")?;
        let config = Config::parse(
            "llmq-bench.yaml",
            &format!(
                "providers:\n  - name: {provider}\n    kind: openai_compatible\n    base_url: {}/v1\n    \
                 api_key: bench\n    quotas: {{{}, window: 1m, reserve: {{0: 10}}}}\n    models:\n      \
                 - {{id: mock-fast, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.6}}\n",
                mock.url(),
                args.minute_quotas,
            ),
            &|_| None,
        )?;
        client.ensure_group(&keys).await?;
        let running = Workers::start(workers, |i| settings(&args.redis_url, &config, &queue, 32, i))?;
        let before = Snapshot::take(redis).await?;
        let task = |tenant: Option<&str>, priority: i64, i: usize| {
            let mut e = Envelope::new(format!("{} {i}", tenant.unwrap_or("urgent")));
            e.model = Some("mock-fast".into());
            e.priority = Some(priority);
            e.tenant = tenant.map(Into::into);
            // The answers are about 9 tokens: an estimate of 1,024 would hold most of a
            // `tpm` limit sized for these calls.
            e.max_tokens = Some(16);
            e
        };
        let flood: Vec<Envelope> = (0..300).map(|i| task(Some("flood"), 5, i)).collect();
        client.enqueue_many(&keys, &flood).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let small: Vec<Envelope> = (0..30)
            .flat_map(|i| [task(Some("small-a"), 5, i), task(Some("small-b"), 5, i)])
            .collect();
        let small_at = chrono::Utc::now().timestamp_millis();
        client.enqueue_many(&keys, &small).await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut urgent = Vec::new();
        for i in 0..20 {
            let e = task(None, 0, i);
            urgent.push((format!("urgent {i}"), chrono::Utc::now().timestamp_millis()));
            client.enqueue(&keys, &e).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        // Until every urgent and small task has been called.
        let deadline = Instant::now() + Duration::from_secs(300);
        let seen = loop {
            let seen = mock.first_seen();
            let small_done = (0..30).all(|i| {
                seen.contains_key(&format!("small-a {i}")) && seen.contains_key(&format!("small-b {i}"))
            });
            if small_done && urgent.iter().all(|(p, _)| seen.contains_key(p)) {
                break seen;
            }
            ensure!(Instant::now() < deadline, "the small tenants and urgent tasks were not all called in 5 minutes");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let after = Snapshot::take(redis).await?;
        let arrived = mock.arrivals();
        let answers = mock.answers();
        running.stop().await?;
        mock.shutdown().await;
        let urgent_ms = urgent
            .iter()
            .map(|(p, at)| u64::try_from(seen[p] - at).unwrap_or(0))
            .collect();
        // The tenants' calls in order, from when the small tenants arrived.
        let mut calls: Vec<(i64, usize)> = seen
            .iter()
            .filter(|(_, at)| **at >= small_at)
            .filter_map(|(p, at)| {
                let tenant = ["flood ", "small-a ", "small-b "].iter().position(|t| p.starts_with(t))?;
                Some((*at, tenant))
            })
            .collect();
        calls.sort_unstable();
        let mut left = [usize::MAX, 30, 30];
        let mut first_90 = [0, 0];
        let mut jain_min: f64 = 1.0;
        for (i, &(_, tenant)) in calls.iter().enumerate() {
            if i < 90 && tenant > 0 {
                first_90[tenant - 1] += 1;
            }
            left[tenant] -= 1;
            // Windows that end while every tenant still has tasks.
            if i + 1 >= 90 && left.iter().all(|&l| l > 0) {
                let mut n = [0.0f64; 3];
                for &(_, t) in &calls[i + 1 - 90..=i] {
                    n[t] += 1.0;
                }
                let jain = n.iter().sum::<f64>().powi(2) / (3.0 * n.iter().map(|x| x * x).sum::<f64>());
                jain_min = jain_min.min(jain);
            }
        }
        let busiest_minute = (0..arrived.len())
            .map(|i| arrived[i..].iter().take_while(|t| **t < arrived[i] + 60_000).count())
            .max()
            .unwrap_or(0);
        let span_min = (arrived.last().copied().unwrap_or(0) - arrived.first().copied().unwrap_or(0)) as f64 / 60_000.0;
        let per_minute = arrived.len().saturating_sub(1) as f64 / span_min.max(1e-9);
        let delta = after.since(&before, arrived.len().max(1));
        if args.verbose {
            delta.print_commands("minute_limit");
            print_gaps(&arrived);
            let mut named: Vec<(i64, &String)> = seen.iter().map(|(p, at)| (*at, p)).collect();
            named.sort_unstable();
            for w in named.windows(2) {
                if w[1].0 - w[0].0 > 1100 {
                    println!("# gap {} ms at +{} ms before {:?}", w[1].0 - w[0].0, w[1].0 - named[0].0, w[1].1);
                }
            }
        }
        let redis_cpu_us_per_call = delta.redis_cpu_us_per_task;
        // Tokens as a provider counting `tpm` sees them: by when each call was answered.
        let busiest_tokens_minute = (0..answers.len())
            .map(|i| answers[i..].iter().take_while(|a| a.0 < answers[i].0 + 60_000).map(|a| a.1).sum::<u64>())
            .max()
            .unwrap_or(0);
        let answered_min = match (answers.first(), answers.last()) {
            (Some(first), Some(last)) => (last.0 - first.0) as f64 / 60_000.0,
            _ => 0.0,
        };
        // The tokens after the first answer, over the time from it to the last.
        let tokens_per_minute = answers.iter().skip(1).map(|a| a.1).sum::<u64>() as f64 / answered_min.max(1e-9);
        if args.verbose {
            for (i, a) in answers.iter().enumerate() {
                let before: u64 = answers[..i].iter().rev().take_while(|b| b.0 > a.0 - 60_000).map(|b| b.1).sum();
                println!("# answer +{} ms: {} tokens, {before} in the minute before", a.0 - answers[0].0, a.1);
            }
        }
        Ok(MinuteLimit {
            urgent_ms,
            first_90,
            jain_min,
            busiest_minute,
            per_minute,
            tokens_per_minute,
            busiest_tokens_minute,
            redis_cpu_us_per_call,
        })
    }
    .await;
    cleanup(redis, &queue).await?;
    cleanup_provider(redis, &provider).await?;
    result
}

/// (e) What llmq adds to each call: routing, the quota reservation and its reconciliation
/// (two Lua calls to Redis), and the ledger's group commit, each timed on its own.
async fn overhead(args: &Args, redis: &mut Redis) -> Result<String> {
    let calls = args.tasks.unwrap_or(5_000);
    let provider = format!("oh-{}", &fresh_queue()[6..]);
    let result = async {
        let config = Config::parse(
            "llmq-bench.yaml",
            &format!(
                "providers:\n  - name: {provider}\n    kind: openai_compatible\n    base_url: http://127.0.0.1:9/v1\n    \
                 quotas: {{requests_per_day: 100000000, usd_per_month: 1000000, rpm: 100000000, tpm: 100000000000}}\n    \
                 models:\n      - {{id: m, capabilities: [analysis], input_usd_per_mtok: 1, output_usd_per_mtok: 2}}\n"
            ),
            &|_| None,
        )?;
        let limiter = llmq_shared::quota::Limiter::new(Client::new(&args.redis_url)?);
        let quotas = config.providers[0].quotas;
        let env = Envelope::new("Summarise the incident report in five bullet points.");
        let mut per_call = Vec::with_capacity(calls);
        let quota_before = Snapshot::take(redis).await?;
        for _ in 0..calls {
            let started = Instant::now();
            let plan = llmq_shared::routing::plan(
                &config,
                &env,
                &llmq_shared::routing::Constraints::default(),
                &llmq_shared::routing::Stats::default(),
            )
            .map_err(|e| anyhow!("{e}"))?;
            let c = &plan.candidates[0];
            let decision = limiter.reserve(&provider, &quotas, 0, c.estimated_tokens, c.estimated_usd, Utc::now()).await?;
            let llmq_shared::quota::Decision::Granted { reservation, .. } = decision else {
                bail!("the generous quota refused a call");
            };
            ensure!(limiter.stamp(&reservation, &quotas, Utc::now()).await?.is_none());
            limiter.reconcile(&reservation, 100, 0.0001).await?;
            per_call.push(started.elapsed().as_micros() as u64);
        }
        let quota_after = Snapshot::take(redis).await?;
        // The stamp alone: a reservation stamped again, as many times.
        let llmq_shared::quota::Decision::Granted { reservation, .. } =
            limiter.reserve(&provider, &quotas, 0, 100, 0.0, Utc::now()).await?
        else {
            bail!("the generous quota refused a call");
        };
        let stamp_before = Snapshot::take(redis).await?;
        for _ in 0..calls {
            limiter.stamp(&reservation, &quotas, Utc::now()).await?;
        }
        let stamp_cpu_s = Snapshot::take(redis).await?.redis_cpu_s - stamp_before.redis_cpu_s;
        let quota_cpu_s = quota_after.redis_cpu_s - quota_before.redis_cpu_s;
        per_call.sort_unstable();
        // The ledger: rows are group-committed per batch of finished tasks; a batch of 64
        // is typical under load. Each batch's commit, divided by its rows.
        let bench_url = with_database(&args.database_url, BENCH_DB)?;
        let ledger = bench_ledger(&args.database_url, &bench_url).await?;
        let queue = fresh_queue();
        let mut per_row = Vec::new();
        for _ in 0..100 {
            let rows: Vec<llmq_shared::ledger::CallRow> = (0..64)
                .map(|_| llmq_shared::ledger::CallRow {
                    task_id: uuid::Uuid::new_v4(),
                    delivery: uuid::Uuid::new_v4(),
                    run: 0,
                    attempt: 1,
                    call_no: 1,
                    queue: queue.as_str().into(),
                    chain_id: None,
                    task_type: "data_analysis".into(),
                    provider: provider.as_str().into(),
                    model: "m".into(),
                    input_tokens: 100,
                    output_tokens: 50,
                    cached_tokens: 0,
                    cache_write_tokens: 0,
                    reasoning_tokens: 0,
                    cost_usd: 0.0002,
                    latency_ms: 1,
                    outcome: llmq_shared::ledger::CallOutcome::Ok,
                    error_class: None,
                    error: None,
                    worker: "bench".into(),
                    called_at: Utc::now(),
                    list_cost_usd: None,
                    tenant: None,
                    tags: None,
                })
                .collect();
            let started = Instant::now();
            ledger.record(&rows, &[]).await?;
            per_row.push(started.elapsed().as_micros() as u64 / 64);
        }
        sqlx::query("DELETE FROM provider_calls WHERE queue = $1").bind(&queue).execute(ledger.pool()).await?;
        per_row.sort_unstable();
        Ok(format!(
            "bench=overhead calls={calls} route_quota_p50_us={} route_quota_p99_us={} \
             quota_redis_cpu_us_per_call={:.1} stamp_redis_cpu_us={:.1} \
             ledger_per_call_p50_us={} ledger_per_call_p99_us={} ledger_batch_rows=64",
            percentile(&per_call, 50.0),
            percentile(&per_call, 99.0),
            quota_cpu_s * 1e6 / calls as f64,
            stamp_cpu_s * 1e6 / calls as f64,
            percentile(&per_row, 50.0),
            percentile(&per_row, 99.0)
        ))
    }
    .await;
    cleanup_provider(redis, &provider).await?;
    result
}

/// (f) Redis memory across 100,000 finished tasks, then 100,000 finished two-step chains,
/// with the scheduler running: what each costs while its results live, and that memory
/// returns to where it was once they expire (a 5 s result TTL stands in for the default 7
/// days) and the scheduler has dropped the expired chains from the chains index.
async fn memory(args: &Args, redis: &mut Redis) -> Result<String> {
    let tasks = args.tasks.unwrap_or(100_000);
    let ttl = Duration::from_secs(5);
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        let before = used_memory(redis).await?;
        let bench_url = with_database(&args.database_url, BENCH_DB)?;
        bench_ledger(&args.database_url, &bench_url).await?;
        let config = noop_config()?;
        let scheduler_stop = CancellationToken::new();
        let mut sched = llmq_scheduler::Settings::new(&args.redis_url, &bench_url, config.clone())?;
        sched.queues = vec![queue.clone()];
        sched.id = Some(format!("{queue}-scheduler"));
        sched.chains_every = Duration::from_secs(1);
        let scheduler = tokio::spawn(llmq_scheduler::run(sched, scheduler_stop.clone()));
        let ids = backlog(&client, &keys, tasks).await?;
        let provider: Arc<dyn Provider> = Arc::new(NoopProvider::default());
        let running = Workers::start(1, |i| {
            let mut s = settings(&args.redis_url, &config, &queue, 256, i)?;
            s.provider_overrides = vec![("noop".into(), Arc::clone(&provider))];
            s.result_ttl = ttl;
            Ok(s)
        })?;
        let drained = wait_drained(&client, &keys, &running).await;
        let after_drain = used_memory(redis).await?;
        drained?;
        ensure!(!ids.is_empty());
        let after_ttl = settled_memory(redis, before, ttl).await?;

        // The same number of chains, each a step and one after it.
        let mut c = client.conn().await?;
        for chunk in (0..tasks).collect::<Vec<_>>().chunks(ENQUEUE_CHUNK) {
            let mut pipe = redis::pipe();
            for i in chunk {
                let spec = serde_json::json!({"v": 1, "chain_id": format!("m{i}"), "steps": [
                    {"name": "plan", "prompt": "plan"},
                    {"name": "docs", "after": ["plan"], "prompt": "docs {{plan.summary}}"}]});
                pipe.cmd("XADD")
                    .arg(keys.stream())
                    .arg("*")
                    .arg(llmq_shared::keys::CHAIN_FIELD)
                    .arg(spec.to_string())
                    .ignore();
            }
            pipe.query_async::<()>(&mut c).await?;
        }
        let drained = wait_drained(&client, &keys, &running).await;
        let after_chains = used_memory(redis).await?;
        let indexed_after_drain: u64 = redis::cmd("ZCARD").arg(keys.chains()).query_async(redis).await?;
        running.stop().await?;
        drained?;
        // The last chains expire within the TTL; the scheduler drops them within its period.
        let deadline = Instant::now() + ttl + Duration::from_secs(30);
        let mut indexed: u64 = indexed_after_drain;
        while indexed > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            indexed = redis::cmd("ZCARD").arg(keys.chains()).query_async(redis).await?;
        }
        let after_chains_ttl = settled_memory(redis, before, ttl).await?;
        scheduler_stop.cancel();
        let _ = scheduler.await;
        let mb = |b: f64| b / (1024.0 * 1024.0);
        Ok(format!(
            "bench=memory tasks={tasks} result_ttl_s={} scheduler=on before_mb={:.1} after_drain_mb={:.1} \
             bytes_per_finished_task={:.0} after_ttl_mb={:.1} chains={tasks} steps_per_chain=2 \
             after_chains_drain_mb={:.1} bytes_per_finished_chain={:.0} chains_indexed_after_drain={indexed_after_drain} \
             after_chains_ttl_mb={:.1} chains_indexed_after_ttl={indexed}",
            ttl.as_secs(),
            mb(before),
            mb(after_drain),
            (after_drain - before) / tasks as f64,
            mb(after_ttl),
            mb(after_chains),
            (after_chains - after_ttl) / tasks as f64,
            mb(after_chains_ttl),
        ))
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// Redis `used_memory`, in bytes.
async fn used_memory(redis: &mut Redis) -> Result<f64> {
    Ok(info(redis, "memory")
        .await?
        .get("used_memory")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0))
}

/// Redis memory once what expires after `ttl` is gone (Redis reclaims expired keys in the
/// background within seconds): back within 2 MiB of `before`, or what it is after 30 s more.
async fn settled_memory(redis: &mut Redis, before: f64, ttl: Duration) -> Result<f64> {
    let deadline = Instant::now() + ttl + Duration::from_secs(30);
    let mut now = used_memory(redis).await?;
    while Instant::now() < deadline && now > before + 2.0 * 1024.0 * 1024.0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = used_memory(redis).await?;
    }
    Ok(now)
}

/// Deletes a bench provider's quota keys.
async fn cleanup_provider(redis: &mut Redis, provider: &str) -> Result<()> {
    unlink_matching(redis, &format!("llmq:{{p:{provider}}}:*")).await
}

/// In-process workers sharing one shutdown token.
struct Workers {
    token: CancellationToken,
    handles: Vec<JoinHandle<llmq_worker::Result<()>>>,
}

impl Workers {
    fn start(n: usize, settings: impl Fn(usize) -> Result<Settings>) -> Result<Self> {
        let token = CancellationToken::new();
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            handles.push(tokio::spawn(llmq_worker::run(settings(i)?, token.clone())));
        }
        Ok(Self { token, handles })
    }

    /// Fails when a worker has stopped on its own (its error comes out of [`Workers::stop`]).
    fn check(&self) -> Result<()> {
        ensure!(
            !self.handles.iter().any(JoinHandle::is_finished),
            "a worker stopped on its own"
        );
        Ok(())
    }

    /// Shuts every worker down and returns the first error one of them had.
    async fn stop(self) -> Result<()> {
        self.token.cancel();
        for h in self.handles {
            match tokio::time::timeout(Duration::from_secs(60), h).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(anyhow!(e).context("the worker failed")),
                Ok(Err(e)) => return Err(anyhow!(e).context("the worker task failed")),
                Err(_) => bail!("a worker did not stop within 60 s"),
            }
        }
        Ok(())
    }
}

/// (issue 70) What `llmq serve` adds to a task: the same chat requests at 1,000 a second
/// (`--tasks`, default 10,000) through `llmq serve` (the release binary, its own process) and
/// enqueued by XADD and waited on directly (one loop reading the open results every
/// millisecond, as the server's own waiter does), in the same run, one worker of 256 slots,
/// the mock answering at once: the latency each path saw from send to answer (the front
/// door's added p50 and p99), the most answers a second with 2,000 callers each asking again
/// as soon as answered (the front door's as a ratio to the direct path's), the server's CPU
/// per request (its /proc time over the paced phase), and its RSS per request waiting (2,000
/// requests held open with no worker).
async fn gateway(args: &Args, redis: &mut Redis) -> Result<String> {
    let n = args.tasks.unwrap_or(10_000);
    let rate = 1_000.0;
    let callers = 2_000;
    let queue = fresh_queue();
    let result = async {
        let keys = QueueKeys::new(&queue);
        let client = Client::new(&args.redis_url)?;
        client.ensure_group(&keys).await?;
        let (mock, config) = mock_fast(Duration::ZERO).await?;
        let mut exe = std::env::current_exe()?;
        exe.pop();
        let llmq = exe.join("llmq");
        ensure!(llmq.exists(), "{} is missing: cargo build --release --bin llmq (make bench does)", llmq.display());
        let port = llmq_tests::harness::free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut server = std::process::Command::new(&llmq)
            .args(["serve", "--listen", &listen, "--queue", &queue])
            .env("REDIS_URL", &args.redis_url)
            .env_remove("LLMQ_SERVE_KEYS")
            .env_remove("LLMQ_CONFIG")
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let measured = async {
            let url = format!("http://{listen}/v1/chat/completions");
            let http = reqwest::Client::builder().pool_max_idle_per_host(callers).build()?;
            let mut up = false;
            for _ in 0..100 {
                if http.get(format!("http://{listen}/healthz")).send().await.is_ok() {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ensure!(up, "llmq serve did not start");
            let running = Workers::start(1, |i| settings(&args.redis_url, &config, &queue, 256, i))?;
            let direct = Direct::start(client.clone(), keys.clone());
            let body = |i: usize| serde_json::json!({"model": "mock-fast", "messages": [{"role": "user", "content": format!("gateway {i}")}]});
            let envelope = |i: usize| {
                let mut e = Envelope::new(format!("gateway {i}"));
                e.model = Some("mock-fast".into());
                e
            };
            // Paced: each path alone, at `rate`.
            let before = Snapshot::take(redis).await?;
            let start = Instant::now();
            let mut asks = tokio::task::JoinSet::new();
            for i in 0..n {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                let (client, keys, direct, e) = (client.clone(), keys.clone(), direct.clone(), envelope(i));
                asks.spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    let sent = Instant::now();
                    let done = direct.wait(e.id.context("Envelope::new names its task")?);
                    client.enqueue(&keys, &e).await?;
                    done.await?;
                    Ok::<_, anyhow::Error>(sent.elapsed().as_micros() as u64)
                });
            }
            let mut direct_us = Vec::new();
            while let Some(r) = asks.join_next().await {
                direct_us.push(r??);
            }
            let between = Snapshot::take(redis).await?;
            let direct_redis_us = between.since(&before, n).redis_cpu_us_per_task;
            let cpu_before = proc_cpu_us(server.id())?;
            let start = Instant::now();
            for i in 0..n {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                let (http, url, body) = (http.clone(), url.clone(), body(n + i));
                asks.spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    let sent = Instant::now();
                    let r = http.post(&url).json(&body).send().await?;
                    ensure!(r.status().is_success(), "llmq serve answered {}", r.status());
                    r.bytes().await?;
                    Ok(sent.elapsed().as_micros() as u64)
                });
            }
            let mut gateway_us = Vec::new();
            while let Some(r) = asks.join_next().await {
                gateway_us.push(r??);
            }
            let cpu_us_per_request = (proc_cpu_us(server.id())? - cpu_before) as f64 / n as f64;
            let gateway_redis_us = Snapshot::take(redis).await?.since(&between, n).redis_cpu_us_per_task;
            direct_us.sort_unstable();
            gateway_us.sort_unstable();
            // The most: `callers` each asking again as soon as answered, 5 s a path.
            let most = |gateway: bool| {
                let (client, keys, direct, http, url) = (client.clone(), keys.clone(), direct.clone(), http.clone(), url.clone());
                async move {
                    let until = Instant::now() + Duration::from_secs(5);
                    let mut loops = tokio::task::JoinSet::new();
                    for c in 0..callers {
                        let (client, keys, direct, http, url) = (client.clone(), keys.clone(), direct.clone(), http.clone(), url.clone());
                        loops.spawn(async move {
                            let mut answered = 0u64;
                            while Instant::now() < until {
                                let i = 10_000_000 + c * 100_000 + answered as usize;
                                if gateway {
                                    let r = http.post(&url).json(&serde_json::json!({"model": "mock-fast", "messages": [{"role": "user", "content": format!("most {i}")}]})).send().await?;
                                    ensure!(r.status().is_success(), "llmq serve answered {}", r.status());
                                    r.bytes().await?;
                                } else {
                                    let mut e = Envelope::new(format!("most {i}"));
                                    e.model = Some("mock-fast".into());
                                    let done = direct.wait(e.id.context("Envelope::new names its task")?);
                                    client.enqueue(&keys, &e).await?;
                                    done.await?;
                                }
                                answered += 1;
                            }
                            Ok::<_, anyhow::Error>(answered)
                        });
                    }
                    let started = Instant::now();
                    let mut total = 0;
                    while let Some(r) = loops.join_next().await {
                        total += r??;
                    }
                    Ok::<_, anyhow::Error>(total as f64 / started.elapsed().as_secs_f64())
                }
            };
            let direct_most = most(false).await?;
            let gateway_most = most(true).await?;
            running.stop().await?;
            // RSS per waiting request: no worker, `callers` requests held open.
            let idle_kib = proc_rss_kib(server.id())?;
            let mut held = tokio::task::JoinSet::new();
            for i in 0..callers {
                let (http, url, body) = (http.clone(), url.clone(), body(20_000_000 + i));
                held.spawn(async move { http.post(&url).json(&body).send().await });
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            let held_kib = proc_rss_kib(server.id())?;
            held.abort_all();
            let p = |v: &[u64], q: f64| percentile(v, q) as f64 / 1000.0;
            Ok(format!(
                "bench=gateway requests={n} rate_per_s={rate:.0} direct_p50_ms={:.2} direct_p99_ms={:.2} \
                 gateway_p50_ms={:.2} gateway_p99_ms={:.2} added_p50_ms={:.2} added_p99_ms={:.2} \
                 callers={callers} direct_most_per_s={direct_most:.0} gateway_most_per_s={gateway_most:.0} \
                 most_ratio={:.2} direct_redis_cpu_us_per_task={direct_redis_us:.1} \
                 gateway_redis_cpu_us_per_request={gateway_redis_us:.1} \
                 serve_cpu_us_per_request={cpu_us_per_request:.0} \
                 serve_rss_kib_per_waiting_request={:.1}",
                p(&direct_us, 50.0),
                p(&direct_us, 99.0),
                p(&gateway_us, 50.0),
                p(&gateway_us, 99.0),
                p(&gateway_us, 50.0) - p(&direct_us, 50.0),
                p(&gateway_us, 99.0) - p(&direct_us, 99.0),
                gateway_most / direct_most.max(1e-9),
                held_kib.saturating_sub(idle_kib) as f64 / callers as f64,
            ))
        }
        .await;
        let _ = server.kill();
        let _ = server.wait();
        mock.shutdown().await;
        measured
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// (issue 70) A batch file of 100,000 lines (`--tasks`) in OpenAI's Batch shape through
/// `llmq serve` (the release binary, its own process, files and batches in the bench's
/// Postgres): uploaded to `POST /v1/files`, run with `POST /v1/batches` by one worker of 256
/// slots against the mock answering at once, and its output downloaded; the time of each
/// part, the lines a second, the server's peak RSS (`VmHWM`: the goal is at most 100 MB) and
/// its CPU per line, and Redis's CPU per line.
async fn gateway_batch(args: &Args, redis: &mut Redis) -> Result<String> {
    let n = args.tasks.unwrap_or(100_000);
    let queue = fresh_queue();
    let bench_url = with_database(&args.database_url, BENCH_DB)?;
    bench_ledger(&args.database_url, &bench_url).await?;
    let result = async {
        let keys = QueueKeys::new(&queue);
        Client::new(&args.redis_url)?.ensure_group(&keys).await?;
        let (mock, config) = mock_fast(Duration::ZERO).await?;
        let mut exe = std::env::current_exe()?;
        exe.pop();
        let llmq = exe.join("llmq");
        ensure!(llmq.exists(), "{} is missing: cargo build --release --bin llmq (make bench does)", llmq.display());
        let listen = format!("127.0.0.1:{}", llmq_tests::harness::free_port());
        let mut server = std::process::Command::new(&llmq)
            .args(["serve", "--listen", &listen, "--queue", &queue])
            .env("REDIS_URL", &args.redis_url)
            .env("DATABASE_URL", &bench_url)
            .env_remove("LLMQ_SERVE_KEYS")
            .env_remove("LLMQ_CONFIG")
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let measured = async {
            let base = format!("http://{listen}/v1");
            let http = reqwest::Client::new();
            let mut up = false;
            for _ in 0..100 {
                if http.get(format!("http://{listen}/healthz")).send().await.is_ok() {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ensure!(up, "llmq serve did not start");
            let boundary = "llmq-bench-boundary";
            let mut form = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
                 --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n\
                 Content-Type: application/jsonl\r\n\r\n"
            );
            for i in 0..n {
                form.push_str(&serde_json::json!({
                    "custom_id": format!("request-{i}"), "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "mock-fast", "max_tokens": 16, "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": format!("batch line {i}")}]},
                }).to_string());
                form.push('\n');
            }
            form.push_str(&format!("\r\n--{boundary}--\r\n"));
            let file_mb = form.len() as f64 / 1e6;
            let cpu_before = proc_cpu_us(server.id())?;
            let started = Instant::now();
            let file: serde_json::Value = http
                .post(format!("{base}/files"))
                .header("content-type", format!("multipart/form-data; boundary={boundary}"))
                .body(form)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let upload_s = started.elapsed().as_secs_f64();
            let running = Workers::start(1, |i| settings(&args.redis_url, &config, &queue, 256, i))?;
            let before = Snapshot::take(redis).await?;
            let started = Instant::now();
            let batch: serde_json::Value = http
                .post(format!("{base}/batches"))
                .json(&serde_json::json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let id = batch["id"].as_str().context("no batch id")?.to_owned();
            let done = loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let b: serde_json::Value = http.get(format!("{base}/batches/{id}")).send().await?.json().await?;
                match b["status"].as_str() {
                    Some("completed") => break b,
                    Some("failed" | "expired" | "cancelled") => bail!("the batch ended {}: {b}", b["status"]),
                    _ => ensure!(started.elapsed() < Duration::from_secs(1200), "the batch did not end in 20 minutes: {b}"),
                }
            };
            let run_s = started.elapsed().as_secs_f64();
            let redis_us = Snapshot::take(redis).await?.since(&before, n).redis_cpu_us_per_task;
            running.stop().await?;
            ensure!(done["request_counts"]["completed"] == n, "not every line succeeded: {done}");
            let started = Instant::now();
            let mut out = http
                .get(format!("{base}/files/{}/content", done["output_file_id"].as_str().unwrap_or_default()))
                .send()
                .await?
                .error_for_status()?;
            let (mut lines, mut bytes) = (0u64, 0u64);
            while let Some(chunk) = out.chunk().await? {
                lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
                bytes += chunk.len() as u64;
            }
            let download_s = started.elapsed().as_secs_f64();
            ensure!(lines == n as u64, "the output holds {lines} lines of {n}");
            let cpu_us_per_line = (proc_cpu_us(server.id())? - cpu_before) as f64 / n as f64;
            let peak_mb = proc_status_kib(server.id(), "VmHWM:")? as f64 / 1024.0;
            Ok(format!(
                "bench=gateway_batch lines={n} file_mb={file_mb:.1} upload_s={upload_s:.2} run_s={run_s:.1} \
                 lines_per_s={:.0} download_s={download_s:.2} output_mb={:.1} serve_peak_rss_mb={peak_mb:.1} \
                 serve_cpu_us_per_line={cpu_us_per_line:.0} redis_cpu_us_per_line={redis_us:.1}",
                n as f64 / run_s,
                bytes as f64 / 1e6,
            ))
        }
        .await;
        let _ = server.kill();
        let _ = server.wait();
        mock.shutdown().await;
        measured
    }
    .await;
    cleanup(redis, &queue).await?;
    result
}

/// The direct path's waiter in [`gateway`]: one loop reads the open tasks' results every
/// millisecond, as `llmq serve`'s does.
#[derive(Clone)]
struct Direct {
    open: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<TaskId, tokio::sync::oneshot::Sender<()>>>,
    >,
}

impl Direct {
    fn start(client: Client, keys: QueueKeys) -> Self {
        let me = Self {
            open: std::sync::Arc::default(),
        };
        let open = std::sync::Arc::clone(&me.open);
        tokio::spawn(async move {
            loop {
                let ids: Vec<TaskId> = {
                    let mut o = open
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    o.retain(|_, tx| !tx.is_closed());
                    o.keys().copied().collect()
                };
                for chunk in ids.chunks(1000) {
                    if let Ok(records) = client.results(&keys, chunk).await {
                        let mut o = open
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        for r in records
                            .into_iter()
                            .flatten()
                            .filter(|r| r.status.is_final())
                        {
                            if let Some(tx) = o.remove(&r.task_id) {
                                let _ = tx.send(());
                            }
                        }
                    }
                }
                if std::sync::Arc::strong_count(&open) == 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_micros((2 * ids.len() as u64).max(1_000))).await;
            }
        });
        me
    }

    fn wait(&self, id: TaskId) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, tx);
        rx
    }
}

/// A process's CPU time so far (user and system, µs), from /proc.
fn proc_cpu_us(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command's name in parentheses: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|t| t.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|t| t.parse().ok()).unwrap_or(0);
    // The kernel's clock ticks are 100 a second here (getconf CLK_TCK).
    Ok(ticks * 10_000)
}

/// A process's resident memory (KiB), from /proc.
fn proc_rss_kib(pid: u32) -> Result<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`).
fn proc_status_kib(pid: u32, line: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(line)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {line} in /proc/<pid>/status"))
}

/// Enqueues `n` no-op tasks in chunks; returns their ids.
async fn backlog(client: &Client, keys: &QueueKeys, n: usize) -> Result<Vec<TaskId>> {
    backlog_shaped(client, keys, n, Shape::Plain).await
}

/// What the tasks of a no-op backlog carry besides their prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Plain,
    /// One concurrency key for every task, whose limit is `.0`.
    Keyed(u32),
    /// Priorities 1 to 3 and 100 tenants, in turn: every task goes through the room.
    Classed,
    /// An idempotency key of its own for every task: each takes a free key and ends it.
    Idempotent,
    /// A task of `llmq batch`: its key made of the batch's id and its place, and the batch's
    /// id, so its end also counts toward the batch's progress.
    Batch,
    /// The prompt padded with words to at least `.0` bytes.
    Prompt(usize),
    /// Ten tenants in turn, no priority: every task goes through the room.
    Tenants,
}

impl Shape {
    fn apply(self, i: usize, e: &mut Envelope) {
        match self {
            Shape::Plain => {}
            Shape::Keyed(limit) => {
                e.concurrency_key = Some("bench".into());
                e.concurrency_limit = Some(limit);
            }
            Shape::Classed => {
                e.priority = Some(1 + (i % 3) as i64);
                e.tenant = Some(format!("tenant-{}", i % 100).into());
            }
            Shape::Idempotent => e.idempotency_key = Some(format!("order-{i}").into()),
            Shape::Tenants => e.tenant = Some(format!("tenant-{}", i % 10).into()),
            Shape::Batch => {
                e.idempotency_key = Some(format!("bench:line-{i}").into());
                e.batch_id = Some("bench".into());
            }
            Shape::Prompt(bytes) => {
                while e.prompt.len() < bytes {
                    e.prompt
                        .push_str(" and then some more words of the task's long prompt");
                }
            }
        }
    }
}

/// [`backlog`], each task shaped by `shape`.
async fn backlog_shaped(
    client: &Client,
    keys: &QueueKeys,
    n: usize,
    shape: Shape,
) -> Result<Vec<TaskId>> {
    client.ensure_group(keys).await?;
    let mut ids = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let chunk: Vec<Envelope> = (0..left.min(ENQUEUE_CHUNK))
            .map(|i| {
                let mut e = Envelope::new(format!("benchmark task {}", n - left + i));
                shape.apply(n - left + i, &mut e);
                e
            })
            .collect();
        client.enqueue_many(keys, &chunk).await?;
        ids.extend(chunk.iter().filter_map(|e| e.id));
        left -= chunk.len();
    }
    Ok(ids)
}

/// Waits until nothing is ready, in flight or delayed; fails on a dead letter.
async fn wait_drained(client: &Client, keys: &QueueKeys, workers: &Workers) -> Result<()> {
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let c = client.counts(keys).await?;
        ensure!(c.dead == 0, "{} tasks went to the dead letters", c.dead);
        if c.ready + c.in_flight + c.delayed == 0 {
            return Ok(());
        }
        workers.check()?;
        ensure!(
            Instant::now() < deadline,
            "not drained after {DRAIN_LIMIT:?}: {c:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// An llmq-mock answering after `latency`, and a provider file with its one model,
/// `mock-fast`.
async fn mock_fast(latency: Duration) -> Result<(MockServer, Config)> {
    let mock = MockServer::start(MockOptions {
        latency,
        ..MockOptions::default()
    })
    .await
    .context("cannot start the mock LLM server")?;
    let config = Config::parse(
        "llmq-bench.yaml",
        &format!(
            "providers:\n  - name: mock\n    kind: openai_compatible\n    base_url: {}/v1\n    \
             api_key: bench\n    models:\n      - {{id: mock-fast, input_usd_per_mtok: 0.15, \
             output_usd_per_mtok: 0.6}}\n",
            mock.url()
        ),
        &|_| None,
    )?;
    Ok((mock, config))
}

/// [`wait_drained`], and nothing parked (behind a call, a flight or a key's first task).
async fn wait_unparked(
    client: &Client,
    keys: &QueueKeys,
    workers: &Workers,
    redis: &mut Redis,
) -> Result<()> {
    loop {
        wait_drained(client, keys, workers).await?;
        let parked: u64 = redis::cmd("HLEN")
            .arg(keys.kept("parked"))
            .query_async(redis)
            .await?;
        if parked == 0 {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Checks that every task has a stored, successful result.
async fn verify_results(client: &Client, keys: &QueueKeys, ids: &[TaskId]) -> Result<()> {
    for chunk in ids.chunks(1000) {
        for (id, record) in chunk.iter().zip(client.results(keys, chunk).await?) {
            match record {
                Some(r) if r.status == Status::Succeeded => {}
                Some(r) => bail!("task {id} ended {}: {:?}", r.status, r.error),
                None => bail!("task {id} has no result"),
            }
        }
    }
    Ok(())
}

/// Deletes every key of `queue` and its entry in the set of known queues.
async fn cleanup(redis: &mut Redis, queue: &str) -> Result<()> {
    unlink_matching(redis, &format!("llmq:{{{queue}}}:*")).await?;
    redis::cmd("SREM")
        .arg(QUEUES)
        .arg(queue)
        .query_async::<()>(redis)
        .await?;
    Ok(())
}

/// Deletes every key matching `pattern`.
async fn unlink_matching(redis: &mut Redis, pattern: &str) -> Result<()> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(redis)
                .await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(())
}

fn fresh_queue() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("bench-{}", &id[..8])
}

/// The nearest-rank percentile of sorted `v`.
fn percentile(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// `url` with its database name replaced by `db` (query string kept).
fn with_database(url: &str, db: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let start = base
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| anyhow!("DATABASE_URL `{url}` is not a postgres:// URL"))?;
    let root = match base[start..].find('/') {
        Some(i) => &base[..start + i],
        None => base,
    };
    Ok(match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    })
}

/// Connects to the bench database, creating it next to `admin_url`'s database when it does
/// not exist, and migrates it. The database belongs to the bench: if its migrations no
/// longer match the embedded ones (they were edited during development), it is recreated.
/// `llmq web` over a big queue: 100,000 dead letters and 10,000 chains (1 % failed). Each
/// page is asked 20 times over HTTP; the median and the slowest, in ms. The overview reads
/// counts only; the lists read one page by cursor, however deep.
async fn web_pages(args: &Args, redis: &mut Redis) -> Result<String> {
    const DEAD: usize = 100_000;
    const CHAINS: usize = 10_000;
    let keys = QueueKeys::new("bench-web");
    clear_web(redis, &keys, CHAINS).await?;
    let task = Envelope::new("a task that died").to_json();
    for start in (0..DEAD).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..start + 1000 {
            pipe.cmd("XADD")
                .arg(keys.dead())
                .arg("*")
                .arg("task")
                .arg(&task)
                .arg("error")
                .arg(format!("failure {i}"))
                .arg("class")
                .arg("fatal")
                .ignore();
        }
        let () = pipe.query_async(redis).await?;
    }
    let now = Utc::now().timestamp_millis();
    for start in (0..CHAINS).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..start + 1000 {
            let id = format!("chain-{i:05}");
            let state = if i % 100 == 0 { "failed" } else { "succeeded" };
            pipe.zadd(keys.chains(), &id, now - i as i64)
                .ignore()
                .hset(keys.chain(&id), "state", state)
                .ignore();
        }
        let () = pipe.query_async(redis).await?;
    }
    let client = Client::new(&args.redis_url)?;
    client
        .heartbeat("bench-web", std::slice::from_ref(&keys), false)
        .await?;
    let deep_dead: Vec<(String, redis::Value)> = redis::cmd("XRANGE")
        .arg(keys.dead())
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(100)
        .query_async(redis)
        .await
        .unwrap_or_default();
    let deep = deep_dead
        .last()
        .map(|(id, _)| id.clone())
        .unwrap_or_default();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    tokio::spawn(llmq::web::serve(
        listener,
        llmq::web::WebState::new(client.clone()),
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let pages = [
        ("overview", "/".to_owned()),
        ("dead_first", "/dead?queue=bench-web".to_owned()),
        ("dead_deep", format!("/dead?queue=bench-web&before={deep}")),
        ("chains_first", "/chains?queue=bench-web".to_owned()),
        (
            "chains_failed",
            "/chains?queue=bench-web&state=failed".to_owned(),
        ),
        (
            "chains_deep",
            format!("/chains?queue=bench-web&after={}:chain-09900", now - 9900),
        ),
        // A task that is nowhere: the lookup reads at most 5,000 dead letters, not 100,000.
        (
            "task_unknown",
            format!("/task?queue=bench-web&id={}", uuid::Uuid::new_v4()),
        ),
    ];
    let queues: u64 = redis::cmd("SCARD").arg(QUEUES).query_async(redis).await?;
    let mut line = format!("bench=web_pages dead={DEAD} chains={CHAINS} queues={queues}");
    for (name, path) in &pages {
        let mut ms = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let r = http.get(format!("{base}{path}")).send().await?;
            let want = if *name == "task_unknown" { 404 } else { 200 };
            ensure!(
                r.status().as_u16() == want,
                "{path} answered {}",
                r.status()
            );
            let _ = r.bytes().await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        line.push_str(&format!(
            " {name}_ms={:.1} {name}_max_ms={:.1}",
            ms[ms.len() / 2],
            ms[ms.len() - 1]
        ));
    }
    stop.cancel();
    client
        .leave("bench-web", std::slice::from_ref(&keys))
        .await?;
    clear_web(redis, &keys, CHAINS).await?;
    Ok(line)
}

/// The operator page where operators live: a ledger of 5 M calls and tasks (`--tasks`; the
/// fresh ledger of `ledger_scale`, made when missing) and a queue of 1 M ready tasks, 1,000 in
/// flight, 100,000 delayed and 100,000 dead. Each page and filter: the median and the slowest
/// of five loads. And what an open page costs Redis a second (its Redis time a load over its
/// refresh), beside a worker's idle heartbeat a second (its beat and its announcement, every
/// 5 s).
async fn web(args: &Args, redis: &mut Redis) -> Result<String> {
    const READY: usize = 1_000_000;
    const HELD: usize = 1_000;
    const DELAYED: usize = 100_000;
    const DEAD: usize = 100_000;
    let n = args.tasks.unwrap_or(5_000_000) as i64;
    let (ledger, _, _) = fresh_ledger(args, n).await?;
    llmq_shared::ledger::roll(ledger.pool()).await?;
    let keys = QueueKeys::new("bench-web-scale");
    let () = redis::pipe()
        .del(keys.stream())
        .del(keys.delayed())
        .del(keys.dead())
        .query_async(redis)
        .await?;
    let client = Client::new(&args.redis_url)?;
    client.ensure_group(&keys).await?;
    let task = |i: usize| {
        let mut e = Envelope::new(format!("task {i}: summarise the quarterly report"));
        e.model = Some(
            if i.is_multiple_of(2) {
                "model-1"
            } else {
                "model-2"
            }
            .into(),
        );
        e.to_json()
    };
    for start in (0..READY).step_by(5000) {
        let mut pipe = redis::pipe();
        for i in start..start + 5000 {
            pipe.cmd("XADD")
                .arg(keys.stream())
                .arg("*")
                .arg("task")
                .arg(task(i))
                .ignore();
        }
        let () = pipe.query_async(redis).await?;
    }
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(llmq_shared::keys::GROUP)
        .arg("bench-web-worker")
        .arg("COUNT")
        .arg(HELD)
        .arg("STREAMS")
        .arg(keys.stream())
        .arg(">")
        .query_async(redis)
        .await?;
    let due = Utc::now().timestamp_millis() + 86_400_000;
    for start in (0..DELAYED).step_by(5000) {
        let mut pipe = redis::pipe();
        for i in start..start + 5000 {
            pipe.zadd(keys.delayed(), task(i), due + i as i64).ignore();
        }
        let () = pipe.query_async(redis).await?;
    }
    for start in (0..DEAD).step_by(5000) {
        let mut pipe = redis::pipe();
        for i in start..start + 5000 {
            pipe.cmd("XADD")
                .arg(keys.dead())
                .arg("*")
                .arg("task")
                .arg(task(i))
                .arg("error")
                .arg(format!(
                    "HTTP 400 from model-{}: request {i} refused",
                    i % 7
                ))
                .arg("class")
                .arg("fatal")
                .ignore();
        }
        let () = pipe.query_async(redis).await?;
    }
    let info = llmq_shared::queue::WorkerInfo {
        id: "bench-web-worker".into(),
        host: "bench".into(),
        queues: vec![keys.name().to_owned()],
        version: env!("CARGO_PKG_VERSION").into(),
        concurrency: HELD as u64,
        started_ms: Utc::now().timestamp_millis(),
        busy: HELD as u64,
        calls: 0,
        draining: false,
    };
    // A worker's idle beat: its heartbeat and its announcement.
    let before = Snapshot::take(redis).await?;
    for _ in 0..200 {
        client
            .heartbeat("bench-web-worker", std::slice::from_ref(&keys), false)
            .await?;
        client.announce(&info).await?;
    }
    let beat_us = Snapshot::take(redis)
        .await?
        .since(&before, 200)
        .redis_cpu_us_per_task;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    tokio::spawn(llmq::web::serve(
        listener,
        llmq::web::WebState {
            ledger: Some(ledger.clone()),
            ..llmq::web::WebState::new(client.clone())
        },
        stop.clone(),
    ));
    let q = keys.name();
    let week = (Utc::now() - chrono::Duration::days(7)).format("%Y-%m-%d");
    let known: uuid::Uuid = sqlx::query_scalar(
        "SELECT task_id FROM tasks WHERE status = 'dead' ORDER BY finished_at DESC LIMIT 1",
    )
    .fetch_one(ledger.pool())
    .await?;
    // (name, path, refresh in s when it is a live page, for its Redis cost a second)
    let pages: Vec<(&str, String, f64)> = vec![
        ("overview", "/".into(), 5.0),
        ("workers", format!("/workers?queue={q}"), 5.0),
        ("tasks_ready", format!("/tasks?queue={q}&state=ready"), 10.0),
        (
            "tasks_ready_filtered",
            format!("/tasks?queue={q}&state=ready&model=model-2&q=report"),
            10.0,
        ),
        (
            "tasks_in_flight",
            format!("/tasks?queue={q}&state=in_flight"),
            10.0,
        ),
        (
            "tasks_delayed",
            format!("/tasks?queue={q}&state=delayed&older=50000"),
            10.0,
        ),
        ("tasks_finished", "/tasks?state=finished".into(), 0.0),
        (
            "tasks_succeeded_queue",
            "/tasks?state=succeeded&queue=queue-1".into(),
            0.0,
        ),
        ("tasks_dead", "/tasks?state=dead".into(), 0.0),
        (
            "tasks_dead_text_none",
            "/tasks?state=dead&q=no+such+words".into(),
            0.0,
        ),
        (
            "tasks_tenant",
            "/tasks?state=finished&tenant=tenant-7".into(),
            0.0,
        ),
        (
            "tasks_tag",
            "/tasks?state=finished&tag=team%3Dteam-3".into(),
            0.0,
        ),
        (
            "tasks_model_week",
            format!("/tasks?state=finished&model=model-3&since={week}"),
            0.0,
        ),
        (
            "tasks_rare_week",
            format!("/tasks?state=finished&tenant=nobody&since={week}"),
            0.0,
        ),
        // Ended: its page does not refresh.
        ("task_ledger", format!("/task?id={known}"), 0.0),
        ("charts_hour", "/charts?span=hour".into(), 10.0),
        ("charts_day", "/charts?span=day".into(), 60.0),
        ("charts_30d", "/charts?span=30d".into(), 60.0),
        (
            "charts_30d_queue",
            "/charts?span=30d&queue=queue-1".into(),
            60.0,
        ),
        ("dead", format!("/dead?queue={q}"), 0.0),
        (
            "dead_filtered",
            format!("/dead?queue={q}&q=request+9999&model=model-2"),
            0.0,
        ),
    ];
    let http = reqwest::Client::new();
    let mut line = format!(
        "bench=web ledger_tasks={n} ready={READY} in_flight={HELD} delayed={DELAYED} \
         dead={DEAD} heartbeat_redis_us_per_s={:.1}",
        beat_us / 5.0
    );
    let mut slowest: (f64, &str) = (0.0, "");
    for (name, path, refresh) in &pages {
        let mut ms = Vec::new();
        let before = Snapshot::take(redis).await?;
        for _ in 0..5 {
            let t = Instant::now();
            let r = http.get(format!("{base}{path}")).send().await?;
            ensure!(r.status().is_success(), "{path} answered {}", r.status());
            let _ = r.bytes().await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let delta = Snapshot::take(redis).await?.since(&before, 5);
        let redis_us = delta.redis_cpu_us_per_task;
        if *refresh > 0.0 {
            delta.print_commands(&format!("web {name}"));
        }
        ms.sort_by(f64::total_cmp);
        line.push_str(&format!(
            " {name}_ms={:.1} {name}_max_ms={:.1}",
            ms[2], ms[4]
        ));
        if *refresh > 0.0 {
            line.push_str(&format!(" {name}_redis_us_per_s={:.1}", redis_us / refresh));
        }
        if ms[2] > slowest.0 {
            slowest = (ms[2], name);
        }
    }
    line.push_str(&format!(
        " slowest={} slowest_ms={:.1}",
        slowest.1, slowest.0
    ));
    stop.cancel();
    client.forget_worker("bench-web-worker").await?;
    client
        .leave("bench-web-worker", std::slice::from_ref(&keys))
        .await?;
    let () = redis::pipe()
        .del(keys.stream())
        .del(keys.delayed())
        .del(keys.dead())
        .query_async(redis)
        .await?;
    Ok(line)
}

async fn clear_web(redis: &mut Redis, keys: &QueueKeys, chains: usize) -> Result<()> {
    let mut pipe = redis::pipe();
    pipe.del(keys.dead()).ignore().del(keys.chains()).ignore();
    for i in 0..chains {
        pipe.del(keys.chain(&format!("chain-{i:05}"))).ignore();
    }
    let () = pipe.query_async(redis).await?;
    Ok(())
}

async fn bench_ledger(admin_url: &str, bench_url: &str) -> Result<Ledger> {
    bench_ledger_named(admin_url, bench_url, BENCH_DB, true).await
}

/// [`bench_ledger`] for the database `name` (at `bench_url`).
async fn bench_ledger_named(
    admin_url: &str,
    bench_url: &str,
    name: &str,
    migrate: bool,
) -> Result<Ledger> {
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .with_context(|| format!("cannot reach Postgres at {admin_url}; set DATABASE_URL"))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
    }
    let ledger = Ledger::connect(bench_url, 4).await?;
    if !migrate {
        return Ok(ledger);
    }
    if let Err(e) = ledger.migrate().await {
        if !matches!(
            e,
            llmq_shared::ledger::Error::Migrate(sqlx::migrate::MigrateError::VersionMismatch(_))
        ) {
            return Err(e.into());
        }
        ledger.pool().close().await;
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let ledger = Ledger::connect(bench_url, 4).await?;
        ledger.migrate().await?;
        return Ok(ledger);
    }
    Ok(ledger)
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Redis and process CPU, and Redis per-command stats, at one moment.
struct Snapshot {
    at: Instant,
    redis_cpu_s: f64,
    proc_cpu_s: f64,
    /// CPU time every process on the machine has used since boot.
    machine_cpu_s: f64,
    commands: BTreeMap<String, (u64, u64)>,
}

impl Snapshot {
    async fn take(redis: &mut Redis) -> Result<Self> {
        let cpu = info(redis, "cpu").await?;
        let field = |k: &str| -> Result<f64> {
            cpu.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow!("INFO cpu has no {k}"))
        };
        let redis_cpu_s = field("used_cpu_sys")? + field("used_cpu_user")?;
        let mut commands = BTreeMap::new();
        for (k, v) in info(redis, "commandstats").await? {
            let Some(name) = k.strip_prefix("cmdstat_") else {
                continue;
            };
            let mut calls = 0;
            let mut usec = 0;
            for part in v.split(',') {
                match part.split_once('=') {
                    Some(("calls", n)) => calls = n.parse().unwrap_or(0),
                    Some(("usec", n)) => usec = n.parse().unwrap_or(0),
                    _ => {}
                }
            }
            commands.insert(name.to_owned(), (calls, usec));
        }
        Ok(Self {
            at: Instant::now(),
            redis_cpu_s,
            proc_cpu_s: process_cpu_s()?,
            machine_cpu_s: machine_cpu_s()?,
            commands,
        })
    }

    fn since(&self, before: &Snapshot, tasks: usize) -> Delta {
        let secs = self.at.duration_since(before.at).as_secs_f64();
        let n = tasks.max(1) as f64;
        let mut commands: Vec<(String, u64, u64)> = self
            .commands
            .iter()
            .map(|(name, (calls, usec))| {
                let (c0, u0) = before.commands.get(name).copied().unwrap_or((0, 0));
                (
                    name.clone(),
                    calls.saturating_sub(c0),
                    usec.saturating_sub(u0),
                )
            })
            .filter(|(_, calls, _)| *calls > 0)
            .collect();
        commands.sort_by_key(|c| std::cmp::Reverse(c.2));
        Delta {
            tasks: n,
            secs,
            tasks_per_s: n / secs,
            redis_cpu_us_per_task: (self.redis_cpu_s - before.redis_cpu_s) * 1e6 / n,
            proc_cpu_us_per_task: (self.proc_cpu_s - before.proc_cpu_s) * 1e6 / n,
            other_cpu_cores: ((self.machine_cpu_s - before.machine_cpu_s)
                - (self.redis_cpu_s - before.redis_cpu_s)
                - (self.proc_cpu_s - before.proc_cpu_s))
                .max(0.0)
                / secs,
            commands,
        }
    }
}

struct Delta {
    tasks: f64,
    secs: f64,
    tasks_per_s: f64,
    redis_cpu_us_per_task: f64,
    proc_cpu_us_per_task: f64,
    /// Cores busy with anything but Redis and this process, on average: Postgres in
    /// `e2e_mock`, otherwise noise that makes the run less trustworthy.
    other_cpu_cores: f64,
    /// name, calls, usec
    commands: Vec<(String, u64, u64)>,
}

impl Delta {
    /// One `cmdstat` line per Redis command that ran, most time first. Commands run inside
    /// scripts are counted both on their own line and in the script's (`evalsha`) time.
    fn print_commands(&self, bench: &str) {
        for (name, calls, usec) in &self.commands {
            println!(
                "cmdstat bench={bench} cmd={name} calls={calls} usec={usec} \
                 calls_per_task={:.3} usec_per_task={:.2} usec_per_call={:.2}",
                *calls as f64 / self.tasks,
                *usec as f64 / self.tasks,
                *usec as f64 / (*calls).max(1) as f64
            );
        }
    }
}

/// CPU time of this process (every thread) from `/proc/self/stat`, in seconds.
fn process_cpu_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("cannot read /proc/self/stat")?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("/proc/self/stat is malformed"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the file (utime, stime) in clock ticks of 1/100 s.
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("/proc/self/stat has no field {}", i + 3))
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Busy CPU time of the whole machine from the first line of `/proc/stat`, in seconds.
fn machine_cpu_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat has no cpu line"))?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let busy: f64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Ok(busy / 100.0)
}

/// `machine cpus=.. model=".." mem_gib=.. redis=.. os=".."`.
async fn machine(redis: &mut Redis) -> Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let cpus = if cpus > 0 {
        cpus
    } else {
        std::thread::available_parallelism().map_or(0, usize::from)
    };
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_owned();
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let server = info(redis, "server").await?;
    let version = server
        .get("redis_version")
        .map_or("unknown", String::as_str);
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let os = format!(
        "{} {}",
        read("/proc/sys/kernel/ostype"),
        read("/proc/sys/kernel/osrelease")
    );
    Ok(format!(
        "machine cpus={cpus} model={} mem_gib={:.1} redis={version} os={}",
        quote(&model),
        mem_kib / (1024.0 * 1024.0),
        quote(os.trim())
    ))
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `INFO <section>` as a map of its `key:value` lines.
async fn info(redis: &mut Redis, section: &str) -> Result<BTreeMap<String, String>> {
    let text: String = redis::cmd("INFO").arg(section).query_async(redis).await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}
