//! Everything a dispatcher needs to know about Arvados itself.
//!
//! Owns: the cluster config (`config`: typed structs, defaults, loader with key-path errors),
//! the API records (`types`: containers, lists, tokens), and the API client (`client`: request
//! encoding, paging, errors, last-503 tracking). It knows nothing about clouds, VMs or
//! scheduling; every other crate reaches Arvados through it.

pub mod client;
pub mod config;
pub mod host;
pub mod types;

pub use client::{ApiError, Client, ClientConfig, Count, Filter, ListOptions, Method};
pub use config::{Cluster, ConfigError, ConfigSource, InstanceType};
pub use types::{ApiClientAuthorization, Container, ContainerList, ContainerState};
