// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// The `aggregate3` function of Multicall3 (same ABI), for tests: its runtime code is installed
/// at 0xcA11bde05977b3631167028862bE2a173976CA11 with `anvil_setCode` so reconciliation's
/// Multicall3 path runs against a real EVM.
contract Multicall3Lite {
    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData) {
        returnData = new Result[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            (bool ok, bytes memory data) = calls[i].target.call(calls[i].callData);
            require(ok || calls[i].allowFailure, "Multicall3: call failed");
            returnData[i] = Result(ok, data);
        }
    }
}
