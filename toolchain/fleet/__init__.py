"""The fleet, off the device: the listener that consumes device telemetry from the broker
(listener), the store it lands in and the only place that speaks SQL (store), the running
summaries and hourly rollups the store keeps, as arithmetic over rows (rollup), the rules
that turn windows into retraining triggers as pure functions over rows (rules), and the
`toolchain fleet` report (report). The wire protocol itself is runtime.protocol."""
