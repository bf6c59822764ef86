//! The `kaleidoscope` executable; everything it does is in [`kaleidoscope::cli`].

/// mimalloc instead of glibc's malloc (see [`kaleidoscope::allocator`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The allocator's settings must be in place before its first allocation, which Rust's own
/// start-up (before `main`) makes: so on Linux they are applied by the loader, as a constructor.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE_ALLOCATOR: extern "C" fn() = configure_allocator;

#[cfg(target_os = "linux")]
extern "C" fn configure_allocator() {
    kaleidoscope::allocator::configure();
}

fn main() -> std::process::ExitCode {
    // Elsewhere, as early as Rust lets us (the first arena is then committed eagerly).
    #[cfg(not(target_os = "linux"))]
    kaleidoscope::allocator::configure();
    kaleidoscope::cli::main()
}
