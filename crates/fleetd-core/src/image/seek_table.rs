//! zstd's seekable format (contrib/seekable_format in the zstd sources):
//! independent frames, then a skippable frame holding the seek table, which
//! plain `zstd -d` skips. `fleetctl image pack` writes it; tools that know
//! the format can seek in the `.zst` without fleetd's index.

const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
const FOOTER_LEN: usize = 9;

/// One frame's entry: compressed and decompressed sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub compressed: u32,
    pub decompressed: u32,
}

/// The whole skippable frame, without checksums.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let content = entries.len() * 8 + FOOTER_LEN;
    let mut out = Vec::with_capacity(8 + content);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(content as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.compressed.to_le_bytes());
        out.extend_from_slice(&e.decompressed.to_le_bytes());
    }
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.push(0); // descriptor: no checksums
    out.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    out
}

/// Reads the seek table from the end of a `.zst` file (`tail` is the
/// file's last bytes, at least the whole table). `None` if there is none.
pub fn parse(tail: &[u8]) -> Option<Vec<Entry>> {
    let n = tail.len();
    if n < FOOTER_LEN + 8 {
        return None;
    }
    let u32_at = |at: usize| u32::from_le_bytes([tail[at], tail[at + 1], tail[at + 2], tail[at + 3]]);
    if u32_at(n - 4) != SEEKABLE_MAGIC {
        return None;
    }
    let count = u32_at(n - 9) as usize;
    let per = if tail[n - 5] & 0x80 != 0 { 12 } else { 8 };
    let content = count.checked_mul(per)?.checked_add(FOOTER_LEN)?;
    let start = n.checked_sub(content + 8)?;
    if u32_at(start) != SKIPPABLE_MAGIC || u32_at(start + 4) as usize != content {
        return None;
    }
    Some(
        (0..count)
            .map(|i| {
                let at = start + 8 + i * per;
                Entry { compressed: u32_at(at), decompressed: u32_at(at + 4) }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let entries =
            vec![Entry { compressed: 10, decompressed: 4096 }, Entry { compressed: 7, decompressed: 5 }];
        let table = encode(&entries);
        assert_eq!(table.len(), 8 + 16 + 9);
        let mut file = vec![0xAA; 17];
        file.extend_from_slice(&table);
        assert_eq!(parse(&file), Some(entries));
        assert_eq!(parse(&file[..file.len() - 1]), None, "no footer magic");
        let mut wrong_count = file.clone();
        let n = wrong_count.len();
        wrong_count[n - 9] = 200;
        assert_eq!(parse(&wrong_count), None, "more entries than bytes");
        assert_eq!(parse(&[]), None);
    }
}
