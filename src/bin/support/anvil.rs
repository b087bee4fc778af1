//! anvil for the run-time tools (the chain chaos run, the indexer benchmark): where its binary
//! is, a child process on a free port killed on drop, the test contracts of `contracts/` and the
//! calls the tools make on them. Errors are `anyhow` (these are tools, not library code).
//! `tests/common/anvil.rs` includes this file for the binary lookup, the ERC-20/721 contract
//! interfaces and their calldata (its own helpers panic, as tests do), so it uses nothing
//! else of `support`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::sol;
use alloy::sol_types::SolCall;
use anyhow::{Context, Result, bail};

sol! {
    interface TestToken20 {
        function batch(address[] from, address[] to, uint256[] value) external;
        function spam(uint160 base, uint256 holders, uint256 start, uint256 n) external;
        function balanceOf(address owner) external view returns (uint256);
        function totalSupply() external view returns (uint256);
    }
    interface TestNft721 {
        function batch(address[] from, address[] to, uint256[] id) external;
        function ownerOf(uint256 id) external view returns (address);
    }
}

/// The anvil binary under `root` (the repository). `node_modules/.bin/anvil` is a Node launcher
/// whose child would outlive a kill of the launcher, so the platform package's binary is used
/// when present.
pub fn anvil_bin(root: &Path) -> PathBuf {
    if let Ok(entries) = std::fs::read_dir(root.join("node_modules/@foundry-rs")) {
        for e in entries.flatten() {
            let bin = e.path().join("bin/anvil");
            if e.file_name().to_string_lossy().starts_with("anvil-") && bin.exists() {
                return bin;
            }
        }
    }
    root.join("node_modules/.bin/anvil")
}

/// ERC-20 `batch` calldata: each (from, to, value); from = 0 mints, to = 0 burns.
pub fn erc20_batch(ops: &[(Address, Address, U256)]) -> Vec<u8> {
    TestToken20::batchCall {
        from: ops.iter().map(|o| o.0).collect(),
        to: ops.iter().map(|o| o.1).collect(),
        value: ops.iter().map(|o| o.2).collect(),
    }
    .abi_encode()
}

/// ERC-721 `batch` calldata: each (from, to, id); from = 0 mints, to = 0 burns.
pub fn erc721_batch(ops: &[(Address, Address, U256)]) -> Vec<u8> {
    TestNft721::batchCall {
        from: ops.iter().map(|o| o.0).collect(),
        to: ops.iter().map(|o| o.1).collect(),
        id: ops.iter().map(|o| o.2).collect(),
    }
    .abi_encode()
}

/// A running anvil (automine), killed when dropped.
pub struct AnvilProc {
    child: Child,
    pub url: String,
    pub ws_url: String,
    pub provider: DynProvider,
    /// The first unlocked dev account: sends every transaction.
    pub sender: Address,
    root: PathBuf,
}

