/**
 * tokenwarden client for Supabase Edge Functions (Deno) and any other Deno/Node code.
 *
 * Each helper enqueues one job with a single `XADD {prefix}:jobs:<type> * payload <json>` and waits
 * for the worker's reply with `BLPOP {prefix}:reply:<requestId> <timeout>`. The worker pushes the
 * reply only after the outcome is committed in Postgres, so `success: true` means the ledger
 * change is durable.
 *
 * A timeout (`error: "timeout"`) does NOT mean the job failed: the worker may still apply it.
 * The durable outcome is always readable in Postgres (`ledger_requests` by `request_id`), and
 * calling the same helper again with the SAME `requestId` is safe: the ledger is idempotent, so
 * the repeat changes nothing and returns the stored outcome.
 *
 * Drop-in for the seed middleware:
 *
 * ```ts
 * import { consumeTokensAtomic } from "./client.ts";
 * const r = await consumeTokensAtomic({ userId, tokenAmount: 120, operationType: "meal-analyzer",
 *   requestId: crypto.randomUUID(), metadata: { model: "gpt-4o-mini" } });
 * if (!r.success) return new Response(JSON.stringify({ error: r.error }), { status: 402 });
 * ```
 *
 * Configuration: options passed to {@link TokenwardenClient}, else the environment variables
 * `TOKENWARDEN_REDIS_URL` (default `redis://127.0.0.1:6379`), `TOKENWARDEN_REDIS_PREFIX`
 * (default `tokenwarden`) and `TOKENWARDEN_REPLY_TIMEOUT_MS` (default 10000).
 *
 * @module
 */

import { createClientPool } from "npm:redis@6.3.1";

/** Ledger outcome statuses, as the worker writes them in replies (`status`). */
export type OutcomeStatus =
  | "consumed"
  | "granted"
  | "held"
  | "settled"
  | "released"
  | "insufficient_tokens"
  | "request_id_conflict"
  | "hold_expired"
  | "hold_not_found"
  | "hold_already_resolved"
  | "rate_limited"
  | "rejected";

/** The reply JSON the worker pushes for a ledger job. */
export interface Outcome {
  request_id: string;
  status: OutcomeStatus;
  /** Available balance after the operation (held tokens not included). */
  balance?: number;
  /** Tokens held by the user's open holds after the operation. */
  held?: number;
  /** Human-readable reason for `rejected` and other failures. */
  reason?: string;
}

/**
 * What every helper returns. `success`, `error` and `balance` are the seed middleware's shape;
 * the other fields are extra.
 */
export interface LedgerResult {
  /** True only for the helper's success status (consume: `consumed`, grant: `granted`, ...). */
  success: boolean;
  /**
   * Why it did not succeed: an {@link OutcomeStatus} (e.g. `insufficient_tokens`,
   * `rate_limited`), `timeout` (no reply in time; the outcome may still come: see the module
   * docs), `invalid_request` (refused locally, nothing enqueued), `enqueue_failed` (Redis refused
   * the XADD; nothing enqueued) or `reply_failed` (Redis failed while waiting; outcome unknown).
   */
  error?: string;
  /** Available balance after the operation, when the worker reports one. */
  balance?: number;
  /** Tokens held by open holds after the operation, when the worker reports it. */
  held?: number;
  /** The outcome status, or `timeout` / `invalid_request` / `enqueue_failed` / `reply_failed`. */
  status: OutcomeStatus | "timeout" | "invalid_request" | "enqueue_failed" | "reply_failed";
  /** The request id used (generated when the caller gave none). */
  requestId: string;
  /** Details for humans (the worker's `reason`, or the local error). */
  reason?: string;
}

