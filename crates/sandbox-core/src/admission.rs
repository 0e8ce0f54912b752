//! Admission control: memory and CPU budgets for VMs, granted in FIFO order.
//!
//! The budget is the host's capacity (or the cgroup limit the host program runs under,
//! passed in by the caller) minus a reserve, times an overcommit ratio. A request waits in
//! line until it fits; after a bound it fails with a transient capacity error. Each grant is
//! an [`AdmissionPermit`] that gives its share back exactly once, when dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{Error, PermanentCause, Result, TransientCause};

/// Budget settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// Host memory (or the host program's cgroup limit), MiB.
    pub host_memory_mb: u64,
    /// Host CPUs (or the cgroup quota), cores.
    pub host_cpus: f64,
    /// Memory overcommit ratio (guest memory is mostly untouched), 1–10.
    pub memory_overcommit: f64,
    /// CPU overcommit ratio, 1–20.
    pub cpu_overcommit: f64,
    /// Share of host memory kept for the host, 0.01–0.5.
    pub memory_reserve_ratio: f64,
    /// Cores kept for the host, 0–16.
    pub cpu_reserve_cores: f64,
    /// How long a request may wait before a capacity error.
    pub timeout: Duration,
}

impl AdmissionConfig {
    /// Defaults for a host with `memory_mb` and `cpus`.
    pub fn for_host(memory_mb: u64, cpus: f64) -> Self {
        Self {
            host_memory_mb: memory_mb,
            host_cpus: cpus,
            memory_overcommit: 5.0,
            cpu_overcommit: 2.0,
            memory_reserve_ratio: 0.08,
            cpu_reserve_cores: 0.5,
            timeout: Duration::from_secs(120),
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::permanent(PermanentCause::Config, what.to_owned()))
            }
        };
        check(self.host_memory_mb > 0, "host memory must be positive")?;
        check(self.host_cpus > 0.0, "host CPUs must be positive")?;
        check(
            (1.0..=10.0).contains(&self.memory_overcommit),
            "memory overcommit must be 1-10",
        )?;
        check(
            (1.0..=20.0).contains(&self.cpu_overcommit),
            "CPU overcommit must be 1-20",
        )?;
        check(
            (0.01..=0.5).contains(&self.memory_reserve_ratio),
            "memory reserve ratio must be 0.01-0.5",
        )?;
        check(
            (0.0..=16.0).contains(&self.cpu_reserve_cores),
            "CPU reserve must be 0-16 cores",
        )
    }

    /// Memory budget in MiB.
    pub fn memory_budget_mb(&self) -> f64 {
        self.host_memory_mb as f64 * (1.0 - self.memory_reserve_ratio) * self.memory_overcommit
    }

    /// CPU budget in cores.
    pub fn cpu_budget(&self) -> f64 {
        (self.host_cpus - self.cpu_reserve_cores).max(0.25) * self.cpu_overcommit
    }
}

#[derive(Debug, Default)]
struct State {
    memory_mb: f64,
    cpus: f64,
    queue: VecDeque<u64>,
    next_ticket: u64,
}

/// Grants memory and CPU to VMs, first come first served.
#[derive(Debug, Clone)]
pub struct Admission {
    cfg: Arc<AdmissionConfig>,
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

/// A granted share; given back on drop, exactly once.
#[derive(Debug)]
pub struct AdmissionPermit {
    memory_mb: f64,
    cpus: f64,
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            s.memory_mb = (s.memory_mb - self.memory_mb).max(0.0);
            s.cpus = (s.cpus - self.cpus).max(0.0);
        }
        self.notify.notify_waiters();
    }
}

/// Leaves the queue when a waiter gives up or is cancelled.
struct Ticket<'a> {
    id: u64,
    admission: &'a Admission,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.admission.state.lock() {
            s.queue.retain(|t| *t != self.id);
        }
        self.admission.notify.notify_waiters();
    }
}

