// Type-checked with `tsc --noEmit -p test/tsconfig.json` (never run): the published types, as a
// user's TypeScript sees them through the package's `exports`. A `@ts-expect-error` line
// fails the check when the types let a wrong use through.
import {
  chainKeyId,
  connect,
  LlmqError,
  type AnswerEvent,
  type CacheAsk,
  type CancelOptions,
  type CancelOutcome,
  type ChainEvent,
  type DeadLetter,
  type Task,
  type TaskRecord,
} from '@llmq/client';

export async function usage(): Promise<void> {
  const q = await connect({ url: 'redis+cluster://127.0.0.1:7000', queue: 'default' });
  const task: Task = {
    prompt: 'Summarise this',
    model: 'mock-fast',
    priority: 3,
    tenant: 'acme',
    stream: true,
    run_at: new Date(),
    messages: [{ role: 'user', content: [{ type: 'text', text: 'earlier' }] }],
    response_format: { type: 'json_schema', schema: { type: 'object' } },
    tool_choice: { name: 'lookup' },
    tools: [{ name: 'lookup', parameters: { type: 'object' } }],
    prompt_cache: false,
  };
  const id: string = await q.enqueue(task);
  const ids: string[] = await q.enqueueMany([task, { messages: [{ role: 'user', content: 'hi' }] }]);
  let answerText = '';
  for await (const e of q.followAnswer(id, { timeoutMs: 5000 })) {
    const event: AnswerEvent = e;
    if (e.type === 'text') answerText += e.text;
    else answerText = `(restarted: ${e.error}) `;
    void event;
  }
  void answerText;
  // @ts-expect-error the restart is an event of the loop, not a callback
  q.followAnswer(id, { onRestart: (why: string) => void why });
  for await (const e of q.followAnswer(id)) {
    // @ts-expect-error an event is not a string: its text is under `text`
    const piece: string = e;
    void piece;
  }
  const record: TaskRecord = await q.waitForResult(id);
  const status: 'queued' | 'delayed' | 'running' | 'succeeded' | 'failed' | 'dead' | 'cancelled' = record.status;
  const cached: boolean | undefined = record.cached;
  const cachedFrom: string | undefined = record.cached_from;
  const duplicateOf: string | undefined = record.duplicate_of;
  await q.enqueue({ prompt: 'x', idempotency_key: 'order-42', idempotency_window: '1h' });
  await q.enqueue({ prompt: 'x', idempotency_key: 'order-42', idempotency_window: null });
  await q.enqueue({ prompt: 'x', batch_id: 'batch-2030-01-02' });
  await q.enqueue({ prompt: 'x', batch_id: null });
  const keep: CacheAsk = { ttl: '24h', sampled: true };
  await q.enqueue({ prompt: 'x', temperature: 0, cache: { ttl: '10m' } });
  await q.enqueue({ prompt: 'x', cache: keep });
  await q.enqueue({ prompt: 'x', cache: false });
  const records: TaskRecord[] = await q.waitForResults(ids, { timeoutMs: 1000, pollMs: 50 });

  const chainId = await q.submitChain({
    chain_id: 'release-42',
    on_failure: 'fail_chain',
    vars: { input: 'x' },
    defaults: { model: 'mock-fast', timeout: '5m' },
    steps: [
      { name: 'plan', prompt: 'Plan {{input}}' },
      { name: 'review', kind: 'review', after: ['plan'], on_reject: { rerun: 'plan', max_rounds: 2 } },
    ],
  });
  const keyed: string = await q.submitChain({ idempotency_key: 'release-42', tenant: 'acme', steps: [{ name: 'plan', prompt: 'x' }] });
  const derived: string = chainKeyId('default', 'acme', 'release-42');
  void [keyed, derived];
  for await (const e of q.followChain(chainId)) {
    const event: ChainEvent = e;
    if (e.type === 'step') void e.state.status;
    else void (e.state satisfies 'running' | 'succeeded' | 'failed' | 'cancelled');
    void event;
  }
  const dead: DeadLetter[] = await q.deadLetters({ limit: 10 });
  const replayed = await q.replay(dead[0]!.id, { provider: 'mock' });
  const how: 'enqueued' | 'gone' = replayed.status;
  const cancelling: CancelOptions = { taskIds: [id, ...ids], batch: 'batch-2030-01-02', tenant: 'acme' };
  const cancelled: Record<string, CancelOutcome> = await q.cancel(cancelling);
  const outcome: 'cancelled' | 'succeeded' | 'failed' | 'dead' | undefined = cancelled[`task:${id}`];
  const asText: Record<string, string> = await q.cancel({ tenant: 'acme' });
  void [outcome, asText];
  // @ts-expect-error taskIds is an array of ids
  await q.cancel({ taskIds: id });
  // @ts-expect-error a misspelt option
  await q.cancel({ taskId: id });
  try {
    await q.queue('other').enqueue({ prompt: 'x' });
  } catch (e) {
    if (e instanceof LlmqError) {
      void (e.code satisfies 'invalid' | 'url' | 'redis' | 'redis_reply' | 'bad_record' | 'timeout' | 'not_found' | 'refused');
      const enqueued: readonly string[] | undefined = e.enqueued;
      void enqueued;
    }
  }
  void [status, records, how, cached, cachedFrom, duplicateOf];

  // @ts-expect-error prompt_cache is true or false
  await q.enqueue({ prompt: 'x', prompt_cache: 'off' });
  // @ts-expect-error cache: true needs a ttl: write { ttl: '24h' }
  await q.enqueue({ prompt: 'x', cache: true });
  // @ts-expect-error a cache has a ttl and sampled, nothing else
  await q.enqueue({ prompt: 'x', cache: { ttl: '1h', keep: true } });
  // @ts-expect-error a ttl is a duration as text
  await q.enqueue({ prompt: 'x', cache: { ttl: 3600 } });
  // @ts-expect-error a window is a duration as text
  await q.enqueue({ prompt: 'x', idempotency_key: 'k', idempotency_window: 3600 });
  // @ts-expect-error a key is text
  await q.enqueue({ prompt: 'x', idempotency_key: 42 });
  // @ts-expect-error a batch id is text
  await q.enqueue({ prompt: 'x', batch_id: 7 });
  // @ts-expect-error a chain's key is text
  await q.submitChain({ idempotency_key: 42, steps: [{ name: 'a', prompt: 'x' }] });
  // @ts-expect-error priority is a number
  await q.enqueue({ prompt: 'x', priority: '1' });
  // @ts-expect-error a misspelt field
  await q.enqueue({ prompt: 'x', modle: 'mock-fast' });
  // @ts-expect-error workers set attempts
  await q.enqueue({ prompt: 'x', attempts: 2 });
  // @ts-expect-error not a task type
  await q.enqueue({ prompt: 'x', type: 'poetry' });
  // @ts-expect-error not a role
  await q.enqueue({ messages: [{ role: 'robot', content: 'hi' }] });
  // @ts-expect-error a chain needs steps
  await q.submitChain({ chain_id: 'x' });
  // @ts-expect-error not a step kind
  await q.submitChain({ steps: [{ name: 'a', kind: 'poll' }] });
  await q.close();
}