/** Arguments of {@link TokenwardenClient.consumeTokensAtomic} (the seed middleware's names). */
export interface ConsumeParams {
  userId: string;
  /** Positive integer, at most `Number.MAX_SAFE_INTEGER`. */
  tokenAmount: number;
  /** What the tokens pay for, 1 to 100 characters (e.g. the Edge Function's name). */
  operationType: string;
  /** Idempotency key (UUID). Reuse it when retrying; generated when omitted. */
  requestId?: string;
  metadata?: Record<string, unknown>;
  /** Accepted and ignored, so the seed's call sites work unchanged. */
  supabaseClient?: unknown;
}

/** Arguments of {@link TokenwardenClient.grantTokens}. */
export interface GrantParams {
  userId: string;
  amount: number;
  /** Why the tokens are granted, 1 to 200 characters. */
  reason: string;
  requestId?: string;
  metadata?: Record<string, unknown>;
}

/** Arguments of {@link TokenwardenClient.holdTokens}. The hold's id is its `requestId`. */
export interface HoldParams {
  userId: string;
  tokenAmount: number;
  operationType: string;
  requestId?: string;
  /** Hold lifetime in seconds; the worker's default (`ledger.default_hold_ttl_secs`) if omitted. */
  ttlSecs?: number;
  metadata?: Record<string, unknown>;
}

/** Arguments of {@link TokenwardenClient.settleHold}. */
export interface SettleParams {
  /** The `requestId` of the hold. */
  holdId: string;
  /** The actual cost, 1 to the held amount; the rest returns to the balance. */
  tokenAmount: number;
  requestId?: string;
  metadata?: Record<string, unknown>;
}

/** Arguments of {@link TokenwardenClient.releaseHold}. */
export interface ReleaseParams {
  holdId: string;
  requestId?: string;
  metadata?: Record<string, unknown>;
}

/** Client options; each falls back to its environment variable, then to the default. */
/** `linkWallet` arguments. */
export interface LinkWalletParams {
  userId: string;
  /** The EIP-4361 message exactly as the wallet signed it. */
  message: string;
  /** The wallet's signature of `message`, hex. */
  signature: string;
  requestId?: string;
}

/** `unlinkWallet` arguments. */
export interface UnlinkWalletParams {
  userId: string;
  address: string;
  requestId?: string;
}

/** `verifyAccess` arguments: `creatorId`, or `chainId` and `token` (the seed's form). */
export interface VerifyAccessParams {
  userId: string;
  creatorId?: string;
  chainId?: number;
  token?: string;
  feature: string;
  requestId?: string;
  /** The end user's IP address, recorded with the check (audit). */
  callerIp?: string;
  /** The end user's User-Agent, recorded with the check (cut to 512 characters). */
  userAgent?: string;
}

/** An access decision as the worker replies it (docs/access.md). */
export interface AccessDecision {
  allowed: boolean;
  reason: "no_rule" | "no_wallet" | "stale" | "not_met" | null;
  user_id: string;
  creator_id: string;
  feature: string;
  rule_version: number | null;
  source: "cache" | "index" | "snapshot";
  as_of_block: number | null;
  stale: boolean;
  evidence: Array<{
    path: string;
    kind: string;
    chain_id?: number;
    token?: string;
    snapshot_id?: string;
    token_id?: string;
    /** `held`: the window's first block. */
    window_from?: number;
    minimum: string;
    amount: string;
    wallets: Array<{ address: string; amount: string }>;
    block: number | null;
    source: "index" | "snapshot";
    passed: boolean;
    stale?: string;
  }>;
  checked_at: string;
}

/** The answer to `verifyAccess`. */
export interface AccessResult {
  /** The decision's `allowed`. */
  success: boolean;
  requestId: string;
  decision?: AccessDecision;
  /** The denial reason, or a client failure (`invalid_request`, `timeout`, ...). */
  error?: string;
  reason?: string;
}

/** `requestWhitelist` arguments: the list, the user, optionally which proven wallet holds the place. */
export interface RequestWhitelistParams {
  userId: string;
  whitelistId: string;
  address?: string;
  requestId?: string;
}

