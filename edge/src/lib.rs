//! co2-edge: the Raspberry Pi agent that samples a CO2 sensor, keeps every reading in an on-disk
//! outbox and publishes it to the co2 broker until the broker confirms it is stored.
//!
//! Data flow: [`sensors`] → [`sampler`] (warm-up gate, outlier filter, timestamps) →
//! [`outbox`] (durable queue on the SD card) → [`publisher`] (MQTT QoS 1, storage acks) →
//! broker. [`agent`] wires the pieces together and owns shutdown.

pub mod agent;
pub mod brokers;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connection;
pub mod filter;
pub mod outbox;
pub mod publisher;
pub mod reading;
pub mod sampler;
pub mod sensors;
pub mod shutdown;
