#!/usr/bin/env bash
# Compiles the test contracts with solcjs (npm `solc`, installed by `make tools`) and writes
# <Name>.abi, <Name>.bin (creation code) and <Name>.runtime.bin (deployed code) next to the
# sources. The outputs are committed so tests and the benchmark need no compiler.
# Imports such as "@openzeppelin/contracts/..." resolve in ../node_modules (npm
# @openzeppelin/contracts, a devDependency): solc's import callback with --include-path.
set -euo pipefail
cd "$(dirname "$0")"
SOLC=../node_modules/.bin/solcjs
for name in TestToken20 TestNft721 Multicall3Lite TestVaultFactory TestWallet1271 TestAllowlist TestMulti1155; do
  node -e '
    const fs = require("fs");
    const name = process.argv[1];
    const input = {
      language: "Solidity",
      sources: { [name + ".sol"]: { content: fs.readFileSync(name + ".sol", "utf8") } },
      settings: { optimizer: { enabled: true, runs: 200 },
                  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } } },
    };
    const raw = require("child_process").execFileSync(process.argv[2], ["--standard-json", "--base-path", ".", "--include-path", "../node_modules"], { input: JSON.stringify(input) }).toString();
    const out = JSON.parse(raw.slice(raw.indexOf("{")));
    for (const e of out.errors || []) if (e.severity === "error") { console.error(e.formattedMessage); process.exit(1); }
    const c = out.contracts[name + ".sol"][name];
    fs.writeFileSync(name + ".abi", JSON.stringify(c.abi));
    fs.writeFileSync(name + ".bin", c.evm.bytecode.object);
    fs.writeFileSync(name + ".runtime.bin", c.evm.deployedBytecode.object);
  ' "$name" "$SOLC"
done
echo "compiled: $(ls *.abi *.bin | tr '\n' ' ')"
