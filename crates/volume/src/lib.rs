//! The cluster shared volume: LUN on-disk format, coordinator, leases with fencing epochs, direct and redirected I/O

#![forbid(unsafe_code)]
