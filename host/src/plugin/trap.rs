//! Reports of a trapped plugin call: the panic message from its stderr and the plugin's own
//! frames, without the runtime's, so the dead letter says where the handler failed.

use wasmtime::Trap;

/// How many of the plugin's own frames a trap report names.
pub(super) const TRAP_FRAMES: usize = 4;

/// A trap as one readable line: the panic message first (from the plugin's stderr), then the
/// trap and the innermost frames of the plugin's own code — not the dozen frames of the standard
/// library's panic machinery, nor a `RUST_BACKTRACE` hint that cannot apply inside the host.
pub(super) fn trap_report(error: &wasmtime::Error, stderr: &str) -> String {
    let trap = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    };
    let frames: Vec<String> = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|backtrace| {
            backtrace
                .frames()
                .iter()
                .filter_map(|frame| frame.func_name())
                .map(|name| format!("{:#}", rustc_demangle::demangle(name)))
                .filter(|name| !is_runtime_frame(name))
                .take(TRAP_FRAMES)
                .collect()
        })
        .unwrap_or_default();
    let place = if frames.is_empty() {
        String::new()
    } else {
        format!(" in {}", frames.join(" < "))
    };
    if let Some(exception) = python_exception(stderr) {
        return format!("{exception} ({trap}{place})");
    }
    match panic_message(stderr) {
        Some(panic) => format!("{panic} ({trap}{place})"),
        None if stderr.trim().is_empty() => format!("{trap}{place}"),
        None => format!("{trap}{place}; plugin stderr: {}", stderr.trim()),
    }
}

/// `<Type>: <message> at <file>:<line> in <function> < …` (the innermost [`TRAP_FRAMES`]
/// frames, innermost first) from the traceback componentize-py's runtime prints for an exception
/// escaping a Python handler, if there is one: the last traceback on stderr. (Its trap says only
/// "Python function threw an unexpected exception".)
pub(super) fn python_exception(stderr: &str) -> Option<String> {
    let start = stderr.rfind("Traceback (most recent call last):")?;
    let mut frames = Vec::new();
    let mut exception = None;
    for line in stderr[start..].lines().skip(1) {
        if let Some(frame) = line.trim_start().strip_prefix("File \"") {
            // `File "app.py", line 27, in handle`
            let (file, rest) = frame.split_once("\", line ")?;
            let (number, function) = rest.split_once(", in ").unwrap_or((rest, "?"));
            let file = std::path::Path::new(file)
                .file_name()
                .map_or(file.into(), |n| n.to_string_lossy());
            frames.push(format!("{file}:{number} in {}", function.trim()));
        } else if !line.starts_with(' ') && !line.trim().is_empty() {
            // The exception line ends the traceback (a chained one starts another).
            exception = Some(line.trim().to_string());
            break;
        }
    }
    let exception = exception?;
    frames.reverse();
    frames.truncate(TRAP_FRAMES);
    Some(if frames.is_empty() {
        exception
    } else {
        format!("{exception} at {}", frames.join(" < "))
    })
}

/// `panicked at <file:line:col>: <message>` from a Rust plugin's panic output, if it panicked.
pub(super) fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.find("panicked at ")?;
    let text: Vec<&str> = stderr[start..]
        .lines()
        .filter(|line| !line.starts_with("note: run with `RUST_BACKTRACE"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let (location, message) = text.split_first()?;
    let location = location.trim_end_matches(':');
    Some(if message.is_empty() {
        location.to_string()
    } else {
        format!("{location}: {}", message.join(" "))
    })
}

/// Frames of the standard library, the panic runtime and the bindings, which say nothing about
/// where the plugin failed.
pub(super) fn is_runtime_frame(name: &str) -> bool {
    [
        "std",
        "core",
        "alloc",
        "__rust",
        "__rdl",
        "abort",
        "wit_bindgen",
        "<std",
        "<core",
        "<alloc",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
        || name.contains("::panicking::")
}

#[cfg(test)]
mod tests {
    use super::{is_runtime_frame, panic_message, python_exception};

    #[test]
    fn a_python_traceback_reads_as_the_exception_and_its_innermost_frames() {
        // As componentize-py's runtime prints it (no source lines: the component has none).
        let stderr = "Traceback (most recent call last):\n  File \"/0/app.py\", line 30, in handle\n  File \"/0/app.py\", line 22, in parse\n  File \"/0/app.py\", line 19, in lookup\n  File \"/1/kaleidoscope_sdk.py\", line 112, in required\n  File \"/0/app.py\", line 13, in label_of\nKeyError: 'label'\n\nthread '<unnamed>' (1) panicked at runtime/src/lib.rs:1293:29:\nPython function threw an unexpected exception\n";
        assert_eq!(
            python_exception(stderr).as_deref(),
            Some(
                "KeyError: 'label' at app.py:13 in label_of < kaleidoscope_sdk.py:112 in required < app.py:19 in lookup < app.py:22 in parse"
            )
        );
        assert_eq!(python_exception("panicked at x"), None);
    }

    #[test]
    fn the_panic_message_is_read_without_the_backtrace_hint() {
        let stderr = "thread '<unnamed>' (1) panicked at src/lib.rs:3:5:\nbad input: 7\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("panicked at src/lib.rs:3:5: bad input: 7")
        );
        assert_eq!(panic_message("some other output"), None);
    }

    #[test]
    fn runtime_frames_are_told_from_the_plugins_own() {
        for frame in [
            "std::process::abort",
            "core::panicking::panic_fmt",
            "__rustc::rust_begin_unwind",
            "abort",
        ] {
            assert!(is_runtime_frame(frame), "{frame}");
        }
        for frame in ["handle", "behaviours::perform", "my_plugin::parse_faces"] {
            assert!(!is_runtime_frame(frame), "{frame}");
        }
    }
}
