#!/usr/bin/env bash
# Compiles the test contracts with solcjs (npm `solc`, installed by `make tools`) and writes
# <Name>.abi and <Name>.bin next to the sources. The outputs are committed so tests and the
# benchmark need no compiler.
set -euo pipefail
cd "$(dirname "$0")"
SOLC=../node_modules/.bin/solcjs
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for name in TestToken20 TestNft721; do
  "$SOLC" --optimize --bin --abi -o "$out" "$name.sol" >/dev/null
  cp "$out/${name}_sol_${name}.abi" "$name.abi"
  cp "$out/${name}_sol_${name}.bin" "$name.bin"
done
echo "compiled: $(ls *.abi *.bin | tr '\n' ' ')"
