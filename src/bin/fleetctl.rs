fn main() -> std::process::ExitCode {
    fleetd::cli::fleetctl::main()
}