/** Why a whitelist place was refused (docs/access.md, Whitelists). */
export type WhitelistRefusal =
  | "unknown_whitelist" | "not_open" | "closed" | "full" | "not_your_wallet" | "address_taken"
  | "no_wallet" | "not_met" | "stale" | "no_rule";

/** The answer to `requestWhitelist`. */
export interface WhitelistResult {
  /** True when the place is granted (now or by an earlier request). */
  success: boolean;
  /** `granted`, `refused`, or a client failure (`invalid_request`, `timeout`, ...). */
  status: string;
  requestId: string;
  whitelistId?: string;
  /** The granted place's wallet and allowlist amount (decimal uint256). */
  address?: string | null;
  amount?: string | null;
  /** The access decision the place was decided on, with its evidence. */
  decision?: AccessDecision | null;
  decidedAt?: string;
  /** The refusal's reason, or what the client failure was. */
  reason?: WhitelistRefusal | string;
  error?: string;
}

/** The answer to `linkWallet` / `unlinkWallet`. */
export interface WalletResult {
  success: boolean;
  /** The worker's status (`linked`, `refused`, `unlinked`, `not_linked`) or a client failure. */
  status: string;
  requestId: string;
  address?: string;
  chains?: number[];
  method?: "eoa" | "erc1271";
  verifiedAt?: string;
  movedFromUser?: string | null;
  /** Why a link was refused (`wrong_signer`, `nonce_used`, …) or what the client failure was. */
  reason?: string;
  detail?: string;
  error?: string;
}

export interface ClientOptions {
  /** `TOKENWARDEN_REDIS_URL`, default `redis://127.0.0.1:6379`. */
  redisUrl?: string;
  /** `TOKENWARDEN_REDIS_PREFIX`, default `tokenwarden` (the worker's `redis.prefix`). */
  prefix?: string;
  /** How long to wait for a reply: `TOKENWARDEN_REPLY_TIMEOUT_MS`, default 10000. */
  timeoutMs?: number;
  /** Redis connections at most (each waiting call holds one while it waits). Default 16. */
  maxConnections?: number;
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function env(name: string): string | undefined {
  try {
    return Deno.env.get(name) ?? undefined;
  } catch {
    // Without --allow-env, fall back to the defaults instead of failing.
    return undefined;
  }
}

class InvalidRequest extends Error {}

/** A node-redis pool: XADD and BLPOP each take a free connection, so waits run in parallel. */
function newPool(url: string, maxConnections: number, timeoutMs: number) {
  return createClientPool(
    { url, socket: { connectTimeout: timeoutMs } },
    { minimum: 1, maximum: maxConnections, acquireTimeout: timeoutMs },
  );
}
type Pool = ReturnType<typeof newPool>;

function checkUuid(name: string, v: unknown): string {
  if (typeof v !== "string" || !UUID_RE.test(v)) {
    throw new InvalidRequest(`${name} must be a UUID, got ${JSON.stringify(v)}`);
  }
  return v;
}

function checkAmount(name: string, v: unknown): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0) {
    throw new InvalidRequest(`${name} must be a positive integer, got ${JSON.stringify(v)}`);
  }
  return v;
}

const HEX_RE = /^(0x)?[0-9a-fA-F]{2,8192}$/;
const ADDRESS_RE = /^0x[0-9a-fA-F]{40}$/;

function checkHex(name: string, v: unknown): string {
  if (typeof v !== "string" || !HEX_RE.test(v)) {
    throw new InvalidRequest(`${name} must be hex, got ${JSON.stringify(v)}`);
  }
  return v;
}

function checkAddress(name: string, v: unknown): string {
  if (typeof v !== "string" || !ADDRESS_RE.test(v)) {
    throw new InvalidRequest(`${name} must be a 0x-prefixed 20-byte hex address, got ${JSON.stringify(v)}`);
  }
  return v;
}

