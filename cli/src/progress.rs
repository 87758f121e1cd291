//! Progress of `vlmc train` on stderr: a bar on a terminal, plain lines elsewhere (CI logs,
//! `2> file`), one line per step with `--quiet`.
//!
//! Every form shows the step, loss, learning rate, gradient norm, throughput and an estimate
//! of the time left (ETA): the steps left times the mean wall-clock time per step since the
//! first step this process ran (that first step, which compiles the plans, is left out once
//! there is another; evaluations and checkpoints are in the mean, as they are in what is
//! left).

use std::io::IsTerminal;
use std::time::{Duration, Instant};
use vlmc_runtime::train_loop::Event;

/// Plain lines come at least this often while steps complete (when `log_every` steps take
/// longer).
pub const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An indicatif bar (stderr is a terminal).
    Bar,
    /// One line per step (`--quiet`).
    EveryStep,
    /// One line every `every` steps or [`LINE_INTERVAL`], whichever comes first, and at the
    /// first and last steps and every evaluation (stderr is not a terminal).
    Lines { every: u64 },
}

impl Mode {
    /// The mode for stderr as it is: `--quiet`, else a bar on a terminal, else lines every
    /// `log_every` steps.
    pub fn detect(quiet: bool, log_every: u64) -> Mode {
        if quiet {
            Mode::EveryStep
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines {
                every: log_every.max(1),
            }
        }
    }
}

/// Whether a plain line is due after `step` of `total`: the first step this process ran, the
/// last step, an evaluated step, every `every`-th step, or `since` (the time since the last
/// line) at least [`LINE_INTERVAL`].
pub fn line_due(
    step: u64,
    total: u64,
    every: u64,
    first: bool,
    evaluated: bool,
    since: Duration,
) -> bool {
    first
        || step >= total
        || evaluated
        || step.is_multiple_of(every.max(1))
        || since >= LINE_INTERVAL
}

/// A duration in words as short as it goes: `42s`, `3m05s`, `1h02m`, `2d03h`.
pub fn short_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The estimate of the time left, from the steps this process ran.
#[derive(Debug, Default)]
pub struct Eta {
    /// When the first step of this process ended, and its number.
    first: Option<(Instant, u64)>,
    /// The first step's own time (the only estimate until a second step ends).
    first_secs: f64,
}

impl Eta {
    /// Records step `step` (of `seconds`) ending at `now`; returns the seconds per step.
    pub fn step(&mut self, step: u64, seconds: f64, now: Instant) -> f64 {
        match self.first {
            None => {
                self.first = Some((now, step));
                self.first_secs = seconds;
                seconds
            }
            Some((t, s)) if step > s => now.duration_since(t).as_secs_f64() / (step - s) as f64,
            Some(_) => self.first_secs,
        }
    }
}

/// Progress of one run (one stage of a chain).
pub struct Progress {
    mode: Mode,
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
    eta: Eta,
    /// The latest evaluation loss.
    eval: Option<f64>,
    /// When the last plain line was printed, and whether any was.
    last_line: Instant,
    printed_any: bool,
    /// Examples and step seconds since the last plain line (its mean throughput).
    examples: f64,
    seconds: f64,
    /// The last step seen and whether its line was printed (for [`Progress::finish`]).
    pending: Option<String>,
}

impl Progress {
    pub fn new(mode: Mode) -> Progress {
        let bar = (mode == Mode::Bar).then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let now = Instant::now();
        Progress {
            mode,
            bar,
            start: now,
            eta: Eta::default(),
            eval: None,
            last_line: now,
            printed_any: false,
            examples: 0.0,
            seconds: 0.0,
            pending: None,
        }
    }

