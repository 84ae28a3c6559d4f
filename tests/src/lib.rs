//! Test harness shared by Pushwire's end-to-end tests and benchmarks: real backing services
//! started per test, and helpers to drive them.

pub mod admin;
pub mod control_plane;
pub mod etcd;
pub mod eventually;
pub mod faults;
pub mod postgres;
pub mod process;
pub mod receiver;
pub mod tokens;
pub mod worker;
