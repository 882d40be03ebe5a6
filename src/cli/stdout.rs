//! Command output on stdout. A reader that went away (`taskcred audit export | head`) ends the
//! command quietly with exit 141, as SIGPIPE ends `cat`, instead of a panic; any other write failure is said on
//! stderr and exits 1; a stderr that cannot be written is passed over. Use [`crate::outln!`],
//! [`crate::out!`] and [`crate::errln!`] where `println!`, `print!` and `eprintln!` would be.

use std::io::{self, Write as _};

/// The exit code of a command whose output's reader went away.
pub const EXIT_BROKEN_PIPE: i32 = 141;

/// Writes `args` to stdout and flushes it.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            // 128 + SIGPIPE: what a shell reports for `cat` ended so. Not 0: what was not
            // written (a token) is lost, and the caller must know.
            std::process::exit(EXIT_BROKEN_PIPE);
        }
        warn(format_args!("error: cannot write the output: {e}\n"));
        std::process::exit(1);
    }
}

/// `println!` on [`write`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` on [`write`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!($($arg)*))
    };
}

/// Writes `args` to stderr; a stderr that cannot be written (closed, a full disk) is passed over:
/// what failed is said by the exit code.
pub fn warn(args: std::fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// `eprintln!` on [`warn`]: never a panic.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::cli::stdout::warn(format_args!("{}\n", format_args!($($arg)*)))
    };
}
