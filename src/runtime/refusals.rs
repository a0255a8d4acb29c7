//! Isolating a record the broker keeps refusing.
//!
//! A transaction that the broker or producer refuses is aborted, and every
//! task rewinds; a record the broker refuses every time would abort every
//! transaction forever. So each task counts, per input partition, how many
//! consecutive refused transactions started at the same uncommitted offset.
//! At [`REFUSALS_BEFORE_SOLO`] it asks the engine for a solo transaction:
//! one holding only its next record, while every other task holds back.
//! If that transaction commits, the record was innocent. If it is refused
//! too, the record is the culprit and is dead-lettered instead (in another
//! solo transaction), so processing goes on.

use std::collections::BTreeMap;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use super::task::TopicPartition;
use crate::metrics::METRICS;

/// Consecutive refused transactions starting at the same offset before the
/// task asks for a solo transaction.
pub const REFUSALS_BEFORE_SOLO: u32 = 3;

/// Failed attempts to commit a dead letter before the task gives the
/// isolation up (the dead-letter topic itself is refused: an outage, not a
/// record). It then starts counting again from zero.
pub const DEAD_LETTER_ATTEMPTS: u32 = 3;

/// Where a task stands with isolating a refused record.
#[derive(Debug, Default)]
enum Mode {
    #[default]
    Normal,
    /// Waiting for a solo transaction; takes no records meanwhile.
    WantSolo,
    /// Granted a solo transaction: takes exactly one record.
    Solo,
    /// The solo record is in the open transaction.
    SoloTaken(OwnedMessage),
    /// The solo record was refused too: dead-letter it when next granted.
    DeadLetter {
        message: OwnedMessage,
        cause: String,
        attempts: u32,
    },
    /// The dead letter is in the open transaction.
    DeadLettered {
        message: OwnedMessage,
        cause: String,
        attempts: u32,
    },
}

/// What the task must do once a transaction's outcome is known.
#[derive(Debug)]
pub enum Grant<'a> {
    /// Nothing special.
    Nothing,
    /// Dead-letter `message` now, with `cause`, as the only output.
    WriteDeadLetter {
        message: &'a OwnedMessage,
        cause: &'a str,
    },
}

/// One task's refusal streaks and isolation state.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Per input partition: the first uncommitted offset of the last
    /// refused transaction, and how many in a row started there.
    streaks: BTreeMap<TopicPartition, (i64, u32)>,
    mode: Mode,
    /// Another task holds the solo transaction of this generation.
    held_for_other: bool,
}

impl Refusals {
    /// Whether the task may take input records now.
    pub fn takes_records(&self) -> bool {
        !self.held_for_other && matches!(self.mode, Mode::Normal | Mode::Solo)
    }

    /// Whether the task asks the engine for a solo transaction.
    pub fn wants_solo(&self) -> bool {
        matches!(self.mode, Mode::WantSolo | Mode::DeadLetter { .. })
    }

    /// In a solo transaction, the task took its one record.
    pub fn took(&mut self, message: OwnedMessage) {
        if matches!(self.mode, Mode::Solo) {
            tracing::warn!(
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                "processing a record alone in its own transaction"
            );
            self.mode = Mode::SoloTaken(message);
        }
    }

    /// Whether the next record must go through [`Refusals::took`].
    pub fn is_solo(&self) -> bool {
        matches!(self.mode, Mode::Solo)
    }

    /// The transaction was aborted; `firsts` are the task's first
    /// uncommitted offsets in it, `refused` the broker's words when the
    /// broker or producer caused the abort.
    pub fn aborted(&mut self, firsts: &[(TopicPartition, i64)], refused: Option<&str>) {
        self.mode = match std::mem::take(&mut self.mode) {
            Mode::SoloTaken(message) => match refused {
                Some(cause) => Mode::DeadLetter {
                    message,
                    cause: cause.to_string(),
                    attempts: 0,
                },
                None => Mode::WantSolo,
            },
            Mode::DeadLettered {
                message,
                cause,
                attempts,
            } if attempts + 1 < DEAD_LETTER_ATTEMPTS => Mode::DeadLetter {
                message,
                cause,
                attempts: attempts + 1,
            },
            Mode::DeadLettered { message, .. } => {
                tracing::error!(
                    topic = message.topic(),
                    offset = message.offset(),
                    "the dead letter of a refused record is refused too; counting again"
                );
                self.streaks.clear();
                Mode::Normal
            }
            Mode::Solo => Mode::WantSolo,
            Mode::DeadLetter {
                message,
                cause,
                attempts,
            } => Mode::DeadLetter {
                message,
                cause,
                attempts,
            },
            Mode::WantSolo => Mode::WantSolo,
            Mode::Normal => match refused {
                Some(_) if self.count(firsts) => Mode::WantSolo,
                _ => Mode::Normal,
            },
        };
    }

