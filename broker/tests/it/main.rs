//! Integration tests: the real broker, a real MariaDB (and SQLite), real MQTT clients.
//! One test binary, so the private MariaDB server starts once for all of them.

mod burst;
mod config;
mod edge;
mod faults;
mod galera;
mod grafana;
mod hostile;
mod ingest;
mod legacy;
mod metrics;
mod recovery;
mod retention;
mod rollups;
mod schema;
mod security;
mod support;
