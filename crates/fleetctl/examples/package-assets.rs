//! Writes the man pages and shell completions the Debian package ships
//! (`scripts/package` runs it): `package-assets OUT_DIR`.
//!
//! OUT_DIR/man/<cmd>.1 and <cmd>-<subcommand>.1 (gzipped by the script),
//! OUT_DIR/completions/{bash,zsh,fish}/...

use std::path::{Path, PathBuf};

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::args_os().nth(1).unwrap_or_else(|| "target/assets".into()));
    for command in [fleetd::cli::fleetd_command(), fleetctl::cli::command()] {
        man_pages(&command, &out.join("man"))?;
        completions(command, &out.join("completions"))?;
    }
    Ok(())
}

/// One page for the command and one per subcommand, as git does.
fn man_pages(command: &clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = command.get_name().to_string();
    write_page(command.clone(), &dir.join(format!("{name}.1")))?;
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        // clap names are &'static str; this process ends right after.
        let full: &'static str = Box::leak(format!("{name}-{}", sub.get_name()).into_boxed_str());
        let page = sub.clone().name(full);
        write_page(page, &dir.join(format!("{full}.1")))?;
    }
    Ok(())
}

fn write_page(command: clap::Command, path: &Path) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    clap_mangen::Man::new(command).render(&mut bytes)?;
    std::fs::write(path, bytes)
}

fn completions(mut command: clap::Command, dir: &Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    let name = command.get_name().to_string();
    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = dir.join(sub);
        std::fs::create_dir_all(&dir)?;
        let mut bytes = Vec::new();
        clap_complete::generate(shell, &mut command, &name, &mut bytes);
        std::fs::write(dir.join(file), bytes)?;
    }
    Ok(())
}
