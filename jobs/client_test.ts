/**
 * Tests of the Edge Function client against a RUNNING tokenwarden worker and real Redis.
 * `tests/deno_client.rs` starts the worker, funds a user and runs this file with:
 *
 *   TOKENWARDEN_REDIS_URL, TOKENWARDEN_REDIS_PREFIX   where the worker listens
 *   TW_TEST_FUNDED_USER, TW_TEST_FUNDED_BALANCE       a user granted that many tokens
 *   TW_TEST_LINK_USER, TW_TEST_LINK_MESSAGE,          a user, a SIWE message with a nonce
 *   TW_TEST_LINK_SIGNATURE, TW_TEST_LINK_ADDRESS      issued to them, its signature, the wallet
 *   TW_TEST_MEMBER, TW_TEST_CREATOR, TW_TEST_TOKEN    a user whose wallet meets the CHAT rule of
 *                                                     that creator, and the token on chain 31337
 *   TW_TEST_WHITELIST                                 an open list with that rule
 *
 *   node_modules/.bin/deno test --node-modules-dir=manual --allow-net --allow-env --allow-read \
 *     jobs/client_test.ts
 *
 * It leaves the funded user at TW_TEST_FUNDED_BALANCE - 150, which the Rust test checks in
 * Postgres afterwards.
 */

import { deepStrictEqual as assertEquals, ok as assert } from "node:assert/strict";
import {
  consumeTokensAtomic,
  defaultTokenwardenClient,
  linkWallet,
  requestWhitelist,
  TokenwardenClient,
  unlinkWallet,
  verifyAccess,
} from "./client.ts";

function required(name: string): string {
  const v = Deno.env.get(name);
  if (!v) throw new Error(`${name} must be set (see tests/deno_client.rs)`);
  return v;
}

const FUNDED_USER = required("TW_TEST_FUNDED_USER");
const FUNDED_BALANCE = Number(required("TW_TEST_FUNDED_BALANCE"));
const client = new TokenwardenClient({ timeoutMs: 15_000 });

Deno.test("consumeTokensAtomic: debit, idempotent repeat, insufficient, conflict", async (t) => {
  await t.step("a consumption succeeds and reports the balance after it", async () => {
    // The module-level function, configured from the environment, as Edge Functions call it.
    const r = await consumeTokensAtomic({
      supabaseClient: {},
      userId: FUNDED_USER,
      tokenAmount: 120,
      operationType: "meal-analyzer",
      requestId: crypto.randomUUID(),
      metadata: { model: "gpt-4o-mini", tokens_in: 812 },
    });
    assertEquals(r.success, true, JSON.stringify(r));
    assertEquals(r.status, "consumed");
    assertEquals(r.error, undefined);
    assertEquals(r.balance, FUNDED_BALANCE - 120);
  });

  await t.step("the same requestId twice debits once and answers the same", async () => {
    const requestId = crypto.randomUUID();
    const params = { userId: FUNDED_USER, tokenAmount: 30, operationType: "recipe-generator", requestId };
    const first = await client.consumeTokensAtomic(params);
    const second = await client.consumeTokensAtomic(params);
    assertEquals(first.success, true, JSON.stringify(first));
    assertEquals(first.balance, FUNDED_BALANCE - 150);
    assertEquals(second, first);
  });

  await t.step("the same requestId with different fields is a conflict, not a debit", async () => {
    const requestId = crypto.randomUUID();
    const ok = await client.consumeTokensAtomic({
      userId: FUNDED_USER, tokenAmount: 5, operationType: "scan", requestId,
    });
    assertEquals(ok.success, true, JSON.stringify(ok));
    // Undo that debit so the final balance stays predictable for the Rust side.
    const refund = await client.grantTokens({ userId: FUNDED_USER, amount: 5, reason: "test refund" });
    assertEquals(refund.balance, FUNDED_BALANCE - 150);
    const conflict = await client.consumeTokensAtomic({
      userId: FUNDED_USER, tokenAmount: 6, operationType: "scan", requestId,
    });
    assertEquals(conflict.success, false);
    assertEquals(conflict.error, "request_id_conflict");
  });

  await t.step("more than the balance gives insufficient_tokens and changes nothing", async () => {
    const r = await client.consumeTokensAtomic({
      userId: FUNDED_USER,
      tokenAmount: FUNDED_BALANCE,
      operationType: "image-generator",
      requestId: crypto.randomUUID(),
    });
    assertEquals(r.success, false);
    assertEquals(r.error, "insufficient_tokens");
    assertEquals(r.status, "insufficient_tokens");
  });

  await t.step("an unknown user gets insufficient_tokens", async () => {
    const r = await client.consumeTokensAtomic({
      userId: crypto.randomUUID(), tokenAmount: 1, operationType: "scan",
    });
    assertEquals(r.success, false);
    assertEquals(r.error, "insufficient_tokens");
  });
});

