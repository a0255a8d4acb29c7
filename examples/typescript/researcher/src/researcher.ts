// baton's researcher agent in TypeScript, doing what examples/agents/researcher.rs does:
// consume mcp.handover.researcher in a consumer group, skip handovers already answered,
// fetch the memory snapshot from the signed URL, heartbeat while working, and write the
// memory it learned (memory.upserted on mcp.memory) and tool.research_enrich.completed
// with token usage on mcp.events.all, then commit the handover's offset. Answers carry an
// event_id derived from the handover_id, so a re-delivered handover is applied once.
//
// No model is called: the reply is deterministic simulated text (from the handover id),
// counted with cl100k, the tokenizer baton debits budgets with. The one place a real
// model call goes is marked "THE MODEL CALL GOES HERE".
//
// Events are written the way JavaScript code naturally writes them: `occurred_at` is
// `Date.now()` (epoch milliseconds), which baton accepts as well as RFC 3339.

import { createHash } from "node:crypto";
import { getEncoding } from "js-tiktoken";
import { Kafka, Partitioners, logLevel, Producer, Consumer, KafkaMessage } from "kafkajs";

// ---------------------------------------------------------------------------- flags

interface Options {
  bootstrapServers: string;
  instanceId: string;
  groupId: string;
  handoverTopic: string;
  outputTopic: string;
  memoryTopic: string;
  workMs: number;
  heartbeatIntervalMs: number;
  dedupCapacity: number;
  retryAttempts: number;
  retryBackoffMs: number;
  retryMaxBackoffMs: number;
  snapshotTimeoutMs: number;
  maxSnapshotBytes: number;
  words: number;
}

const USAGE = `usage: node dist/researcher.js --bootstrap-servers HOST:PORT [flags]
  --instance-id ID            names this copy in logs and its client id (default 0)
  --group-id GROUP            consumer group (default agent-researcher)
  --handover-topic TOPIC      (default mcp.handover.researcher)
  --output-topic TOPIC        completions and heartbeats (default mcp.events.all)
  --memory-topic TOPIC        (default mcp.memory)
  --work-ms N                 simulated model latency (default 200)
  --heartbeat-interval-ms N   agent.heartbeat while working (default 1000)
  --dedup-capacity N          answered handover ids remembered (default 10000)
  --retry-attempts N          broker and snapshot calls before giving up (default 6)
  --retry-backoff-ms N        first pause, doubling (default 100)
  --retry-max-backoff-ms N    longest pause (default 5000)
  --snapshot-timeout-ms N     one snapshot request (default 5000)
  --max-snapshot-bytes N      larger snapshots fail the call (default 1048576)
  --words N                   words in each simulated reply (default 60)
Each flag also reads BATON_AGENT_<FLAG> (e.g. BATON_AGENT_WORK_MS), and
--bootstrap-servers reads BATON_BOOTSTRAP_SERVERS.`;

function parseOptions(argv: string[]): Options {
  const values = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "-h" || arg === "--help") {
      console.log(USAGE);
      process.exit(0);
    }
    if (!arg.startsWith("--")) fail(`unexpected argument ${arg}\n${USAGE}`);
    const eq = arg.indexOf("=");
    if (eq > 0) {
      values.set(arg.slice(2, eq), arg.slice(eq + 1));
    } else {
      const value = argv[++i];
      if (value === undefined) fail(`${arg} needs a value`);
      values.set(arg.slice(2), value);
    }
  }
  const known = new Set([
    "bootstrap-servers", "instance-id", "group-id", "handover-topic", "output-topic",
    "memory-topic", "work-ms", "heartbeat-interval-ms", "dedup-capacity", "retry-attempts",
    "retry-backoff-ms", "retry-max-backoff-ms", "snapshot-timeout-ms", "max-snapshot-bytes",
    "words",
  ]);
  for (const key of values.keys()) if (!known.has(key)) fail(`unknown flag --${key}\n${USAGE}`);
  const env = (flag: string) => process.env["BATON_AGENT_" + flag.toUpperCase().replace(/-/g, "_")];
  const text = (flag: string, fallback: string) => values.get(flag) ?? env(flag) ?? fallback;
  const number = (flag: string, fallback: number, min: number, max: number) => {
    const raw = values.get(flag) ?? env(flag);
    if (raw === undefined) return fallback;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min || n > max) fail(`--${flag} must be an integer in ${min}..${max}, got ${raw}`);
    return n;
  };
  const bootstrapServers = values.get("bootstrap-servers") ?? process.env.BATON_BOOTSTRAP_SERVERS;
  if (!bootstrapServers) fail(`--bootstrap-servers is required\n${USAGE}`);
  const groupId = text("group-id", "agent-researcher");
  return {
    bootstrapServers: bootstrapServers!,
    instanceId: text("instance-id", "0"),
    groupId,
    handoverTopic: text("handover-topic", "mcp.handover.researcher"),
    outputTopic: text("output-topic", "mcp.events.all"),
    memoryTopic: text("memory-topic", "mcp.memory"),
    workMs: number("work-ms", 200, 0, 600_000),
    heartbeatIntervalMs: number("heartbeat-interval-ms", 1000, 10, 600_000),
    dedupCapacity: number("dedup-capacity", 10_000, 1, 10_000_000),
    retryAttempts: number("retry-attempts", 6, 1, 100),
    retryBackoffMs: number("retry-backoff-ms", 100, 1, 60_000),
    retryMaxBackoffMs: number("retry-max-backoff-ms", 5000, 1, 600_000),
    snapshotTimeoutMs: number("snapshot-timeout-ms", 5000, 1, 600_000),
    maxSnapshotBytes: number("max-snapshot-bytes", 1 << 20, 1, 1 << 30),
    words: number("words", 60, 1, 10_000),
  };
}

