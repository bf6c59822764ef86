//! The plugin author's loop outside the host: `plugin new` writes a project ([`scaffold`]),
//! `plugin build` turns a project into a component ([`build`]), `plugin dev` rebuilds and
//! redeploys it on every save ([`dev`]), `plugin up` runs a host of the project's own with
//! `plugin dev` on it ([`up`]). `plugin test`, `exec` and `deploy` live in
//! [`crate::toolkit`] and [`crate::deploy`].

pub mod build;
pub mod dev;
pub mod scaffold;
pub mod up;

pub use build::{Language, build};
