//! Randomised tests driven by proptest through a choice sequence: proptest generates a vector
//! of numbers, the test draws its decisions from it ([`Choices::below`]), and a failing case is
//! shrunk element by element towards 0 (fewer and first options), so it is reported small.
//! The seed is fixed, so CI runs the same cases every time.

use proptest::test_runner::{Config, TestRng, TestRunner};

/// Where a randomised test draws its decisions from. Past the end every choice is 0.
pub struct Choices<'a> {
    choices: &'a [u32],
    at: usize,
}

impl Choices<'_> {
    /// A number in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        let c = self.choices.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        u64::from(c) % n.max(1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Run `case` on `cases` choice sequences of `len` numbers; panic with the shrunk failure.
pub fn check(cases: u32, len: usize, case: impl FnMut(&mut Choices<'_>)) {
    // proptest wants an `Fn`; the case may count things across runs.
    let case = std::cell::RefCell::new(case);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let strategy = proptest::collection::vec(proptest::prelude::any::<u32>(), len);
    let result = runner.run(&strategy, |choices| {
        (case.borrow_mut())(&mut Choices {
            choices: &choices,
            at: 0,
        });
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
