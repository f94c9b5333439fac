//! The adaptive busy-poll window: how long a worker keeps polling after its last work before
//! it sleeps until a kick or a completion wakes it.
//!
//! A poll that finds nothing burns a CPU for nothing, and with one daemon per VM a host runs
//! hundreds of workers. So the window follows QEMU's aio-poll (`adjust_polling_time` in
//! util/aio-posix.c): after each wake-up the worker looks at how long it waited for work (its
//! "block time", from its last work to the event that woke it, the poll included) and
//!
//! - leaves the window alone when the work came within it (polling caught it);
//! - grows it (from [`START_NS`], doubling) when the work came after the window but within
//!   `poll-max-ns`: a longer poll would have caught it, without the sleep and wake-up;
//! - drops it to zero when the work came later than `poll-max-ns`: no poll the limit allows
//!   would have caught it, so polling only cost CPU (QEMU's default `poll-shrink=0`).
//!
//! A wait measured at a wake-up includes the wake-up itself, which on a virtual machine can
//! take longer than the whole bound: a closed window would then never see a wait short enough
//! to reopen it, however fast the requests come. So while the window is closed, some sleeps are
//! preceded by a probe: one poll of the full bound, timed without a wake-up in it. If it
//! catches work, polling pays and the window opens to the bound. The first probe comes right
//! after the window closes (one long gap in a fast stream costs one poll, as with a fixed
//! window); each probe that finds nothing doubles the sleeps to the next, up to
//! [`PROBE_EVERY`].
//!
//! `poll-max-ns` stays the upper bound, and 0 never polls.

/// The first window once waits show that polling could pay: QEMU's, long enough to cover a
/// fast device's round trip, short enough that a wrong guess costs little.
const START_NS: u64 = 4_000;

/// Factor the window grows by per wake-up that came after it (QEMU's default `poll-grow`).
const GROW: u64 = 2;

/// Most sleeps with the window closed between two probes: on a slow stream a probe that
/// finds nothing costs at most the bound once per this many requests, a small share of what
/// their wake-ups cost.
const PROBE_EVERY: u32 = 16;

/// The busy-poll window of one worker and its bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PollWindow {
    /// The current window, in nanoseconds (0: sleep at once).
    ns: u64,
    /// The bound (`poll-max-ns`; 0: never poll).
    max_ns: u64,
    /// Sleeps since the last probe while the window was closed.
    closed_sleeps: u32,
    /// Sleeps from one probe to the next (1 up to [`PROBE_EVERY`]).
    probe_after: u32,
}

impl PollWindow {
    /// A window bounded by `max_ns`. It starts closed, as QEMU's does: the first waits say
    /// whether polling pays.
    pub(crate) fn new(max_ns: u64) -> PollWindow {
        PollWindow {
            ns: 0,
            max_ns,
            closed_sleeps: 0,
            probe_after: 1,
        }
    }

    /// Whether the worker polls at all (`poll-max-ns` is not 0), so block times matter.
    pub(crate) fn adapts(&self) -> bool {
        self.max_ns > 0
    }

    /// How long the poll that is about to start may wait for work: the window, or, every
    /// [`PROBE_EVERY`]th time the window is closed, the bound (a probe).
    pub(crate) fn next_poll(&mut self) -> u64 {
        if self.ns > 0 || self.max_ns == 0 {
            return self.ns;
        }
        self.closed_sleeps += 1;
        if self.closed_sleeps < self.probe_after {
            return 0;
        }
        self.closed_sleeps = 0;
        // Doubled now; back to 1 when the window closes after being open.
        self.probe_after = (self.probe_after * 2).min(PROBE_EVERY);
        self.max_ns
    }

    /// A poll started by [`Self::next_poll`] found a new request: if it was a probe, polling
    /// would have caught it, so the window opens to the bound.
    pub(crate) fn caught(&mut self) {
        if self.ns == 0 {
            self.ns = self.max_ns;
        }
    }

