//! The `kaleidoscope` executable; everything it does is in [`kaleidoscope::cli`].

fn main() -> std::process::ExitCode {
    kaleidoscope::cli::main()
}
