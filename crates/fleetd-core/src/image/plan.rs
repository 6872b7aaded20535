//! The adaptive install's plan, without IO: given what the local slots
//! hold (read by the device), which frames of the `.zst` must be fetched,
//! merged into single-range requests, and what that costs.
//!
//! The lookup is built from the index (the blocks wanted), not from the
//! booted slot (the blocks there): each block read from the booted slot is
//! hashed and looked up once, and memory follows the image, not the slot
//! (5 bytes per 4 KiB block with the index's 16, 5.1 MiB per GiB).

use super::index::{BlockHash, Index};
use super::BLOCK;

/// One bit per block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    pub fn new(len: usize) -> Self {
        Self { words: vec![0; len.div_ceil(64)] }
    }

    pub fn set(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    pub fn get(&self, i: usize) -> bool {
        self.words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// The wanted blocks by hash: each distinct hash once, sorted, with where
/// the booted slot holds it (if it does).
pub struct Lookup {
    /// Image block numbers, one per distinct hash, sorted by hash.
    order: Vec<u32>,
    /// Parallel to `order`: booted block number + 1, or 0.
    found: Vec<u32>,
}

impl Lookup {
    pub fn new(index: &Index) -> Self {
        // Only whole blocks can be found at another offset.
        let whole = (index.size / BLOCK as u64) as u32;
        let mut order: Vec<u32> = (0..whole).collect();
        order.sort_unstable_by(|a, b| index.block(*a as usize).cmp(index.block(*b as usize)));
        order.dedup_by(|a, b| index.block(*a as usize) == index.block(*b as usize));
        order.shrink_to_fit();
        let found = vec![0; order.len()];
        Self { order, found }
    }

    fn position(&self, index: &Index, hash: &BlockHash) -> Option<usize> {
        self.order.binary_search_by(|b| index.block(*b as usize).cmp(hash)).ok()
    }

    /// A block of the booted slot, `booted_block` (in 4 KiB units), hashed
    /// to `hash`: remembered if the image wants it and has no source yet.
    pub fn record(&mut self, index: &Index, hash: &BlockHash, booted_block: u32) {
        if let Some(p) = self.position(index, hash) {
            if self.found[p] == 0 {
                self.found[p] = booted_block.saturating_add(1);
            }
        }
    }

    /// Where in the booted slot image block `block` can be copied from.
    pub fn booted_offset(&self, index: &Index, block: usize) -> Option<u64> {
        if (block as u64 + 1) * BLOCK as u64 > index.size {
            return None;
        }
        let hash = index.block(block);
        let p = self.position(index, hash)?;
        match self.found[p] {
            0 => None,
            n => Some(u64::from(n - 1) * BLOCK as u64),
        }
    }
}

/// Where one block of the image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSource {
    /// The slot being written already holds it, at its own offset.
    Target,
    /// The booted slot holds it at this offset.
    Booted(u64),
    /// Neither: its frame is fetched.
    Fetch,
}

pub fn block_source(index: &Index, in_target: &BitSet, lookup: &Lookup, block: usize) -> BlockSource {
    if in_target.get(block) {
        BlockSource::Target
    } else if let Some(offset) = lookup.booted_offset(index, block) {
        BlockSource::Booted(offset)
    } else {
        BlockSource::Fetch
    }
}

/// One single-range request: consecutive frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchRange {
    pub first_frame: usize,
    pub frames: usize,
    /// Bytes of the `.zst` file: `offset..offset + len`.
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The first frame still to produce (a resumed install starts later).
    pub start_frame: usize,
    /// Per frame from `start_frame`: fetched (true) or made of local blocks.
    pub fetch: Vec<bool>,
    pub ranges: Vec<FetchRange>,
    /// Compressed bytes the ranges fetch.
    pub fetch_bytes: u64,
    /// Image bytes taken from the local slots.
    pub reuse_bytes: u64,
}

/// A range grows by whole frames up to this many bytes: a retry after a
/// cut re-asks for less, and no request is unbounded.
pub const MAX_RANGE: u64 = 8 << 20;

impl Plan {
    pub fn new(index: &Index, start_frame: usize, in_target: &BitSet, lookup: &Lookup) -> Self {
        let per = index.blocks_per_frame();
        let mut fetch = Vec::with_capacity(index.frames.len().saturating_sub(start_frame));
        let mut reuse_bytes = 0u64;
        for f in start_frame..index.frames.len() {
            let blocks = (f * per)..((f + 1) * per).min(index.block_count());
            let needs =
                blocks.clone().any(|b| block_source(index, in_target, lookup, b) == BlockSource::Fetch);
            if !needs {
                let raw = index.frame_raw_range(f);
                reuse_bytes += raw.end - raw.start;
            }
            fetch.push(needs);
        }
        let ranges = merge(index, start_frame, &fetch);
        let fetch_bytes = ranges.iter().map(|r| r.len).sum();
        Self { start_frame, fetch, ranges, fetch_bytes, reuse_bytes }
    }