function checkText(name: string, v: unknown, max: number): string {
  if (typeof v !== "string" || v.length === 0 || [...v].length > max) {
    throw new InvalidRequest(`${name} must be a string of 1 to ${max} characters`);
  }
  return v;
}

/**
 * A connection to tokenwarden's job streams. Create one per isolate (module scope) and reuse
 * it: connections are opened lazily and pooled.
 */
export class TokenwardenClient {
  readonly prefix: string;
  readonly timeoutMs: number;
  readonly #url: string;
  readonly #maxConnections: number;
  #pool: Pool | undefined;
  #connecting: Promise<Pool> | undefined;

  constructor(options: ClientOptions = {}) {
    this.#url = options.redisUrl ?? env("TOKENWARDEN_REDIS_URL") ?? "redis://127.0.0.1:6379";
    this.prefix = options.prefix ?? env("TOKENWARDEN_REDIS_PREFIX") ?? "tokenwarden";
    const timeout = options.timeoutMs ?? Number(env("TOKENWARDEN_REPLY_TIMEOUT_MS") ?? 10_000);
    if (!Number.isFinite(timeout) || timeout <= 0) {
      throw new RangeError(`timeoutMs must be a positive number of milliseconds, got ${timeout}`);
    }
    this.timeoutMs = timeout;
    this.#maxConnections = options.maxConnections ?? 16;
  }

