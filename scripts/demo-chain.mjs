// Deploys the demo ERC-20 (contracts/TestToken20) on a local anvil and makes a small history of
// mints and transfers, using plain JSON-RPC (anvil's accounts are unlocked). Prints
// {"address": "0x…", "block": N} on stdout.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { keccak256 } = require("js-sha3");
const rpcUrl = process.env.ANVIL_URL ?? "http://127.0.0.1:8545";
let nextId = 1;

async function rpc(method, params = []) {
  const res = await fetch(rpcUrl, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ jsonrpc: "2.0", id: nextId++, method, params }),
  });
  const body = await res.json();
  if (body.error) throw new Error(`${method}: ${JSON.stringify(body.error)}`);
  return body.result;
}

async function send(from, to, data) {
  const hash = await rpc("eth_sendTransaction", [{ from, to, data, gas: "0x1c9c380" }]);
  for (let i = 0; i < 200; i++) {
    const receipt = await rpc("eth_getTransactionReceipt", [hash]);
    if (receipt) {
      if (receipt.status !== "0x1") throw new Error(`transaction ${hash} reverted`);
      return receipt;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`no receipt for ${hash}`);
}

const word = (n) => BigInt(n).toString(16).padStart(64, "0");
const selector = (sig) => keccak256(sig).slice(0, 8);

const [deployer] = await rpc("eth_accounts");
const bytecode = readFileSync(new URL("../contracts/TestToken20.bin", import.meta.url), "utf8").trim();
const deployed = await send(deployer, null, bytecode.startsWith("0x") ? bytecode : `0x${bytecode}`);
const token = deployed.contractAddress;
// 20 demo holders at 0x…1000 + k: mint 1000 to each, then 40 one-unit transfers among them.
const spam = `0x${selector("spam(uint160,uint256,uint256,uint256)")}${word(0x1000)}${word(20)}${word(0)}${word(60)}`;
const receipt = await send(deployer, token, spam);
console.log(JSON.stringify({ address: token.toLowerCase(), block: Number(receipt.blockNumber) }));
