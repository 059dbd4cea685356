//! The end-to-end suite: real `tentacle`, `tentacle-hub` and `tentacle-sim` processes over
//! real mutual TLS, real proxies and a real trace backend.
//!
//! One test binary rather than one per file: each binary links every
//! dependency again, and a single link keeps the build's time and disk use
//! down. Filter by module as usual, e.g. `cargo test -p tentacle-tests polling::`.

mod bench;
mod cancel;
mod cluster;
mod cluster_cli;
mod cluster_failover;
mod cluster_fencing;
mod cluster_store;
mod container_start;
mod containers;
mod containers_cluster;
mod deploy;
mod etcd_harness;
mod fault_matrix;
mod files;
mod fleet;
mod health;
mod hostile;
mod hostile_files;
mod hub_cli;
mod isolation;
mod kubernetes;
mod metrics;
mod polling;
mod proxy;
mod registration;
mod registration_limits;
mod registry_locks;
mod restart;
mod rotation;
mod rotation_approval;
mod scenario_run;
mod script_output;
mod script_survival;
mod sim_cluster;
mod stock_grpc_tools;
mod systemd;
mod traces;
mod trust;
