//! Synthetic images for the image tests and `scripts/bench-image`: what a
//! root filesystem looks like to a compressor and to a block index (text,
//! random, zeros), and a v2 with a given share of its blocks changed.

const BLOCK: usize = 4096;

/// Fast deterministic bytes: xorshift, 8 bytes a step.
pub fn random_fill(out: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// Text-like bytes: lines of words from a small vocabulary.
pub fn text_fill(out: &mut [u8], seed: u64) {
    const WORDS: [&str; 16] = [
        "fleetd ",
        "gateway ",
        "slot ",
        "update ",
        "config ",
        "=",
        "true\n",
        "/usr/lib/",
        "libc.so.6 ",
        "0x7f3a ",
        "ERROR ",
        "INFO ",
        "systemd ",
        "mqtt ",
        "{\"state\": ",
        "}\n",
    ];
    let mut x = seed | 1;
    let mut at = 0;
    while at < out.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let word = WORDS[(x % 16) as usize].as_bytes();
        let n = word.len().min(out.len() - at);
        out[at..at + n].copy_from_slice(&word[..n]);
        at += n;
    }
}

/// A root-filesystem-like image: a quarter text, three eighths random, a
/// quarter zeros, the rest text.
pub fn synthetic_image(len: usize, seed: u64) -> Vec<u8> {
    let mut image = vec![0u8; len];
    let (q, e) = (len / 4, len / 8);
    text_fill(&mut image[..q], seed);
    random_fill(&mut image[q..q + 3 * e], seed + 1);
    text_fill(&mut image[q + 3 * e + q..], seed + 2);
    image
}

/// `v1` with `percent` % of its blocks changed, in `runs` contiguous runs
/// spread over the image.
pub fn changed(v1: &[u8], percent: f64, runs: usize, seed: u64) -> Vec<u8> {
    let mut v2 = v1.to_vec();
    let blocks = v1.len() / BLOCK;
    let per_run = ((blocks as f64 * percent / 100.0) / runs as f64).round() as usize;
    for r in 0..runs {
        // Run r starts somewhere in its own stretch of the image.
        let stretch = blocks / runs;
        let start = r * stretch + (seed as usize * 7919 + r * 104_729) % (stretch - per_run);
        random_fill(&mut v2[start * BLOCK..(start + per_run) * BLOCK], seed + 100 + r as u64);
    }
    v2
}
