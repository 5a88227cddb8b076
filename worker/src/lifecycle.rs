//! What the trainer thread does next, decided without IO: the worker's lifecycle as a state
//! machine. The driver tells it what happened (an epoch announced, a stop, a run started or
//! not, how an epoch ended), with the time, and asks it what to do next; the core reads no
//! clock, sends nothing and touches no tensor. Its tests are a table of inputs and decisions.
//!
//! The rules:
//! - Only the newest epoch announced counts; a stop of its run forgets it.
//! - A run whose state this worker does not hold is started first. If its content makes that
//!   impossible (a run file, a model, a device it cannot use), the worker declines the run,
//!   once per epoch it is given (a restarted coordinator forgets declines), and never starts it
//!   again. If something passing failed (its first shard could not be fetched), the start is
//!   retried after `retry_after`.
//! - An epoch of the held run is joined at once; one that failed is joined again only when a
//!   newer epoch replaces it or after `retry_after`; a run whose last step is done waits for the
//!   coordinator's stop.

use std::time::{Duration, Instant};

/// A run and an epoch of it, as the coordinator numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochRef {
    pub run: u64,
    pub epoch: u64,
}

/// How an epoch this worker joined ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The run's last step is synchronised: nothing to do until the coordinator stops the run.
    Finished,
    /// A newer epoch, an abort or a stop ended it: the next epoch is joined when it comes.
    Interrupted,
    /// It failed here or in the ring: joined again when replaced, or after `retry_after`.
    Failed,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The coordinator announced an epoch (perhaps not a newer one).
    Epoch(EpochRef),
    /// The coordinator stopped a run (completed, failed or stopped by its owner).
    Stopped { run: u64 },
    /// The driver built the run's trainer: it holds the run's state.
    Started { run: u64 },
    /// The driver could not start the run; `passing` if trying again later may succeed.
    CannotStart { at: EpochRef, why: String, passing: bool },
    /// An epoch the driver joined ended.
    Ended { at: EpochRef, how: Ended },
    /// The driver dropped the run's state (after a stop).
    Dropped { run: u64 },
}

/// Something the driver must do for an event, beside what [`Lifecycle::next`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Tell the coordinator this worker cannot train the run.
    Decline { at: EpochRef, why: String },
}

/// What to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing until the next command.
    Wait,
    /// Nothing until the next command or this time, whichever comes first.
    WaitUntil(Instant),
    /// Build the trainer of this epoch's run.
    Start(EpochRef),
    /// Join this epoch of the held run.
    Join(EpochRef),
}

/// The run whose state this worker holds.
#[derive(Clone, Debug)]
struct Held {
    run: u64,
    finished: bool,
    /// The epoch that failed and when.
    failed: Option<(u64, Instant)>,
}

#[derive(Clone, Debug)]
pub struct Lifecycle {
    retry_after: Duration,
    latest: Option<EpochRef>,
    held: Option<Held>,
    /// The run this worker cannot train, why, and the last epoch of it it declined.
    declined: Option<(u64, String, u64)>,
    /// A start that failed for a passing reason: the run, and when.
    start_failed: Option<(u64, Instant)>,
}

impl Lifecycle {
    pub fn new(retry_after: Duration) -> Self {
        Self { retry_after, latest: None, held: None, declined: None, start_failed: None }
    }

    /// The newest epoch announced, if its run was not stopped since.
    pub fn latest(&self) -> Option<EpochRef> {
        self.latest
    }

