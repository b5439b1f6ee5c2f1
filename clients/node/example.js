#!/usr/bin/env node
'use strict';
/**
 * The agent loop against keybroker, in Node.js:
 *
 *   GetKey -> CheckLimit (reserve an estimate) -> POST {OPENROUTER_BASE_URL}/chat/completions with
 *   the user's key -> RecordUsage (request_id = the generation id, cost_usd = usage.cost, exact)
 *
 * Environment:
 *   KEYBROKER_TARGET        broker address                      (default 127.0.0.1:50051)
 *   KEYBROKER_TOKEN         caller token, scope agent or admin  (required)
 *   KEYBROKER_USER          the end user                        (required)
 *   OPENROUTER_BASE_URL     OpenRouter API base                 (default https://openrouter.ai/api/v1)
 *   OPENROUTER_MODEL        model slug                          (default openai/gpt-4o-mini)
 *   OPENROUTER_MAX_TOKENS   completion token cap (always send one: OpenRouter's pre-flight
 *                           budget check assumes the model's full output otherwise)  (default 256)
 *   KEYBROKER_PROMPT        the user message                    (default "Say hello in one word.")
 *   KEYBROKER_ESTIMATE_USD  cost reserved before the call       (default 0.01)
 *   KEYBROKER_AGENT         agent name recorded with the usage  (default node-example)
 *
 * On success prints one JSON line (never the key) and exits 0; on failure prints one line
 * "keybroker-example: ..." on stderr (with the broker's ErrorInfo reason) and exits 1.
 */

const crypto = require('node:crypto');
const { createClient, KeybrokerError, parseJsonExact, plainDecimal, status } = require('./keybroker');

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined || value === '') throw new Error(`${name} is not set`);
  return value;
};

async function main() {
  const config = {
    target: env('KEYBROKER_TARGET', '127.0.0.1:50051'),
    token: env('KEYBROKER_TOKEN'),
    user: env('KEYBROKER_USER'),
    baseUrl: env('OPENROUTER_BASE_URL', 'https://openrouter.ai/api/v1').replace(/\/+$/, ''),
    model: env('OPENROUTER_MODEL', 'openai/gpt-4o-mini'),
    maxTokens: Number(env('OPENROUTER_MAX_TOKENS', '256')),
    prompt: env('KEYBROKER_PROMPT', 'Say hello in one word.'),
    estimateUsd: env('KEYBROKER_ESTIMATE_USD', '0.01'),
    agent: env('KEYBROKER_AGENT', 'node-example'),
  };
  const kb = createClient(config.target, config.token, { deadlineMs: 10_000 });
  try {
    return await runOnce(kb, config);
  } finally {
    kb.close();
  }
}

async function runOnce(kb, config) {
  const key = await kb.getKey({ user_id: config.user });

  // Reserve the estimate: concurrent agents of the same user can never together overspend.
  const check = await kb.checkLimit({
    user_id: config.user,
    estimated_cost_usd: config.estimateUsd,
    request_id: `node-${crypto.randomUUID()}`,
  });
  if (!check.allowed) {
    throw new Error(`monthly limit reached (spent ${check.spent_usd} of ${check.limit_usd} USD)`);
  }

  const started = process.hrtime.bigint();
  let completion;
  try {
    completion = await chatCompletion(config, key.api_key);
  } catch (error) {
    // Nothing was charged: free the reservation now instead of waiting for it to expire.
    await kb
      .releaseReservation({ user_id: config.user, reservation_id: check.reservation_id })
      .catch(() => {});
    throw error;
  }
  const elapsedNs = process.hrtime.bigint() - started;

  const usage = completion.usage ?? {};
  if (usage.cost === undefined || usage.cost === null) {
    // Never guess a price: Reconcile at the broker reports the drift for this generation.
    throw new Error(`OpenRouter reply ${completion.id} carries no usage.cost; usage not recorded`);
  }
  const costUsd = plainDecimal(usage.cost);
  const recorded = await recordUsage(kb, {
    user_id: config.user,
    request_id: completion.id, // the generation id makes RecordUsage idempotent
    reservation_id: check.reservation_id,
    model: completion.model ?? config.model,
    agent: config.agent,
    prompt_tokens: usage.prompt_tokens ?? 0,
    completion_tokens: usage.completion_tokens ?? 0,
    total_tokens: usage.total_tokens ?? 0,
    cost_usd: costUsd,
    duration: { seconds: String(elapsedNs / 1_000_000_000n), nanos: Number(elapsedNs % 1_000_000_000n) },
  });

  return {
    user_id: config.user,
    key_id: key.key_id,
    key_version: key.key_version,
    generation_id: completion.id,
    model: completion.model ?? config.model,
    prompt_tokens: usage.prompt_tokens ?? 0,
    completion_tokens: usage.completion_tokens ?? 0,
    cost_usd: costUsd,
    reservation_id: check.reservation_id,
    duplicate: recorded.duplicate,
    spent_usd: recorded.spent_usd,
    remaining_usd: recorded.remaining_usd,
    over_limit: recorded.over_limit,
    reply: completion.choices?.[0]?.message?.content ?? '',
  };
}

/** POST /chat/completions with the user's key; the reply parsed with exact numbers. */
async function chatCompletion(config, apiKey) {
  const response = await fetch(`${config.baseUrl}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model: config.model,
      messages: [{ role: 'user', content: config.prompt }],
      max_tokens: config.maxTokens,
    }),
    signal: AbortSignal.timeout(60_000),
  });
  // Read the raw text: usage.cost must reach the broker digit for digit, so it is never put
  // through JSON.parse's binary floats (see parseJsonExact in keybroker.js).
  const text = await response.text();
  if (!response.ok) {
    throw new Error(`OpenRouter answered HTTP ${response.status}: ${text.slice(0, 200).replace(/\s+/g, ' ')}`);
  }
  const body = parseJsonExact(text);
  if (typeof body?.id !== 'string' || !body.id) throw new Error('OpenRouter reply has no generation id');
  return body;
}

/** RecordUsage, retried on UNAVAILABLE: the generation id makes a retry count nothing twice. */
async function recordUsage(kb, request, attempts = 3) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await kb.recordUsage(request);
    } catch (error) {
      const retriable = error instanceof KeybrokerError && error.code === status.UNAVAILABLE;
      if (!retriable || attempt >= attempts) throw error;
      await new Promise((resolve) => setTimeout(resolve, error.retryDelayMs ?? 200 * attempt));
    }
  }
}

main().then(
  (summary) => {
    process.stdout.write(`${JSON.stringify(summary)}\n`);
  },
  (error) => {
    const text = error instanceof KeybrokerError ? error.message : error?.message ?? String(error);
    process.stderr.write(`keybroker-example: ${text.replace(/\s+/g, ' ')}\n`);
    process.exitCode = 1;
  },
);
