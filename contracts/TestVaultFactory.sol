// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// A stand-in for an IP Royalty Vault: an ERC-20 whose whole supply is minted to one holder
/// at creation (Transfer from 0 in the constructor), plus TestToken20's `batch` so tests can
/// move it without the holders' keys. A test contract, not something to deploy for value.
contract TestRoyaltyVault {
    string public name = "Royalty Vault";
    string public symbol = "RT";
    uint8 public constant decimals = 6;
    mapping(address => uint256) public balanceOf;

    event Transfer(address indexed from, address indexed to, uint256 value);

    constructor(address holder, uint256 amount) {
        balanceOf[holder] = amount;
        emit Transfer(address(0), holder, amount);
    }

    function batch(address[] calldata from, address[] calldata to, uint256[] calldata value) external {
        require(from.length == to.length && to.length == value.length, "lengths");
        for (uint256 i = 0; i < from.length; i++) {
            if (from[i] != address(0)) {
                require(balanceOf[from[i]] >= value[i], "balance");
                balanceOf[from[i]] -= value[i];
            }
            if (to[i] != address(0)) {
                balanceOf[to[i]] += value[i];
            }
            emit Transfer(from[i], to[i], value[i]);
        }
    }
}

/// A factory shaped like Story's RoyaltyModule: each creation is announced with
/// `IpRoyaltyVaultDeployed(address ipId, address ipRoyaltyVault)`, both arguments in the data.
contract TestVaultFactory {
    event IpRoyaltyVaultDeployed(address ipId, address ipRoyaltyVault);

    function deploy(address ipId, address holder, uint256 amount) external returns (address vault) {
        vault = address(new TestRoyaltyVault(holder, amount));
        emit IpRoyaltyVaultDeployed(ipId, vault);
    }
}