impl Admission {
    /// An admission controller for `cfg` (validated).
    pub fn new(cfg: AdmissionConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg: Arc::new(cfg),
            state: Arc::new(Mutex::new(State::default())),
            notify: Arc::new(Notify::new()),
        })
    }

    /// The settings.
    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// Memory (MiB) and CPU currently granted.
    pub fn allocated(&self) -> (f64, f64) {
        self.state
            .lock()
            .map(|s| (s.memory_mb, s.cpus))
            .unwrap_or((0.0, 0.0))
    }

    /// How many VMs of this size fit in the budget at once.
    pub fn capacity_for(&self, memory_mb: f64, cpus: f64) -> usize {
        let by_mem = self.cfg.memory_budget_mb() / memory_mb.max(1.0);
        let by_cpu = self.cfg.cpu_budget() / cpus.max(0.01);
        by_mem.min(by_cpu).floor().max(0.0) as usize
    }

    /// Grants `memory_mb` and `cpus` only if they fit now and nobody is waiting in line
    /// (background work such as the warm pool never queues ahead of requests).
    pub fn try_acquire(&self, memory_mb: f64, cpus: f64) -> Option<AdmissionPermit> {
        let mut s = self.state.lock().ok()?;
        let fits = s.memory_mb + memory_mb <= self.cfg.memory_budget_mb()
            && s.cpus + cpus <= self.cfg.cpu_budget();
        if !s.queue.is_empty() || !fits {
            return None;
        }
        s.memory_mb += memory_mb;
        s.cpus += cpus;
        Some(AdmissionPermit {
            memory_mb,
            cpus,
            state: self.state.clone(),
            notify: self.notify.clone(),
        })
    }

    /// Waits (FIFO, bounded) until `memory_mb` and `cpus` fit, then grants them.
    ///
    /// A VM larger than the host's memory (overcommit aside: a guest could touch all of
    /// it) is an input error at once, never a wait.
    pub async fn acquire(&self, memory_mb: f64, cpus: f64) -> Result<AdmissionPermit> {
        if memory_mb > self.cfg.host_memory_mb as f64 {
            return Err(Error::input(
                "memory_mb",
                format!(
                    "a VM needing {memory_mb:.0} MiB (guest memory and QEMU overhead) is \
                     larger than this host's memory ({} MiB)",
                    self.cfg.host_memory_mb
                ),
            ));
        }
        if memory_mb > self.cfg.memory_budget_mb() || cpus > self.cfg.cpu_budget() {
            return Err(Error::transient(
                TransientCause::Capacity,
                format!(
                    "a VM needing {memory_mb:.0} MiB and {cpus:.2} CPUs exceeds the whole budget \
                     ({:.0} MiB, {:.2} CPUs)",
                    self.cfg.memory_budget_mb(),
                    self.cfg.cpu_budget()
                ),
            ));
        }
        let ticket = {
            let mut s = self.state.lock().map_err(|_| poisoned())?;
            let id = s.next_ticket;
            s.next_ticket += 1;
            s.queue.push_back(id);
            Ticket {
                id,
                admission: self,
            }
        };
        let wait = async {
            loop {
                let notified = self.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let mut s = self.state.lock().map_err(|_| poisoned())?;
                    let first = s.queue.front() == Some(&ticket.id);
                    let fits = s.memory_mb + memory_mb <= self.cfg.memory_budget_mb()
                        && s.cpus + cpus <= self.cfg.cpu_budget();
                    if first && fits {
                        s.memory_mb += memory_mb;
                        s.cpus += cpus;
                        return Ok(AdmissionPermit {
                            memory_mb,
                            cpus,
                            state: self.state.clone(),
                            notify: self.notify.clone(),
                        });
                    }
                }
                notified.await;
            }
        };
        let result = tokio::time::timeout(self.cfg.timeout, wait).await;
        drop(ticket);
        match result {
            Ok(r) => r,
            Err(_) => Err(Error::transient(
                TransientCause::Capacity,
                format!(
                    "no capacity for a {memory_mb:.0} MiB VM within {} s",
                    self.cfg.timeout.as_secs()
                ),
            )),
        }
    }
}