    /// Adds one refusal to the streak of each partition; true when one
    /// reached [`REFUSALS_BEFORE_SOLO`].
    fn count(&mut self, firsts: &[(TopicPartition, i64)]) -> bool {
        let mut reached = false;
        for (tp, first) in firsts {
            let streak = self.streaks.entry(tp.clone()).or_insert((*first, 0));
            if streak.0 != *first {
                *streak = (*first, 0);
            }
            streak.1 += 1;
            reached |= streak.1 >= REFUSALS_BEFORE_SOLO;
        }
        reached
    }

    /// The transaction committed; `advanced` are the task's partitions in it.
    pub fn committed(&mut self, advanced: &[TopicPartition]) {
        self.mode = match std::mem::take(&mut self.mode) {
            Mode::SoloTaken(_) => {
                METRICS
                    .records_isolated
                    .with_label_values(&["committed"])
                    .inc();
                self.streaks.clear();
                Mode::Normal
            }
            Mode::DeadLettered { message, cause, .. } => {
                METRICS
                    .records_isolated
                    .with_label_values(&["dead_lettered"])
                    .inc();
                tracing::warn!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    %cause,
                    "a record the broker kept refusing was dead-lettered"
                );
                self.streaks.clear();
                Mode::Normal
            }
            // Granted, but no record came: ask again.
            Mode::Solo => Mode::WantSolo,
            other => {
                for tp in advanced {
                    self.streaks.remove(tp);
                }
                other
            }
        };
    }

    /// Applies the engine's choice of solo task for the new generation.
    pub fn granted(&mut self, solo: Option<i32>, me: i32) -> Grant<'_> {
        self.held_for_other = solo.is_some_and(|p| p != me);
        if solo != Some(me) {
            return Grant::Nothing;
        }
        self.mode = match std::mem::take(&mut self.mode) {
            Mode::WantSolo => Mode::Solo,
            Mode::DeadLetter {
                message,
                cause,
                attempts,
            } => Mode::DeadLettered {
                message,
                cause,
                attempts,
            },
            other => other,
        };
        match &self.mode {
            Mode::DeadLettered { message, cause, .. } => Grant::WriteDeadLetter { message, cause },
            _ => Grant::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    fn tp() -> TopicPartition {
        TopicPartition::new("in", 0)
    }

    fn message(offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"v".to_vec()),
            None,
            "in".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    #[test]
    fn three_refusals_at_the_same_offset_ask_for_a_solo_transaction() {
        let mut refusals = Refusals::default();
        for _ in 0..REFUSALS_BEFORE_SOLO - 1 {
            refusals.aborted(&[(tp(), 5)], Some("refused"));
            assert!(!refusals.wants_solo());
        }
        refusals.aborted(&[(tp(), 5)], Some("refused"));
        assert!(refusals.wants_solo());
        assert!(!refusals.takes_records(), "holds while waiting");
    }

    #[test]
    fn progress_or_other_causes_break_the_streak() {
        let mut refusals = Refusals::default();
        refusals.aborted(&[(tp(), 5)], Some("refused"));
        refusals.aborted(&[(tp(), 5)], None);
        refusals.aborted(&[(tp(), 6)], Some("refused"));
        refusals.aborted(&[(tp(), 6)], Some("refused"));
        assert!(!refusals.wants_solo());
        refusals.committed(&[tp()]);
        refusals.aborted(&[(tp(), 6)], Some("refused"));
        assert!(!refusals.wants_solo());
    }

    #[test]
    fn a_solo_record_refused_again_is_dead_lettered() {
        let mut refusals = Refusals::default();
        for _ in 0..REFUSALS_BEFORE_SOLO {
            refusals.aborted(&[(tp(), 5)], Some("too big"));
        }
        assert!(matches!(refusals.granted(Some(0), 0), Grant::Nothing));
        assert!(refusals.is_solo() && refusals.takes_records());
        refusals.took(message(5));
        assert!(!refusals.takes_records(), "one record only");
        refusals.aborted(&[(tp(), 5)], Some("too big"));
        assert!(refusals.wants_solo());
        match refusals.granted(Some(0), 0) {
            Grant::WriteDeadLetter { message, cause } => {
                assert_eq!(message.offset(), 5);
                assert_eq!(cause, "too big");
            }
            Grant::Nothing => panic!("expected a dead letter"),
        }
        refusals.committed(&[tp()]);
        assert!(refusals.takes_records() && !refusals.wants_solo());
    }

    #[test]
    fn a_solo_record_that_commits_was_innocent() {
        let mut refusals = Refusals::default();
        for _ in 0..REFUSALS_BEFORE_SOLO {
            refusals.aborted(&[(tp(), 5)], Some("refused"));
        }
        let _ = refusals.granted(Some(0), 0);
        refusals.took(message(5));
        refusals.committed(&[tp()]);
        assert!(refusals.takes_records() && !refusals.wants_solo());
    }

    #[test]
    fn other_tasks_hold_during_a_solo_transaction() {
        let mut refusals = Refusals::default();
        let _ = refusals.granted(Some(3), 0);
        assert!(!refusals.takes_records());
        let _ = refusals.granted(None, 0);
        assert!(refusals.takes_records());
    }
}