  /** Debits `tokenAmount` now. `success` only when the status is `consumed`. */
  consumeTokensAtomic(p: ConsumeParams): Promise<LedgerResult> {
    return this.#ledger("consume_tokens", "consumed", p.requestId, (request_id) => ({
      request_id,
      user_id: checkUuid("userId", p.userId),
      amount: checkAmount("tokenAmount", p.tokenAmount),
      operation_type: checkText("operationType", p.operationType, 100),
      ...(p.metadata !== undefined ? { metadata: p.metadata } : {}),
    }));
  }

  /** Credits `amount` (creates the account if needed). `success` when `granted`. */
  grantTokens(p: GrantParams): Promise<LedgerResult> {
    return this.#ledger("grant_tokens", "granted", p.requestId, (request_id) => ({
      request_id,
      user_id: checkUuid("userId", p.userId),
      amount: checkAmount("amount", p.amount),
      reason: checkText("reason", p.reason, 200),
      ...(p.metadata !== undefined ? { metadata: p.metadata } : {}),
    }));
  }

  /** Reserves `tokenAmount` before an AI call; the hold id is the result's `requestId`. */
  holdTokens(p: HoldParams): Promise<LedgerResult> {
    return this.#ledger("hold_tokens", "held", p.requestId, (request_id) => ({
      request_id,
      user_id: checkUuid("userId", p.userId),
      amount: checkAmount("tokenAmount", p.tokenAmount),
      operation_type: checkText("operationType", p.operationType, 100),
      ...(p.ttlSecs !== undefined ? { ttl_secs: checkAmount("ttlSecs", p.ttlSecs) } : {}),
      ...(p.metadata !== undefined ? { metadata: p.metadata } : {}),
    }));
  }

  /** Debits the actual cost of a hold; the rest returns. `success` when `settled`. */
  settleHold(p: SettleParams): Promise<LedgerResult> {
    return this.#ledger("settle_hold", "settled", p.requestId, (request_id) => ({
      request_id,
      hold_id: checkUuid("holdId", p.holdId),
      amount: checkAmount("tokenAmount", p.tokenAmount),
      ...(p.metadata !== undefined ? { metadata: p.metadata } : {}),
    }));
  }

  /** Cancels a hold; the whole held amount returns. `success` when `released`. */
  releaseHold(p: ReleaseParams): Promise<LedgerResult> {
    return this.#ledger("release_hold", "released", p.requestId, (request_id) => ({
      request_id,
      hold_id: checkUuid("holdId", p.holdId),
      ...(p.metadata !== undefined ? { metadata: p.metadata } : {}),
    }));
  }

  /**
   * Enqueues any job (see `jobs/<type>.schema.json`) without waiting; returns the stream entry
   * id. Use it for fire-and-forget work such as `cleanup_locks`.
   */
  async enqueue(jobType: string, payload: Record<string, unknown>): Promise<string> {
    const pool = await this.#connect();
    return await pool.xAdd(`${this.prefix}:jobs:${jobType}`, "*", {
      payload: JSON.stringify(payload),
      enqueued_at: String(Date.now()),
    });
  }

  /**
   * Waits up to `timeoutMs` for the reply to `requestId`; `null` on timeout. The reply is
   * consumed (BLPOP), so only one waiter gets it; the worker pushes it again on a repeat.
   */
  async waitReply(requestId: string, timeoutMs = this.timeoutMs): Promise<unknown | null> {
    const pool = await this.#connect();
    const reply = await pool.blPop(`${this.prefix}:reply:${requestId}`, timeoutMs / 1000);
    return reply === null ? null : JSON.parse(reply.element);
  }

  /** Closes the Redis connections; later calls reconnect. */
  async close(): Promise<void> {
    const pool = this.#pool ?? (await this.#connecting?.catch(() => undefined));
    this.#pool = undefined;
    this.#connecting = undefined;
    if (pool) await pool.close();
  }

  async #connect(): Promise<Pool> {
    if (this.#pool) return this.#pool;
    this.#connecting ??= (async () => {
      const pool = newPool(this.#url, this.#maxConnections, this.timeoutMs);
      // Connection errors surface on the commands; without a listener they would crash the isolate.
      pool.on("error", () => {});
      await pool.connect();
      this.#pool = pool;
      return pool;
    })();
    try {
      return await this.#connecting;
    } catch (e) {
      this.#connecting = undefined;
      throw e;
    }
  }

  async #ledger(
    jobType: string,
    successStatus: OutcomeStatus,
    givenRequestId: string | undefined,
    build: (requestId: string) => Record<string, unknown>,
  ): Promise<LedgerResult> {
    const r = await this.#ask(jobType, givenRequestId, build);
    if ("failure" in r) {
      const reason = r.failure !== "timeout" ? r.reason
        : `no reply within ${this.timeoutMs} ms; the outcome may still be applied: read ` +
          `ledger_requests for request_id ${r.requestId}, or retry with the same requestId`;
      return fail(r.requestId, r.failure, reason);
    }
    const o = r.reply as Outcome;
    const requestId = r.requestId;
    const result: LedgerResult = { success: o.status === successStatus, status: o.status, requestId };
    if (!result.success) result.error = o.status;
    if (typeof o.balance === "number") result.balance = o.balance;
    if (typeof o.held === "number") result.held = o.held;
    if (typeof o.reason === "string") result.reason = o.reason;
    return result;
  }

  /**
   * Links a wallet the user proved with Sign-In with Ethereum (EIP-4361): `message` is the SIWE
   * message carrying a nonce from `access_wallet_nonce()`, `signature` the wallet's signature of
   * it. `success` when `linked`; a refusal says why in `reason` (`wrong_signer`, `nonce_used`,
   * `expired`, `wrong_domain`, …) and `detail`.
   */
  async linkWallet(p: LinkWalletParams): Promise<WalletResult> {
    const r = await this.#ask("link_wallet", p.requestId, (request_id) => ({
      request_id,
      user_id: checkUuid("userId", p.userId),
      message: checkText("message", p.message, 4096),
      signature: checkHex("signature", p.signature),
    }));
    return walletResult(r, "linked");
  }

  /** Removes a user's link of a wallet. `success` when `unlinked` (`not_linked`: there was none). */
  async unlinkWallet(p: UnlinkWalletParams): Promise<WalletResult> {
    const r = await this.#ask("unlink_wallet", p.requestId, (request_id) => ({
      request_id,
      user_id: checkUuid("userId", p.userId),
      address: checkAddress("address", p.address),
    }));
    return walletResult(r, "unlinked");
  }

  /**
   * May `userId` use `feature` of `creatorId` now? (Or, with `chainId` and `token` instead of
   * `creatorId`, the seed's `verifyAccess(userId, tokenAddress, feature)`.) `success` is the
   * decision's `allowed`; `decision` has the reason, evidence per condition, source and block.
   */
  async verifyAccess(p: VerifyAccessParams): Promise<AccessResult> {
    const r = await this.#ask("verify_access", p.requestId, (request_id) => {
      const target = p.creatorId !== undefined
        ? { creator_id: checkText("creatorId", p.creatorId, 200) }
        : {
          chain_id: checkAmount("chainId", p.chainId),
          token: checkAddress("token", p.token),
        };
      return {
        request_id,
        user_id: checkUuid("userId", p.userId),
        ...target,
        feature: checkText("feature", p.feature, 100),
        ...(p.callerIp !== undefined ? { caller_ip: checkText("callerIp", p.callerIp, 45) } : {}),
        ...(p.userAgent !== undefined ? { user_agent: checkText("userAgent", p.userAgent, 8192) } : {}),
      };
    });
    if ("failure" in r) {
      return { success: false, error: r.failure, requestId: r.requestId, reason: r.reason };
    }
    const decision = r.reply as AccessDecision;
    const result: AccessResult = { success: decision.allowed === true, requestId: r.requestId, decision };
    if (!result.success) result.error = decision.reason ?? "denied";
    return result;
  }

  /**
   * Asks for a place on a whitelist for `userId`: `success` when granted (a granted place is
   * final: asking again returns it). A refusal says why in `reason` (`not_met`, `full`,
   * `closed`, `not_open`, `no_wallet`, …) and keeps the access decision in `decision`.
   */
  async requestWhitelist(p: RequestWhitelistParams): Promise<WhitelistResult> {
    const r = await this.#ask("request_whitelist", p.requestId, (request_id) => ({
      request_id,
      user_id: checkUuid("userId", p.userId),
      whitelist_id: checkUuid("whitelistId", p.whitelistId),
      ...(p.address === undefined ? {} : { address: checkAddress("address", p.address) }),
    }));
    if ("failure" in r) {
      return { success: false, status: r.failure, error: r.failure, requestId: r.requestId, reason: r.reason };
    }
    const o = r.reply as {
      status: string;
      reason?: string | null;
      whitelist_id?: string;
      address?: string | null;
      amount?: string | null;
      decision?: AccessDecision | null;
      decided_at?: string;
    };
    const result: WhitelistResult = {
      success: o.status === "granted",
      status: o.status,
      requestId: r.requestId,
      whitelistId: o.whitelist_id,
      address: o.address,
      amount: o.amount,
      decision: o.decision,
      decidedAt: o.decided_at,
    };
    if (typeof o.reason === "string") result.reason = o.reason;
    if (!result.success) result.error = o.reason ?? o.status;
    return result;
  }

  /** Enqueues one job with a request id and waits for its reply, or says what went wrong. */
  async #ask(
    jobType: string,
    givenRequestId: string | undefined,
    build: (requestId: string) => Record<string, unknown>,
  ): Promise<Asked> {
    const requestId = givenRequestId ?? crypto.randomUUID();
    let payload: Record<string, unknown>;
    try {
      payload = build(checkUuid("requestId", requestId));
    } catch (e) {
      if (!(e instanceof InvalidRequest)) throw e;
      return { requestId, failure: "invalid_request", reason: e.message };
    }
    try {
      await this.enqueue(jobType, payload);
    } catch (e) {
      return { requestId, failure: "enqueue_failed", reason: String(e) };
    }
    let reply: unknown;
    try {
      reply = await this.waitReply(requestId);
    } catch (e) {
      return { requestId, failure: "reply_failed", reason: String(e) };
    }
    if (reply === null) {
      return {
        requestId,
        failure: "timeout",
        reason: `no reply within ${this.timeoutMs} ms; the job may still be applied: ` +
          `retry with the same requestId`,
      };
    }
    return { requestId, reply };
  }
}