    /// Takes in what happened at `now`.
    pub fn on(&mut self, now: Instant, event: Event) -> Option<Action> {
        match event {
            Event::Epoch(e) => {
                let newer = self.latest.is_none_or(|l| l.run != e.run || e.epoch > l.epoch);
                if !newer {
                    return None;
                }
                self.latest = Some(e);
                match &mut self.declined {
                    Some((run, why, told)) if *run == e.run && e.epoch > *told => {
                        *told = e.epoch;
                        Some(Action::Decline { at: e, why: why.clone() })
                    }
                    _ => None,
                }
            }
            Event::Stopped { run } => {
                if self.latest.is_some_and(|l| l.run == run) {
                    self.latest = None;
                }
                None
            }
            Event::Started { run } => {
                self.held = Some(Held { run, finished: false, failed: None });
                self.start_failed = None;
                None
            }
            Event::CannotStart { at, why, passing } => {
                if passing {
                    self.start_failed = Some((at.run, now));
                    return None;
                }
                self.declined = Some((at.run, why.clone(), at.epoch));
                Some(Action::Decline { at, why })
            }
            Event::Ended { at, how } => {
                if let Some(h) = self.held.as_mut().filter(|h| h.run == at.run) {
                    match how {
                        Ended::Finished => h.finished = true,
                        Ended::Interrupted | Ended::Failed => h.failed = Some((at.epoch, now)),
                    }
                }
                None
            }
            Event::Dropped { run } => {
                if self.held.as_ref().is_some_and(|h| h.run == run) {
                    self.held = None;
                }
                None
            }
        }
    }

    /// What to do at `now`.
    pub fn next(&self, now: Instant) -> Next {
        let Some(e) = self.latest else { return Next::Wait };
        if self.declined.as_ref().is_some_and(|(run, _, _)| *run == e.run) {
            return Next::Wait;
        }
        match &self.held {
            Some(h) if h.run == e.run => {
                if h.finished {
                    return Next::Wait;
                }
                match h.failed {
                    Some((epoch, at)) if epoch >= e.epoch => {
                        self.not_before(now, at).map_or(Next::Join(e), Next::WaitUntil)
                    }
                    _ => Next::Join(e),
                }
            }
            _ => match self.start_failed {
                Some((run, at)) if run == e.run => {
                    self.not_before(now, at).map_or(Next::Start(e), Next::WaitUntil)
                }
                _ => Next::Start(e),
            },
        }
    }

