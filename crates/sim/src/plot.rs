//! Hand-written SVG plots.