Deno.test("grant, hold, settle and release", async () => {
  const user = crypto.randomUUID();
  const grant = await client.grantTokens({ userId: user, amount: 1000, reason: "welcome pack" });
  assertEquals(grant.success, true, JSON.stringify(grant));
  assertEquals(grant.status, "granted");
  assertEquals(grant.balance, 1000);

  const hold = await client.holdTokens({
    userId: user, tokenAmount: 300, operationType: "voice-coach-realtime", ttlSecs: 120,
  });
  assertEquals(hold.success, true, JSON.stringify(hold));
  assertEquals(hold.status, "held");
  assertEquals(hold.balance, 700);
  assertEquals(hold.held, 300);

  const settle = await client.settleHold({ holdId: hold.requestId, tokenAmount: 120 });
  assertEquals(settle.success, true, JSON.stringify(settle));
  assertEquals(settle.status, "settled");
  assertEquals(settle.balance, 880);
  assertEquals(settle.held, 0);

  const again = await client.settleHold({ holdId: hold.requestId, tokenAmount: 10 });
  assertEquals(again.success, false);
  assertEquals(again.error, "hold_already_resolved");

  const hold2 = await client.holdTokens({ userId: user, tokenAmount: 200, operationType: "audio-transcribe" });
  assertEquals(hold2.success, true, JSON.stringify(hold2));
  assertEquals(hold2.balance, 680);
  const release = await client.releaseHold({ holdId: hold2.requestId });
  assertEquals(release.success, true, JSON.stringify(release));
  assertEquals(release.status, "released");
  assertEquals(release.balance, 880);
  assertEquals(release.held, 0);

  const unknown = await client.releaseHold({ holdId: crypto.randomUUID() });
  assertEquals(unknown.success, false);
  assertEquals(unknown.error, "hold_not_found");

  const tooBig = await client.holdTokens({ userId: user, tokenAmount: 881, operationType: "scan" });
  assertEquals(tooBig.success, false);
  assertEquals(tooBig.error, "insufficient_tokens");
});

Deno.test("bad arguments are refused locally, before anything is enqueued", async () => {
  for (const tokenAmount of [0, -3, 1.5, Number.MAX_SAFE_INTEGER + 1]) {
    const r = await client.consumeTokensAtomic({ userId: FUNDED_USER, tokenAmount, operationType: "scan" });
    assertEquals(r.success, false);
    assertEquals(r.error, "invalid_request", `tokenAmount ${tokenAmount}`);
  }
  const badUser = await client.consumeTokensAtomic({ userId: "alice", tokenAmount: 1, operationType: "scan" });
  assertEquals(badUser.error, "invalid_request");
  const badOp = await client.consumeTokensAtomic({ userId: FUNDED_USER, tokenAmount: 1, operationType: "" });
  assertEquals(badOp.error, "invalid_request");
});

Deno.test("no reply within the timeout gives error 'timeout' with the request id", async () => {
  // Nobody serves this prefix, so no reply can come.
  const lonely = new TokenwardenClient({ prefix: `${client.prefix}:unserved`, timeoutMs: 300 });
  try {
    const requestId = crypto.randomUUID();
    const started = Date.now();
    const r = await lonely.consumeTokensAtomic({
      userId: FUNDED_USER, tokenAmount: 1, operationType: "scan", requestId,
    });
    assertEquals(r.success, false);
    assertEquals(r.error, "timeout");
    assertEquals(r.requestId, requestId);
    assert(Date.now() - started >= 250, "waited about the timeout");
    assert(r.reason?.includes("ledger_requests") === true, "the reason says where the outcome is");
  } finally {
    await lonely.close();
  }
});

