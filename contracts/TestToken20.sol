// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// A minimal ERC-20 for indexer tests and benchmarks. `batch` lets a test emit many Transfer logs
/// (mints, burns, transfers, self-transfers, zero-value transfers) in one transaction without
/// holding the holders' keys; it is a test token, not something to deploy for value.
contract TestToken20 {
    string public name = "Test Token";
    string public symbol = "TT20";
    uint8 public constant decimals = 18;
    uint256 public totalSupply;
    mapping(address => uint256) public balanceOf;

    event Transfer(address indexed from, address indexed to, uint256 value);

    function _move(address from, address to, uint256 value) internal {
        if (from == address(0)) {
            totalSupply += value;
        } else {
            require(balanceOf[from] >= value, "balance");
            balanceOf[from] -= value;
        }
        if (to == address(0)) {
            totalSupply -= value;
        } else {
            balanceOf[to] += value;
        }
        emit Transfer(from, to, value);
    }

    function transfer(address to, uint256 value) external returns (bool) {
        _move(msg.sender, to, value);
        return true;
    }

    /// Applies each (from, to, value): from == 0 mints, to == 0 burns.
    function batch(address[] calldata from, address[] calldata to, uint256[] calldata value) external {
        require(from.length == to.length && to.length == value.length, "lengths");
        for (uint256 i = 0; i < from.length; i++) {
            _move(from[i], to[i], value[i]);
        }
    }

    /// Benchmark helper: `n` transfers among `holders` synthetic addresses starting at `base`.
    /// Transfer k (counting from `start`) mints 1000 to holder k while k < holders, then moves
    /// 1 unit from holder k % holders to holder (k * 7 + 3) % holders.
    function spam(uint160 base, uint256 holders, uint256 start, uint256 n) external {
        for (uint256 k = start; k < start + n; k++) {
            if (k < holders) {
                _move(address(0), address(base + uint160(k)), 1000);
            } else {
                _move(address(base + uint160(k % holders)), address(base + uint160((k * 7 + 3) % holders)), 1);
            }
        }
    }
}
