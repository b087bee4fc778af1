//! A real anvil per test: spawned on a free port, ready when it answers, killed on drop; plus
//! helpers to deploy and drive the test contracts in `contracts/` (compiled artifacts committed).

use std::time::Duration;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::sol;
use alloy::sol_types::SolCall;

use super::{repo_root, wait_until};

/// The run-time tools' anvil helpers: binary lookup, ERC-20/721 interfaces and calldata.
#[allow(dead_code)]
#[path = "../../src/bin/support/anvil.rs"]
mod tools;
pub use tools::{TestNft721, TestToken20};

sol! {
    interface TestMulti1155 {
        event TransferSingle(address indexed operator, address indexed from, address indexed to, uint256 id, uint256 value);
        event TransferBatch(address indexed operator, address indexed from, address indexed to, uint256[] ids, uint256[] values);
        function mint(address to, uint256 id, uint256 value) external;
        function mintBatch(address to, uint256[] ids, uint256[] values) external;
        function safeTransferFrom(address from, address to, uint256 id, uint256 value, bytes data) external;
        function safeBatchTransferFrom(address from, address to, uint256[] ids, uint256[] values, bytes data) external;
        function burn(address from, uint256 id, uint256 value) external;
        function burnBatch(address from, uint256[] ids, uint256[] values) external;
        function emitMalformed(address from, address to, uint256[] ids, uint256[] values) external;
        function balanceOfBatch(address[] accounts, uint256[] ids) external view returns (uint256[]);
        function totalSupply(uint256 id) external view returns (uint256);
    }
}

/// A running anvil, killed when dropped.
pub struct Anvil {
    child: std::process::Child,
    pub port: u16,
    pub url: String,
    pub ws_url: String,
    pub provider: DynProvider,
    /// The first unlocked dev account (sends every test transaction).
    pub sender: Address,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// The anvil binary (the platform package's when present: see `tools::anvil_bin`).
pub fn anvil_bin() -> std::path::PathBuf {
    let bin = tools::anvil_bin(&repo_root());
    assert!(
        bin.exists(),
        "anvil is not installed at {}: run `make tools`",
        bin.display()
    );
    bin
}

impl Anvil {
    /// Starts anvil (automine) and waits until it answers.
    pub async fn spawn() -> Anvil {
        Self::spawn_with(&[]).await
    }

