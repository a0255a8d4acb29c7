//! Carrying out the fault schedule on the running pods, healer, proxy,
//! registry and state disk, and counting what was done.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::agents::Shared;
use crate::common::proxy::ProxyHandle;
use crate::common::registry::SchemaRegistry;
use crate::common::{Baton, BatonOptions, Broker, Healer};
use crate::plan::Fault;

/// The pod whose state directory is a small filesystem of its own.
pub const DISK_POD: usize = 2;

/// How the state disk of [`DISK_POD`] is filled.
pub enum Disk {
    /// A size-limited tmpfs mounted on its state directory: filled for
    /// real with a file until writes fail with ENOSPC.
    Tmpfs { mount: PathBuf },
    /// Mounting is not allowed here: baton's test switch makes every state
    /// write fail instead (`BATON_TEST_FAULTS_DIR`), which is what a full
    /// disk looks like to RocksDB's caller.
    Simulated { switch: PathBuf, why: String },
}

impl Disk {
    /// Mounts a tmpfs of `size_mib` on `dir`, or says why it cannot.
    pub fn prepare(dir: &Path, faults_dir: &Path, size_mib: u64) -> Disk {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir)
            .output();
        match status {
            Ok(output) if output.status.success() => Disk::Tmpfs {
                mount: dir.to_path_buf(),
            },
            Ok(output) => Disk::Simulated {
                switch: faults_dir.join(baton::state::faults::FAIL_STATE_WRITES),
                why: format!(
                    "mount -t tmpfs refused: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            },
            Err(err) => Disk::Simulated {
                switch: faults_dir.join(baton::state::faults::FAIL_STATE_WRITES),
                why: format!("cannot run mount: {err}"),
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Disk::Tmpfs { .. } => "a real full disk (tmpfs filled to ENOSPC)".into(),
            Disk::Simulated { why, .. } => {
                format!("SIMULATED with BATON_TEST_FAULTS_DIR/fail-state-writes, because {why}")
            }
        }
    }

    fn fill(&self) -> std::io::Result<u64> {
        match self {
            Disk::Tmpfs { mount } => {
                use std::io::Write;
                let mut file = std::fs::File::create(mount.join("chaos-filler"))?;
                let chunk = vec![0u8; 1 << 20];
                let mut written = 0u64;
                // Bounded by the filesystem's size: the write fails at ENOSPC.
                loop {
                    match file.write(&chunk) {
                        Ok(0) => break,
                        Ok(n) => written += n as u64,
                        Err(_) => break,
                    }
                }
                let _ = file.flush();
                Ok(written)
            }
            Disk::Simulated { switch, .. } => std::fs::write(switch, b"").map(|_| 0),
        }
    }

    fn free(&self) {
        match self {
            Disk::Tmpfs { mount } => {
                let _ = std::fs::remove_file(mount.join("chaos-filler"));
            }
            Disk::Simulated { switch, .. } => {
                let _ = std::fs::remove_file(switch);
            }
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Disk::Tmpfs { mount } = self {
            let _ = Command::new("umount").arg("-l").arg(&*mount).status();
            let _ = std::fs::remove_dir(&*mount);
        }
    }
}

/// The SIGSTOPped pod and what its metrics said around it.
#[derive(Debug, Default, Clone)]
pub struct Zombie {
    pub pod: usize,
    pub frozen_for: Duration,
    /// From SIGSTOP until the other pods held every partition.
    pub partitions_moved_after: Option<Duration>,
    /// Its transactions by outcome just before SIGSTOP and 10 s after SIGCONT.
    pub before: BTreeMap<&'static str, f64>,
    pub after: BTreeMap<&'static str, f64>,
    pub lost_partitions_after: f64,
    pub revoked_partitions_after: f64,
    pub partitions_held_before: f64,
}

const OUTCOMES: [&str; 4] = ["committed", "aborted", "fenced", "outcome_unknown"];

fn transactions(pod: &Baton) -> BTreeMap<&'static str, f64> {
    OUTCOMES
        .into_iter()
        .map(|o| {
            (
                o,
                pod.metric(&format!("baton_transactions_total{{outcome=\"{o}\"}}")),
            )
        })
        .collect()
}

pub struct Cluster<'a> {
    pub broker: &'a Broker,
    pub proxy: ProxyHandle,
    pub registry: &'a SchemaRegistry,
    pub pods: Vec<Option<Baton>>,
    pub healer: Option<Healer>,
    pub disk: Disk,
    pub shared: Arc<Shared>,
    pub options: Box<dyn FnMut(usize) -> BatonOptions<'static> + 'a>,
    /// Pods not to kill now (frozen, disk being filled, just thawed).
    spared: BTreeSet<usize>,
    removed: BTreeSet<usize>,
    pub done: BTreeMap<&'static str, usize>,
    pub notes: Vec<String>,
    pub zombie: Option<Zombie>,
    /// Pods that exited without being told to, and were restarted.
    pub exited_by_themselves: Vec<String>,
    pub registry_refusals: f64,
    pub state_write_reopens: f64,
    pub state_open_retries: f64,
    pub disk_bytes_filled: u64,
    /// Topic-partitions the pods hold between them when the group is
    /// settled (each task reads its input partition and the co-partitioned
    /// topics'), measured once the first pods are up.
    pub held_when_settled: f64,
}

/// A pending end of a fault: (when, what to undo).
pub enum Undo {
    Thaw { pod: usize, stopped: Instant },
    HealProxy { pod: usize },
    RegistryBack,
    StallEnds,
    FreeDisk,
    DiskReport,
    Unspare { pod: usize },
}

impl<'a> Cluster<'a> {
    pub fn new(
        broker: &'a Broker,
        proxy: ProxyHandle,
        registry: &'a SchemaRegistry,
        disk: Disk,
        shared: Arc<Shared>,
        options: Box<dyn FnMut(usize) -> BatonOptions<'static> + 'a>,
    ) -> Cluster<'a> {
        Cluster {
            broker,
            proxy,
            registry,
            pods: Vec::new(),
            healer: None,
            disk,
            shared,
            options,
            spared: BTreeSet::new(),
            removed: BTreeSet::new(),
            done: BTreeMap::new(),
            notes: Vec::new(),
            zombie: None,
            exited_by_themselves: Vec::new(),
            registry_refusals: 0.0,
            state_write_reopens: 0.0,
            state_open_retries: 0.0,
            disk_bytes_filled: 0,
            held_when_settled: f64::INFINITY,
        }
    }