fn poisoned() -> Error {
    Error::permanent(PermanentCause::Internal, "admission state poisoned")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn small(timeout_ms: u64) -> Admission {
        // Budget: 1000 MiB × (1 − 0.1) × 1 = 900 MiB; CPUs (4.5 − 0.5) × 1 = 4.
        Admission::new(AdmissionConfig {
            host_memory_mb: 1000,
            host_cpus: 4.5,
            memory_overcommit: 1.0,
            cpu_overcommit: 1.0,
            memory_reserve_ratio: 0.1,
            cpu_reserve_cores: 0.5,
            timeout: Duration::from_millis(timeout_ms),
        })
        .unwrap()
    }

    #[test]
    fn budgets_and_validation() {
        let a = small(10);
        assert!((a.config().memory_budget_mb() - 900.0).abs() < 1e-9);
        assert!((a.config().cpu_budget() - 4.0).abs() < 1e-9);
        assert_eq!(a.capacity_for(300.0, 1.0), 3);
        let mut bad = AdmissionConfig::for_host(1000, 2.0);
        bad.memory_overcommit = 0.5;
        assert!(Admission::new(bad).is_err());
    }

    #[tokio::test]
    async fn grants_until_full_then_times_out_with_capacity_error() {
        let a = small(50);
        let p1 = a.acquire(400.0, 1.0).await.unwrap();
        let p2 = a.acquire(400.0, 1.0).await.unwrap();
        let err = a.acquire(400.0, 1.0).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Transient(TransientCause::Capacity));
        assert!(err.is_retryable());
        drop(p1);
        let p3 = a.acquire(400.0, 1.0).await.unwrap();
        drop((p2, p3));
        assert_eq!(a.allocated(), (0.0, 0.0));
    }

    #[tokio::test]
    async fn oversized_requests_fail_at_once() {
        let a = small(10_000);
        let err = a.acquire(901.0, 1.0).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Transient(TransientCause::Capacity));
    }

    /// Overcommit lets many VMs share the host's memory, never one VM exceed it: that is
    /// the caller's mistake, not a capacity problem to retry.
    #[tokio::test]
    async fn a_vm_larger_than_the_host_is_an_input_error() {
        let a = Admission::new(AdmissionConfig::for_host(1000, 4.0)).unwrap();
        assert!(a.config().memory_budget_mb() > 1000.0);
        let err = a.acquire(1001.0, 1.0).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Input);
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("1000 MiB"), "{err}");
        drop(a.acquire(900.0, 1.0).await.unwrap());
    }

    #[tokio::test]
    async fn waiters_are_served_in_order() {
        let a = small(5_000);
        let hold = a.acquire(800.0, 1.0).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, mem) in [(0, 500.0), (1, 100.0), (2, 100.0)] {
            let a = a.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let p = a.acquire(mem, 0.5).await.unwrap();
                order.lock().unwrap().push(i);
                p
            }));
            // Queue in a known order.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The small requests would fit now, but the big one is first in line: FIFO.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(order.lock().unwrap().is_empty());
        drop(hold);
        let mut permits = Vec::new();
        for t in tasks {
            permits.push(t.await.unwrap());
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        drop(permits);
        assert_eq!(a.allocated(), (0.0, 0.0));
    }

    #[tokio::test]
    async fn try_acquire_never_jumps_the_line() {
        let a = small(5_000);
        let hold = a.acquire(800.0, 1.0).await.unwrap();
        assert!(a.try_acquire(200.0, 1.0).is_none(), "does not fit");
        assert!(a.try_acquire(100.0, 1.0).is_some_and(|p| {
            drop(p);
            true
        }));
        // A waiter is in line: try_acquire refuses even what would fit.
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.acquire(500.0, 1.0).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(a.try_acquire(50.0, 0.5).is_none());
        drop(hold);
        let p = waiter.await.unwrap().unwrap();
        drop(p);
        assert_eq!(a.allocated(), (0.0, 0.0));
    }

    #[tokio::test]
    async fn cancelled_waiters_leave_the_queue() {
        let a = small(5_000);
        let hold = a.acquire(800.0, 1.0).await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(30), a.acquire(500.0, 1.0)).await;
        assert!(waiting.is_err());
        drop(hold);
        // The cancelled waiter no longer blocks the line.
        let p = tokio::time::timeout(Duration::from_millis(500), a.acquire(100.0, 1.0))
            .await
            .unwrap()
            .unwrap();
        drop(p);
        assert_eq!(a.allocated(), (0.0, 0.0));
    }
}
