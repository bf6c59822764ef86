//! The plugin author's loop outside the host: `plugin new` writes a project ([`scaffold`]),
//! `plugin build` turns a project into a component ([`build`]), `plugin dev` rebuilds and
//! redeploys it on every save ([`dev`]). `plugin test`, `exec` and `deploy` live in
//! [`crate::toolkit`] and [`crate::deploy`].

pub mod build;
pub mod dev;
pub mod scaffold;

pub use build::{Language, build};
