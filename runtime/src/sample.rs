//! Choosing the next token from a row of logits: greedy, or seeded sampling after the logits
//! processors of transformers' `generate`, in its order: repetition penalty, temperature,
//! top-k, top-p, min-p.

use crate::rng;

/// How the next token is chosen. `temperature == 0` is greedy (as is `top_k == 1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to `top_p` (1: all).
    pub top_p: f64,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f64,
    /// Divide positive logits of tokens already in the sequence by this (multiply negative ones).
    pub repetition_penalty: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Greedy: the most likely token is always taken.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// The first setting out of its range, as a message.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "--temperature must be a number >= 0 (0 is greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("--min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "--repetition-penalty must be a number > 0 (1 is none), got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: every distinct token id in `seen` has its
/// logit divided by `penalty` when positive, multiplied when negative (once, however often the
/// id occurs).
pub fn repetition_penalty(logits: &mut [f64], seen: &[i32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if !done.insert(id) {
            continue;
        }
        if let Some(l) = usize::try_from(id).ok().and_then(|i| logits.get_mut(i)) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// The logits after temperature, top-k, top-p and min-p (removed tokens are -inf), as
/// transformers' warpers compute them.
pub fn warp(logits: &[f64], s: &Sampling) -> Vec<f64> {
    let mut x: Vec<f64> = logits.iter().map(|l| l / s.temperature).collect();
    let n = x.len();
    if s.top_k > 0 && s.top_k < n {
        let mut sorted = x.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[s.top_k - 1];
        for v in x.iter_mut() {
            if *v < kth {
                *v = f64::NEG_INFINITY;
            }
        }
    }
    if s.top_p < 1.0 {
        // ascending; remove the tail whose cumulative probability is <= 1 - top_p, keeping
        // at least the most likely token
        let p = softmax(&x);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| x[a].total_cmp(&x[b]).then(a.cmp(&b)));
        let mut cum = 0.0;
        for (rank, &i) in order.iter().enumerate() {
            cum += p[i];
            if cum <= 1.0 - s.top_p && rank + 1 < n {
                x[i] = f64::NEG_INFINITY;
            }
        }
    }
    if s.min_p > 0.0 {
        let p = softmax(&x);
        let top = p.iter().cloned().fold(0.0, f64::max);
        for (v, pi) in x.iter_mut().zip(&p) {
            if *pi < s.min_p * top {
                *v = f64::NEG_INFINITY;
            }
        }
    }
    x
}

/// softmax in f64 (-inf entries get probability 0).
pub fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// log softmax of one token (the model's log-probability of choosing it).
pub fn log_prob(logits: &[f32], token: usize) -> f64 {
    let m = logits
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|&v| (v as f64 - m).exp()).sum();
    logits[token] as f64 - m - z.ln()
}

/// The index of the largest value (the first of equal ones, as `torch.argmax`).
pub fn argmax(x: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// The next token for one row. `seen` are the row's tokens so far (for the repetition
/// penalty); `stream` and `step` select the random number, so a row's samples depend on the
/// seed, the row's place in the input and the step, never on the rest of its batch.
pub fn choose(logits: &[f32], seen: &[i32], s: &Sampling, stream: u64, step: u64) -> usize {
    let mut x: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    repetition_penalty(&mut x, seen, s.repetition_penalty);
    if s.is_greedy() {
        return argmax(&x);
    }
    let p = softmax(&warp(&x, s));
    let u = rng::uniform01(s.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15), step);
    draw(&p, u)
}

/// The token whose cumulative probability first exceeds `u` (a zero-probability token is never
/// drawn).
pub fn draw(p: &[f64], u: f64) -> usize {
    let total: f64 = p.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &pi) in p.iter().enumerate() {
        if pi <= 0.0 {
            continue;
        }
        cum += pi;
        last = i;
        if cum > target {
            return i;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy() {
        let l = [0.3f32, 2.5, -1.0, 2.4];
        let s = Sampling {
            temperature: 0.7,
            top_k: 1,
            ..Sampling::default()
        };
        for step in 0..20 {
            assert_eq!(choose(&l, &[], &s, 3, step), 1);
        }
    }

    #[test]
    fn filters_remove_what_transformers_removes() {
        // probabilities 0.5, 0.25, 0.125, 0.125 (logits ln p)
        let l: Vec<f64> = [0.5f64, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln())
            .collect();
        let s = |top_p, min_p| Sampling {
            temperature: 1.0,
            top_p,
            min_p,
            ..Sampling::default()
        };
        let kept = |x: Vec<f64>| x.iter().filter(|v| v.is_finite()).count();
        // top-p 0.7: the tail with cumulative mass <= 0.3 (0.125 + 0.125) goes
        assert_eq!(kept(warp(&l, &s(0.7, 0.0))), 2);
        // top-p 0.8: tail mass allowed 0.2: only one 0.125 goes
        assert_eq!(kept(warp(&l, &s(0.8, 0.0))), 3);
        // min-p 0.3: keep p >= 0.15
        assert_eq!(kept(warp(&l, &s(1.0, 0.3))), 2);
        let mut x = vec![2.0, -2.0, 1.0];
        repetition_penalty(&mut x, &[0, 1, 1], 2.0);
        // once per distinct id (transformers gathers, then scatters the same value)
        assert_eq!(x, vec![1.0, -4.0, 1.0]);
    }
}
