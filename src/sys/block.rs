//! Block devices: whether one is in use (mounted, or backing `/`). The
//! exclusive open that settles it for writing is in the slot writer.

use std::path::Path;

/// True when `device` is a block device that is mounted (at `/` or
/// anywhere else): such a device is in use and must never be written.
pub fn device_in_use(device: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = std::fs::metadata(device) else {
        return false;
    };
    if !meta.file_type().is_block_device() {
        return false;
    }
    let rdev = meta.rdev();
    if std::fs::metadata("/").is_ok_and(|root| root.dev() == rdev) {
        return true;
    }
    let wanted = format!("{}:{}", dev_major(rdev), dev_minor(rdev));
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| info.lines().any(|l| l.split_whitespace().nth(2) == Some(wanted.as_str())))
        .unwrap_or(false)
}

/// True when `device` is the block device mounted at `/`.
pub fn device_backs_root(device: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (Ok(dev), Ok(root)) = (std::fs::metadata(device), std::fs::metadata("/")) else {
        return false;
    };
    dev.file_type().is_block_device() && dev.rdev() == root.dev()
}

fn dev_major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

fn dev_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}
