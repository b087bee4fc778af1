//! One circuit breaker per verifier: `failsafe`'s state machine (a success rate over a time
//! window, a constant open delay) with a gate that lets exactly one probe through while
//! half-open — failsafe itself lets every call through in that state. State and transitions
//! are metrics (`tokenwarden_verifier_breaker_state`, `…_transitions_total`) and log lines.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{SuccessRateOverTimeWindow, success_rate_over_time_window};
use failsafe::{Instrument, StateMachine};

use crate::config::VerifierConfig;

/// The breaker's state, as the gauge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::HalfOpen,
            2 => BreakerState::Open,
            _ => BreakerState::Closed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

/// Receives failsafe's transitions: keeps the state for the gate, sets the metrics, logs.
#[derive(Clone)]
struct Observer {
    verifier: Arc<str>,
    state: Arc<AtomicU8>,
}

impl Observer {
    fn enter(&self, to: BreakerState) {
        let from = BreakerState::from_u8(self.state.swap(to as u8, Ordering::SeqCst));
        metrics::gauge!("tokenwarden_verifier_breaker_state", "verifier" => self.verifier.to_string())
            .set(to as u8 as f64);
        if from == to {
            return;
        }
        metrics::counter!("tokenwarden_verifier_breaker_transitions_total",
            "verifier" => self.verifier.to_string(), "to" => to.as_str())
        .increment(1);
        match to {
            BreakerState::Open => tracing::warn!(verifier = %self.verifier, from = from.as_str(),
                "verifier circuit breaker opened: calls fail fast, checks use the fallback"),
            BreakerState::HalfOpen => tracing::info!(verifier = %self.verifier,
                "verifier circuit breaker half-open: one probe call goes through"),
            BreakerState::Closed => tracing::info!(verifier = %self.verifier, from = from.as_str(),
                "verifier circuit breaker closed"),
        }
    }
}

impl Instrument for Observer {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.enter(BreakerState::Open);
    }
    fn on_half_open(&self) {
        self.enter(BreakerState::HalfOpen);
    }
    fn on_closed(&self) {
        self.enter(BreakerState::Closed);
    }
}

type Machine = StateMachine<SuccessRateOverTimeWindow<Constant>, Observer>;

/// A verifier's breaker.
pub struct Breaker {
    machine: Machine,
    observer: Observer,
    /// Serialises the permit decision so that one caller, and only one, becomes the probe.
    gate: Mutex<()>,
    probing: AtomicBool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("verifier", &self.observer.verifier)
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    pub fn new(verifier: &str, cfg: &VerifierConfig) -> Self {
        let observer = Observer {
            verifier: Arc::from(verifier),
            state: Arc::new(AtomicU8::new(BreakerState::Closed as u8)),
        };
        let policy = success_rate_over_time_window(
            (1.0 - cfg.breaker_failure_rate).clamp(0.0, 1.0),
            cfg.breaker_min_calls,
            Duration::from_secs(cfg.breaker_window_secs),
            backoff::constant(Duration::from_secs(cfg.breaker_open_secs)),
        );
        let machine = failsafe::Config::new()
            .failure_policy(policy)
            .instrument(observer.clone())
            .build();
        Self {
            machine,
            observer,
            gate: Mutex::new(()),
            probing: AtomicBool::new(false),
        }
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.observer.state.load(Ordering::SeqCst))
    }

    /// Leave to make one call, or `None`: open (fail fast), or half-open with its probe out.
    pub fn permit(&self) -> Option<Permit<'_>> {
        let _gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        if self.state() == BreakerState::HalfOpen && self.probing.load(Ordering::SeqCst) {
            return None;
        }
        if !failsafe::CircuitBreaker::is_call_permitted(&self.machine) {
            return None;
        }
        let probe = self.state() == BreakerState::HalfOpen;
        if probe {
            self.probing.store(true, Ordering::SeqCst);
        }
        Some(Permit {
            breaker: self,
            probe,
            done: false,
        })
    }
}

/// One permitted call; report how it went. Dropped unreported (the caller gave up), it counts
/// as a failure, so a lost probe cannot leave the breaker half-open for ever.
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    done: bool,
}

impl Permit<'_> {
    /// The verifier answered (a valid body, or a client error: it is up).
    pub fn success(mut self) {
        self.finish(true);
    }

    /// Timeout, network error, 5xx, 429 or a body that is not the profile's format.
    pub fn failure(mut self) {
        self.finish(false);
    }

    fn finish(&mut self, ok: bool) {
        if self.done {
            return;
        }
        self.done = true;
        if ok {
            self.breaker.machine.on_success();
        } else {
            self.breaker.machine.on_error();
        }
        if self.probe {
            self.breaker.probing.store(false, Ordering::SeqCst);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.finish(false);
    }
}
