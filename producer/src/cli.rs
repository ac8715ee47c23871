//! The `llmq` command line: arguments only. Each command lives in its own module.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use llmq_shared::envelope::TaskType;
use llmq_shared::ids::TaskId;
use llmq_shared::keys::queue_name;

/// llmq: a durable job queue for LLM work.
#[derive(Parser, Debug)]
#[command(name = "llmq", version)]
pub struct Cli {
    /// Redis holding the queues.
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enqueue one task and print its id (with --wait, its result).
    Submit(Submit),
    /// Enqueue a JSON array of tasks.
    Batch(Batch),
    /// Show a task's status and result.
    Result(ResultArgs),
    /// Cancel tasks by id, a batch's tasks, or a tenant's queued work: what is queued never
    /// runs, a call in flight is dropped, and what already ended is left as it was.
    Cancel(CancelArgs),
    /// Show queue depths, live workers and provider readiness.
    Status(StatusArgs),
    /// Inspect, replay and purge dead letters.
    Dlq(Dlq),
    /// Apply the Postgres migrations.
    Migrate(Migrate),
    /// Report what the provider calls cost.
    Costs(Costs),
    /// What the ledger says of each model: success, cost and latency by task type, rankings,
    /// and switches that would save money at similar success.
    Insights(InsightsCmd),
    /// Show each provider's quota use: requests today, dollars this month, rate windows.
    Quota(QuotaArgs),
    /// Check or list the providers of the provider file.
    Providers(Providers),
    /// Submit, watch and inspect chains: multi-step workflows.
    Chain(ChainCmd),
    /// Pause or resume a queue: workers stop taking its tasks within a second.
    Queue(QueueCmd),
    /// List the fleet's workers, or drain one: it takes nothing new and finishes what it
    /// holds.
    Worker(WorkerCmd),
    /// Serve a page for operators: queues, chains, approvals, dead letters and costs.
    Web(WebArgs),
    /// Serve OpenAI's and Anthropic's APIs (chat completions, messages, models) in front of
    /// the queue: each request a task, answered in the caller's SDK's shape.
    Serve(ServeArgs),
    /// Make, list and revoke the keys `llmq serve` takes.
    Keys(KeysCmd),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Where to listen; loopback by default (behind TLS in Kubernetes). Without --keys only
    /// a loopback address is allowed.
    #[arg(long, env = "LLMQ_SERVE_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: std::net::SocketAddr,
    /// The keys file (`llmq keys create` makes it): callers present a key, which names their
    /// tenant. Without it, callers need no key and the server stays on loopback.
    #[arg(long, env = "LLMQ_SERVE_KEYS")]
    pub keys: Option<PathBuf>,
    /// The queue requests become tasks in.
    #[arg(long, env = "LLMQ_SERVE_QUEUE", default_value = "default", value_parser = queue_name)]
    pub queue: String,
    /// The provider file (its API keys are not read): the models a request may name and
    /// `GET /v1/models` lists.
    #[arg(long, env = "LLMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// How long a request waits for its task when the caller does not say (`llmq-timeout`,
    /// or its SDK's timeout); then 504, and the task goes on.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Exit 0 when a server on --listen answers, 1 when not (a probe for Kubernetes).
    #[arg(long)]
    pub health_check: bool,
    /// Postgres, where the Files and Batch APIs keep files and batches (every replica
    /// reads them; a restart keeps them). Without it those APIs answer 404, saying so.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// How long a replica's hold on a batch lasts unless kept (each second): after a replica
    /// dies, another takes its batches up this long after.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub batch_lease: Duration,
}

