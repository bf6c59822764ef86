//! The `kaleidoscope` executable; everything it does is in [`kaleidoscope::cli`].

/// mimalloc instead of glibc's malloc (see [`kaleidoscope::allocator`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The allocator's settings must be in place before its first allocation, which Rust's own
/// start-up (before `main`) makes: so they are applied by the loader, as a constructor.
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE_ALLOCATOR: extern "C" fn() = configure_allocator;

extern "C" fn configure_allocator() {
    kaleidoscope::allocator::configure();
}

fn main() -> std::process::ExitCode {
    kaleidoscope::cli::main()
}
