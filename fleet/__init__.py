"""Simulated fleets: Mininet hypervisors running Goldilocks, driven by scenario timelines.

Pure parts (no I/O): `fleet.spec` (the simulation scenario file) and `fleet.matrix`
(expected vs observed reachability, tables). The shell: `fleet.ovs` (a private Open vSwitch),
`fleet.net` (the Mininet topology, probes, servers), `fleet.context` (relays, agents, logins),
`fleet.control` (the controller process and its API), `fleet.runner` (the timeline).
See docs/simulation.md. `mininet/` (no __init__.py, so `import mininet` is the real Mininet)
holds the runner script and the shipped scenarios.
"""
