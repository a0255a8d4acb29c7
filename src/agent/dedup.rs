//! The agent's duplicate filter: the `handover_id`s it has finished, bounded
//! and optionally kept in a small local file across restarts.
//!
//! It is the second of three layers (see the exactly-once story in
//! [`crate::agent`]): the first is the consumer offset committed in the
//! same transaction as the agent's output, so a handover whose output was
//! committed is never read again by this group; this filter catches the
//! same handover arriving again at another offset (baton's handover ids are
//! deterministic, so a redelivered or re-dispatched copy has the same id);
//! the last is baton itself, which applies an `event_id` once, and an
//! agent's `event_id` is derived from the `handover_id`.
//!
//! Policy at the bound: the oldest id is forgotten (counted in
//! `baton_agent_dedup_evicted_total`). A copy older than the window is then
//! worked again, and baton's own `event_id` filter drops its output.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::metrics::AGENTS;

/// The longest id the file may hold; a longer line is not an id baton wrote
/// and is skipped when the file is read.
pub const MAX_ID_BYTES: usize = 256;

/// The bounded set of finished handover ids, oldest first.
pub struct Dedup {
    agent: String,
    capacity: usize,
    order: VecDeque<String>,
    seen: HashSet<String>,
    file: Option<IdFile>,
}

/// An append-only file of ids, one a line, rewritten with only the live
/// window when it holds twice the capacity (so it stays bounded too).
struct IdFile {
    path: PathBuf,
    writer: File,
    lines: usize,
}

impl Dedup {
    /// An empty filter holding at most `capacity` ids (at least 1).
    pub fn in_memory(agent: &str, capacity: usize) -> Dedup {
        Dedup {
            agent: agent.to_owned(),
            capacity: capacity.max(1),
            order: VecDeque::new(),
            seen: HashSet::new(),
            file: None,
        }
    }

    /// A filter kept in `path`: the newest `capacity` ids already there are
    /// loaded, and every id inserted from now on is appended.
    pub fn persisted(agent: &str, capacity: usize, path: &Path) -> io::Result<Dedup> {
        let mut dedup = Dedup::in_memory(agent, capacity);
        let mut lines = 0;
        match File::open(path) {
            Ok(file) => {
                for line in BufReader::new(file).lines() {
                    let line = line?;
                    lines += 1;
                    let id = line.trim();
                    if !id.is_empty() && id.len() <= MAX_ID_BYTES {
                        dedup.remember(id.to_owned(), false);
                    }
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let writer = OpenOptions::new().create(true).append(true).open(path)?;
        dedup.file = Some(IdFile {
            path: path.to_owned(),
            writer,
            lines,
        });
        Ok(dedup)
    }

    pub fn contains(&self, handover_id: &str) -> bool {
        self.seen.contains(handover_id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Records a finished handover (after its transaction committed). An id
    /// longer than [`MAX_ID_BYTES`] is not remembered: it cannot be one
    /// baton wrote, and baton's `event_id` filter still covers it.
    pub fn insert(&mut self, handover_id: &str) -> io::Result<()> {
        if handover_id.len() > MAX_ID_BYTES || self.seen.contains(handover_id) {
            return Ok(());
        }
        self.remember(handover_id.to_owned(), true);
        let rewrite = match &mut self.file {
            Some(file) => {
                writeln!(file.writer, "{handover_id}")?;
                file.lines += 1;
                file.lines >= self.capacity.saturating_mul(2)
            }
            None => false,
        };
        if rewrite {
            self.compact()?;
        }
        Ok(())
    }

    fn remember(&mut self, id: String, count_evictions: bool) {
        if !self.seen.insert(id.clone()) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
                if count_evictions {
                    AGENTS.dedup_evicted.with_label_values(&[&self.agent]).inc();
                }
            }
        }
    }

    /// Rewrites the file with the live window only, atomically (a new file
    /// renamed over the old), so a crash leaves one or the other.
    fn compact(&mut self) -> io::Result<()> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let tmp = file.path.with_extension("tmp");
        {
            let mut out = File::create(&tmp)?;
            for id in &self.order {
                writeln!(out, "{id}")?;
            }
            out.sync_all()?;
        }
        std::fs::rename(&tmp, &file.path)?;
        file.writer = OpenOptions::new().append(true).open(&file.path)?;
        file.lines = self.order.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_ids_and_forgets_the_oldest_at_the_bound() {
        let mut dedup = Dedup::in_memory("test-dedup", 2);
        dedup.insert("h-1").expect("insert");
        dedup.insert("h-2").expect("insert");
        assert!(dedup.contains("h-1") && dedup.contains("h-2"));
        dedup.insert("h-3").expect("insert");
        assert!(!dedup.contains("h-1"), "the oldest is forgotten");
        assert!(dedup.contains("h-2") && dedup.contains("h-3"));
        assert_eq!(dedup.len(), 2);
        assert_eq!(
            AGENTS
                .dedup_evicted
                .with_label_values(&["test-dedup"])
                .get(),
            1
        );
    }

    #[test]
    fn a_persisted_filter_survives_a_restart_and_its_file_stays_bounded() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("seen");
        {
            let mut dedup = Dedup::persisted("test-persist", 3, &path).expect("open");
            for n in 0..10 {
                dedup.insert(&format!("h-{n}")).expect("insert");
            }
        }
        let lines = std::fs::read_to_string(&path)
            .expect("file")
            .lines()
            .count();
        assert!(lines < 6, "compacted at twice the capacity: {lines} lines");
        let dedup = Dedup::persisted("test-persist", 3, &path).expect("reopen");
        assert!(dedup.contains("h-9") && dedup.contains("h-8") && dedup.contains("h-7"));
        assert!(!dedup.contains("h-6"));
        assert_eq!(dedup.len(), 3);
    }

    #[test]
    fn overlong_lines_in_the_file_are_skipped() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("seen");
        std::fs::write(&path, format!("{}\nh-ok\n\n", "x".repeat(MAX_ID_BYTES + 1)))
            .expect("write");
        let dedup = Dedup::persisted("test-long", 8, &path).expect("open");
        assert_eq!(dedup.len(), 1);
        assert!(dedup.contains("h-ok"));
    }
}
