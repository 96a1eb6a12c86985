//! Where readings end up: the database (through SeaORM), and the on-disk spool that holds them
//! while the database is away.

pub mod ack;
pub mod database;
pub mod devices;
pub mod entities;
pub mod retention;
pub mod rollup_backfill;
pub mod rollups;
pub mod spool;
pub mod writer;

pub use ack::AckSink;
pub use database::{Database, WriteOutcome};
pub use spool::{Spool, SpoolError};
pub use writer::Writer;
