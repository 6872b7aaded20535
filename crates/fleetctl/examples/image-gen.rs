//! Writes a synthetic root-filesystem-like image and a v2 of it, for
//! scripts/bench-image: `image-gen --mib N --out DIR` writes DIR/v1.img and
//! DIR/v2.img (1 % of v2's 4 KiB blocks changed, in 16 runs).

use fleetd_fixture::images::{changed, synthetic_image};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut mib, mut out) = (256usize, std::path::PathBuf::from("."));
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => mib = value.parse().expect("--mib N"),
            "--out" => out = value.into(),
            other => panic!("unknown flag {other}"),
        }
    }
    let v1 = synthetic_image(mib << 20, 1);
    let v2 = changed(&v1, 1.0, 16, 3);
    std::fs::write(out.join("v1.img"), &v1).expect("v1.img");
    std::fs::write(out.join("v2.img"), &v2).expect("v2.img");
}