Deno.test("linkWallet: linked, replayed nonce refused, malformed message refused, unlink", async () => {
  const userId = required("TW_TEST_LINK_USER");
  const message = required("TW_TEST_LINK_MESSAGE");
  const signature = required("TW_TEST_LINK_SIGNATURE");
  const address = required("TW_TEST_LINK_ADDRESS");
  const bad = await client.linkWallet({ userId, message: "let me in", signature });
  assertEquals([bad.success, bad.status, bad.reason], [false, "refused", "malformed_message"]);
  const ok = await linkWallet({ userId, message, signature });
  assertEquals([ok.success, ok.status, ok.method, ok.address], [true, "linked", "eoa", address]);
  assertEquals(ok.movedFromUser, null);
  const replay = await client.linkWallet({ userId, message, signature });
  assertEquals([replay.success, replay.reason], [false, "nonce_used"]);
  const local = await client.linkWallet({ userId, message, signature: "not hex" });
  assertEquals(local.error, "invalid_request");
  const gone = await unlinkWallet({ userId, address });
  assertEquals([gone.success, gone.status], [true, "unlinked"]);
  const again = await client.unlinkWallet({ userId, address });
  assertEquals([again.success, again.status], [false, "not_linked"]);
});

Deno.test("verifyAccess: allowed with evidence, no_wallet, the seed's form, bad input", async () => {
  const member = required("TW_TEST_MEMBER");
  const creatorId = required("TW_TEST_CREATOR");
  const token = required("TW_TEST_TOKEN");
  const ok = await verifyAccess({ userId: member, creatorId, feature: "CHAT" });
  assertEquals([ok.success, ok.decision?.source, ok.decision?.evidence.length], [true, "index", 1]);
  assert(ok.decision!.evidence[0].passed);
  const stranger = await client.verifyAccess({ userId: crypto.randomUUID(), creatorId, feature: "CHAT" });
  assertEquals([stranger.success, stranger.error], [false, "no_wallet"]);
  const seed = await client.verifyAccess({ userId: member, chainId: 31337, token, feature: "CHAT" });
  assertEquals([seed.success, seed.decision?.rule_version], [true, 0]);
  const bad = await client.verifyAccess({ userId: member, chainId: 31337, token: "0x12", feature: "CHAT" });
  assertEquals(bad.error, "invalid_request");
  // The caller's IP and user agent go to the audit; a malformed IP is the worker's rejection.
  const audited = await client.verifyAccess({
    userId: member, creatorId, feature: "CHAT", callerIp: "203.0.113.7", userAgent: "deno-test",
  });
  assertEquals(audited.success, true);
  const badIp = await client.verifyAccess({ userId: member, creatorId, feature: "CHAT", callerIp: "999.1.1.1" });
  assertEquals(badIp.success, false);
});

Deno.test("requestWhitelist: granted with evidence, final, no_wallet, bad input", async () => {
  const member = required("TW_TEST_MEMBER");
  const whitelistId = required("TW_TEST_WHITELIST");
  const first = await requestWhitelist({ userId: member, whitelistId });
  assertEquals([first.success, first.status, first.amount], [true, "granted", "1"], JSON.stringify(first));
  assert(first.decision!.evidence[0].passed);
  const again = await client.requestWhitelist({ userId: member, whitelistId });
  assertEquals([again.success, again.address, again.decidedAt], [true, first.address, first.decidedAt]);
  const stranger = await client.requestWhitelist({ userId: crypto.randomUUID(), whitelistId });
  assertEquals([stranger.success, stranger.status, stranger.reason], [false, "refused", "no_wallet"]);
  const bad = await client.requestWhitelist({ userId: member, whitelistId: "not-a-uuid" });
  assertEquals(bad.error, "invalid_request");
});

Deno.test("close the shared clients", async () => {
  await client.close();
  await defaultTokenwardenClient().close();
});
