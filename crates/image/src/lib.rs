//! OCI images for sandboxes: references as people write them, and layers unpacked into a
//! rootfs without anything in them reaching outside it.

pub mod pull;
pub mod reference;
pub mod registries;
pub mod rootfs;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
pub mod unpack;

pub use pull::{
    Cache, CachedImage, Credentials, ImageConfig, ImageUser, NoProgress, Pruned, PullError,
    PullOptions, PullProgress, Pulled, pull,
};
pub use reference::{Reference, ReferenceError};
pub use registries::RegistryPolicy;
pub use rootfs::ImageFileError;
pub use unpack::{Compression, Owners, UnpackError, Unpacked, unpack_layer};
