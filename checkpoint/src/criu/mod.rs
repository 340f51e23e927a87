//! One container's CRIU work: its dump, restore and inspection, CRIU's images, the hold at
//! CRIU's start and the kernel feature cache. Names `error`, `fs`, `format`, `config`.

pub mod container;
pub mod hold;
pub mod image;
pub mod kdat;
