// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// A minimal ERC-1155 for indexer tests, written by hand (no OpenZeppelin). Like the other test
/// tokens it lets a test move anyone's tokens without their keys (no approval check, no
/// receiver hook: holders are plain addresses); it is a test token, not something to deploy
/// for value. `emitMalformed` emits a TransferBatch whose arrays differ in length, which a real
/// contract never does, so the indexer's rejection path can be tested against a real chain.
contract TestMulti1155 {
    mapping(uint256 => mapping(address => uint256)) private _balances;
    mapping(uint256 => uint256) public totalSupply;

    event TransferSingle(address indexed operator, address indexed from, address indexed to, uint256 id, uint256 value);
    event TransferBatch(address indexed operator, address indexed from, address indexed to, uint256[] ids, uint256[] values);

    function balanceOf(address account, uint256 id) external view returns (uint256) {
        return _balances[id][account];
    }

    function balanceOfBatch(address[] calldata accounts, uint256[] calldata ids) external view returns (uint256[] memory out) {
        require(accounts.length == ids.length, "lengths");
        out = new uint256[](accounts.length);
        for (uint256 i = 0; i < accounts.length; i++) {
            out[i] = _balances[ids[i]][accounts[i]];
        }
    }

    function _move(address from, address to, uint256 id, uint256 value) internal {
        if (from == address(0)) {
            totalSupply[id] += value;
        } else {
            require(_balances[id][from] >= value, "balance");
            _balances[id][from] -= value;
        }
        if (to == address(0)) {
            totalSupply[id] -= value;
        } else {
            _balances[id][to] += value;
        }
    }

    function _single(address from, address to, uint256 id, uint256 value) internal {
        _move(from, to, id, value);
        emit TransferSingle(msg.sender, from, to, id, value);
    }

    function _batch(address from, address to, uint256[] calldata ids, uint256[] calldata values) internal {
        require(ids.length == values.length, "lengths");
        for (uint256 i = 0; i < ids.length; i++) {
            _move(from, to, ids[i], values[i]);
        }
        emit TransferBatch(msg.sender, from, to, ids, values);
    }

    function mint(address to, uint256 id, uint256 value) external {
        _single(address(0), to, id, value);
    }

    function mintBatch(address to, uint256[] calldata ids, uint256[] calldata values) external {
        _batch(address(0), to, ids, values);
    }

    function safeTransferFrom(address from, address to, uint256 id, uint256 value, bytes calldata) external {
        _single(from, to, id, value);
    }

    function safeBatchTransferFrom(address from, address to, uint256[] calldata ids, uint256[] calldata values, bytes calldata) external {
        _batch(from, to, ids, values);
    }

    function burn(address from, uint256 id, uint256 value) external {
        _single(from, address(0), id, value);
    }

    function burnBatch(address from, uint256[] calldata ids, uint256[] calldata values) external {
        _batch(from, address(0), ids, values);
    }

    function emitMalformed(address from, address to, uint256[] calldata ids, uint256[] calldata values) external {
        emit TransferBatch(msg.sender, from, to, ids, values);
    }
}
