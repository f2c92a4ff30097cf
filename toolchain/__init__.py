"""Everything of edgepack that runs off the device, one subpackage per concern:

    build/     the build pipeline and its stages (ingest, train, distill, prune, quantize,
               assess, decide, package)
    latency/   measurement, the cost model, its fit and calibration, `toolchain profile`
    fleet/     the cloud listener, its store, rules and triggers, the fleet report
    cli/       the thin Click command line, one module per command group

and the pieces they share: `profiles` (hardware profiles and where they are found), `host`
(this machine, detected), `paths`, `budgets`, `errors`, `progress`. Backends are reached only
through `targets`; the bundle format and the fleet protocol come from `runtime`. The library
modules never import click.
"""

__version__ = "0.1.0"