#[derive(Args, Debug)]
pub struct KeysCmd {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a key for a tenant: its line (the key's SHA-256, never the key) is added to the
    /// file, and the key is printed once.
    Create {
        #[arg(long, env = "LLMQ_SERVE_KEYS")]
        file: PathBuf,
        /// The tenant its requests are charged to and take turns as.
        #[arg(long)]
        tenant: String,
        /// A model it may name (a pin, `provider/model` or `llmq/auto`); repeat for several.
        /// None: any.
        #[arg(long = "model")]
        models: Vec<String>,
        /// The most urgent priority it may ask for, 0 (most urgent) to 9; its requests get
        /// it when they ask for none.
        #[arg(long)]
        highest_priority: Option<u8>,
        /// The requests it may make a clock minute, across every replica; past it the server
        /// answers 429 with `retry-after` (the caller's SDK waits and sends it again). None:
        /// no limit.
        #[arg(long)]
        requests_per_minute: Option<u32>,
        /// A tag every task it sends carries, NAME=VALUE (e.g. team=search); repeat it, up
        /// to 8. `llmq costs --by tag:NAME` reports by it.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// The keys of the file: ids, tenants, models and priorities, nothing secret.
    List {
        #[arg(long, env = "LLMQ_SERVE_KEYS")]
        file: PathBuf,
    },
    /// Remove a key (a running server stops taking it within a second).
    Revoke {
        #[arg(long, env = "LLMQ_SERVE_KEYS")]
        file: PathBuf,
        /// The key's id, as `list` shows it.
        id: String,
    },
}

#[derive(Args, Debug)]
pub struct QueueCmd {
    #[command(subcommand)]
    pub command: QueueCommand,
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Every worker stops taking the queue's tasks within a second; tasks in flight finish,
    /// and new ones wait in the queue until `resume`.
    Pause {
        #[arg(value_parser = queue_name)]
        queue: String,
        /// Why, shown by `llmq status` and the web page.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Workers take the queue's tasks again.
    Resume {
        #[arg(value_parser = queue_name)]
        queue: String,
    },
}

#[derive(Args, Debug)]
pub struct WorkerCmd {
    #[command(subcommand)]
    pub command: WorkerCommand,
}

#[derive(Subcommand, Debug)]
pub enum WorkerCommand {
    /// Every worker heard from within the hour: queues, version, tasks held, calls under
    /// way, heartbeat; silent ones marked.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The worker takes no new task (within its next heartbeat, 5 s) and finishes those it
    /// holds; it stays up, drained, until `resume` or its shutdown.
    Drain {
        /// The worker's id, as `llmq worker list` shows it.
        id: String,
    },
    /// A drained worker takes tasks again.
    Resume { id: String },
}

#[derive(Args, Debug)]
pub struct WebArgs {
    /// Where to listen; loopback by default (reach it with `kubectl port-forward`, or put
    /// your own ingress and authentication in front).
    #[arg(long, env = "LLMQ_WEB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// The scheduler namespace whose status the overview shows.
    #[arg(long, env = "LLMQ_SCHEDULER_NAMESPACE")]
    pub scheduler_namespace: Option<String>,
    /// The token a person signs in with to approve, reject, replay, purge, pause and resume;
    /// without it the page is read-only.
    #[arg(long, env = "LLMQ_WEB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The provider file, for each provider's state and quota bars (its API keys are not
    /// read).
    #[arg(long, env = "LLMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// The ledger, for the costs page.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Exit 0 when a server on --listen answers, 1 when not (a probe for Kubernetes).
    #[arg(long)]
    pub health_check: bool,
}

#[derive(Args, Debug)]
pub struct ChainCmd {
    #[command(subcommand)]
    pub command: ChainCommand,
}

#[derive(Subcommand, Debug)]
pub enum ChainCommand {
    /// Submit a chain (a JSON file, or - for stdin) and print its id (with --wait, each
    /// step as it ends and then the chain's outcome).
    Submit {
        file: PathBuf,
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        /// Fills `{{NAME}}` in the chain's prompts; repeat for several.
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// Wait until the chain ends.
        #[arg(long)]
        wait: bool,
        /// With --wait, give up after this long (exit 1).
        #[arg(long, value_parser = humantime::parse_duration)]
        wait_timeout: Option<std::time::Duration>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Show a chain's state and each step.
    Show {
        chain_id: String,
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Cancel a running chain: its steps not yet ended never run.
    Cancel {
        chain_id: String,
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
    },
    /// Run an ended chain's failed and cancelled steps again (with --from, that step and
    /// every step after it); steps that succeeded keep their outputs.
    Retry {
        chain_id: String,
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        /// Rerun this step and its descendants, whatever their state.
        #[arg(long)]
        from: Option<String>,
    },
    /// List the chain steps awaiting a person's approval, soonest deadline first.
    Pending {
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Approve a step awaiting approval; the chain goes on. A step is decided once.
    Approve {
        chain_id: String,
        step: String,
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        /// Recorded as the step's summary.
        #[arg(long)]
        note: Option<String>,
    },
    /// Reject a step awaiting approval; it fails like any step. A step is decided once.
    Reject {
        chain_id: String,
        step: String,
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        /// Why, recorded as the step's error.
        #[arg(long)]
        reason: String,
    },
    /// List the queue's chains, newest first.
    List {
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        /// Only chains in this state: running, succeeded, failed or cancelled.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Args, Debug)]
pub struct QuotaArgs {
    /// The provider file.
    #[arg(long, env = "LLMQ_CONFIG")]
    pub config: PathBuf,
    /// Show closed windows from Postgres (recorded by the scheduler) instead.
    #[arg(long)]
    pub history: bool,
    /// With --history, only this provider.
    #[arg(long, requires = "history")]
    pub provider: Option<String>,
    /// A tenant's limits too (those the file names are always shown); repeat it for more.
    #[arg(long, value_parser = parse_tenant, conflicts_with = "history")]
    pub tenant: Vec<String>,
    /// With --history: the ledger.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct Providers {
    #[command(subcommand)]
    pub command: ProvidersCommand,
}

#[derive(Subcommand, Debug)]
pub enum ProvidersCommand {
    /// Validate the provider file; print every problem as file:key: problem; fix.
    Check {
        #[arg(long, env = "LLMQ_CONFIG")]
        config: PathBuf,
    },
    /// List the configured models.
    List {
        #[arg(long, env = "LLMQ_CONFIG")]
        config: PathBuf,
        /// Only models with this capability.
        #[arg(long, value_parser = parse_capability)]
        capability: Option<llmq_shared::config::Capability>,
        /// Only models of this tier (fast, standard, advanced).
        #[arg(long, value_parser = parse_tier)]
        tier: Option<llmq_shared::config::Tier>,
        /// Only models whose input plus output price is at most this many USD per million tokens.
        #[arg(long)]
        max_cost: Option<f64>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct Submit {
    /// The prompt; `-` reads it from standard input.
    #[arg(long)]
    pub prompt: String,
    /// A system prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// The task type.
    #[arg(long = "type", value_parser = parse_type, default_value = "data_analysis")]
    pub task_type: TaskType,
    /// Run on this provider (a name from the provider file).
    #[arg(long)]
    pub platform: Option<String>,
    /// Run on this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Run only on the provider the task names (or the first the routing picks): fail with
    /// its error rather than fall back to another.
    #[arg(long)]
    pub no_fallback: bool,
    /// Group the task under a chain id for cost reports.
    #[arg(long)]
    pub chain_id: Option<String>,
    /// How urgent: 0 (the default, most urgent) to 9 (least). Within a queue, a ready task
    /// of a lower number runs before any of a higher one.
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..=9))]
    pub priority: Option<i64>,
    /// Whose work this is (a customer, a team): within a priority, tenants with work are
    /// served in turn.
    #[arg(long)]
    pub tenant: Option<String>,
    /// A tag the ledger keeps with the task and its calls, as NAME=VALUE (e.g. team=search);
    /// repeat it, up to 8. `llmq costs --by tag:NAME` reports by it.
    #[arg(long = "tag", value_name = "NAME=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Seconds one attempt may take.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Attempts before the task becomes a dead letter.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Run no sooner than this from now, e.g. 30s or 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,
    /// Cap on output tokens.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Answer from the answer cache when an identical request was answered within this
    /// long (e.g. 24h; 1s to 30d), and keep this answer as long. Needs --temperature 0, or
    /// --cache-sampled.
    #[arg(long, value_name = "TTL")]
    pub cache: Option<String>,
    /// With --cache: keep a sampled answer too (temperature unset or above 0).
    #[arg(long, requires = "cache")]
    pub cache_sampled: bool,
    /// Never answer from the answer cache, nor keep this answer (not even the queue's).
    #[arg(long, conflicts_with = "cache")]
    pub no_cache: bool,
    /// Run once per key (on the queue, for the tenant): submitting again with the same key,
    /// while the first runs or within its window after it succeeded, gives the first's
    /// answer without a call. A first that failed frees the key.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// With --idempotency-key: how long after the first succeeded its answer is given
    /// (e.g. 1h; 1s to 30d). Default: the queue's (provider file `idempotency:`), else 24h.
    #[arg(long, value_name = "WINDOW", requires = "idempotency_key")]
    pub idempotency_window: Option<String>,
    /// Free JSON kept with the task.
    #[arg(long, value_parser = parse_json)]
    pub metadata: Option<serde_json::Value>,
    #[arg(long, default_value = "default", value_parser = queue_name)]
    pub queue: String,
    /// Write the output (or, with --format json, the whole result) to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Block until the task finishes and print its result.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: the provider streams the answer, and it is printed as it is written,
    /// before the result.
    #[arg(long, requires = "wait")]
    pub stream: bool,
    /// With --wait, give up after this long (exit 1).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait_timeout: Option<Duration>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct Batch {
    /// The tasks: a JSON array, or JSON Lines (one task a line), each with prompt (or
    /// messages), type, platform, model, timeout, metadata, system, tools, tool_choice,
    /// response_format, custom_id, ...; or an OpenAI Batch file (chat completions), or an
    /// Anthropic Message Batches file or body, whose results come back in the same
    /// provider's batch output shape; `-` reads standard input, enqueuing as it comes.
    #[arg(long)]
    pub input: PathBuf,
    /// Names the batch: each task's id and idempotency key are made of it and the task's
    /// custom_id (else its place), and a rerun with the same id after an interrupted enqueue
    /// enqueues only what did not go in. Default: a new id, printed.
    #[arg(long, value_name = "ID", value_parser = parse_batch_id)]
    pub batch_id: Option<String>,
    /// Write the batch report here (with --wait) or the task ids (without); for an OpenAI or
    /// Anthropic batch file with --wait, its results in that provider's batch output shape
    /// (JSON Lines); a directory
    /// (an existing one, or a path ending in `/`) gets `batch_<timestamp>.json` inside.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long, default_value = "default", value_parser = queue_name)]
    pub queue: String,
    /// At most this many of the batch's tasks run at once, across every worker.
    #[arg(long, value_parser = parse_parallel)]
    pub parallel: Option<u32>,
    /// How urgent every task is (a task's own `priority` wins): 0 (the default, most urgent) to 9 (least). Within a queue, a ready task
    /// of a lower number runs before any of a higher one.
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..=9))]
    pub priority: Option<i64>,
    /// Whose work the tasks are (a task's own `tenant` wins) (a customer, a team): within a priority, tenants with work are
    /// served in turn.
    #[arg(long)]
    pub tenant: Option<String>,
    /// A tag for every task, as NAME=VALUE; repeat it. A line's own `tags` win, name by name.
    #[arg(long = "tag", value_name = "NAME=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// The tasks can wait this long (default 24h, at least 24h): they go through the
    /// providers' batch APIs at the batch price where the provider file allows
    /// (`deadline` on each task; a task's own `deadline` wins).
    #[arg(long, num_args = 0..=1, default_missing_value = "24h", value_name = "DEADLINE")]
    pub provider_batch: Option<String>,
    /// Let tasks fall back to other providers when theirs fails (as the provider file says).
    #[arg(long, overrides_with = "no_fallback")]
    pub fallback: bool,
    /// Tasks run only on the provider they name (or the first the routing picks), or fail.
    #[arg(long, overrides_with = "fallback")]
    pub no_fallback: bool,
    /// Routing chooses each task's provider and model: the model (and platform) a line names
    /// is not pinned. For an OpenAI or Anthropic batch file, whose lines all name a model.
    #[arg(long)]
    pub route: bool,
    /// The provider file, to estimate the batch's requests, tokens and cost per provider and
    /// warn before it pushes a quota past 90 %.
    #[arg(long, env = "LLMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// Enqueue even when the estimate warns about a quota (without a terminal, a warning
    /// otherwise stops the batch with exit code 2).
    #[arg(long)]
    pub yes: bool,
    /// Print the estimate and enqueue nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Block until every task finishes, showing progress, then print a summary.
    #[arg(long)]
    pub wait: bool,
    /// With --wait, give up after this long (exit 1).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait_timeout: Option<Duration>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct ResultArgs {
    /// The task's id, as `llmq submit` printed it.
    #[arg(value_parser = parse_task_id)]
    pub task_id: TaskId,
    #[arg(long, default_value = "default", value_parser = queue_name)]
    pub queue: String,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["task_ids", "batch", "tenant"])))]
pub struct CancelArgs {
    /// The tasks' ids, as `llmq submit` printed them.
    #[arg(value_parser = parse_task_id)]
    pub task_ids: Vec<TaskId>,
    /// Every task of this batch (the tasks' `batch_id`, as `llmq batch` printed it).
    #[arg(long, value_parser = parse_batch_id)]
    pub batch: Option<String>,
    /// This tenant's tasks enqueued until now; its later ones run.
    #[arg(long, value_parser = parse_tenant)]
    pub tenant: Option<String>,
    #[arg(long, default_value = "default", value_parser = queue_name)]
    pub queue: String,
    /// Say what would be cancelled, and cancel nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Queues to show; default: every queue a worker has served.
    #[arg(long = "queue", value_parser = queue_name)]
    pub queues: Vec<String>,
    /// The provider file, to check each provider.
    #[arg(long, env = "LLMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// The scheduler namespace to show (as given to `llmq-scheduler --namespace`).
    #[arg(long, env = "LLMQ_SCHEDULER_NAMESPACE")]
    pub scheduler_namespace: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct Dlq {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters, newest first.
    List {
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Show the dead letters the scheduler archived to Postgres.
        #[arg(long)]
        archived: bool,
        /// With --archived: the ledger.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Show one dead letter in full (by dead-letter id or task id).
    Show {
        id: String,
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Re-enqueue dead letters with their attempts reset.
    Replay {
        /// Dead-letter ids or task ids.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Replay every dead letter of the queue.
        #[arg(long)]
        all: bool,
        /// Send the replayed tasks to this provider.
        #[arg(long)]
        platform: Option<String>,
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
        /// Where archived dead letters are: ids not in Redis are looked up there.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
    },
    /// Delete dead letters.
    Purge {
        /// Dead-letter ids or task ids.
        #[arg(required_unless_present = "older_than", conflicts_with = "older_than")]
        ids: Vec<String>,
        /// Delete those that died longer ago than this, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        #[arg(long, default_value = "default", value_parser = queue_name)]
        queue: String,
    },
}

#[derive(Args, Debug)]
pub struct InsightsCmd {
    #[command(subcommand)]
    pub command: Insights,
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Only tasks finished since this UTC day (YYYY-MM-DD).
    #[arg(long, value_parser = parse_date, global = true)]
    pub since: Option<chrono::NaiveDate>,
    /// Only this tenant's tasks (the envelope's `tenant`).
    #[arg(long, value_parser = parse_tenant, global = true)]
    pub tenant: Option<String>,
    #[arg(long, value_enum, default_value_t, global = true)]
    pub format: Format,
}

#[derive(Subcommand, Debug)]
pub enum Insights {
    /// Success rate, cost and latency by model and task type.
    Summary,
    /// The models that did a task type, best success first.
    Rankings {
        /// The task type (e.g. code_review).
        task_type: String,
        /// Only tasks of this risk: low, medium or high.
        #[arg(long, value_parser = |s: &str| s.parse::<llmq_shared::envelope::Risk>())]
        risk: Option<llmq_shared::envelope::Risk>,
    },
    /// Switches that would save money at similar success, with the saving per task and the
    /// evidence.
    Optimize {
        /// How much lower the cheaper model's success may be, as a share (0.02: two points).
        #[arg(long, default_value_t = 0.02, value_parser = parse_share)]
        tolerance: f64,
        /// The fewest tasks a model needs on the type to be proposed.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..))]
        min_tasks: i64,
    },
    /// One model, by task type.
    Model {
        /// The model id.
        id: String,
    },
    /// What another strategy would have achieved on the routes a learned strategy logged:
    /// success and cost per task, estimated by inverse propensity weighting.
    Replay {
        /// The strategy to judge: cheapest, performance, cost, balanced or learning (without
        /// exploring).
        #[arg(long, value_parser = |s: &str| s.parse::<llmq_shared::config::Strategy>())]
        strategy: llmq_shared::config::Strategy,
        /// The provider file: the models' prices and `routing`'s tolerance and prior.
        #[arg(long, env = "LLMQ_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct Migrate {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

/// What `llmq costs --by` groups by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum By {
    Provider,
    Model,
    Type,
    Day,
    Chain,
    Tenant,
    /// `tag:NAME`: the value of the tag NAME.
    Tag(String),
}

impl By {
    /// The report's column header.
    pub fn header(&self) -> String {
        match self {
            By::Tag(name) => format!("TAG {name}"),
            other => format!("{other:?}").to_uppercase(),
        }
    }
}

fn parse_by(s: &str) -> Result<By, String> {
    Ok(match s {
        "provider" => By::Provider,
        "model" => By::Model,
        "type" => By::Type,
        "day" => By::Day,
        "chain" => By::Chain,
        "tenant" => By::Tenant,
        _ => match s.strip_prefix("tag:") {
            Some(name) => {
                let tag = std::collections::BTreeMap::from([(name.to_owned(), "-".to_owned())]);
                llmq_shared::envelope::check_tags(&tag).map_err(|e| e.to_string())?;
                By::Tag(name.to_owned())
            }
            None => {
                return Err(format!(
                    "`{}` is not a grouping; group by provider, model, type, day, chain, tenant or tag:NAME (e.g. tag:team)",
                    s.escape_debug()
                ));
            }
        },
    })
}

#[derive(Args, Debug)]
pub struct Costs {
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// One UTC day, YYYY-MM-DD.
    #[arg(long, value_parser = parse_date, conflicts_with_all = ["since", "until"])]
    pub date: Option<chrono::NaiveDate>,
    /// From this UTC day on (YYYY-MM-DD).
    #[arg(long, value_parser = parse_date)]
    pub since: Option<chrono::NaiveDate>,
    /// Up to and including this UTC day (YYYY-MM-DD).
    #[arg(long, value_parser = parse_date)]
    pub until: Option<chrono::NaiveDate>,
    /// One chain's costs.
    #[arg(long, conflicts_with = "batch")]
    pub chain_id: Option<String>,
    /// One batch's costs (`llmq batch`'s id): its finished tasks and their calls.
    #[arg(long, value_name = "BATCH_ID", value_parser = parse_batch_id)]
    pub batch: Option<String>,
    /// One tenant's costs (the envelope's `tenant`).
    #[arg(long, value_parser = parse_tenant, conflicts_with_all = ["chain_id", "batch"])]
    pub tenant: Option<String>,
    /// Group the costs by provider, model, type, day, chain, tenant or tag:NAME (the value
    /// of the tag NAME, e.g. tag:team); by chain, the costliest chains begun in the range,
    /// each with its whole cost. By tenant or tag, the line `(none)` is the work without one.
    #[arg(long, value_parser = parse_by, default_value = "provider")]
    pub by: By,
    /// With --by chain: how many chains to list, the costliest first.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// A task id is a UUID: never a pattern.
fn parse_task_id(s: &str) -> Result<TaskId, String> {
    s.parse()
        .map_err(|e: llmq_shared::ids::BadId| e.to_string())
}

/// `NAME=VALUE`, checked as a task's `tags` are.
fn parse_tag(s: &str) -> Result<(String, String), String> {
    let Some((name, value)) = s.split_once('=') else {
        return Err(format!(
            "`{}` is not a tag; write it as NAME=VALUE, e.g. team=search",
            s.escape_debug()
        ));
    };
    let tag = std::collections::BTreeMap::from([(name.to_owned(), value.to_owned())]);
    llmq_shared::envelope::check_tags(&tag)
        .map(|()| (name.to_owned(), value.to_owned()))
        .map_err(|e| e.to_string())
}

fn parse_tenant(s: &str) -> Result<String, String> {
    llmq_shared::envelope::check_class(None, Some(s))
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_batch_id(s: &str) -> Result<String, String> {
    llmq_shared::envelope::check_batch_id(s)
        .map(|()| s.to_owned())
        .map_err(|e| format!("a batch id {e}"))
}

fn parse_parallel(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "`{s}` is not a number of tasks; --parallel takes how many of the batch's tasks may run at once, at least 1"
        )),
    }
}

fn parse_type(s: &str) -> Result<TaskType, String> {
    s.parse()
        .map_err(|e: llmq_shared::envelope::Error| e.to_string())
}

fn parse_capability(s: &str) -> Result<llmq_shared::config::Capability, String> {
    use llmq_shared::config::Capability;
    Capability::ALL
        .into_iter()
        .find(|c| c.as_str() == s)
        .ok_or_else(|| {
            format!(
                "unknown capability `{s}`; use one of: {}",
                Capability::ALL.map(Capability::as_str).join(", ")
            )
        })
}

fn parse_tier(s: &str) -> Result<llmq_shared::config::Tier, String> {
    use llmq_shared::config::Tier;
    [Tier::Fast, Tier::Standard, Tier::Advanced]
        .into_iter()
        .find(|t| t.as_str() == s)
        .ok_or_else(|| format!("unknown tier `{s}`; use fast, standard or advanced"))
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
}

/// A share between 0 and 1.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a share between 0 and 1; write e.g. 0.02 for two points"
        )),
    }
}

fn parse_date(s: &str) -> Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| format!("`{s}` is not a date; write it as YYYY-MM-DD"))
}
