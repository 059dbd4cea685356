//! Figures from noisy samples: medians, and ratios measured in alternating
//! rounds (A, B, A, B, …), so that a burst of load from another process
//! lands on both sides of a ratio instead of on one.

use serde::Serialize;

/// The median of `values` (NaN-free), or `None` when there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    })
}

/// A ratio of two measurements, taken in rounds that alternate the sides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    /// The median of the per-round ratios.
    pub median: f64,
    /// The smallest and largest per-round ratio: the spread.
    pub min: f64,
    pub max: f64,
    /// Every round's ratio, in the order they were measured.
    pub rounds: Vec<f64>,
}

impl Ratio {
    /// The ratio of each pair `(ours, theirs)` as `ours / theirs`; `None`
    /// without a pair whose sides are both positive.
    pub fn of(pairs: &[(f64, f64)]) -> Option<Self> {
        let rounds: Vec<f64> = pairs
            .iter()
            .filter(|(a, b)| *a > 0.0 && *b > 0.0 && a.is_finite() && b.is_finite())
            .map(|(a, b)| a / b)
            .collect();
        let median = median(&rounds)?;
        let min = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Self {
            median,
            min,
            max,
            rounds,
        })
    }
}

impl Ratio {
    /// The same spread of per-round differences `ours - theirs`, for rows
    /// whose target is a difference (e.g. at most 5 ms slower).
    pub fn differences(pairs: &[(f64, f64)]) -> Option<Self> {
        let rounds: Vec<f64> = pairs
            .iter()
            .filter(|(a, b)| a.is_finite() && b.is_finite())
            .map(|(a, b)| a - b)
            .collect();
        let median = median(&rounds)?;
        let min = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Self {
            median,
            min,
            max,
            rounds,
        })
    }
}

/// Runs `a` and `b` in `rounds` alternating rounds, starting with `a` on
/// even rounds and with `b` on odd ones (ABBA order), and returns each
/// round's `(a, b)` figures. The order flips so neither side always runs
/// first, right after the other warmed a cache.
pub fn alternate<E>(
    rounds: usize,
    mut a: impl FnMut() -> Result<f64, E>,
    mut b: impl FnMut() -> Result<f64, E>,
) -> Result<Vec<(f64, f64)>, E> {
    let mut pairs = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let pair = if round.is_multiple_of(2) {
            let x = a()?;
            (x, b()?)
        } else {
            let y = b()?;
            (a()?, y)
        };
        pairs.push(pair);
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn a_ratio_reports_its_median_and_spread() {
        let ratio = Ratio::of(&[(2.0, 1.0), (3.0, 1.0), (1.0, 1.0)]).expect("ratio");
        assert_eq!(ratio.median, 2.0);
        assert_eq!((ratio.min, ratio.max), (1.0, 3.0));
        assert_eq!(ratio.rounds, vec![2.0, 3.0, 1.0]);
        assert_eq!(Ratio::of(&[(1.0, 0.0)]), None, "a zero side is no ratio");
    }

    #[test]
    fn rounds_alternate_which_side_runs_first() {
        let order = std::cell::RefCell::new(String::new());
        let pairs = alternate::<()>(
            4,
            || {
                order.borrow_mut().push('a');
                Ok(1.0)
            },
            || {
                order.borrow_mut().push('b');
                Ok(2.0)
            },
        )
        .expect("rounds");
        assert_eq!(order.into_inner(), "abbaabba");
        assert_eq!(
            pairs,
            vec![(1.0, 2.0); 4],
            "pairs stay (a, b) whatever the order"
        );
    }

    #[test]
    fn a_failing_side_stops_the_rounds() {
        let mut calls = 0;
        let result = alternate(
            3,
            || {
                calls += 1;
                Err("disk full")
            },
            || Ok(1.0),
        );
        assert_eq!(result, Err("disk full"));
        assert_eq!(calls, 1);
    }
}
