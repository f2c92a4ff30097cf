"""The build, top to bottom: ingest a model and data (`ingest`, `data`), train (`train`),
distill, prune and quantize (`compress`, `prune`), assess each stage as it would ship in the
real backend (`assess`, `stats`), decide (`decisions`: backend, precision, budgets, gate), and
package the bundle (`package`), as `pipeline.build` runs them; `recipe` says which stages run,
`report` renders the result. Backends are reached only through `targets`."""
