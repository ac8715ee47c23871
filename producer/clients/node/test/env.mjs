// What the Redis tests are given by their driver, tests/tests/e2e/client_node.rs, which starts
// real workers: run them with `cargo test -p llmq-tests --test e2e client_node`.
import { createClient } from 'redis';

/** The environment variable `name`; its absence fails the test with how to run it. */
export function need(name) {
  const v = process.env[name];
  if (!v) {
    throw new Error(
      `${name} is not set; these tests need a worker, which their driver starts: cargo test -p llmq-tests --test e2e client_node`,
    );
  }
  return v;
}

/** A plain node-redis client on one Redis, for looking behind the client's back. */
export async function raw(url) {
  const c = createClient({ url });
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

/** Waits until `f()` is truthy (a look every 100 ms, at most `ms`), and returns it. */
export async function eventually(what, f, ms = 30_000) {
  const end = performance.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (performance.now() > end) throw new Error(`${what} did not happen within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
