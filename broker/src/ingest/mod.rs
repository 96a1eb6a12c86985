//! From the MQTT link to storable records: receive, classify, hand to the writer.

pub mod classify;
pub mod link;
pub mod record;

pub use classify::Classifier;
pub use record::{Batch, Reading, Record, Rejection};
