//! Wire formats shared by the co2 broker and the edge agent.
//!
//! Both binaries must agree byte for byte on what a reading looks like on MQTT, which topic
//! carries it and how the broker tells an agent that a reading is safely stored. Keeping those
//! formats here, and only here, means the two sides cannot drift apart.

pub mod ack;
pub mod framing;
pub mod payload;
pub mod topic;

pub use ack::{SeqRanges, StorageAck};
pub use payload::{MeasuredAt, Payload, PayloadError};
pub use topic::{DeviceId, TopicError, READINGS_FILTER};