    pub fn start_pod(&mut self) -> usize {
        let index = self.pods.len();
        let pod = Baton::start(self.broker, (self.options)(index));
        self.pods.push(Some(pod));
        self.publish_ports();
        index
    }

    pub fn running(&self) -> Vec<&Baton> {
        self.pods.iter().flatten().collect()
    }

    fn publish_ports(&self) {
        if let Ok(mut ports) = self.shared.pod_ports.lock() {
            *ports = self.running().iter().map(|p| p.http_port).collect();
        }
    }

    /// A running pod chosen by `pick` among those that may be hit now; only
    /// kills hit the disk pod (its metrics and log tell the disk's story).
    fn target(&self, pick: u64, kill: bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.pods.len())
            .filter(|i| self.pods[*i].is_some() && !self.spared.contains(i))
            .filter(|i| kill || *i != DISK_POD)
            .collect();
        (!candidates.is_empty()).then(|| candidates[(pick % candidates.len() as u64) as usize])
    }

    fn count(&mut self, name: &'static str) {
        *self.done.entry(name).or_default() += 1;
    }

    fn restart(&mut self, index: usize) {
        if let Some(pod) = self.pods[index].take() {
            self.pods[index] = Some(pod.restart(self.broker));
        }
        self.publish_ports();
    }

    /// Restarts pods that exited without being told to (as Kubernetes
    /// would), noting each.
    pub fn watch(&mut self) {
        for index in 0..self.pods.len() {
            let exited = self.pods[index]
                .as_mut()
                .and_then(|pod| pod.wait_for_exit(Duration::ZERO));
            if let Some(status) = exited {
                let log_tail: String = self.pods[index]
                    .as_ref()
                    .map(|p| p.log())
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ");
                self.exited_by_themselves
                    .push(format!("pod {index} exited with {status}: {log_tail}"));
                self.restart(index);
            }
        }
    }

    /// Carries out one fault; returns what must be undone later, and when.
    pub fn inject(&mut self, fault: &Fault) -> Vec<(Duration, Undo)> {
        let mut undo = Vec::new();
        match fault {
            Fault::KillPod { pick } => {
                if let Some(index) = self.target(*pick, true) {
                    self.restart(index);
                    self.count(fault.name());
                }
            }
            Fault::AddPod => {
                let index = self.start_pod();
                self.notes.push(format!("pod {index} added"));
                self.count(fault.name());
            }
            Fault::RemovePod { pick } => {
                // Never the disk pod or a spared one: the verdict reads state
                // from those still running.
                if let Some(index) = self.target(*pick, false) {
                    if let Some(mut pod) = self.pods[index].take() {
                        let status = pod.terminate(Duration::from_secs(30));
                        self.notes
                            .push(format!("pod {index} removed (SIGTERM): exit {status:?}"));
                    }
                    self.removed.insert(index);
                    self.publish_ports();
                    self.count(fault.name());
                }
            }
            Fault::FreezePod { pick, for_ } => {
                // A pod that holds partitions, so it has something to be a
                // zombie about.
                // Pods restart all the time here: wait up to 15 s for one.
                let mut holding: Vec<usize> = Vec::new();
                let waited = Instant::now();
                while holding.is_empty() && waited.elapsed() < Duration::from_secs(15) {
                    holding = (0..self.pods.len())
                        .filter(|i| *i != DISK_POD && !self.spared.contains(i))
                        .filter(|i| {
                            self.pods[*i]
                                .as_ref()
                                .is_some_and(|p| p.metric("baton_assigned_partitions") > 0.0)
                        })
                        .collect();
                    if holding.is_empty() {
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
                let chosen = if holding.is_empty() {
                    self.target(*pick, false)
                } else {
                    Some(holding[(*pick % holding.len() as u64) as usize])
                };
                if let Some(index) = chosen {
                    let pod = self.pods[index].as_ref().expect("running");
                    self.zombie = Some(Zombie {
                        pod: index,
                        frozen_for: *for_,
                        partitions_held_before: pod.metric("baton_assigned_partitions"),
                        before: transactions(pod),
                        ..Zombie::default()
                    });
                    unsafe {
                        libc::kill(pod.pid(), libc::SIGSTOP);
                    }
                    self.spared.insert(index);
                    undo.push((
                        *for_,
                        Undo::Thaw {
                            pod: index,
                            stopped: Instant::now(),
                        },
                    ));
                    self.count(fault.name());
                }
            }
            Fault::CutPod { pick, for_ } | Fault::BlackHolePod { pick, for_ } => {
                if let Some(index) = self.target(*pick, false) {
                    let handle = self.proxy.only(&format!("chaos-pod-{index}"));
                    if matches!(fault, Fault::CutPod { .. }) {
                        handle.cut();
                    } else {
                        handle.black_hole();
                    }
                    self.spared.insert(index);
                    undo.push((*for_, Undo::HealProxy { pod: index }));
                    self.count(fault.name());
                }
            }
            Fault::MalformedBurst => {
                self.count(fault.name());
            }
            Fault::RegistryOutage { for_ } => {
                self.registry.stop();
                undo.push((*for_, Undo::RegistryBack));
                self.count(fault.name());
            }
            Fault::KillHealer => {
                if let Some(healer) = self.healer.take() {
                    self.healer = Some(healer.restart(self.broker));
                    self.count(fault.name());
                }
            }
            Fault::StallResearcher { for_ } => {
                self.shared.stalling.store(true, Ordering::Relaxed);
                undo.push((*for_, Undo::StallEnds));
                self.count(fault.name());
            }
            Fault::FillDisk { for_ } => {
                if self.pods.get(DISK_POD).is_some_and(Option::is_some) {
                    self.spared.insert(DISK_POD);
                    match self.disk.fill() {
                        Ok(bytes) => self.disk_bytes_filled = bytes,
                        Err(err) => self.notes.push(format!("filling the disk failed: {err}")),
                    }
                    undo.push((*for_, Undo::FreeDisk));
                    self.count(fault.name());
                }
            }
        }
        undo
    }

    pub fn undo(&mut self, undo: Undo) -> Vec<(Duration, Undo)> {
        let mut later = Vec::new();
        match undo {
            Undo::Thaw { pod, stopped } => {
                // SIGCONT only once the others hold every partition: then the
                // pod is a zombie for certain.
                let moved = self.wait_partitions_moved(pod, Duration::from_secs(30));
                if let (Some(zombie), Some(moved)) = (self.zombie.as_mut(), moved) {
                    zombie.partitions_moved_after = Some(moved.max(stopped.elapsed()));
                }
                if let Some(zombie) = self.zombie.as_mut() {
                    zombie.frozen_for = stopped.elapsed();
                }
                if let Some(baton) = self.pods[pod].as_ref() {
                    unsafe {
                        libc::kill(baton.pid(), libc::SIGCONT);
                    }
                }
                later.push((Duration::from_secs(10), Undo::Unspare { pod }));
            }
            Undo::Unspare { pod } => {
                if let (Some(zombie), Some(baton)) = (self.zombie.as_mut(), self.pods[pod].as_ref())
                    && zombie.pod == pod
                    && zombie.after.is_empty()
                {
                    zombie.after = transactions(baton);
                    zombie.lost_partitions_after =
                        baton.metric("baton_rebalances_total{kind=\"lost\"}");
                    zombie.revoked_partitions_after =
                        baton.metric("baton_rebalances_total{kind=\"revoke\"}");
                }
                self.spared.remove(&pod);
            }
            Undo::HealProxy { pod } => {
                self.proxy.heal();
                self.spared.remove(&pod);
            }
            Undo::RegistryBack => {
                self.registry_refusals = self
                    .running()
                    .iter()
                    .map(|p| {
                        p.metric("baton_transient_errors_total{dependency=\"schema_registry\"}")
                    })
                    .sum();
                let paused: f64 = self
                    .running()
                    .iter()
                    .map(|p| p.metric("baton_partitions_paused"))
                    .sum();
                self.notes.push(format!(
                    "at the end of the registry outage: {} partitions paused waiting for it, {} refused lookups (baton_transient_errors_total{{dependency=\"schema_registry\"}})",
                    paused, self.registry_refusals
                ));
                self.registry.resume();
            }
            Undo::StallEnds => self.shared.stalling.store(false, Ordering::Relaxed),
            Undo::FreeDisk => {
                if let Some(pod) = self.pods[DISK_POD].as_ref() {
                    self.state_write_reopens =
                        pod.metric("baton_partition_reopens_total{reason=\"state_write\"}");
                    let log = pod.log();
                    let full: Vec<&str> = log
                        .lines()
                        .filter(|l| l.contains("No space left") || l.contains("state write"))
                        .collect();
                    self.notes.push(format!(
                        "the disk pod logged {} lines about the full disk{}",
                        full.len(),
                        full.first()
                            .map(|l| format!(", first: {l}"))
                            .unwrap_or_default()
                    ));
                }
                self.disk.free();
                later.push((Duration::from_secs(10), Undo::DiskReport));
            }
            Undo::DiskReport => {
                if let Some(pod) = self.pods[DISK_POD].as_ref() {
                    self.state_open_retries =
                        pod.metric("baton_partition_reopens_total{reason=\"state_open\"}");
                    self.state_write_reopens = self
                        .state_write_reopens
                        .max(pod.metric("baton_partition_reopens_total{reason=\"state_write\"}"));
                }
                self.spared.remove(&DISK_POD);
            }
        }
        later
    }

    /// Measures [`Cluster::held_when_settled`]: the pods' total once it has
    /// stayed the same for 3 s (up to a minute).
    pub fn measure_settled(&mut self) {
        let mut last = -1.0;
        let mut same = 0;
        let began = Instant::now();
        while same < 3 && began.elapsed() < Duration::from_secs(60) {
            let held: f64 = self
                .running()
                .iter()
                .map(|p| p.metric("baton_assigned_partitions"))
                .sum();
            if held > 0.0 && held == last {
                same += 1;
            } else {
                same = 0;
            }
            last = held;
            std::thread::sleep(Duration::from_secs(1));
        }
        self.held_when_settled = last.max(crate::PARTITIONS as f64);
    }

    /// Whether the running pods hold every partition between them.
    pub fn group_settled(&self) -> bool {
        let held: f64 = self
            .running()
            .iter()
            .map(|p| p.metric("baton_assigned_partitions"))
            .sum();
        held >= self.held_when_settled
    }

    /// Every running pod holds partitions and together they hold them all:
    /// every pod is a member of one formed generation, and no join is due.
    pub fn group_formed(&self) -> bool {
        let held: Vec<f64> = self
            .running()
            .iter()
            .map(|p| p.metric("baton_assigned_partitions"))
            .collect();
        held.iter().all(|h| *h > 0.0) && held.iter().sum::<f64>() >= self.held_when_settled
    }

    /// Waits until the running pods other than `frozen` hold every partition.
    fn wait_partitions_moved(&self, frozen: usize, timeout: Duration) -> Option<Duration> {
        let began = Instant::now();
        while began.elapsed() < timeout {
            let held: f64 = (0..self.pods.len())
                .filter(|i| *i != frozen)
                .filter_map(|i| self.pods[i].as_ref())
                .map(|p| p.metric("baton_assigned_partitions"))
                .sum();
            if held >= self.held_when_settled {
                return Some(began.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }
}
