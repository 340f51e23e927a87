//! Files and processes, below everything else: private files and directories, synced and
//! capped I/O, /proc facts, units, and the kernel-confined apply of archives. Names only
//! `error`.

pub mod confined;
pub mod fingerprint;
pub mod private;
pub mod proc;
pub mod read;
pub mod remove;
pub mod units;
