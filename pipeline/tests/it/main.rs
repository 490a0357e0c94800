//! The integration tests: one binary, a module per subject, each test against
//! real services (a nats-server and a PostgreSQL database of its own, an S3 server
//! where it needs one) and the real stage binaries. `cargo test --test it <name>` runs
//! some; the harness ([`support`]) builds the binaries it runs first, so an edited
//! stage is never tested as its old binary. docs/testing.md says what each module covers.

mod support;

mod align;
mod api;
mod bench;
mod broker_loss;
mod chaos;
mod cluster;
mod cluster_faults;
mod dashboard;
mod database;
mod delivery;
mod disk_full;
mod detector;
mod end_to_end;
mod engines;
mod eval;
mod hardening;
mod hostile;
mod large_photos;
mod logs;
mod orientation;
mod postgres_tls;
mod priority;
mod prometheus;
mod reconfigure;
mod retention;
mod s3;
mod scale;
mod security;
