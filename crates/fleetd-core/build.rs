// Records the build time: the daemon's clock floor never goes below it, so a
// gateway whose clock was reset still refuses messages that expired before
// the image was built. SOURCE_DATE_EPOCH keeps reproducible builds reproducible.
fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=FLEETD_BUILD_EPOCH={epoch}");
}