    /// Starts anvil with extra CLI arguments.
    pub async fn spawn_with(extra: &[&str]) -> Anvil {
        let bin = anvil_bin();
        let port = free_port();
        let child = std::process::Command::new(&bin)
            .args([
                "--port",
                &port.to_string(),
                "--host",
                "127.0.0.1",
                "--silent",
            ])
            .args(["--gas-limit", "1000000000"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn anvil");
        let url = format!("http://127.0.0.1:{port}");
        let provider = ProviderBuilder::new()
            .connect_http(url.parse().expect("anvil url"))
            .erased();
        let p = provider.clone();
        wait_until(Duration::from_secs(30), "anvil answers", || {
            let p = p.clone();
            async move { p.get_block_number().await.ok() }
        })
        .await;
        let sender = provider.get_accounts().await.expect("anvil accounts")[0];
        Anvil {
            child,
            port,
            url,
            ws_url: format!("ws://127.0.0.1:{port}"),
            provider,
            sender,
        }
    }

    /// Deploys a compiled contract from `contracts/<name>.bin`.
    pub async fn deploy(&self, name: &str) -> Address {
        self.deploy_with(name, &[]).await
    }

    /// Deploys `contracts/<name>.bin` with ABI-encoded constructor arguments appended.
    pub async fn deploy_with(&self, name: &str, constructor_args: &[u8]) -> Address {
        let hex_code = std::fs::read_to_string(repo_root().join(format!("contracts/{name}.bin")))
            .expect("compiled contract (run contracts/build.sh)");
        let mut code = hex::decode(hex_code.trim()).expect("hex bytecode");
        code.extend_from_slice(constructor_args);
        let code = Bytes::from(code);
        let tx = TransactionRequest::default()
            .from(self.sender)
            .with_deploy_code(code);
        let receipt = self
            .provider
            .send_transaction(tx)
            .await
            .expect("send deploy")
            .get_receipt()
            .await
            .expect("deploy receipt");
        receipt.contract_address.expect("contract address")
    }

    /// Sends one transaction calling `to` with `data`, waits for it to be mined, asserts it
    /// succeeded, and returns its hash.
    pub async fn send(&self, to: Address, data: Vec<u8>) -> B256 {
        // The nonce is read from the chain each time: anvil_reorg replaces history (and nonces).
        let nonce = self
            .provider
            .get_transaction_count(self.sender)
            .await
            .expect("nonce");
        let tx = TransactionRequest::default()
            .from(self.sender)
            .nonce(nonce)
            .to(to)
            .input(Bytes::from(data).into())
            .gas_limit(900_000_000);
        let receipt = self
            .provider
            .send_transaction(tx)
            .await
            .expect("send tx")
            .get_receipt()
            .await
            .expect("receipt");
        assert!(receipt.status(), "transaction reverted");
        receipt.transaction_hash
    }

    /// One `anvil_reorg` replacement transaction calling `to` with `data`, as JSON.
    pub fn reorg_tx_json(&self, to: Address, data: Vec<u8>) -> serde_json::Value {
        serde_json::json!({
            "from": self.sender,
            "to": to,
            "input": format!("0x{}", hex::encode(data)),
            "gas": "0x3000000",
        })
    }

    /// A transaction request (for `anvil_reorg` replacement blocks).
    pub fn tx(&self, to: Address, data: Vec<u8>) -> TransactionRequest {
        TransactionRequest::default()
            .from(self.sender)
            .to(to)
            .input(Bytes::from(data).into())
            .gas_limit(900_000_000)
    }

    /// ERC-20 `batch` calldata.
    pub fn erc20_batch(ops: &[(Address, Address, U256)]) -> Vec<u8> {
        tools::erc20_batch(ops)
    }

    /// ERC-721 `batch` calldata.
    pub fn erc721_batch(ops: &[(Address, Address, U256)]) -> Vec<u8> {
        tools::erc721_batch(ops)
    }

    /// `balanceOf(holder)` at the latest block.
    pub async fn balance_of(&self, token: Address, holder: Address) -> U256 {
        let data = TestToken20::balanceOfCall { owner: holder }.abi_encode();
        let out = self
            .provider
            .call(self.tx(token, data))
            .await
            .expect("balanceOf");
        TestToken20::balanceOfCall::abi_decode_returns(&out).expect("decode balanceOf")
    }

    /// `ownerOf(id)` at the latest block; `None` if it reverts (not minted or burned).
    pub async fn owner_of(&self, token: Address, id: U256) -> Option<Address> {
        let data = TestNft721::ownerOfCall { id }.abi_encode();
        match self.provider.call(self.tx(token, data)).await {
            Ok(out) => {
                Some(TestNft721::ownerOfCall::abi_decode_returns(&out).expect("decode ownerOf"))
            }
            Err(_) => None,
        }
    }

    /// ERC-1155 `balanceOfBatch(accounts, ids)` at the latest block.
    pub async fn balance_of_batch(&self, token: Address, pairs: &[(Address, U256)]) -> Vec<U256> {
        let data = TestMulti1155::balanceOfBatchCall {
            accounts: pairs.iter().map(|p| p.0).collect(),
            ids: pairs.iter().map(|p| p.1).collect(),
        }
        .abi_encode();
        let out = self
            .provider
            .call(self.tx(token, data))
            .await
            .expect("balanceOfBatch");
        TestMulti1155::balanceOfBatchCall::abi_decode_returns(&out).expect("decode balanceOfBatch")
    }

    /// ERC-1155 `totalSupply(id)` of the test contract at the latest block.
    pub async fn supply_of(&self, token: Address, id: U256) -> U256 {
        let data = TestMulti1155::totalSupplyCall { id }.abi_encode();
        let out = self
            .provider
            .call(self.tx(token, data))
            .await
            .expect("totalSupply");
        TestMulti1155::totalSupplyCall::abi_decode_returns(&out).expect("decode totalSupply")
    }

    /// Raw JSON-RPC (anvil_reorg, anvil_mine, evm_snapshot…).
    pub async fn raw(&self, method: &'static str, params: serde_json::Value) -> serde_json::Value {
        self.provider
            .raw_request::<_, serde_json::Value>(method.into(), params)
            .await
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    /// Mines `n` empty blocks.
    pub async fn mine(&self, n: u64) {
        self.raw("anvil_mine", serde_json::json!([format!("{n:#x}")]))
            .await;
    }

    /// The latest block number.
    pub async fn head(&self) -> u64 {
        self.provider
            .get_block_number()
            .await
            .expect("block number")
    }

    /// The process id (for tests that must look at it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