    /// Shows one finished step.
    pub fn step(&mut self, ev: &Event<'_>) {
        let now = Instant::now();
        if ev.eval_loss.is_some() {
            self.eval = ev.eval_loss;
        }
        let per_step = self.eta.step(ev.step, ev.seconds, now);
        let left = ev.total.saturating_sub(ev.step) as f64 * per_step;
        self.examples += ev.examples_per_s * ev.seconds;
        self.seconds += ev.seconds;
        let throughput = match self.mode {
            // The mean since the last line.
            Mode::Lines { .. } if self.seconds > 0.0 => self.examples / self.seconds,
            _ => ev.examples_per_s,
        };
        let mut msg = format!(
            "loss {:.4} lr {:.2e} |g| {:.3} {:.1} ex/s eta {}",
            ev.stats.loss,
            ev.stats.lr,
            ev.stats.grad_norm,
            throughput,
            short_duration(left)
        );
        // preference objectives: the reward accuracy (reward models, PRM: their accuracy)
        let acc = ev
            .stats
            .metrics
            .iter()
            .find(|(k, _)| k == "rewards/accuracies" || k == "accuracy");
        if let Some((_, a)) = acc {
            msg.push_str(&format!(" acc {:.0}%", 100.0 * a));
        }
        if let Some(e) = self.eval {
            msg.push_str(&format!(" eval {e:.4}"));
        }
        let line = format!("step {}/{}: {msg}", ev.step, ev.total);
        match self.mode {
            Mode::Bar => {
                if let Some(b) = &self.bar {
                    b.set_length(ev.total);
                    b.set_position(ev.step);
                    b.set_message(msg);
                    if let Some(e) = ev.eval_loss {
                        b.println(format!("step {}/{}: eval loss {e:.4}", ev.step, ev.total));
                    }
                }
            }
            Mode::EveryStep => eprintln!("{line}"),
            Mode::Lines { every } => {
                let due = line_due(
                    ev.step,
                    ev.total,
                    every,
                    !self.printed_any,
                    ev.eval_loss.is_some(),
                    now.duration_since(self.last_line),
                );
                if due {
                    self.print(&line, now);
                } else {
                    self.pending = Some(line);
                }
            }
        }
    }

    fn print(&mut self, line: &str, now: Instant) {
        eprintln!(
            "[{}] {line}",
            short_duration(now.duration_since(self.start).as_secs_f64())
        );
        self.last_line = now;
        self.printed_any = true;
        self.examples = 0.0;
        self.seconds = 0.0;
        self.pending = None;
    }

    /// Ends the display: the bar is left as it is (`clear`: removed), and a plain line is
    /// printed for the last step if it had none (a run stopped by `--stop-after`).
    pub fn finish(&mut self, clear: bool) {
        if let Some(b) = self.bar.take() {
            if clear {
                b.finish_and_clear();
            } else {
                b.finish();
            }
        }
        if let Some(line) = self.pending.take() {
            self.print(&line, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_every_few_steps_or_seconds() {
        let s = Duration::from_secs(1);
        let due = |step, first, evaluated, since| line_due(step, 100, 10, first, evaluated, since);
        assert!(due(1, true, false, s), "the first step");
        assert!(!due(2, false, false, s));
        assert!(due(10, false, false, s));
        assert!(due(20, false, false, s));
        assert!(!due(21, false, false, s));
        assert!(due(21, false, true, s), "an evaluation");
        assert!(due(23, false, false, LINE_INTERVAL), "after a few seconds");
        assert!(due(100, false, false, s), "the last step");
        assert!(line_due(7, 100, 0, false, false, s), "every 0 is every 1");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(0.4), "0s");
        assert_eq!(short_duration(42.0), "42s");
        assert_eq!(short_duration(185.0), "3m05s");
        assert_eq!(short_duration(3720.0), "1h02m");
        assert_eq!(short_duration(2.0 * 86400.0 + 3.0 * 3600.0), "2d03h");
        assert_eq!(short_duration(f64::NAN), "?");
    }

    #[test]
    fn the_eta_leaves_out_the_first_step_once_there_is_another() {
        let t0 = Instant::now();
        let mut e = Eta::default();
        // The first step compiles: 30 s.
        assert_eq!(e.step(5, 30.0, t0), 30.0);
        // Then 2 s a step.
        let per = e.step(9, 2.0, t0 + Duration::from_secs(8));
        assert!((per - 2.0).abs() < 1e-9, "{per}");
    }
}
