// BullMQ's side of the comparison in docs/benchmarks.md, on the same Redis as llmq-bench.
//
//   node bench.mjs noop      50,000 jobs, a processor that returns at once, concurrency 100
//   node bench.mjs inflight  40,000 jobs, a processor that awaits a 2 s timer, concurrency 10,000
//
// Prints one line in llmq-bench's format. Redis CPU is `used_cpu_sys + used_cpu_user` from
// INFO over the timed window, per job; RSS per job in flight is this process's peak resident
// memory over its memory just before the worker started, divided by the concurrency. Every
// job must complete. The queue is obliterated afterwards.
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';

const mode = process.argv[2] ?? 'noop';
const shapes = {
  noop: { jobs: 50000, concurrency: 100, latencyMs: 0 },
  inflight: { jobs: 40000, concurrency: 10000, latencyMs: 2000 },
};
const shape = shapes[mode];
if (!shape) {
  console.error(`unknown benchmark ${mode}; use noop or inflight`);
  process.exit(2);
}
const jobs = Number(process.env.JOBS ?? shape.jobs);
const concurrency = Number(process.env.CONCURRENCY ?? shape.concurrency);
const latencyMs = Number(process.env.LATENCY_MS ?? shape.latencyMs);
const url = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';

const connection = new IORedis(url, { maxRetriesPerRequest: null });
const probe = new IORedis(url);
const name = `bullmq-bench-${Math.random().toString(16).slice(2, 10)}`;
const queue = new Queue(name, { connection });

async function redisCpu() {
  const info = await probe.info('cpu');
  const field = (k) => Number(info.match(new RegExp(`${k}:([0-9.]+)`))[1]);
  return field('used_cpu_sys') + field('used_cpu_user');
}

for (let i = 0; i < jobs; i += 1000) {
  const batch = [];
  for (let j = i; j < Math.min(i + 1000, jobs); j++) {
    batch.push({ name: 'task', data: { prompt: `task ${j}` } });
  }
  await queue.addBulk(batch);
}

const idleRss = process.memoryUsage().rss;
let peakRss = idleRss;
const sampler = setInterval(() => {
  peakRss = Math.max(peakRss, process.memoryUsage().rss);
}, 100);

let completed = 0;
let failed = 0;
const cpu0 = await redisCpu();
const t0 = process.hrtime.bigint();
const workerConnection = new IORedis(url, { maxRetriesPerRequest: null });
const done = new Promise((resolve) => {
  const worker = new Worker(
    name,
    async (job) => {
      if (latencyMs > 0) await new Promise((r) => setTimeout(r, latencyMs));
      return `answer to ${job.data.prompt}`;
    },
    { connection: workerConnection, concurrency },
  );
  worker.on('completed', () => {
    completed += 1;
    if (completed + failed === jobs) resolve(worker);
  });
  worker.on('failed', () => {
    failed += 1;
    if (completed + failed === jobs) resolve(worker);
  });
});
const worker = await done;
const secs = Number(process.hrtime.bigint() - t0) / 1e9;
const cpu1 = await redisCpu();
clearInterval(sampler);
await worker.close();
await queue.obliterate({ force: true });
await queue.close();
await Promise.all([connection.quit(), workerConnection.quit(), probe.quit()]);

if (failed > 0 || completed !== jobs) {
  console.error(`${failed} of ${jobs} jobs failed`);
  process.exit(1);
}
const perS = jobs / secs;
const fields = [
  `bench=bullmq_${mode}`,
  `jobs=${jobs}`,
  `concurrency=${concurrency}`,
  `latency_ms=${latencyMs}`,
  `jobs_per_s=${perS.toFixed(0)}`,
];
if (latencyMs > 0) {
  const ideal = (concurrency * 1000) / latencyMs;
  fields.push(`ideal_per_s=${ideal.toFixed(0)}`, `efficiency_pct=${((100 * perS) / ideal).toFixed(1)}`);
}
fields.push(
  `redis_cpu_us_per_job=${(((cpu1 - cpu0) * 1e6) / jobs).toFixed(1)}`,
  `rss_kib_per_inflight=${((peakRss - idleRss) / 1024 / concurrency).toFixed(2)}`,
  `secs=${secs.toFixed(3)}`,
  `bullmq=6.7.0 node=${process.version}`,
);
console.log(fields.join(' '));
