"""Latency, honestly labelled: measured here in a fresh torch-free process (`measure`),
estimated for hardware we do not have by a per-operator cost model (`costmodel`, with the
`roofline` fallback), fitted on micro-models (`micromodels`, `calibrate.fit_host`), stored
under the CPU each fit was measured on (`fitstore`), calibrated by itself on a CPU it has not
seen (`selfcal`) and from device measurements (`calibrate.calibrate`); `profile` puts
measurement and estimate side by side with per-layer times, `profile_report` renders them."""
