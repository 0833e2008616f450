//! The embedded broker: the MQTT face sensors and local subscribers connect to.

pub mod codec;
pub mod packet;
