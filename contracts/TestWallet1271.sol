// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// A contract wallet for the ERC-1271 tests: it vouches for a hash signed by its owner (the
/// deployer). `isValidSignature` returns the magic value 0x1626ba7e for a valid signature.
contract TestWallet1271 {
    address public owner;

    constructor() {
        owner = msg.sender;
    }

    function isValidSignature(bytes32 hash, bytes calldata sig) external view returns (bytes4) {
        if (sig.length != 65) return 0xffffffff;
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := calldataload(sig.offset)
            s := calldataload(add(sig.offset, 32))
            v := byte(0, calldataload(add(sig.offset, 64)))
        }
        if (v < 27) v += 27;
        address signer = ecrecover(hash, v, r, s);
        return signer != address(0) && signer == owner ? bytes4(0x1626ba7e) : bytes4(0xffffffff);
    }
}
