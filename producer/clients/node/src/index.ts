export { connect, checkQueueName, Queue, CHAINS_KEPT, DEAD_SCAN, MAX_DEAD_LETTERS } from './client.js';
export type {
  AnswerEvent,
  CancelOptions,
  CancelOutcome,
  ConnectOptions,
  DeadLetter,
  FollowAnswerOptions,
  Replayed,
  WaitOptions,
} from './client.js';
export { replayedTask } from './replay.js';
export { buildEnvelope, parseDuration, DEFAULT_MAX_PAYLOAD_BYTES, RESERVED_FIELDS, TASK_FIELDS, TASK_TYPES } from './envelope.js';
export type {
  CacheAsk,
  ContentPart,
  ImageType,
  JsonObject,
  Message,
  ResponseFormat,
  Risk,
  Role,
  Task,
  TaskRecord,
  TaskType,
  Tier,
  Tool,
  ToolCall,
  ToolChoice,
} from './envelope.js';
export { buildChain, CHAIN_FIELDS, STEP_DEFAULT_FIELDS, STEP_FIELDS } from './chain.js';
export type { Chain, ChainEvent, ChainState, Step, StepFields, StepState } from './chain.js';
export { LlmqError } from './errors.js';
export type { LlmqErrorCode } from './errors.js';
export { parseRedisUrl } from './url.js';
export type { HostPort, RedisTarget } from './url.js';
export { chainKeyId, deriveId } from './uuid.js';
