//! `longhaul`: the control-plane CLI. Everything lives in [`coordinator::cli`].

fn main() -> std::process::ExitCode {
    coordinator::cli::main()
}
