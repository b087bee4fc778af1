// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// A minimal ERC-721 for indexer tests. `batch` emits many Transfer logs (mints, burns,
/// transfers, self-transfers) in one transaction without holding the holders' keys.
contract TestNft721 {
    string public name = "Test NFT";
    string public symbol = "TNFT";
    mapping(uint256 => address) private _owners;
    mapping(address => uint256) public balanceOf;

    event Transfer(address indexed from, address indexed to, uint256 indexed tokenId);

    function ownerOf(uint256 id) external view returns (address) {
        address o = _owners[id];
        require(o != address(0), "nonexistent");
        return o;
    }

    function _move(address from, address to, uint256 id) internal {
        require(_owners[id] == from, "owner");
        if (from != address(0)) {
            balanceOf[from] -= 1;
        }
        if (to != address(0)) {
            balanceOf[to] += 1;
        }
        _owners[id] = to;
        emit Transfer(from, to, id);
    }

    /// Applies each (from, to, id): from == 0 mints, to == 0 burns.
    function batch(address[] calldata from, address[] calldata to, uint256[] calldata id) external {
        require(from.length == to.length && to.length == id.length, "lengths");
        for (uint256 i = 0; i < from.length; i++) {
            _move(from[i], to[i], id[i]);
        }
    }
}