/** A reply, or why there is none. */
type Asked =
  | { requestId: string; reply: unknown }
  | { requestId: string; failure: ClientFailure; reason: string };

/** Failures of the client itself (nothing reached the worker, or no reply came). */
export type ClientFailure = "invalid_request" | "enqueue_failed" | "reply_failed" | "timeout";

function fail(requestId: string, status: LedgerResult["status"], reason: string): LedgerResult {
  return { success: false, error: status, status, requestId, reason };
}

function walletResult(r: Asked, successStatus: string): WalletResult {
  if ("failure" in r) {
    return { success: false, status: r.failure, error: r.failure, requestId: r.requestId, reason: r.reason };
  }
  const o = r.reply as Record<string, unknown>;
  const status = String(o.status);
  const result: WalletResult = { success: status === successStatus, status, requestId: r.requestId };
  if (!result.success) result.error = status;
  if (typeof o.address === "string") result.address = o.address;
  if (Array.isArray(o.chains)) result.chains = o.chains as number[];
  if (o.method === "eoa" || o.method === "erc1271") result.method = o.method;
  if (typeof o.verified_at === "string") result.verifiedAt = o.verified_at;
  if ("moved_from_user" in o) result.movedFromUser = o.moved_from_user as string | null;
  if (typeof o.reason === "string") result.reason = o.reason;
  if (typeof o.detail === "string") result.detail = o.detail;
  return result;
}

