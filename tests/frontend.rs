//! Front-end tests: .vlm files in, snapshots out.