    pub fn fetches(&self, frame: usize) -> bool {
        frame.checked_sub(self.start_frame).and_then(|i| self.fetch.get(i)).copied().unwrap_or(false)
    }
}

fn merge(index: &Index, start_frame: usize, fetch: &[bool]) -> Vec<FetchRange> {
    let mut ranges: Vec<FetchRange> = Vec::new();
    for (i, needed) in fetch.iter().enumerate() {
        if !needed {
            continue;
        }
        let f = start_frame + i;
        let frame = index.frames[f];
        match ranges.last_mut() {
            Some(r) if r.first_frame + r.frames == f && r.len + u64::from(frame.len) <= MAX_RANGE => {
                r.frames += 1;
                r.len += u64::from(frame.len);
            }
            _ => ranges.push(FetchRange {
                first_frame: f,
                frames: 1,
                offset: frame.offset,
                len: u64::from(frame.len),
            }),
        }
    }
    ranges
}

/// `[update] adaptive_fallback`: what an adaptive install does when its
/// plan fetches more than `adaptive_max_fetch` percent of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Download the whole `.zst` instead.
    #[default]
    Full,
    /// Fail the job, naming the planned figure.
    Fail,
}

crate::named_error! {
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum BudgetError {
        #[name = "adaptive-over-budget"]
        #[error("{name}: the plan fetches {planned} bytes ({permille} per mille of the {size}-byte image, index included), above adaptive_max_fetch = {max_percent} %")]
        OverBudget { planned: u64, size: u64, permille: u64, max_percent: u8 },
    }
}

/// What to do with a plan, given the budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Adaptive,
    Full,
    Fail(BudgetError),
}

