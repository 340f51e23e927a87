//! Tar archives of files: a container's rootfs changes (from its overlay upper directory),
//! emptyDir volumes and `/dev/shm`. Names `error`, `fs`, `format`, `config`.

pub mod rootfs;
