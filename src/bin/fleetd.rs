fn main() -> std::process::ExitCode {
    fleetd::cli::fleetd_main()
}
