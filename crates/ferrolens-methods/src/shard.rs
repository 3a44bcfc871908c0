//! Shards: a deterministic 1/N of a sweep's work units, so that N processes (a Slurm job array,
//! a Kubernetes Indexed Job, or N local processes) compute disjoint parts of one sweep whose
//! union is exactly the unsharded result.
//!
//! A sweep's work units are the rows of its result table in the order an unsharded run writes
//! them (for `patch`: method, component, layer, position, head). Shard `I/N` owns the units whose
//! row index `u` has `u % N == I` (round robin, so every shard gets early and late layers and the
//! shards cost about the same). Units of cheap methods (AtP, RelP: one backward for all units)
//! are computed whole by every shard and only the owned rows are kept; activation patching runs
//! only the owned patches.
//!
//! ```
//! use ferrolens_methods::shard::Shard;
//! let s: Shard = "1/3".parse().unwrap();
//! assert!(s.owns(4) && !s.owns(5));
//! assert_eq!(s.count_of(10), 3); // units 1, 4, 7
//! ```

use ferrolens_model::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Shard `index` of `count` (0-based: `0/4` .. `3/4`, as Slurm's `--array=0-3` and Kubernetes'
/// `JOB_COMPLETION_INDEX` count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: usize,
    /// The number of shards.
    pub count: usize,
}

impl Shard {
    /// A checked shard.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 {
            return Err(Error::Input("a sweep has at least one shard; give --shard I/N with N >= 1 (e.g. 0/4)".into()));
        }
        if index >= count {
            return Err(Error::Input(format!(
                "shard {index}/{count} does not exist: shards are numbered from 0, so give I in 0..{} (Slurm: --array=0-{}; Kubernetes: JOB_COMPLETION_INDEX)",
                count - 1,
                count - 1
            )));
        }
        Ok(Shard { index, count })
    }

    /// Whether this shard owns work unit `unit` (`unit % count == index`).
    pub fn owns(&self, unit: usize) -> bool {
        unit % self.count == self.index
    }

    /// How many of `total` units (`0..total`) this shard owns.
    pub fn count_of(&self, total: usize) -> usize {
        total / self.count + usize::from(total % self.count > self.index)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// `I/N`, e.g. `0/4`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Input(format!("`{s}` is not a shard; write I/N with 0 <= I < N, e.g. --shard 0/4 (the first of four)"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse().map_err(|_| bad())?;
        let n = n.trim().parse().map_err(|_| bad())?;
        Shard::new(i, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_units() {
        for n in 1..6 {
            let shards: Vec<Shard> = (0..n).map(|i| Shard::new(i, n).unwrap()).collect();
            for u in 0..50 {
                assert_eq!(shards.iter().filter(|s| s.owns(u)).count(), 1);
            }
            for total in 0..20 {
                assert_eq!(shards.iter().map(|s| s.count_of(total)).sum::<usize>(), total);
                for s in &shards {
                    assert_eq!(s.count_of(total), (0..total).filter(|&u| s.owns(u)).count());
                }
            }
        }
        assert!("3/3".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
        assert!("a/2".parse::<Shard>().is_err());
        assert_eq!("2/5".parse::<Shard>().unwrap().to_string(), "2/5");
    }
}