let defaultClient: TokenwardenClient | undefined;

/** The module's shared client, configured from the environment on first use. */
export function defaultTokenwardenClient(): TokenwardenClient {
  defaultClient ??= new TokenwardenClient();
  return defaultClient;
}

/** {@link TokenwardenClient.consumeTokensAtomic} on the shared client: the seed's call shape. */
export function consumeTokensAtomic(p: ConsumeParams): Promise<LedgerResult> {
  return defaultTokenwardenClient().consumeTokensAtomic(p);
}

/** {@link TokenwardenClient.grantTokens} on the shared client. */
export function grantTokens(p: GrantParams): Promise<LedgerResult> {
  return defaultTokenwardenClient().grantTokens(p);
}

/** {@link TokenwardenClient.holdTokens} on the shared client. */
export function holdTokens(p: HoldParams): Promise<LedgerResult> {
  return defaultTokenwardenClient().holdTokens(p);
}

/** {@link TokenwardenClient.settleHold} on the shared client. */
export function settleHold(p: SettleParams): Promise<LedgerResult> {
  return defaultTokenwardenClient().settleHold(p);
}

/** {@link TokenwardenClient.releaseHold} on the shared client. */
export function releaseHold(p: ReleaseParams): Promise<LedgerResult> {
  return defaultTokenwardenClient().releaseHold(p);
}

/** {@link TokenwardenClient.linkWallet} on the shared client. */
export function linkWallet(p: LinkWalletParams): Promise<WalletResult> {
  return defaultTokenwardenClient().linkWallet(p);
}

/** {@link TokenwardenClient.unlinkWallet} on the shared client. */
export function unlinkWallet(p: UnlinkWalletParams): Promise<WalletResult> {
  return defaultTokenwardenClient().unlinkWallet(p);
}

/** {@link TokenwardenClient.verifyAccess} on the shared client. */
export function verifyAccess(p: VerifyAccessParams): Promise<AccessResult> {
  return defaultTokenwardenClient().verifyAccess(p);
}

/** {@link TokenwardenClient.requestWhitelist} on the shared client. */
export function requestWhitelist(p: RequestWhitelistParams): Promise<WhitelistResult> {
  return defaultTokenwardenClient().requestWhitelist(p);
}
