//! Documents several discovery replicas share (join tokens, node revocations), kept in a store
//! that offers compare-and-set, such as Consul KV (`?cas=<ModifyIndex>`).
//!
//! The stores here ([`crate::TokenStore`], [`crate::RevocationStore`]) update their one JSON
//! document by read, change, write-if-unchanged: when another replica wrote in between, the
//! write is refused and the update starts again from what that replica wrote. So two replicas
//! redeeming the same join token cannot both succeed: the second one reads it used.

use std::sync::Arc;

/// A document in a shared store. Blocking: call it from a blocking thread.
pub trait SharedDocument: Send + Sync {
    /// Where it lives, for messages (`Consul KV pilotfish/tokens.json at http://...`).
    fn describe(&self) -> String;
    /// Its bytes (`None`: it does not exist) and the version to hand to [`Self::replace`].
    fn load(&self) -> Result<(Option<Vec<u8>>, u64), SharedError>;
    /// Writes `bytes` if the document is still at `version` (the one [`Self::load`] gave; for
    /// a missing document, that one too). `Ok(false)`: another writer was first.
    fn replace(&self, bytes: &[u8], version: u64) -> Result<bool, SharedError>;
}

/// A shared document, as the stores hold it.
pub type SharedDoc = Arc<dyn SharedDocument>;

/// The shared store could not be read or written (it is down, refused the token, ...).
#[derive(Debug, thiserror::Error)]
#[error("{place}: {message}")]
pub struct SharedError {
    pub place: String,
    pub message: String,
}

/// How many times an update is retried after losing a race before giving up.
pub const MAX_ATTEMPTS: usize = 16;

/// Read, change, write-if-unchanged, until the write goes through (or `change` says there is
/// nothing to write, or it fails). `parse` turns the stored bytes (`None`: absent) into the
/// value, `render` the value into bytes.
pub fn update<T, E>(
    doc: &dyn SharedDocument,
    parse: impl Fn(Option<&[u8]>) -> Result<T, E>,
    render: impl Fn(&T) -> Result<Vec<u8>, E>,
    mut change: impl FnMut(&mut T) -> Result<bool, E>,
) -> Result<bool, E>
where
    E: From<SharedError>,
{
    for _ in 0..MAX_ATTEMPTS {
        let (bytes, version) = doc.load()?;
        let mut value = parse(bytes.as_deref())?;
        if !change(&mut value)? {
            return Ok(false);
        }
        if doc.replace(&render(&value)?, version)? {
            return Ok(true);
        }
        tracing::debug!(doc = %doc.describe(), "another replica wrote first; updating again");
    }
    Err(SharedError {
        place: doc.describe(),
        message: format!("still changing under us after {MAX_ATTEMPTS} attempts"),
    }
    .into())
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory [`SharedDocument`] for the stores' tests.
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub struct MemoryDoc {
        pub state: Mutex<(Option<Vec<u8>>, u64)>,
        /// Writes that lose a race on purpose: before each, another writer bumps the version.
        pub lose_next: Mutex<usize>,
    }

    impl SharedDocument for MemoryDoc {
        fn describe(&self) -> String {
            "memory".into()
        }

        fn load(&self) -> Result<(Option<Vec<u8>>, u64), SharedError> {
            Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).clone())
        }

        fn replace(&self, bytes: &[u8], version: u64) -> Result<bool, SharedError> {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut lose = self.lose_next.lock().unwrap_or_else(|p| p.into_inner());
            if *lose > 0 {
                *lose -= 1;
                state.1 += 1;
            }
            if state.1 != version {
                return Ok(false);
            }
            *state = (Some(bytes.to_vec()), version + 1);
            Ok(true)
        }
    }
}