/// `index_len` counts: the index was fetched for this plan.
pub fn decide(plan: &Plan, index_len: u64, size: u64, max_percent: u8, fallback: Fallback) -> Decision {
    let planned = plan.fetch_bytes + index_len;
    if u128::from(planned) * 100 <= u128::from(size) * u128::from(max_percent) {
        return Decision::Adaptive;
    }
    match fallback {
        Fallback::Full => Decision::Full,
        Fallback::Fail => Decision::Fail(BudgetError::OverBudget {
            planned,
            size,
            permille: (u128::from(planned) * 1000 / u128::from(size.max(1))) as u64,
            max_percent,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::index::{block_hash, Frame};
    use super::*;

    /// An image of `blocks` whole blocks, block i holding `content(i)`, in
    /// frames of `per` blocks, each frame compressing to 1000 bytes.
    fn index_of(contents: &[u64], per: usize) -> Index {
        let size = contents.len() as u64 * BLOCK as u64;
        let hashes = contents.iter().flat_map(|c| block_hash(&c.to_le_bytes())).collect();
        let frames =
            (0..contents.len().div_ceil(per)).map(|i| Frame { offset: i as u64 * 1000, len: 1000 }).collect();
        Index::from_parts(size, [0; 32], (per * BLOCK) as u32, 0, hashes, frames)
    }

    fn scan(index: &Index, target: &[u64], booted: &[u64]) -> (BitSet, Lookup) {
        let mut in_target = BitSet::new(index.block_count());
        for (i, c) in target.iter().enumerate() {
            if i < index.block_count() && index.block(i) == &block_hash(&c.to_le_bytes()) {
                in_target.set(i);
            }
        }
        let mut lookup = Lookup::new(index);
        for (j, c) in booted.iter().enumerate() {
            lookup.record(index, &block_hash(&c.to_le_bytes()), j as u32);
        }
        (in_target, lookup)
    }

    #[test]
    fn plans_by_table() {
        let v2: Vec<u64> = (0..16).collect();
        // (what, target, booted, start frame, fetched frames, ranges as (first, count))
        type Case = (&'static str, Vec<u64>, Vec<u64>, usize, Vec<bool>, Vec<(usize, usize)>);
        let cases: Vec<Case> = vec![
            ("all in the target", v2.clone(), vec![], 0, vec![false; 4], vec![]),
            ("all in the booted slot", vec![99; 16], v2.clone(), 0, vec![false; 4], vec![]),
            ("nothing anywhere", vec![99; 16], vec![98; 16], 0, vec![true; 4], vec![(0, 4)]),
            (
                "one changed block",
                vec![],
                {
                    let mut b = v2.clone();
                    b[5] = 77;
                    b
                },
                0,
                vec![false, true, false, false],
                vec![(1, 1)],
            ),
            (
                "two runs",
                vec![],
                {
                    let mut b = v2.clone();
                    b[1] = 77;
                    b[13] = 77;
                    b
                },
                0,
                vec![true, false, false, true],
                vec![(0, 1), (3, 1)],
            ),
            (
                "adjacent frames merge",
                vec![],
                {
                    let mut b = v2.clone();
                    b[7] = 77;
                    b[8] = 77;
                    b
                },
                0,
                vec![false, true, true, false],
                vec![(1, 2)],
            ),
            (
                "moved by 3 blocks",
                vec![],
                (0..16).map(|i| (i + 13) % 16).collect(),
                0,
                vec![false; 4],
                vec![],
            ),
            ("resumed at frame 2", vec![], vec![], 2, vec![true, true], vec![(2, 2)]),
        ];
        for (what, target, booted, start, fetch, ranges) in cases {
            let index = index_of(&v2, 4);
            let (in_target, lookup) = scan(&index, &target, &booted);
            let plan = Plan::new(&index, start, &in_target, &lookup);
            assert_eq!(plan.fetch, fetch, "{what}");
            let got: Vec<(usize, usize)> = plan.ranges.iter().map(|r| (r.first_frame, r.frames)).collect();
            assert_eq!(got, ranges, "{what}");
            assert_eq!(plan.fetch_bytes, fetch.iter().filter(|f| **f).count() as u64 * 1000, "{what}");
            let local = fetch.iter().filter(|f| !**f).count() as u64;
            assert_eq!(plan.reuse_bytes, local * 4 * BLOCK as u64, "{what}");
        }
    }

    #[test]
    fn sources_prefer_the_target_and_find_moved_blocks() {
        let v2: Vec<u64> = vec![1, 2, 3, 4];
        let index = index_of(&v2, 2);
        let (in_target, lookup) = scan(&index, &[1, 0, 0, 0], &[4, 3, 2, 2]);
        let sources: Vec<BlockSource> =
            (0..4).map(|b| block_source(&index, &in_target, &lookup, b)).collect();
        assert_eq!(
            sources,
            vec![
                BlockSource::Target,
                BlockSource::Booted(2 * 4096),
                BlockSource::Booted(4096),
                BlockSource::Booted(0)
            ],
            "the first booted copy of a hash is the one used"
        );
    }

    #[test]
    fn a_short_last_block_is_never_taken_from_another_offset() {
        let mut index = index_of(&[1, 2], 2);
        index.size -= 10;
        let (in_target, lookup) = scan(&index, &[], &[1, 2]);
        assert_eq!(block_source(&index, &in_target, &lookup, 0), BlockSource::Booted(0));
        assert_eq!(block_source(&index, &in_target, &lookup, 1), BlockSource::Fetch);
    }

    #[test]
    fn ranges_stop_growing_at_the_cap() {
        let contents: Vec<u64> = (0..40).collect();
        let mut index = index_of(&contents, 1);
        for (i, f) in index.frames.iter_mut().enumerate() {
            *f = Frame { offset: i as u64 * (1 << 20), len: 1 << 20 };
        }
        let plan = Plan::new(&index, 0, &BitSet::new(40), &Lookup::new(&index));
        let sizes: Vec<usize> = plan.ranges.iter().map(|r| r.frames).collect();
        assert_eq!(sizes, vec![8, 8, 8, 8, 8]);
        assert!(plan.ranges.iter().all(|r| r.len <= MAX_RANGE));
    }

    #[test]
    fn the_budget_decides() {
        let contents: Vec<u64> = (0..100).collect();
        let index = index_of(&contents, 1);
        let (in_target, lookup) = scan(&index, &[], &contents[..99]);
        let plan = Plan::new(&index, 0, &in_target, &lookup);
        assert_eq!(plan.fetch_bytes, 1000);
        let size = index.size; // 409600: 1000 + 3000 of index is 0.98 %
        assert_eq!(decide(&plan, 3000, size, 1, Fallback::Fail), Decision::Adaptive);
        assert_eq!(decide(&plan, 4100, size, 1, Fallback::Full), Decision::Full);
        let Decision::Fail(e) = decide(&plan, 4100, size, 1, Fallback::Fail) else { panic!() };
        assert_eq!(e.name(), "adaptive-over-budget");
        assert!(e.to_string().contains("5100 bytes"), "{e}");
        assert_eq!(decide(&plan, 0, size, 100, Fallback::Fail), Decision::Adaptive);
    }
}
