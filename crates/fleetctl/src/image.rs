//! `fleetctl image pack`: an image as a seekable `.zst` (independent frames
//! plus zstd's seek table, so plain `zstd -d` restores it) and its block
//! index (`fleetd_core::image::index`), in one pass over the image.

use fleetd::fsutil;
use fleetd::image::index::{block_hash, Frame, Index};
use fleetd::image::seek_table::{self, Entry};
use fleetd::image::{BLOCK, MAX_FRAME};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// 64 KiB: see `benches`' note in README ("Images"): a 1 % change of a
/// root filesystem fetches about half of what 256 KiB frames would, for a
/// .zst a few percent larger.
pub const DEFAULT_FRAME_SIZE: u32 = 64 << 10;
/// zstd's own default level: fast enough to pack in the build, and the
/// device decodes any level at the same speed.
pub const DEFAULT_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("--frame-size {0}: a multiple of 4096 from 4096 to {MAX_FRAME}")]
    FrameSize(u32),
    #[error("{0}: the image is empty")]
    Empty(PathBuf),
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
}

/// What `pack` wrote, and the `image` claim for it.
#[derive(Debug, Clone)]
pub struct Packed {
    pub zst: PathBuf,
    pub index: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub zst_size: u64,
    pub index_size: u64,
    pub index_sha256: String,
}

impl Packed {
    /// `{"size", "sha256", "encoding": "zstd", "index": {"size", "sha256"}}`:
    /// the publisher adds `url` and `index.url`.
    pub fn claim(&self) -> serde_json::Value {
        serde_json::json!({
            "size": self.size,
            "sha256": self.sha256,
            "encoding": "zstd",
            "index": {"size": self.index_size, "sha256": self.index_sha256},
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackError + '_ {
    move |source| PackError::Io { path: path.to_path_buf(), source }
}

/// Writes `DIR/NAME.zst` and `DIR/NAME.index` for `image` (NAME is its file
/// stem), each through a temp file, fsync and rename.
pub fn pack(image: &Path, out: &Path, frame_size: u32, level: i32) -> Result<Packed, PackError> {
    if frame_size == 0 || frame_size as usize % BLOCK != 0 || frame_size > MAX_FRAME {
        return Err(PackError::FrameSize(frame_size));
    }
    let name = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    std::fs::create_dir_all(out).map_err(io(out))?;
    let zst_path = out.join(format!("{name}.zst"));
    let index_path = out.join(format!("{name}.index"));
    let zst_tmp = out.join(format!(".{name}.zst.tmp"));

    let mut input = File::open(image).map_err(io(image))?;
    let mut output = std::io::BufWriter::new(File::create(&zst_tmp).map_err(io(&zst_tmp))?);
    let mut compressor = zstd::bulk::Compressor::new(level).map_err(PackError::Zstd)?;
    // Each frame says its size, so a decoder allocates exactly, and carries a checksum.
    compressor.include_contentsize(true).map_err(PackError::Zstd)?;
    compressor.include_checksum(true).map_err(PackError::Zstd)?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; frame_size as usize];
    let mut hashes = Vec::new();
    let mut frames = Vec::new();
    let mut entries = Vec::new();
    let (mut size, mut offset) = (0u64, 0u64);
    loop {
        let n = read_full(&mut input, &mut buffer).map_err(io(image))?;
        if n == 0 {
            break;
        }
        let raw = &buffer[..n];
        digest.update(raw);
        hashes.extend(raw.chunks(BLOCK).flat_map(block_hash));
        let compressed = compressor.compress(raw).map_err(PackError::Zstd)?;
        output.write_all(&compressed).map_err(io(&zst_tmp))?;
        let len = compressed.len() as u32;
        frames.push(Frame { offset, len });
        entries.push(Entry { compressed: len, decompressed: n as u32 });
        offset += u64::from(len);
        size += n as u64;
        if n < buffer.len() {
            break;
        }
    }
    if size == 0 {
        let _ = std::fs::remove_file(&zst_tmp);
        return Err(PackError::Empty(image.to_path_buf()));
    }
    let table = seek_table::encode(&entries);
    output.write_all(&table).map_err(io(&zst_tmp))?;
    let file =
        output.into_inner().map_err(|e| PackError::Io { path: zst_tmp.clone(), source: e.into_error() })?;
    file.sync_all().map_err(io(&zst_tmp))?;
    drop(file);
    std::fs::rename(&zst_tmp, &zst_path).map_err(io(&zst_path))?;
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest.finish().as_ref());
    let index = Index::from_parts(size, sha256, frame_size, offset + table.len() as u64, hashes, frames);
    let index_bytes = index.encode();
    fsutil::atomic_write(&index_path, &index_bytes, 0o644).map_err(io(&index_path))?;
    fsutil::fsync_dir(out).map_err(io(out))?;
    Ok(Packed {
        zst: zst_path,
        index: index_path,
        size,
        sha256: fleetd::trust::hex(&sha256),
        zst_size: index.zst_size,
        index_size: index_bytes.len() as u64,
        index_sha256: fleetd::trust::hex(ring::digest::digest(&ring::digest::SHA256, &index_bytes).as_ref()),
    })
}

/// Fills `buf` unless the file ends first; the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