    /// `at + retry_after` if that is still to come.
    fn not_before(&self, now: Instant, at: Instant) -> Option<Instant> {
        let due = at + self.retry_after;
        (now < due).then_some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Duration = Duration::from_secs(5);

    fn ep(run: u64, epoch: u64) -> EpochRef {
        EpochRef { run, epoch }
    }

    /// Feeds `steps` (seconds after a start, an event, the decision expected after it, the
    /// action expected for it) to a fresh core.
    fn table(steps: &[(u64, Event, Next, Option<Action>)]) {
        let t0 = Instant::now();
        let mut life = Lifecycle::new(RETRY);
        for (i, (secs, event, next, action)) in steps.iter().enumerate() {
            let now = t0 + Duration::from_secs(*secs);
            let got = life.on(now, event.clone());
            assert_eq!(&got, action, "step {i}: action for {event:?}");
            assert_eq!(&life.next(now), next, "step {i}: decision after {event:?}");
        }
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn nothing_to_do_before_an_epoch() {
        let life = Lifecycle::new(RETRY);
        assert_eq!(life.next(Instant::now()), Next::Wait);
    }

    #[test]
    fn an_epoch_starts_the_run_then_joins_it_and_a_failure_waits_for_a_newer_epoch_or_the_retry() {
        let t0 = Instant::now();
        let mut life = Lifecycle::new(RETRY);
        assert_eq!(life.on(t0, Event::Epoch(ep(1, 1))), None);
        assert_eq!(life.next(t0), Next::Start(ep(1, 1)));
        life.on(t0, Event::Started { run: 1 });
        assert_eq!(life.next(t0), Next::Join(ep(1, 1)));
        life.on(at(t0, 10), Event::Ended { at: ep(1, 1), how: Ended::Failed });
        assert_eq!(life.next(at(t0, 12)), Next::WaitUntil(at(t0, 15)));
        assert_eq!(life.next(at(t0, 15)), Next::Join(ep(1, 1)), "retried after retry_after");
        // A newer epoch is joined at once.
        life.on(at(t0, 16), Event::Ended { at: ep(1, 1), how: Ended::Interrupted });
        life.on(at(t0, 16), Event::Epoch(ep(1, 2)));
        assert_eq!(life.next(at(t0, 16)), Next::Join(ep(1, 2)));
        // An older or repeated epoch changes nothing.
        life.on(at(t0, 16), Event::Epoch(ep(1, 1)));
        assert_eq!(life.latest(), Some(ep(1, 2)));
    }

    #[test]
    fn a_finished_run_waits_for_its_stop_and_the_next_run_is_started() {
        table(&[
            (0, Event::Epoch(ep(1, 3)), Next::Start(ep(1, 3)), None),
            (0, Event::Started { run: 1 }, Next::Join(ep(1, 3)), None),
            (9, Event::Ended { at: ep(1, 3), how: Ended::Finished }, Next::Wait, None),
            (99, Event::Epoch(ep(1, 4)), Next::Wait, None),
            (99, Event::Stopped { run: 1 }, Next::Wait, None),
            (99, Event::Dropped { run: 1 }, Next::Wait, None),
            (100, Event::Epoch(ep(2, 1)), Next::Start(ep(2, 1)), None),
        ]);
    }

    #[test]
    fn a_stop_of_another_run_changes_nothing_and_an_epoch_of_another_run_starts_it() {
        table(&[
            (0, Event::Epoch(ep(1, 1)), Next::Start(ep(1, 1)), None),
            (0, Event::Started { run: 1 }, Next::Join(ep(1, 1)), None),
            (1, Event::Stopped { run: 7 }, Next::Join(ep(1, 1)), None),
            // Moved to run 2 while holding run 1: run 2 is started (its trainer replaces 1's).
            (2, Event::Epoch(ep(2, 5)), Next::Start(ep(2, 5)), None),
            (2, Event::Started { run: 2 }, Next::Join(ep(2, 5)), None),
            // A late end of run 1's epoch does not touch run 2.
            (3, Event::Ended { at: ep(1, 1), how: Ended::Failed }, Next::Join(ep(2, 5)), None),
        ]);
    }

    #[test]
    fn a_run_it_cannot_train_is_declined_once_per_epoch_and_never_started_again() {
        let why = "model: no such file".to_owned();
        let decline = |epoch| Some(Action::Decline { at: ep(1, epoch), why: why.clone() });
        table(&[
            (0, Event::Epoch(ep(1, 1)), Next::Start(ep(1, 1)), None),
            (
                0,
                Event::CannotStart { at: ep(1, 1), why: why.clone(), passing: false },
                Next::Wait,
                decline(1),
            ),
            // The same epoch again: nothing; a new one (a restarted coordinator): declined again.
            (1, Event::Epoch(ep(1, 1)), Next::Wait, None),
            (600, Event::Epoch(ep(1, 2)), Next::Wait, decline(2)),
            // Another run is started as usual.
            (601, Event::Epoch(ep(2, 1)), Next::Start(ep(2, 1)), None),
            (601, Event::Started { run: 2 }, Next::Join(ep(2, 1)), None),
        ]);
    }

    #[test]
    fn a_start_that_failed_for_a_passing_reason_is_retried_after_retry_after() {
        let t0 = Instant::now();
        let mut life = Lifecycle::new(RETRY);
        life.on(t0, Event::Epoch(ep(1, 1)));
        let cannot = Event::CannotStart { at: ep(1, 1), why: "fetch".into(), passing: true };
        assert_eq!(life.on(at(t0, 1), cannot), None, "nothing declined");
        assert_eq!(life.next(at(t0, 2)), Next::WaitUntil(at(t0, 6)));
        assert_eq!(life.next(at(t0, 6)), Next::Start(ep(1, 1)));
        // A newer epoch does not hurry it (the shard is no nearer).
        life.on(at(t0, 3), Event::Epoch(ep(1, 2)));
        assert_eq!(life.next(at(t0, 3)), Next::WaitUntil(at(t0, 6)));
        life.on(at(t0, 6), Event::Started { run: 1 });
        assert_eq!(life.next(at(t0, 6)), Next::Join(ep(1, 2)));
    }

    #[test]
    fn a_stop_of_the_latest_run_forgets_its_epoch() {
        table(&[
            (0, Event::Epoch(ep(1, 1)), Next::Start(ep(1, 1)), None),
            (0, Event::Stopped { run: 1 }, Next::Wait, None),
            // The run's epochs from before the stop count as new if they come again.
            (1, Event::Epoch(ep(1, 1)), Next::Start(ep(1, 1)), None),
        ]);
    }
}