    /// Adjusts the window after the worker waited `block_ns` from its last work to the next.
    pub(crate) fn waited(&mut self, block_ns: u64) {
        if block_ns <= self.ns {
            // Polling caught the work: the window is long enough.
        } else if block_ns > self.max_ns {
            if self.ns == self.max_ns {
                // A stream that filled the whole bound: probe again at once. (Not after a
                // window grown from short waits, such as a completion's, which would probe
                // after every request of a slow stream.)
                self.closed_sleeps = 0;
                self.probe_after = 1;
            }
            self.ns = 0;
        } else {
            let grown = if self.ns == 0 {
                START_NS
            } else {
                self.ns.saturating_mul(GROW)
            };
            self.ns = grown.min(self.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_closed_and_grows_while_waits_fit_under_the_bound() {
        let mut w = PollWindow::new(50_000);
        assert_eq!(w.ns, 0);
        w.waited(20_000);
        assert_eq!(w.ns, START_NS);
        w.waited(20_000);
        assert_eq!(w.ns, 2 * START_NS);
        w.waited(20_000);
        assert_eq!(w.ns, 4 * START_NS);
        w.waited(20_000);
        assert_eq!(w.ns, 8 * START_NS, "32 µs now covers a 20 µs wait");
        w.waited(20_000);
        assert_eq!(
            w.ns,
            8 * START_NS,
            "a wait within the window changes nothing"
        );
        w.waited(1_000);
        assert_eq!(w.ns, 8 * START_NS, "nor does a short one");
    }

    #[test]
    fn growth_stops_at_the_bound() {
        let mut w = PollWindow::new(50_000);
        for _ in 0..10 {
            w.waited(49_000);
        }
        assert_eq!(w.ns, 50_000);
        w.waited(50_000);
        assert_eq!(
            w.ns, 50_000,
            "a wait of exactly the bound is within the window"
        );
    }

    #[test]
    fn a_wait_past_the_bound_closes_the_window() {
        let mut w = PollWindow::new(50_000);
        for _ in 0..4 {
            w.waited(30_000);
        }
        assert_eq!(w.ns, 32_000);
        w.waited(50_001);
        assert_eq!(w.ns, 0, "no window the bound allows would have caught it");
        w.waited(1_000_000);
        assert_eq!(w.ns, 0, "and it stays closed while waits are long");
        w.waited(10_000);
        assert_eq!(
            w.ns, START_NS,
            "it opens again when a wait fits under the bound"
        );
    }

    #[test]
    fn a_zero_bound_never_polls() {
        let mut w = PollWindow::new(0);
        assert!(!w.adapts());
        for wait in [0, 1, 1_000, 4_000, 1_000_000] {
            w.waited(wait);
            assert_eq!(w.ns, 0, "after a wait of {wait} ns");
        }
        assert!(PollWindow::new(1).adapts());
    }

    #[test]
    fn a_closed_window_probes_ever_less_often_and_opens_when_a_probe_catches_work() {
        let mut w = PollWindow::new(50_000);
        // Sleeps before each probe while probes find nothing: 1, 2, 4, 8, 16, 16, ...
        for gap in [1, 2, 4, 8, PROBE_EVERY, PROBE_EVERY] {
            for i in 1..gap {
                assert_eq!(w.next_poll(), 0, "sleep {i} of {gap}: no poll");
            }
            assert_eq!(
                w.next_poll(),
                50_000,
                "after {gap} sleeps: a probe of the bound"
            );
            assert_eq!(w.ns, 0, "a probe that catches nothing leaves it closed");
        }
        for _ in 1..PROBE_EVERY {
            w.next_poll();
        }
        assert_eq!(w.next_poll(), 50_000);
        w.caught();
        assert_eq!(w.ns, 50_000, "the probe caught work: open to the bound");
        assert_eq!(w.next_poll(), 50_000, "and polls with it from now on");
        w.caught();
        assert_eq!(
            w.ns, 50_000,
            "work caught in an open window changes nothing"
        );
        w.waited(80_000);
        assert_eq!(w.ns, 0, "a wait past the bound closes it again");
        assert_eq!(w.next_poll(), 50_000, "and the next sleep probes at once");
        assert_eq!(w.next_poll(), 0, "then after 2 sleeps");
        assert_eq!(w.next_poll(), 50_000);
        // A window grown from short waits that closes keeps the probes spaced out.
        let mut w = PollWindow::new(50_000);
        for _ in 0..5 {
            w.next_poll();
        }
        w.waited(10_000);
        assert_eq!(w.ns, START_NS);
        w.waited(80_000);
        assert_eq!(w.ns, 0);
        assert_eq!(w.next_poll(), 0, "no probe at once");
    }

    #[test]
    fn a_zero_bound_never_probes() {
        let mut w = PollWindow::new(0);
        for _ in 0..3 * PROBE_EVERY {
            assert_eq!(w.next_poll(), 0);
        }
        w.caught();
        assert_eq!(w.ns, 0);
    }

    #[test]
    fn a_bound_below_the_start_caps_the_first_window() {
        let mut w = PollWindow::new(1_000);
        w.waited(500);
        assert_eq!(w.ns, 1_000);
    }
}
