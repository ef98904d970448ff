//! Driver names (`CloudVMs.Driver`) to driver factories.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{CloudError, Driver};

/// The drivers this build knows.
#[derive(Default, Clone)]
pub struct Registry {
    drivers: BTreeMap<String, Arc<dyn Driver>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn register(&mut self, name: &str, driver: Arc<dyn Driver>) {
        self.drivers.insert(name.to_string(), driver);
    }

    /// The driver called `name`; unknown names are the startup error Arvados gives.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Driver>, CloudError> {
        self.drivers
            .get(name)
            .cloned()
            .ok_or_else(|| CloudError::other(format!("unsupported cloud driver {name:?}")))
    }

    pub fn names(&self) -> Vec<String> {
        self.drivers.keys().cloned().collect()
    }
}
