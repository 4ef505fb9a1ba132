//! The `tresor` binary: all of it lives in [`tresor::cli`].

fn main() {
    std::process::exit(tresor::cli::main());
}