function fail(message: string): never {
  console.error(`error: ${message}`);
  process.exit(2);
}

function log(level: "info" | "warn" | "error", message: string, fields: Record<string, unknown> = {}) {
  console.error(JSON.stringify({ at: new Date().toISOString(), level, agent: "researcher", message, ...fields }));
}

// ---------------------------------------------------------------------------- retries

/** An error worth repeating (an outage) rather than one that cannot heal. */
class Retriable extends Error {}

const counters = { retries: 0, exhausted: 0, completed: 0, noted: 0, failed: 0, duplicate: 0, skipped: 0, unreadable: 0, heartbeats: 0 };

/** Calls `call` up to `attempts` times with capped exponential backoff; only a Retriable error is repeated. */
async function retry<T>(opts: Options, what: string, call: () => Promise<T>): Promise<T> {
  for (let failures = 1; ; failures++) {
    try {
      return await call();
    } catch (err) {
      if (!(err instanceof Retriable)) throw err;
      if (failures >= opts.retryAttempts) {
        counters.exhausted++;
        log("error", "still failing at the retry bound; giving up", { what, attempts: failures, cause: String(err.message) });
        throw err;
      }
      const pause = Math.min(opts.retryBackoffMs * 2 ** Math.min(failures - 1, 20), opts.retryMaxBackoffMs);
      counters.retries++;
      log("warn", "retriable error; retrying", { what, attempt: failures, pause_ms: pause, cause: String(err.message) });
      await sleep(pause);
    }
  }
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------- duplicates

/** The answered handover ids, oldest first; past the capacity the oldest is forgotten. */
class Dedup {
  private seen = new Set<string>();
  constructor(private capacity: number) {}
  has(id: string) {
    return this.seen.has(id);
  }
  add(id: string) {
    this.seen.add(id);
    while (this.seen.size > this.capacity) {
      const oldest = this.seen.values().next().value as string;
      this.seen.delete(oldest);
    }
  }
}

// ---------------------------------------------------------------------------- the simulated model

const cl100k = getEncoding("cl100k_base");
/** baton's count: a string is its text, anything else its compact JSON, null nothing. */
function tokens(value: unknown): number {
  if (value === null || value === undefined) return 0;
  return cl100k.encode(typeof value === "string" ? value : JSON.stringify(value)).length;
}

const WORDS = ("the image shows a red bicycle leaning against brick wall vintage frame steel market listing " +
  "price condition evidence seller photo brand model year comparable sales suggest range between and with " +
  "minor rust on chain original paint likely from 1970s source page confirms serial number matches catalogue entry notes").split(" ");

function simulatedText(seed: string, words: number): string {
  const out: string[] = [];
  let block = createHash("sha256").update(seed).digest();
  let index = 0;
  for (let n = 0; n < words; n++) {
    if (index + 2 > block.length) {
      block = createHash("sha256").update(new Uint8Array(block)).digest();
      index = 0;
    }
    out.push(WORDS[block.readUInt16BE(index) % WORDS.length]);
    index += 2;
  }
  return out.join(" ");
}

// ---------------------------------------------------------------------------- snapshots

/** GET the signed snapshot URL (no token needed), bounded in time and size. */
async function fetchSnapshot(opts: Options, url: string): Promise<unknown> {
  let response: Response;
  try {
    response = await fetch(url, { signal: AbortSignal.timeout(opts.snapshotTimeoutMs) });
  } catch (err) {
    // The URL's query is its signature: keep it out of logs.
    throw new Retriable(`snapshot unreachable: ${String((err as Error).message).replace(/\?\S*/g, "?...")}`);
  }
  if (response.status >= 500 || response.status === 429) throw new Retriable(`snapshot unavailable: HTTP ${response.status}`);
  if (!response.ok) throw new Error(`snapshot refused: HTTP ${response.status}`);
  const reader = response.body?.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  while (reader) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.length;
    if (size > opts.maxSnapshotBytes) {
      await reader.cancel();
      throw new Error(`snapshot larger than the ${opts.maxSnapshotBytes} bytes accepted`);
    }
    chunks.push(value);
  }
  return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

// ---------------------------------------------------------------------------- the agent

interface Handover {
  handover_id: string;
  context_id: string;
  intent: string;
  agent: string;
  workflow: string;
  status: string;
  last_tool_output: unknown;
  memory_snapshot_url: string | null;
  correlation_id: string | null;
  attempt?: number;
}

const WORK_STATUSES = new Set(["queued", "retrying", "fallback", "plan_b"]);

async function main() {
  const opts = parseOptions(process.argv.slice(2));
  const kafka = new Kafka({
    clientId: `researcher-ts-${opts.instanceId}`,
    brokers: opts.bootstrapServers.split(","),
    logLevel: logLevel.WARN,
    retry: { retries: opts.retryAttempts, initialRetryTime: opts.retryBackoffMs, maxRetryTime: opts.retryMaxBackoffMs },
  });
  // Java's murmur2 partitioner, as baton's producers use: records keyed by
  // context_id land on the partition baton's state for that context lives on.
  const createPartitioner = Partitioners.DefaultPartitioner;
  const producer: Producer = kafka.producer({ createPartitioner });
  const heartbeats: Producer = kafka.producer({ createPartitioner });
  const consumer: Consumer = kafka.consumer({ groupId: opts.groupId, readUncommitted: false, sessionTimeout: 10_000, heartbeatInterval: 1000 });
  const dedup = new Dedup(opts.dedupCapacity);

  let stopping = false;
  const stop = async (code: number) => {
    if (stopping) return;
    stopping = true;
    log("info", "stopping", { ...counters });
    await Promise.allSettled([consumer.disconnect(), producer.disconnect(), heartbeats.disconnect()]);
    process.exit(code);
  };
  process.on("SIGTERM", () => void stop(0));
  process.on("SIGINT", () => void stop(0));

  await retry(opts, "connect", async () => {
    try {
      await Promise.all([producer.connect(), heartbeats.connect(), consumer.connect()]);
    } catch (err) {
      throw new Retriable(String((err as Error).message));
    }
  });
  await consumer.subscribe({ topics: [opts.handoverTopic], fromBeginning: true });
  log("info", "agent started", { group_id: opts.groupId, handover_topic: opts.handoverTopic, instance_id: opts.instanceId });

  const beat = async (handover: Handover, n: number, progress: string) => {
    try {
      await heartbeats.send({
        topic: opts.outputTopic,
        messages: [{
          key: handover.context_id,
          value: JSON.stringify({
            event: "agent.heartbeat", event_id: `${handover.handover_id}.heartbeat.${n}`,
            context_id: handover.context_id, agent: handover.agent, progress, occurred_at: Date.now(),
          }),
        }],
      });
      counters.heartbeats++;
    } catch (err) {
      counters.retries++;
      log("warn", "heartbeat not sent", { cause: String((err as Error).message) });
    }
  };

  /**
   * The records answering one handover, then its offset: the offset is committed only
   * after the broker acknowledged every record (acks=all), so a crash in between
   * re-delivers the handover and it is answered again with the same event_id, which
   * baton applies once. (The Rust agents put both in one Kafka transaction; kafkajs's
   * InitProducerId v1 is refused by the development broker, see the README.)
   */
  const commit = async (topic: string, partition: number, message: KafkaMessage, records: { topic: string; key: string; value: string }[]) => {
    const offset = (BigInt(message.offset) + 1n).toString();
    await retry(opts, "send the answer, then commit the offset", async () => {
      try {
        if (records.length > 0) {
          await producer.sendBatch({
            acks: -1,
            topicMessages: records.map((record) => ({ topic: record.topic, messages: [{ key: record.key, value: record.value }] })),
          });
        }
        await consumer.commitOffsets([{ topic, partition, offset }]);
      } catch (err) {
        throw new Retriable(String((err as Error).message));
      }
    });
  };

  await consumer.run({
    autoCommit: false,
    eachMessage: async ({ topic, partition, message, heartbeat }) => {
      let handover: Handover;
      try {
        handover = JSON.parse(message.value?.toString("utf8") ?? "");
        if (typeof handover.handover_id !== "string" || typeof handover.context_id !== "string") throw new Error("no handover_id or context_id");
      } catch (err) {
        counters.unreadable++;
        log("error", "not a JSON handover; skipped (baton's step timeout heals the step)", { topic, partition, offset: message.offset, cause: String(err) });
        await commit(topic, partition, message, []);
        return;
      }
      if (dedup.has(handover.handover_id) || !WORK_STATUSES.has(handover.status)) {
        if (dedup.has(handover.handover_id)) counters.duplicate++; else counters.skipped++;
        await commit(topic, partition, message, []);
        return;
      }
      const started = Date.now();
      let beats = 0;
      await beat(handover, beats, "started");
      const ticker = setInterval(() => {
        void beat(handover, ++beats, `working on ${handover.intent} (typescript) (${Date.now() - started} ms)`);
        void heartbeat();
      }, opts.heartbeatIntervalMs);
      const records: { topic: string; key: string; value: string }[] = [];
      const key = handover.context_id;
      try {
        if (handover.intent === "plan_b_manual_review") {
          records.push({ topic: opts.memoryTopic, key, value: JSON.stringify({
            event: "memory.upserted", context_id: key, type: "instruction",
            content: `PlanB for ${key}: queued for manual review`, importance: 0.9, key: "plan_b",
          }) });
          counters.noted++;
        } else {
          let snapshot: unknown = null;
          let error: string | null = null;
          if (handover.memory_snapshot_url) {
            try {
              snapshot = await retry(opts, "fetch snapshot", () => fetchSnapshot(opts, handover.memory_snapshot_url!));
            } catch (err) {
              error = String((err as Error).message);
            }
          }
          const prompt = { intent: handover.intent, attempt: handover.attempt ?? 0, last_tool_output: handover.last_tool_output, memory: snapshot };
          // THE MODEL CALL GOES HERE: send `prompt` to the model, take its text and the
          // usage its API reports. Simulated instead, with the model's latency:
          await sleep(opts.workMs);
          const text = simulatedText(handover.handover_id, opts.words);
          const usage = { input_tokens: tokens(prompt), output_tokens: error ? 0 : tokens(text) };
          const memories = (snapshot as { memories?: unknown[] } | null)?.memories;
          if (!error) {
            records.push({ topic: opts.memoryTopic, key, value: JSON.stringify({
              event: "memory.upserted", context_id: key, type: "fact",
              content: `research: ${text.split(" ").slice(0, 12).join(" ")}`, importance: 0.7, key: "research_summary",
            }) });
          }
          records.push({ topic: opts.outputTopic, key, value: JSON.stringify({
            event_id: `${handover.handover_id}.research_enrich`, handover_id: handover.handover_id,
            context_id: key, event: "tool.research_enrich.completed", server_id: handover.agent,
            tool: "research_enrich", arguments: { intent: handover.intent, attempt: handover.attempt ?? 0 },
            result: error ? null : { summary: text, memories_seen: Array.isArray(memories) ? memories.length : 0, simulated: true, written_in: "typescript" },
            usage, status: error ? "error" : "ok", ...(error ? { error } : {}),
            occurred_at: Date.now(), correlation_id: handover.correlation_id, workflow: handover.workflow,
            latency_ms: Date.now() - started,
          }) });
          if (error) counters.failed++; else counters.completed++;
        }
      } finally {
        clearInterval(ticker);
      }
      try {
        await commit(topic, partition, message, records);
      } catch (err) {
        log("error", "the broker stayed down past the retry bound; exiting with nothing committed", { cause: String((err as Error).message) });
        await stop(1);
        return;
      }
      dedup.add(handover.handover_id);
      log("info", "handover answered", { context_id: key, handover_id: handover.handover_id });
    },
  });
}

main().catch((err) => {
  log("error", "agent failed", { cause: String(err?.stack ?? err) });
  process.exit(1);
});
