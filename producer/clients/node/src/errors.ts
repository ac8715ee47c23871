/** What kind of problem an {@link LlmqError} is. */
export type LlmqErrorCode =
  /** A task, chain, queue name, id or option the worker would refuse: nothing was written. */
  | 'invalid'
  /** REDIS_URL is not one llmq reads. */
  | 'url'
  /** Redis could not be reached (or the connection broke). */
  | 'redis'
  /** Redis answered a command with an error (WRONGTYPE, OOM, READONLY, NOPERM, ...). */
  | 'redis_reply'
  /** Something read from Redis is not what llmq writes there (a result record, a chain's state). */
  | 'bad_record'
  /** A wait or a follow passed its timeout; the task or chain may still finish later. */
  | 'timeout'
  /** No such dead letter, or a chain that is gone. */
  | 'not_found'
  /** Something llmq refuses to do for a good reason (a chain step's dead letter, an invalid chain). */
  | 'refused';

/** Every error the client throws on purpose: its message is a sentence saying what to do. */
export class LlmqError extends Error {
  readonly code: LlmqErrorCode;
  /**
   * For a batch that failed partway ({@link Queue.enqueueMany}): the ids of the tasks that
   * were enqueued before it failed, in order (they will run); the rest were not.
   */
  enqueued?: readonly string[];

  constructor(code: LlmqErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'LlmqError';
    this.code = code;
  }
}

export function invalid(message: string): LlmqError {
  return new LlmqError('invalid', message);
}
