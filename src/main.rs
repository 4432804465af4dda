fn main() {
    std::process::exit(orcafs::cli::main());
}
