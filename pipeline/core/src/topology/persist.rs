//! `[stages.persist.params]`: none yet.

use serde::{Deserialize, Serialize};

/// Parameters of the persist stage (none yet).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PersistParams {}
