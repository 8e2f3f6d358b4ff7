//! Core parking: a pure parking policy with the Windows knob set, a Linux affinity actuator, telemetry and a power model

#![forbid(unsafe_code)]
