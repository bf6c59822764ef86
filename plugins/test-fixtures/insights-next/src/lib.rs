//! TEST FIXTURE — never deploy. The shipped `insights` plugin compiled again under this crate's
//! version (0.2.0), so a test can swap a new version in and see which version handled an entry.

#[path = "../../../insights/src/lib.rs"]
#[allow(dead_code)]
mod insights;