impl AnvilProc {
    pub async fn spawn(root: &Path) -> Result<AnvilProc> {
        let bin = anvil_bin(root);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&bin)
            .args([
                "--port",
                &port.to_string(),
                "--host",
                "127.0.0.1",
                "--silent",
            ])
            .args(["--gas-limit", "1000000000"])
            // No historical state on disk: a killed anvil never removes it (bench-index left
            // 12 GB a run). The chaos and soak runs read state at the head or within the last
            // few blocks, which anvil keeps in memory.
            .args(["--max-persisted-states", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start {} (run `make tools`)", bin.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let provider = ProviderBuilder::new().connect_http(url.parse()?).erased();
        let mut anvil = AnvilProc {
            child,
            url,
            ws_url: format!("ws://127.0.0.1:{port}"),
            provider,
            sender: Address::ZERO,
            root: root.to_path_buf(),
        };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(accounts) = anvil.provider.get_accounts().await
                && let Some(a) = accounts.first()
            {
                anvil.sender = *a;
                return Ok(anvil);
            }
            if Instant::now() > until {
                bail!("anvil on port {port} did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deploys `contracts/<name>.bin`; returns its address.
    pub async fn deploy(&self, name: &str) -> Result<Address> {
        let path = self.root.join(format!("contracts/{name}.bin"));
        let code = hex::decode(std::fs::read_to_string(&path)?.trim())
            .with_context(|| format!("hex bytecode in {}", path.display()))?;
        let tx = TransactionRequest::default()
            .from(self.sender)
            .with_deploy_code(Bytes::from(code));
        let receipt = self
            .provider
            .send_transaction(tx)
            .await?
            .get_receipt()
            .await?;
        receipt
            .contract_address
            .with_context(|| format!("no contract address deploying {name}"))
    }

    /// Sends one transaction to `to` (mined at once: automine) and returns its hash and
    /// whether it succeeded. The nonce is read from the chain each time: `anvil_reorg`
    /// replaces history, nonces included.
    pub async fn send(&self, to: Address, data: Vec<u8>) -> Result<(B256, bool)> {
        let nonce = self.provider.get_transaction_count(self.sender).await?;
        let tx = self.tx(to, data).nonce(nonce);
        let hash: B256 = self
            .provider
            .raw_request("eth_sendTransaction".into(), (tx,))
            .await
            .context("eth_sendTransaction")?;
        // anvil answers the hash first and mines right after: the receipt follows within ms.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = self.provider.get_transaction_receipt(hash).await? {
                return Ok((hash, r.status()));
            }
            if Instant::now() > until {
                bail!("no receipt for {hash} within 30 s under automine");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A transaction from the sender to `to` with `data`.
    pub fn tx(&self, to: Address, data: Vec<u8>) -> TransactionRequest {
        TransactionRequest::default()
            .from(self.sender)
            .to(to)
            .input(Bytes::from(data).into())
            .gas_limit(900_000_000)
    }

    /// One `anvil_reorg` replacement transaction, as JSON.
    pub fn reorg_tx_json(&self, to: Address, data: Vec<u8>) -> serde_json::Value {
        serde_json::json!({
            "from": self.sender,
            "to": to,
            "input": format!("0x{}", hex::encode(data)),
            "gas": "0x3000000",
        })
    }

    /// Raw JSON-RPC (anvil_reorg, anvil_mine …).
    pub async fn raw(&self, method: &str, params: serde_json::Value) -> Result<serde_json::Value> {
        self.provider
            .raw_request::<_, serde_json::Value>(method.to_string().into(), params)
            .await
            .with_context(|| format!("{method} failed"))
    }

    /// `balanceOf(holder)` at `block`.
    pub async fn balance_of(&self, token: Address, holder: Address, block: u64) -> Result<U256> {
        let data = TestToken20::balanceOfCall { owner: holder }.abi_encode();
        let out = self
            .provider
            .call(self.tx(token, data))
            .block(block.into())
            .await?;
        Ok(TestToken20::balanceOfCall::abi_decode_returns(&out)?)
    }

    /// `totalSupply()` at `block`.
    pub async fn total_supply(&self, token: Address, block: u64) -> Result<U256> {
        let data = TestToken20::totalSupplyCall {}.abi_encode();
        let out = self
            .provider
            .call(self.tx(token, data))
            .block(block.into())
            .await?;
        Ok(TestToken20::totalSupplyCall::abi_decode_returns(&out)?)
    }

    /// `ownerOf(id)` at `block`; `None` when it reverts (never minted, or burned).
    pub async fn owner_of(&self, token: Address, id: U256, block: u64) -> Result<Option<Address>> {
        let data = TestNft721::ownerOfCall { id }.abi_encode();
        match self
            .provider
            .call(self.tx(token, data))
            .block(block.into())
            .await
        {
            Ok(out) => Ok(Some(TestNft721::ownerOfCall::abi_decode_returns(&out)?)),
            Err(e) if e.to_string().contains("revert") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The latest block's number and hash.
    pub async fn head(&self) -> Result<(u64, B256)> {
        let b = self
            .provider
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await?
            .context("anvil has no latest block")?;
        Ok((b.header.number, b.header.hash))
    }
}

impl Drop for AnvilProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
