//! Everything a dispatcher needs to know about Arvados itself.
//!
//! Owns: the cluster config (`config`: typed structs, defaults, loader with key-path errors),
//! the API records (`types`: containers, lists, tokens), and the API client (`client`: request
//! encoding, paging, errors, last-503 tracking). It knows nothing about clouds, VMs or
//! scheduling; every other crate reaches Arvados through it.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod host;
pub mod types;

pub use client::{ApiError, Client, ClientConfig, Count, Filter, ListOptions, Method};
pub use config::{Cluster, ConfigError, ConfigSource, InstanceType};
pub use types::{ApiClientAuthorization, Container, ContainerList, ContainerState};

/// `GatewayAuthSecret` for a container: `hex(HMAC-SHA256(key = SystemRootToken, message = uuid))`.
///
/// ```
/// let secret = arvados::gateway_auth_secret("xyzzy", "zzzzz-dz642-queuedcontainer");
/// assert_eq!(secret, "d71921a0fffb2f51d5994d3a6003cc2b85a21784d755245f63e5390357977f59");
/// ```
pub fn gateway_auth_secret(root_token: &str, uuid: &str) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, root_token.as_bytes());
    hex::encode(hmac::sign(&key, uuid.as_bytes()).as_ref())
}

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
