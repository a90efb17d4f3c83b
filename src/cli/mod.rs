//! The command line, one module per subcommand; `main.rs` parses the
//! arguments, sets up logging and dispatches here.

pub mod args;
pub mod control;
pub mod databases;
pub mod list;
pub mod out;
pub mod replicate;
pub mod restore;
pub mod status;
pub mod target;
pub mod verify;
