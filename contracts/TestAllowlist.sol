// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// A mint allowlist as a creator would deploy it: the root of a whitelist exported by
/// `tokenwarden whitelist export --format tree`, checked with OpenZeppelin's MerkleProof and
/// the StandardMerkleTree leaf for (address, uint256 amount).
contract TestAllowlist {
    bytes32 public immutable root;

    constructor(bytes32 root_) {
        root = root_;
    }

    function leaf(address account, uint256 amount) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(account, amount))));
    }

    function allowed(bytes32[] calldata proof, address account, uint256 amount) external view returns (bool) {
        return MerkleProof.verifyCalldata(proof, root, leaf(account, amount));
    }
}
